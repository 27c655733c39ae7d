"""Exactly-once holes (issue 13) that show without a broker: dirty close, stale snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from infogrowth import snapshot
from infogrowth.kafka.restore import Layout, apply_items
from infogrowth.kafka.select import SelectProcessor
from infogrowth.schema import Embedded
from infogrowth.select import Thresholds
from tests.fixtures.helpers import make_settings
from tests.unit.test_replication import EMBEDDED, Out, _msg

CHANGELOG = "infogrowth.changelog"


def _proc(tmp: Path) -> SelectProcessor:
    settings = make_settings(
        kafka={"topics": {"embedded": EMBEDDED, "changelog": CHANGELOG}},
        **{"index.threads": 1, "snapshot.directory": str(tmp)},
    )
    t = Thresholds(policy="all", k=2, epsilon={"image": 0.01})
    proc = SelectProcessor(settings, t, None, "test")
    proc.owned = {0}
    proc.changelog_id = "changelog-id"  # no broker to ask
    return proc


def _items(n: int, prefix: str) -> list[Embedded]:
    rng = np.random.default_rng(sum(map(ord, prefix)) + n)
    out = []
    for i in range(n):
        v = rng.normal(size=8).astype(np.float32)
        out.append(Embedded(id=f"{prefix}{i}", vectors={"image": v / np.linalg.norm(v)}))
    return out


def _batch(proc: SelectProcessor, items: list[Embedded], first: int) -> Out:
    out = Out()
    msgs = [_msg(e, 0, first + i) for i, e in enumerate(items)]
    proc.process(msgs, out)  # type: ignore[arg-type]
    return out


def _commit(proc: SelectProcessor, out: Out) -> None:
    n = sum(1 for t, _, _ in out.records if t == CHANGELOG)
    out.offsets[(CHANGELOG, 0)] = proc.states[0].changelog_offset + n
    proc.on_commit(out)  # type: ignore[arg-type]


def test_close_after_a_failed_batch_drops_the_state_and_keeps_the_committed_snapshot(
    tmp_path: Path,
) -> None:
    proc = _proc(tmp_path)
    out = _batch(proc, _items(5, "a"), 0)
    _commit(proc, out)
    proc.save_snapshot(0)
    committed = (proc.snapshot_dir(0) / "CURRENT").read_text()
    _batch(proc, _items(5, "b"), 5)  # the transaction never commits (fenced, fatal)
    assert proc.states[0].count == 10
    proc.close()
    assert 0 not in proc.states, "uncommitted state must be dropped, not kept"
    assert (proc.snapshot_dir(0) / "CURRENT").read_text() == committed
    proc.on_revoke([TopicPartition(EMBEDDED, 0)])  # consumer.close() runs the revoke after
    assert (proc.snapshot_dir(0) / "CURRENT").read_text() == committed


def test_revoke_after_a_failed_batch_does_not_snapshot(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    _batch(proc, _items(5, "a"), 0)
    proc.on_revoke([TopicPartition(EMBEDDED, 0)])
    assert not (proc.snapshot_dir(0) / "CURRENT").exists()


def test_close_after_a_commit_snapshots_the_committed_state(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    _commit(proc, _batch(proc, _items(5, "a"), 0))
    proc.close()
    assert (proc.snapshot_dir(0) / "CURRENT").read_text().startswith("snap-000000000005-")


def test_a_snapshot_names_its_changelog_topic_and_calibration(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    _commit(proc, _batch(proc, _items(5, "a"), 0))
    state = proc.states[0]
    offset = state.changelog_offset
    assert offset >= 5
    d = tmp_path / "snap"
    snapshot.save(state, d, "test", topic_id="T1", calibration="C1")
    kw = {"fingerprint": "test", "spaces": state.spaces, "dims": state.dims}
    ok = snapshot.load(d, state.cfg, topic_id="T1", calibration="C1", end_offset=offset + 2, **kw)
    assert ok.ids == state.ids
    with pytest.raises(snapshot.SnapshotError, match="topic id"):
        snapshot.load(d, state.cfg, topic_id="T2", calibration="C1", **kw)
    with pytest.raises(snapshot.SnapshotError, match="calibration"):
        snapshot.load(d, state.cfg, topic_id="T1", calibration="C2", **kw)
    with pytest.raises(snapshot.SnapshotError, match="calibration"):
        snapshot.load(d, state.cfg, topic_id="T1", calibration=None, **kw)
    with pytest.raises(snapshot.SnapshotError, match="beyond the log end"):
        snapshot.load(d, state.cfg, topic_id="T1", calibration="C1", end_offset=offset, **kw)


def test_select_snapshots_carry_the_topic_id_and_calibration(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    proc.calibration_id = "C1"
    _commit(proc, _batch(proc, _items(5, "a"), 0))
    proc.save_snapshot(0)
    cur = proc.snapshot_dir(0) / (proc.snapshot_dir(0) / "CURRENT").read_text()
    manifest = json.loads((cur / "manifest.json").read_text())
    assert manifest["changelog_topic_id"] == "changelog-id"
    assert manifest["calibration"] == "C1"


@pytest.mark.parametrize(
    ("values", "finite"),
    [([1e-46, 0.0, 0.0, 0.0], False), ([3e38, 3e38, 3e38, 3e38], True)],
    ids=["underflows-to-zero", "norm-overflows-float32"],
)
def test_precomputed_vectors_normalise_or_are_rejected_under_their_id(
    values: list[float], finite: bool
) -> None:
    """A float32 vector that becomes zero (or whose norm overflows float32) must not turn into
    NaN (or zeros) on normalisation: it is rejected by the embed stage under its own id, never
    later by select under an ``@embedded:p:o`` position."""
    import msgpack

    from infogrowth.messages import Outcome
    from infogrowth.pipeline import EmbedStage
    from infogrowth.schema import Malformed, parse_msgpack_sample

    settings = make_settings(**{"clean.enabled": False})
    raw = msgpack.packb({"v": 1, "id": "x", "text": "t", "embedding": {"image": values}})
    item = parse_msgpack_sample(raw, settings.limits, {"topic": "ingest", "partition": 0})
    if isinstance(item, Malformed):
        assert not finite and item.id == "x" and "zero" in item.detail
        return
    stage = EmbedStage(settings, None, spaces=("image",), dims={"image": 4})
    (out,) = stage.process([item])
    if finite:
        assert isinstance(out, Embedded)
        v = out.vectors["image"]
        assert np.all(np.isfinite(v)) and abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    else:
        assert isinstance(out, Outcome) and out.id == "x" and out.reason == "malformed"


def test_replay_skips_an_id_repeated_within_one_chunk(tmp_path: Path) -> None:
    """Changelog replay: the same id twice in one chunk (a replica and the item, a re-seed)
    enters the index once."""
    proc = _proc(tmp_path)
    a, b = _items(2, "r")
    layout = Layout("test", spaces=("image",), dims={"image": 8})
    state = apply_items(None, [(a, 0), (b, 1), (a, 2)], layout, proc.settings)
    assert state.ids == [a.id, b.id] and state.changelog_offset == 2
    state = apply_items(state, [(b, 3), (a, 4)], layout, proc.settings)
    assert state.count == 2 and state.changelog_offset == 4


def test_only_fatal_errors_a_new_producer_recovers_from_replace_it() -> None:
    """A fenced producer must exit (another instance owns its transactional id now); a fatal
    transaction-state error after a long broker outage is recovered by a new producer."""
    from confluent_kafka import KafkaError

    from infogrowth.kafka.loop import _replaceable

    assert not _replaceable(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    assert not _replaceable(KafkaError(KafkaError.PRODUCER_FENCED, "fenced", fatal=True))
    assert not _replaceable(
        KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "denied", fatal=True)
    )
    assert _replaceable(KafkaError(KafkaError.INVALID_TXN_STATE, "state", fatal=True))
    assert _replaceable(KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, "epoch", fatal=True))
