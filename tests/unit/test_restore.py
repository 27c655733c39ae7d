"""Select restores in steps, calibration epochs and changelog gaps, without a broker: the
changelog reader and the control topic are replaced by in-memory fakes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from infogrowth import snapshot
from infogrowth.calibrate import Calibration
from infogrowth.kafka import control, restore
from infogrowth.kafka import select as select_mod
from infogrowth.kafka.embed import EmbedProcessor
from infogrowth.kafka.loop import FatalStageError, StaleBatch
from infogrowth.kafka.select import STATE_KEY, EpochAhead, SelectProcessor
from infogrowth.messages import (
    calibration_record,
    changelog_record,
    embedded_record,
    replica_record,
)
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import Embedded, pack
from infogrowth.select import Thresholds
from tests.fixtures.helpers import make_settings
from tests.unit.test_replication import EMBEDDED, Msg, Out

CHANGELOG = "infogrowth.changelog"
DIM = 8
T = Thresholds(policy="all", k=2, epsilon={"image": 0.01})


class FakeReader:
    """Stands in for :class:`reader.PartitionReader`: yields the records of ``LOG[partition]``
    from ``start``; records whether it was closed."""

    LOG: ClassVar[dict[int, list[bytes]]] = {}
    closed: ClassVar[list[int]] = []

    def __init__(self, settings: Any, topic: str, partition: int, start: int = -2) -> None:
        self.partition, self.start = partition, max(start, 0)
        self.end: int | None = None

    def __iter__(self) -> Any:
        records = self.LOG.get(self.partition, [])
        try:
            for offset in range(self.start, len(records)):
                yield Msg(records[offset], self.partition, offset, CHANGELOG)
            self.end = len(records)
        finally:
            FakeReader.closed.append(self.partition)


class FakeWatcher:
    def __init__(self) -> None:
        self.next: Calibration | None = None

    def poll(self) -> Calibration | None:
        cal, self.next = self.next, None
        return cal

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeReader.LOG, FakeReader.closed = {}, []
    monkeypatch.setattr(control, "PartitionReader", FakeReader)
    monkeypatch.setattr(restore, "PartitionReader", FakeReader)
    monkeypatch.setattr(control, "end_offset", lambda *a, **k: 1 << 40)


def _items(n: int, prefix: str, dim: int = DIM) -> list[Embedded]:
    rng = np.random.default_rng(sum(map(ord, prefix)) + n)
    out = []
    for i in range(n):
        v = rng.normal(size=dim).astype(np.float32)
        out.append(Embedded(id=f"{prefix}{i}", vectors={"image": v / np.linalg.norm(v)}))
    return out


def _cal(epoch: int, dim: int = DIM) -> Calibration:
    return Calibration(T, ("image",), {"image": dim}, fingerprint="test", epoch=epoch)


def _proc(tmp: Path, epoch: int = 1, dim: int = DIM, **cfg: Any) -> SelectProcessor:
    settings = make_settings(
        kafka={"topics": {"embedded": EMBEDDED, "changelog": CHANGELOG}},
        **{"index.threads": 1, "snapshot.directory": str(tmp), **cfg},
    )
    proc = SelectProcessor(settings, T, _cal(epoch, dim), "test")
    proc.changelog_id = "changelog-id"
    proc.watcher = FakeWatcher()  # type: ignore[assignment]
    proc.owned = {0}
    return proc


def _log(*records: dict[str, Any]) -> list[bytes]:
    return [pack("changelog", r) for r in records]


def _msg(e: Embedded, offset: int, epoch: int, **extra: Any) -> Msg:
    rec = embedded_record(e, include_image=False, epoch=epoch) | extra
    return Msg(pack("embedded", rec), 0, offset)


def test_a_restore_keeps_only_its_epoch_and_layout_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Records of the previous epoch (before a seed --reset) and another model's dimension are
    skipped with one log line: a new model must not make the restore raise."""
    old, new, wide = _items(3, "old"), _items(4, "new"), _items(2, "wide", dim=DIM * 2)
    FakeReader.LOG[0] = _log(
        *(changelog_record(e, seed=True, epoch=1) for e in old),
        {"v": 1, "state": {"n": 3}, "epoch": 1},
        *(changelog_record(e, seed=True, epoch=2) for e in new),
        *(changelog_record(e, epoch=2) for e in wide),
    )
    proc = _proc(tmp_path, epoch=2)
    with caplog.at_level(logging.WARNING):
        state = proc.restore(0)
    assert state is not None and state.ids == [e.id for e in new]
    assert proc.next_offset[0] == len(FakeReader.LOG[0])
    assert "4 calibration epoch 1" in caplog.text and "2 vectors not matching" in caplog.text


