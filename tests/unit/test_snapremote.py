"""Shared snapshots (``snapshot.remote``): a pod with no snapshot on its volume starts from the
newest shared one and replays only the changelog after it, building exactly the state a full
replay builds; a damaged shared copy is refused and the next start is taken. The changelog is
the in-memory fake of test_restore."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from infogrowth import snapshot
from infogrowth.config import ConfigError
from infogrowth.index import PartitionState
from infogrowth.messages import changelog_record
from infogrowth.metrics import Metrics
from infogrowth.snapremote import RemoteStore
from tests.fixtures.helpers import make_settings
from tests.fixtures.servers import moto_s3, s3_options
from tests.unit.test_replication import EMBEDDED
from tests.unit.test_restore import FakeReader, _items, _log, _proc, fake_kafka

__all__ = ["fake_kafka"]  # the changelog and control-topic fakes, for every test here


def _grow(n: int, prefix: str) -> None:
    """Append ``n`` kept items to partition 0's changelog."""
    FakeReader.LOG.setdefault(0, [])
    FakeReader.LOG[0] += _log(*(changelog_record(e, epoch=1) for e in _items(n, prefix)))


def _shared(tmp: Path, name: str, remote: Path, **cfg: Any) -> Any:
    proc = _proc(tmp / name, **{"snapshot.remote": f"file://{remote}", **cfg})
    proc.metrics = Metrics(runtime=False)
    return proc


def _source(proc: Any) -> dict[str, float]:
    reg = proc.metrics.registry
    return {
        s: reg.get_sample_value("infogrowth_restores_total", {"source": s})
        for s in ("local", "remote", "changelog")
    }


def _upload(proc: Any) -> None:
    proc.save_snapshot(0)
    assert proc.uploads.wait(30)
    proc.reap_uploads()


def _graph(state: PartitionState, tmp: Path) -> list[bytes]:
    """The saved hnswlib indexes, their capacity field (header bytes 8..16: a loaded index has
    the saved capacity, a replayed one its own doubling) left out."""
    out = []
    for s in state.spaces:
        path = tmp / f"graph-{s}.bin"
        state.indexes[s].save(str(path))
        data = path.read_bytes()
        out.append(data[:8] + data[16:])
    return out


