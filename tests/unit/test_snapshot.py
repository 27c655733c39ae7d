"""Snapshot → restore reproduces decisions; damaged or foreign snapshots are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infogrowth import snapshot
from infogrowth.pipeline import Curator
from infogrowth.select import Selector
from tests.fixtures.data import clustered
from tests.fixtures.helpers import make_settings, to_samples

CFG: dict[str, Any] = {"select.keep_fraction": 0.5, "select.batch_size": 25}


def _curator(exact_below: int = 20_000) -> Curator:
    settings = make_settings(**CFG, **{"index.exact_below": exact_below})
    cur = Curator(settings, None)
    cur.seed(to_samples(clustered(80, seed=20, prefix="seed").samples, settings))
    return cur


def _decide(cur: Curator, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    items = to_samples(rows, cur.settings)
    out = []
    for lo in range(0, len(items), 25):
        out += [(o.id, o.decision, o.reason, o.gain) for o in cur.process(items[lo : lo + 25])]
    return out


def _restored(cur: Curator, path: Path) -> Curator:
    fresh = _curator(cur.settings.index.exact_below)
    assert fresh.state is not None and fresh.thresholds is not None
    state = snapshot.load(
        path,
        cur.settings.index,
        fingerprint=cur.embed.fingerprint,
        spaces=fresh.state.spaces,
        dims=fresh.state.dims,
    )
    fresh.state = state
    fresh.selector = Selector(
        state, fresh.thresholds, fresh.settings.select, fresh.settings.clean, True
    )
    return fresh


@pytest.mark.parametrize("exact_below", [20_000, 0])
def test_restore_reproduces_decisions(tmp_path: Path, exact_below: int) -> None:
    rows = clustered(400, dup_rate=0.1, flip_rate=0.05, seed=21).samples
    reference = _decide(_curator(exact_below), rows)

    cur = _curator(exact_below)
    first = _decide(cur, rows[:200])
    assert cur.state is not None
    info = snapshot.save(cur.state, tmp_path, cur.embed.fingerprint)
    assert info.count == cur.state.count
    restored = _restored(cur, tmp_path)
    assert restored.state is not None and restored.state.ids == cur.state.ids
    assert first + _decide(restored, rows[200:]) == reference


def test_corrupted_snapshot_is_detected(tmp_path: Path) -> None:
    cur = _curator()
    _decide(cur, clustered(50, seed=22).samples)
    assert cur.state is not None
    info = snapshot.save(cur.state, tmp_path, cur.embed.fingerprint)
    target = info.path / "space-image.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(snapshot.SnapshotError, match="checksum"):
        _restored(cur, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "manifest", "delete", "current"])
def test_damaged_snapshot_is_refused(tmp_path: Path, damage: str) -> None:
    cur = _curator()
    _decide(cur, clustered(30, seed=23).samples)
    assert cur.state is not None
    info = snapshot.save(cur.state, tmp_path, cur.embed.fingerprint)
    if damage == "truncate":
        p = info.path / "items.msgpack"
        p.write_bytes(p.read_bytes()[:10])
    elif damage == "manifest":
        (info.path / "manifest.json").write_text("{not json")
    elif damage == "delete":
        (info.path / "space-text.bin").unlink()
    else:
        (tmp_path / "CURRENT").unlink()
    with pytest.raises(snapshot.SnapshotError):
        _restored(cur, tmp_path)


def test_foreign_model_snapshot_is_refused(tmp_path: Path) -> None:
    cur = _curator()
    assert cur.state is not None
    snapshot.save(cur.state, tmp_path, "some-other-model")
    with pytest.raises(snapshot.SnapshotError, match="model"):
        _restored(cur, tmp_path)


def test_snapshots_are_pruned_and_current_is_latest(tmp_path: Path) -> None:
    cur = _curator()
    assert cur.state is not None
    for i in range(4):
        _decide(cur, clustered(10, seed=30 + i, prefix=f"b{i}-").samples)
        snapshot.save(cur.state, tmp_path, cur.embed.fingerprint, keep=2)
    snaps = sorted(p.name for p in tmp_path.glob("snap-*"))
    assert len(snaps) == 2
    assert (tmp_path / "CURRENT").read_text() == snaps[-1]
    assert not list(tmp_path.glob(".tmp-*"))