def test_a_restore_runs_in_steps_and_a_revoke_cancels_it(tmp_path: Path) -> None:
    FakeReader.LOG[0] = _log(*(changelog_record(e, epoch=1) for e in _items(50, "a")))
    proc = _proc(tmp_path)
    proc.begin_restore(0)
    assert proc.restoring and proc.restore_step(0.0) == []  # no budget: nothing finishes
    steps = proc.restores[0][1]
    next(steps), next(steps)  # the snapshot step, then the first changelog record
    with pytest.raises(StaleBatch, match="restoring"):
        proc.process([_msg(_items(1, "x")[0], 0, 1)], Out())  # type: ignore[list-item]
    proc.on_revoke([TopicPartition(EMBEDDED, 0)])
    assert not proc.restoring and 0 not in proc.states
    assert FakeReader.closed == [0], "the reader is released at once"
    proc.owned = {0}
    proc.begin_restore(0)
    done: list[int] = []
    while not done:
        done = proc.restore_step(0.05)
    assert done == [0] and proc.states[0].count == 50 and proc.restore_seconds


def test_an_embedded_record_of_an_older_epoch_is_rejected_as_stale(tmp_path: Path) -> None:
    """The documented rule: an older epoch's record is rejected ``stale_epoch`` (carrying its
    text, label, meta and image reference for re-producing); an older epoch's replica is dropped
    silently."""
    proc = _proc(tmp_path, epoch=2)
    a, b, c = _items(3, "e")
    a.text, a.label, a.image_uri = "caption", "c1", "s3://bucket/a.jpg"
    out = Out()
    replica = Msg(pack("embedded", replica_record(c, 0, epoch=1)), 0, 2)
    proc.process([_msg(a, 0, epoch=1), _msg(b, 1, epoch=2), replica], out)  # type: ignore[list-item]
    rejected = [r for _, r in out.on("rejected")]
    assert [(r["id"], r["reason"]) for r in rejected] == [(a.id, "stale_epoch")]
    assert rejected[0]["text"] == "caption" and rejected[0]["label"] == "c1"
    assert rejected[0]["image_uri"] == "s3://bucket/a.jpg"
    assert "epoch 1" in rejected[0]["detail"]
    assert [r["id"] for _, r in out.on("accepted")] == [b.id]
    assert proc.states[0].ids == [b.id] and proc.stale_epoch == 2
    items = [r for _, r in out.on("changelog") if "id" in r]
    assert all(r["epoch"] == 2 for _, r in out.on("changelog")) and len(items) == 1


def test_a_newer_epoch_aborts_the_batch_and_changes_epoch_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = _proc(tmp_path, epoch=1)
    proc.process([_msg(e, i, 1) for i, e in enumerate(_items(3, "a"))], Out())  # type: ignore[misc]
    monkeypatch.setattr(select_mod, "read_calibration", lambda s: _cal(2))
    with pytest.raises(EpochAhead):
        proc.process([_msg(_items(1, "b")[0], 3, epoch=2)], Out())  # type: ignore[list-item]
    proc.on_abort([TopicPartition(EMBEDDED, 0)])
    assert 0 not in proc.states, "no rebuild under the old epoch: the change rebuilds"
    assert proc.maintain() == [0] and proc.epoch == 2 and not proc.states
    lookups: list[int] = []
    monkeypatch.setattr(select_mod, "read_calibration", lambda s: lookups.append(1) or _cal(2))
    out = Out()
    unknown = [_msg(e, 4 + i, epoch=3) for i, e in enumerate(_items(3, "c"))]
    proc.process(unknown, out)  # type: ignore[arg-type]
    assert [r["reason"] for _, r in out.on("rejected")] == ["stale_epoch"] * 3
    assert "not published" in out.on("rejected")[0][1]["detail"] and lookups == [1]