def test_a_new_pod_starts_from_the_shared_snapshot_and_replays_only_the_tail(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "remote"
    _grow(60, "a")
    old = _shared(tmp_path, "old-pod", remote)
    assert old.restore(0) is not None and _source(old)["changelog"] == 1
    _upload(old)
    assert (
        old.metrics.registry.get_sample_value("infogrowth_snapshot_uploads_total", {"result": "ok"})
        == 1
    )
    _grow(15, "b")

    new = _shared(tmp_path, "new-pod", remote)
    state = new.restore(0)
    assert state is not None and state.count == 75
    assert _source(new) == {"local": 0, "remote": 1, "changelog": 0}
    assert new.metrics.registry.get_sample_value("infogrowth_replayed_items_total") == 15
    assert snapshot.current_name(new.snapshot_dir(0)) is not None, "kept on the volume too"

    replay = _proc(tmp_path / "replay").restore(0)  # no snapshot anywhere: the whole changelog
    assert replay is not None
    assert (state.ids, state.labels, state.fixed) == (replay.ids, replay.labels, replay.fixed)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _graph(state, tmp_path / "a") == _graph(replay, tmp_path / "b"), (
        "restore from a shared snapshot == replay, byte for byte"
    )


def test_the_newer_of_the_local_and_the_shared_snapshot_is_used(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    _grow(40, "a")
    a = _shared(tmp_path, "a", remote, **{"snapshot.upload_interval_s": 1e-6})
    a.restore(0)
    _upload(a)  # shared: 40
    b = _shared(tmp_path, "b", remote)
    b.restore(0)
    assert _source(b)["remote"] == 1  # b's volume: 40
    _grow(10, "b")
    a.restore(0)
    _upload(a)  # shared: 50
    b.restore(0)
    assert _source(b)["remote"] == 2, "the shared one is newer than b's own"
    assert b.metrics.registry.get_sample_value("infogrowth_replayed_items_total") == 0
    a.restore(0)
    assert _source(a) == {"local": 2, "remote": 0, "changelog": 1}, "as new as the shared one"


def test_a_damaged_shared_snapshot_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = tmp_path / "remote"
    _grow(30, "a")
    old = _shared(tmp_path, "old", remote)
    old.restore(0)
    _upload(old)
    (shared,) = remote.glob("*/snap-*/space-image.bin")
    data = bytearray(shared.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shared.write_bytes(bytes(data))

    new = _shared(tmp_path, "new", remote)
    with caplog.at_level(logging.WARNING):
        state = new.restore(0)
    assert state is not None and state.count == 30
    assert _source(new) == {"local": 0, "remote": 0, "changelog": 1}
    assert "checksum mismatch" in caplog.text
    assert snapshot.current_name(new.snapshot_dir(0)) is None
    assert not list(new.snapshot_dir(0).glob(".tmp-remote-*")), "the fetched copy is removed"


def test_a_revoke_uploads_the_last_snapshot_whatever_the_interval(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    _grow(20, "a")
    proc = _shared(tmp_path, "p", remote, **{"snapshot.upload_interval_s": 3600})
    proc.restore(0)
    _upload(proc)
    store = RemoteStore(f"file://{remote}", None)
    first = store.snapshots(f"{EMBEDDED}-0")
    _grow(5, "b")
    proc.restore(0)
    proc.save_snapshot(0)  # within the interval: stays local
    assert store.snapshots(f"{EMBEDDED}-0") == first
    proc.dirty[0] = 1
    proc.on_revoke([TopicPartition(EMBEDDED, 0)])
    assert proc.uploads.wait(30)
    newest = store.snapshots(f"{EMBEDDED}-0")[0]
    assert snapshot.name_offset(newest) == 24 and newest != first[0]


def test_the_shared_store_keeps_the_newest_complete_snapshots(tmp_path: Path) -> None:
    """An upload without its manifest (cut short) is never listed; pruning keeps ``keep``
    complete snapshots and drops unfinished uploads older than them."""
    store = RemoteStore(f"file://{tmp_path / 'remote'}", None)
    files = tmp_path / "files"
    files.mkdir()
    (files / "manifest.json").write_text("{}")
    (files / "items.msgpack").write_bytes(b"x")
    for count in (10, 20, 30):
        store.upload(files, "part-0", f"snap-{count:012d}-{count:012d}", keep=2)
    part = tmp_path / "remote" / "part-0"
    (part / f"snap-{5:012d}-{5:012d}").mkdir()  # an unfinished upload, older
    (part / f"snap-{40:012d}-{40:012d}").mkdir()  # one still being written, newer
    assert store.snapshots("part-0") == [f"snap-{c:012d}-{c:012d}" for c in (30, 20)]
    store.prune("part-0", keep=2)
    assert sorted(p.name for p in part.iterdir()) == [
        f"snap-{c:012d}-{c:012d}" for c in (20, 30, 40)
    ]
    assert store.snapshots("nowhere") == []


def test_snapshots_are_shared_through_s3(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "manifest.json").write_text('{"count": 1}')
    (files / "space-image.bin").write_bytes(bytes(range(256)) * 64)
    with moto_s3({"state": {}}) as endpoint:
        settings = make_settings(storage={"options": {"s3": s3_options(endpoint)}})
        store = RemoteStore("s3://state/infogrowth", settings.storage)
        name = f"snap-{1:012d}-{1:012d}"
        assert store.upload(files, "embedded-0", name, keep=2) == 16_384 + 12
        assert store.snapshots("embedded-0") == [name]
        got = tmp_path / "got"
        store.fetch("embedded-0", name, got)
        assert {p.name: p.read_bytes() for p in got.iterdir()} == {
            p.name: p.read_bytes() for p in files.iterdir()
        }


def test_the_shared_store_must_be_a_url() -> None:
    with pytest.raises(ConfigError, match=r"snapshot\.remote"):
        make_settings(**{"snapshot.remote": "/mnt/shared"})


def test_a_slow_or_failing_shared_store_never_holds_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The listing and the fetch run on a thread: restore steps go on returning while they
    wait; a store that fails leaves a warning and the changelog replay."""
    import time

    remote = tmp_path / "remote"
    _grow(20, "a")
    old = _shared(tmp_path, "old", remote)
    old.restore(0)
    _upload(old)
    fetch = RemoteStore.fetch

    def slow_fetch(self: RemoteStore, folder: str, name: str, into: Path) -> int:
        time.sleep(0.6)
        return fetch(self, folder, name, into)

    monkeypatch.setattr(RemoteStore, "fetch", slow_fetch)
    new = _shared(tmp_path, "new", remote)
    new.begin_restore(0)
    t0 = time.monotonic()
    steps = 0
    while not new.restore_step(0.02):
        steps += 1
        assert time.monotonic() - t0 < 30
    assert steps >= 10, "the loop got its turn back while the fetch ran"
    assert _source(new)["remote"] == 1 and new.states[0].count == 20

    def broken(self: RemoteStore, folder: str) -> list[str]:
        raise OSError("store unreachable")

    monkeypatch.setattr(RemoteStore, "snapshots", broken)
    other = _shared(tmp_path, "other", remote)
    with caplog.at_level(logging.WARNING):
        state = other.restore(0)
    assert state is not None and state.count == 20
    assert _source(other)["changelog"] == 1 and "store unreachable" in caplog.text