def test_a_new_calibration_on_the_control_topic_drops_every_state(tmp_path: Path) -> None:
    proc = _proc(tmp_path, epoch=1)
    proc.owned = {0, 1}
    for p in (0, 1):
        proc.process(
            [Msg(_msg(e, i, 1)._value, p, i) for i, e in enumerate(_items(2, f"p{p}"))], Out()
        )  # type: ignore[misc]
    assert proc.maintain() == []
    assert isinstance(proc.watcher, FakeWatcher)
    proc.watcher.next = _cal(1)  # the same epoch read again: nothing to do
    assert proc.maintain() == [] and set(proc.states) == {0, 1}
    proc.watcher.next = Calibration(
        T, ("image",), {"image": DIM * 2}, fingerprint="model-2", epoch=2
    )
    assert proc.maintain() == [0, 1]
    assert not proc.states and proc.epoch == 2 and proc.dims == {"image": DIM * 2}
    assert proc.fingerprint == "model-2"


def test_a_gap_in_the_changelog_at_commit_replays_the_partition(tmp_path: Path) -> None:
    """Records another writer put between this stage's transactions (a seed, a zombie) show as
    a first delivered offset beyond the expected one: the partition is replayed, and it is not
    snapshotted meanwhile (the state misses those records)."""
    proc = _proc(tmp_path, **{"snapshot.interval_items": 1})
    FakeReader.LOG[0] = _log(*(changelog_record(e, epoch=1) for e in _items(2, "s")))
    proc.restore(0)
    assert proc.next_offset[0] == 2
    out = Out()
    proc.process([_msg(e, i, 1) for i, e in enumerate(_items(2, "a"))], out)  # type: ignore[misc]
    n = len(out.on("changelog"))
    out.first[(CHANGELOG, 0)], out.offsets[(CHANGELOG, 0)] = 2, 1 + n  # right after the restore
    proc.on_commit(out)  # type: ignore[arg-type]
    proc.snapshots.wait(0, 30)  # a forked child writes it; maintain() publishes it
    assert proc.maintain() == [] and proc.next_offset[0] == 3 + n  # after the commit marker
    current = (tmp_path / f"{EMBEDDED}-0" / "CURRENT").read_text()
    out = Out()
    proc.process([_msg(e, 2 + i, 1) for i, e in enumerate(_items(2, "b"))], out)  # type: ignore[misc]
    out.first[(CHANGELOG, 0)], out.offsets[(CHANGELOG, 0)] = 3 + n + 5, 3 + n + 5 + 3
    proc.on_commit(out)  # type: ignore[arg-type]
    assert not proc.snapshots.busy(0), "due, yet not started"
    assert (tmp_path / f"{EMBEDDED}-0" / "CURRENT").read_text() == current, "due, yet not taken"
    assert proc.maintain() == [0] and proc.maintain() == []


def test_a_snapshot_of_another_epoch_is_refused(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    proc.process([_msg(e, i, 1) for i, e in enumerate(_items(3, "a"))], Out())  # type: ignore[misc]
    state = proc.states[0]
    d = tmp_path / "snap"
    snapshot.save(state, d, "test", epoch=1)
    kw: dict[str, Any] = {"fingerprint": "test", "spaces": state.spaces, "dims": state.dims}
    assert snapshot.load(d, state.cfg, epoch=1, **kw).ids == state.ids
    with pytest.raises(snapshot.SnapshotError, match=r"epoch 1.*epoch 2"):
        snapshot.load(d, state.cfg, epoch=2, **kw)


def test_the_embed_stage_reloads_thresholds_and_tags_records_with_the_epoch() -> None:
    settings = make_settings(kafka={"topics": {"embedded": EMBEDDED}})
    stage = EmbedStage(settings, None, spaces=("image",), dims={"image": DIM})
    proc = EmbedProcessor(settings, stage, T, None, 1)
    proc.watcher = FakeWatcher()
    cal = Calibration(
        Thresholds(policy="all", k=2, delta=0.25, epsilon={"image": 0.02}),
        ("image",),
        {"image": DIM},
        fingerprint=None,
        epoch=3,
    )
    proc.watcher.next = cal
    assert proc.maintain() == []
    assert proc.epoch == 3 and stage.delta == 0.25 and proc.thresholds.epsilon == {"image": 0.02}
    raw = pack("ingest", {"id": "x", "embedding": {"image": [1.0] + [0.0] * (DIM - 1)}})
    out = Out()
    proc.process([Msg(raw, 0, 0, "infogrowth.ingest")], out)  # type: ignore[list-item]
    assert [r["epoch"] for _, r in out.on("embedded")] == [3]


def test_the_embed_stage_refuses_a_calibration_of_another_model() -> None:
    class Enc:
        spaces = ("image",)
        dims: ClassVar[dict[str, int]] = {"image": DIM}
        fingerprint = "model-1"

    settings = make_settings()
    stage = EmbedStage(settings, Enc())  # type: ignore[arg-type]
    proc = EmbedProcessor(settings, stage, T, None, 1)
    with pytest.raises(FatalStageError, match="model-2"):
        proc.calibrate(Calibration(T, ("image",), {"image": DIM}, fingerprint="model-2", epoch=2))


def test_state_records_carry_the_epoch(tmp_path: Path) -> None:
    proc = _proc(tmp_path, epoch=4)
    out = Out()
    proc.process([_msg(_items(1, "a")[0], 0, 4)], out)  # type: ignore[list-item]
    states = [r for _, r in out.on("changelog") if "state" in r]
    assert states and all(r["epoch"] == 4 for r in states)
    assert STATE_KEY == b"\x00state"


def test_read_calibration_waits_for_a_just_committed_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after a seed commits, its markers may not be in the log yet and a read_committed
    read ends before them: the read is repeated until it reaches the high watermark, so a second
    seed sees the first one's epoch (and --reset moves to the next). A read_committed client's
    watermark is the lagging last stable offset as well, so the log end is read uncommitted."""
    records = [pack("calibration", calibration_record(_cal(e))) for e in (1, 2)]
    reads: list[int] = []

    class Settling:
        def __init__(self, settings: Any, topic: str, partition: int) -> None:
            reads.append(1)
            self.high, self.end = 3, (1 if len(reads) == 1 else 3)

        def __iter__(self) -> Any:
            for i, value in enumerate(records[: 1 if self.end == 1 else 2]):
                yield Msg(value, 0, i, "infogrowth.control", control.CALIBRATION_KEY)

    ends: list[bool] = []

    def log_end(*args: Any, committed: bool = True, **kwargs: Any) -> int:
        ends.append(committed)
        return 3

    monkeypatch.setattr(control, "PartitionReader", Settling)
    monkeypatch.setattr(control, "end_offset", log_end)
    cal = control.read_calibration(make_settings())
    assert ends and not any(ends)  # the high watermark, read uncommitted
    assert cal is not None and cal.epoch == 2 and len(reads) == 2


def test_a_rebuild_waits_for_a_zombie_transaction_below_its_own_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zombie froze with its changelog records written, transaction open; this member took the
    partition over and committed after them. The gap replays the partition, and a read_committed
    reader ends at the last stable offset, before the zombie's records: a rebuild read then
    would lose this member's own commits (seen as 254 decisions off in the slow chaos
    scenario). It waits until the transactions open when it starts have ended instead, giving
    its turn to the other restores meanwhile."""
    monkeypatch.setattr(restore, "SETTLE_POLL_S", 0.0)
    proc = _proc(tmp_path)
    proc.owned = {0, 1}
    own = _items(2, "s")
    FakeReader.LOG[0] = _log(*(changelog_record(e, epoch=1) for e in own))
    FakeReader.LOG[1] = _log(*(changelog_record(e, epoch=1) for e in _items(3, "other")))
    proc.restore(0)
    out = Out()
    proc.process([_msg(e, i, 1) for i, e in enumerate(_items(2, "a"))], out)  # type: ignore[misc]
    written = [r for _, r in out.on("changelog")]
    zombie = 3  # the zombie's open records sit at offsets 2..4
    first = 2 + zombie
    last = first + len(written) - 1
    out.first[(CHANGELOG, 0)], out.offsets[(CHANGELOG, 0)] = first, last
    proc.on_commit(out)  # type: ignore[arg-type]
    assert proc.covered[0] == last
    with pytest.raises(StaleBatch, match="await a rebuild"):
        proc.process([_msg(_items(1, "x")[0], 2, 1)], Out())  # type: ignore[list-item]
    assert proc.maintain() == [0]
    ends = {0: (2, last + 2), 1: (3, 3)}  # (last stable offset, high watermark) per partition
    monkeypatch.setattr(
        control,
        "end_offset",
        lambda s, t, p, *a, committed=True, **k: ends[p][0] if committed else ends[p][1],
    )
    proc.begin_restore(0)
    proc.begin_restore(1)
    done: list[int] = []
    for _ in range(5):
        done += proc.restore_step(0.01)
    assert done == [1], "partition 1 restores while partition 0 waits for the zombie"
    # The coordinator aborts the zombie's transaction: its records become invisible, the last
    # stable offset reaches the high watermark. (The fake reader cannot hold aborted records;
    # another epoch's records are skipped alike.)
    aborted = [pack("changelog", {"v": 1, "state": {}, "epoch": 0})] * zombie
    FakeReader.LOG[0] += aborted + [pack("changelog", r) for r in written]
    ends[0] = (last + 2, last + 2)
    while 0 not in done:
        done += proc.restore_step(0.05)
    assert proc.states[0].count == 4, "this member's own commits are in the rebuilt state"
    assert proc.restores == {} and 0 not in proc.covered


def test_a_rebuild_after_an_abort_that_cannot_see_its_own_commits_is_deferred(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebuild after an abort runs at once, inside the poll loop, so it never waits: when
    the committed view ends before this member's own commits, nothing is installed and the
    partition is rebuilt in steps instead (which waits)."""
    proc = _proc(tmp_path)
    FakeReader.LOG[0] = _log(*(changelog_record(e, epoch=1) for e in _items(2, "s")))
    proc.restore(0)
    proc.covered[0] = 9  # committed by this member beyond what the fake log shows
    proc.on_abort([TopicPartition(EMBEDDED, 0)])
    assert 0 not in proc.states and proc.replay == {0}
    with pytest.raises(StaleBatch, match="await a rebuild"):
        proc.process([_msg(_items(1, "x")[0], 2, 1)], Out())  # type: ignore[list-item]
    assert proc.maintain() == [0]
    proc.on_revoke([TopicPartition(EMBEDDED, 0)])
    assert 0 not in proc.covered, "a new owner's commits are its own business"


def test_outputs_name_the_calibration_epoch_they_were_decided_under(tmp_path: Path) -> None:
    """After a seed --reset the trainer must be able to tell the new index's decisions from
    the old one's (an input produced again is kept again under the new epoch)."""
    FakeReader.LOG[0] = []
    proc = _proc(tmp_path, epoch=3)
    proc.restore(0)
    out = Out()
    proc.process([_msg(e, i, 3) for i, e in enumerate(_items(3, "e"))], out)  # type: ignore[arg-type]
    t = proc.settings.kafka.topics
    decided = [r for topic, _, r in out.records if topic in (t.accepted, t.relabeled, t.rejected)]
    assert len(decided) == 3 and {r["epoch"] for r in decided} == {3}
