"""Snapshots written by a forked child: what it publishes, what a failure leaves, and the select
stage's trigger around it (one in flight, failures counted, close waits)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infogrowth import snapfork, snapshot
from infogrowth.config import IndexConfig
from infogrowth.index import HEADER_BYTES, PartitionState, saved_count
from infogrowth.metrics import Metrics
from infogrowth.snapfork import Result, SnapshotWriter
from tests.unit.test_eos import CHANGELOG, _batch, _commit, _items, _proc

pytestmark = pytest.mark.skipif(not snapfork.fork_available(), reason="needs fork and /proc")

DIMS = {"image": 16, "text": 8}


def _state(n: int, seed: int = 0, exact_below: int = 50) -> PartitionState:
    cfg = IndexConfig(threads=1, exact_below=exact_below)
    st = PartitionState.empty(tuple(DIMS), DIMS, cfg)
    _grow(st, n, seed)
    return st


def _grow(st: PartitionState, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vecs = {}
    for s, d in DIMS.items():
        v = rng.normal(size=(n, d)).astype(np.float32)
        vecs[s] = v / np.linalg.norm(v, axis=1, keepdims=True)
    start = st.count
    st.add([f"i{start + i}" for i in range(n)], vecs, [f"l{i % 3}" for i in range(n)])
    st.changelog_offset += n


def _load(d: Path, st: PartitionState) -> PartitionState:
    return snapshot.load(d, st.cfg, fingerprint="fp", spaces=st.spaces, dims=st.dims)


def _results(w: SnapshotWriter, timeout: float = 30.0) -> list[Result]:
    for p in w.in_flight:
        w.wait(p, timeout)
    return w.poll()


def test_the_child_writes_exactly_the_state_at_the_fork(tmp_path: Path) -> None:
    st = _state(300)
    frozen_ids, frozen_offset = list(st.ids), st.changelog_offset
    w = SnapshotWriter()
    assert w.forking
    stall = w.start(3, st, tmp_path / "a", "fp", epoch=2)
    assert w.busy(3) and stall >= 0
    _grow(st, 100, seed=1)  # the parent goes on while the child writes
    [r] = _results(w)
    assert r.forked and r.error is None and r.info is not None and r.partition == 3
    assert not w.busy(3)
    assert (r.info.count, r.info.changelog_offset) == (300, frozen_offset)
    loaded = snapshot.load(
        tmp_path / "a", st.cfg, fingerprint="fp", spaces=st.spaces, dims=st.dims, epoch=2
    )
    assert loaded.ids == frozen_ids and loaded.changelog_offset == frozen_offset
    for s in st.spaces:
        ids = np.arange(300)
        assert np.array_equal(loaded.indexes[s].get(ids), st.indexes[s].get(ids))
    assert not list((tmp_path / "a").glob(".tmp-*"))


def test_forked_and_in_process_snapshots_are_the_same_bytes(tmp_path: Path) -> None:
    st = _state(200)
    w = SnapshotWriter()
    w.start(0, st, tmp_path / "fork", "fp", topic_id="T", calibration="C")
    [r] = _results(w)
    assert r.info is not None
    info = snapshot.save(st, tmp_path / "inproc", "fp", topic_id="T", calibration="C")
    a = json.loads((r.info.path / "manifest.json").read_text())
    b = json.loads((info.path / "manifest.json").read_text())
    assert a["files"] == b["files"] and a["sizes"] == b["sizes"]
    assert r.info.bytes == info.bytes == sum(a["sizes"].values())
    for f in a["files"]:  # hashed while written == hashed after
        assert snapshot._sha256(r.info.path / f) == a["files"][f]


def test_a_failed_child_leaves_the_previous_snapshot_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = _state(120)
    first = snapshot.save(st, tmp_path, "fp")
    _grow(st, 10, seed=2)

    def broken(state: PartitionState) -> bytes:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot, "items_bytes", broken)  # the child inherits the patch
    w = SnapshotWriter()
    w.start(0, st, tmp_path, "fp")
    [r] = _results(w)
    assert r.info is None and r.forked
    assert r.error is not None and "No space left" in r.error and "exit status 1" in r.error
    assert (tmp_path / "CURRENT").read_text() == first.path.name
    assert not list(tmp_path.glob(".tmp-*")), "the failed child's files are removed"
    assert _load(tmp_path, st).count == 120


def test_a_child_killed_midway_is_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = _state(60)

    def dies(state: PartitionState) -> bytes:
        os.kill(os.getpid(), 9)
        return b""

    monkeypatch.setattr(snapshot, "items_bytes", dies)
    w = SnapshotWriter()
    w.start(0, st, tmp_path, "fp")
    [r] = _results(w)
    assert r.info is None and r.error is not None and "signal 9" in r.error
    assert not (tmp_path / "CURRENT").exists()


def test_a_child_past_the_deadline_is_killed_and_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = _state(60)

    def hangs(state: PartitionState) -> bytes:
        time.sleep(60)
        return b""

    monkeypatch.setattr(snapshot, "items_bytes", hangs)
    w = SnapshotWriter()
    w.start(0, st, tmp_path, "fp")
    pid = w._children[0].pid
    t0 = time.monotonic()
    w.close(0.3)
    assert time.monotonic() - t0 < 10
    [r] = w.poll()
    assert r.info is None and r.error is not None and r.error.startswith("abandoned")
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped, no zombie left
    assert not (tmp_path / "CURRENT").exists() and not list(tmp_path.glob(".tmp-*"))


def test_one_snapshot_in_flight_per_partition(tmp_path: Path) -> None:
    st = _state(50)
    w = SnapshotWriter()
    w.start(0, st, tmp_path / "p0", "fp")
    with pytest.raises(RuntimeError, match="already"):
        w.start(0, st, tmp_path / "p0", "fp")
    w.start(1, st, tmp_path / "p1", "fp")  # another partition may write alongside
    assert w.in_flight == [0, 1]
    assert sorted(r.partition for r in _results(w) if r.info is not None) == [0, 1]


@pytest.mark.parametrize("how", ["setting", "platform", "fork-fails"])
def test_in_process_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "platform":
        monkeypatch.setattr(snapfork, "fork_available", lambda: False)
    if how == "fork-fails":

        def no_fork() -> int:
            raise OSError(12, "Cannot allocate memory")

        monkeypatch.setattr(os, "fork", no_fork)
    w = SnapshotWriter(fork=how != "setting" and how != "platform")
    st = _state(40)
    stall = w.start(0, st, tmp_path, "fp")
    assert not w.busy(0), "written before start returns"
    [r] = w.poll()
    assert not r.forked and r.info is not None and r.stall_s == stall == r.write_s
    assert _load(tmp_path, st).ids == st.ids


def test_publish_refuses_files_that_disagree_with_the_manifest(tmp_path: Path) -> None:
    st = _state(30)
    pending = snapshot.prepare(st, tmp_path, "fp")
    snapshot.write(st, pending)
    with (pending.tmp / "items.msgpack").open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(snapshot.SnapshotError, match=r"items\.msgpack holds"):
        snapshot.publish(pending)
    other = snapshot.prepare(st, tmp_path / "b", "fp")
    with pytest.raises(snapshot.SnapshotError, match="no complete manifest"):
        snapshot.publish(other)  # nothing written
    assert not (tmp_path / "CURRENT").exists()


def test_a_truncated_hnswlib_file_is_caught(tmp_path: Path) -> None:
    st = _state(80)
    path = tmp_path / "i.bin"
    st.indexes["image"].save(str(path))
    data = path.read_bytes()
    assert saved_count(data[:HEADER_BYTES], len(data)) == 80
    assert saved_count(data[:HEADER_BYTES], len(data) // 2) is None
    assert saved_count(data[:10], len(data)) is None
    with pytest.raises(snapshot.SnapshotError, match="expected 80"):
        snapshot.check_index_bytes(data[:HEADER_BYTES], len(data) // 2, st.indexes["image"])


# -- the select stage's trigger ------------------------------------------------------------


def test_the_stage_snapshots_in_the_background_and_counts_the_stall(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    proc.metrics = Metrics(runtime=False)
    _commit(proc, _batch(proc, _items(5, "a"), 0))
    proc.save_snapshot(0, wait=False)
    assert proc.snapshots.busy(0) and proc.dirty[0] == 0
    proc.save_snapshot(0, wait=False)  # one in flight: nothing more is started
    proc.snapshots.wait(0, 30)
    proc.reap_snapshots()
    cur = (proc.snapshot_dir(0) / "CURRENT").read_text()
    assert cur.startswith("snap-000000000005-")
    reg = proc.metrics.registry
    assert reg.get_sample_value("infogrowth_snapshot_stall_seconds_count") == 1
    assert reg.get_sample_value("infogrowth_snapshot_duration_seconds_count") == 1
    assert reg.get_sample_value("infogrowth_snapshot_bytes", {"partition": "0"}) > 0
    assert reg.get_sample_value("infogrowth_snapshot_failures_total") == 0


def test_a_failed_snapshot_is_counted_and_its_changes_stay_dirty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = _proc(tmp_path)
    proc.metrics = Metrics(runtime=False)

    def broken(state: PartitionState) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(snapshot, "items_bytes", broken)
    _commit(proc, _batch(proc, _items(5, "a"), 0))  # never snapshotted: due at once
    assert proc.snapshots.busy(0) and proc.dirty[0] == 0
    held = proc._snapshot_dirty[0]
    assert held > 0
    proc.snapshots.wait(0, 30)
    proc.reap_snapshots()
    assert proc.metrics.registry.get_sample_value("infogrowth_snapshot_failures_total") == 1
    assert proc.dirty[0] == held, "the failed snapshot's changes are still to be saved"
    assert not (proc.snapshot_dir(0) / "CURRENT").exists()
    monkeypatch.undo()
    proc._maybe_snapshot(0)  # due by items, but a failure waits an interval first
    assert not proc.snapshots.busy(0) and proc.dirty[0] == held
    proc.close()  # shutdown does not wait an interval
    assert (proc.snapshot_dir(0) / "CURRENT").read_text().startswith("snap-000000000005-")


def test_close_waits_for_the_child_in_flight(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    _commit(proc, _batch(proc, _items(5, "a"), 0))
    proc.save_snapshot(0, wait=False)
    assert proc.snapshots.busy(0)
    proc.close()
    assert not proc.snapshots.in_flight
    assert (proc.snapshot_dir(0) / "CURRENT").read_text().startswith("snap-000000000005-")


def test_an_epoch_change_abandons_the_old_epochs_snapshot_uncounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infogrowth.calibrate import Calibration
    from infogrowth.select import Thresholds

    proc = _proc(tmp_path)
    proc.metrics = Metrics(runtime=False)

    def hangs(state: PartitionState) -> bytes:
        time.sleep(60)
        return b""

    monkeypatch.setattr(snapshot, "items_bytes", hangs)
    _commit(proc, _batch(proc, _items(5, "a"), 0))
    assert proc.snapshots.busy(0)
    cal = Calibration(
        Thresholds(policy="all", k=2, epsilon={"image": 0.01}), ("image",), {"image": 8}, epoch=4
    )
    proc.change_epoch(cal)
    assert not proc.snapshots.in_flight and proc.epoch == 4
    assert proc.metrics.registry.get_sample_value("infogrowth_snapshot_failures_total") == 0
    assert not (proc.snapshot_dir(0) / "CURRENT").exists()
    assert not list(proc.snapshot_dir(0).glob(".tmp-*"))


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_writer_dies_with_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage killed while its child writes must not leave the child holding the image alone."""

    def hangs(state: PartitionState) -> bytes:
        time.sleep(60)
        return b""

    monkeypatch.setattr(snapshot, "items_bytes", hangs)
    st = _state(40)
    r, w = os.pipe()
    stage = os.fork()
    if stage == 0:  # the "stage": starts a writer, says its pid, waits to be killed
        code = 1
        try:
            writer = SnapshotWriter()
            writer.start(0, st, tmp_path, "fp")
            os.write(w, str(writer._children[0].pid).encode())
            time.sleep(60)
        finally:
            os._exit(code)
    os.close(w)
    try:
        child = int(os.read(r, 64))
    finally:
        os.close(r)
    assert not _gone_or_zombie(child)
    os.kill(stage, 9)
    os.waitpid(stage, 0)
    deadline = time.monotonic() + 10
    while not _gone_or_zombie(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone_or_zombie(child), "the writer outlived the stage"


def test_a_slow_fork_is_logged_once_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(snapfork, "SLOW_STALL_S", -1.0)
    w = SnapshotWriter()
    st = _state(20)
    with caplog.at_level("WARNING", logger="infogrowth.snapfork"):
        w.start(0, st, tmp_path / "a", "fp")
        w.start(1, st, tmp_path / "b", "fp")
        _results(w)
    hints = [r for r in caplog.records if "glibc.malloc.hugetlb" in r.getMessage()]
    assert len(hints) == 1


def test_close_is_bounded_by_the_drain_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung writer in flight and the final snapshot share one deadline at shutdown."""
    from tests.fixtures.helpers import make_settings

    proc = _proc(tmp_path)
    proc.settings = make_settings(
        kafka={"topics": proc.settings.kafka.topics.model_dump(), "drain_timeout_s": 1.0},
        **{"index.threads": 1, "snapshot.directory": str(tmp_path)},
    )
    proc.metrics = Metrics(runtime=False)

    def hangs(state: PartitionState) -> bytes:
        time.sleep(60)
        return b""

    monkeypatch.setattr(snapshot, "items_bytes", hangs)
    _commit(proc, _batch(proc, _items(5, "a"), 0))  # a hung writer in flight
    out = _batch(proc, _items(5, "b"), 5)  # more changes, committed: close wants a final one
    out.first[(CHANGELOG, 0)] = proc.next_offset[0]  # right after the last commit: no gap
    _commit(proc, out)
    assert 0 not in proc.replay
    assert proc.snapshots.busy(0) and proc.dirty[0] > 0
    t0 = time.monotonic()
    proc.close()
    assert time.monotonic() - t0 < 1.8  # one deadline, not one per wait
    assert not proc.snapshots.in_flight
    assert proc.metrics.registry.get_sample_value("infogrowth_snapshot_failures_total") >= 1


def test_a_child_reaped_elsewhere_is_judged_by_its_report(tmp_path: Path) -> None:
    st = _state(30)
    w = SnapshotWriter()
    w.start(0, st, tmp_path, "fp")
    os.waitpid(w._children[0].pid, 0)  # e.g. a library's waitpid(-1)
    [r] = w.poll()
    assert r.info is not None and r.error is None
    assert _load(tmp_path, st).ids == st.ids


def test_the_rebuild_after_an_abort_starts_from_the_snapshot_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child writing a committed snapshot ends before the aborted partition is rebuilt:
    the rebuild starts from that snapshot, and the dropped state's pages are not held by the
    child while the new state loads."""
    from confluent_kafka import TopicPartition

    from tests.unit.test_replication import EMBEDDED

    _slow_snapshots(monkeypatch, 0.5)
    proc = _proc(tmp_path)
    _commit(proc, _batch(proc, _items(5, "a"), 0))  # never snapshotted: one starts at once
    assert proc.snapshots.busy(0)
    seen: list[tuple[bool, str | None]] = []

    def restore(p: int) -> None:
        seen.append((proc.snapshots.busy(p), snapshot.current_name(proc.snapshot_dir(p))))

    monkeypatch.setattr(proc, "restore", restore)
    _batch(proc, _items(3, "b"), 5)  # its transaction aborts
    proc.on_abort([TopicPartition(EMBEDDED, 0)])
    assert len(seen) == 1
    busy, current = seen[0]
    assert not busy and current is not None and current.startswith("snap-000000000005-")


# -- found by review: what a revoke, an abort, a gap or a shutdown may snapshot, and when ----


class _NoWatcher:
    def poll(self) -> None:
        return None

    def close(self) -> None:
        pass


def _hangs(state: PartitionState) -> bytes:
    time.sleep(600)
    return b""


def _with(proc: Any, tmp_path: Path, **cfg: Any) -> Any:
    """``proc`` with settings changed (``kafka.drain_timeout_s`` as ``drain``)."""
    from tests.fixtures.helpers import make_settings

    kafka = {"topics": proc.settings.kafka.topics.model_dump()}
    if "drain" in cfg:
        kafka["drain_timeout_s"] = cfg.pop("drain")
    proc.settings = make_settings(
        kafka=kafka, **{"index.threads": 1, "snapshot.directory": str(tmp_path), **cfg}
    )
    return proc


def _slow_snapshots(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every snapshot write takes ``seconds`` longer (in the forked child too)."""
    items_bytes = snapshot.items_bytes

    def slow(state: PartitionState) -> bytes:
        time.sleep(seconds)
        return items_bytes(state)

    monkeypatch.setattr(snapshot, "items_bytes", slow)


def _dirty_partitions(proc: Any, parts: list[int]) -> Any:
    """``proc`` owning ``parts``, each with a state and changes not yet snapshotted."""
    for p in parts:
        proc.states[p] = _state(30, seed=p)
        proc.dirty[p] = 5
    proc.owned = set(parts)
    return proc


def test_a_state_missing_changelog_records_is_never_snapshotted_before_its_rebuild(
    tmp_path: Path,
) -> None:
    """A gap at commit (someone else wrote to the changelog) queues a rebuild; if the stage
    stops between that decision and the rebuild (the committed-offsets lookup fails), the
    state that misses the foreign records must not become the snapshot a restore trusts."""
    proc = _proc(tmp_path)
    proc.watcher = _NoWatcher()
    _commit(proc, _batch(proc, _items(5, "a"), 0))
    proc.snapshots.wait(0, 30)
    proc.reap_snapshots()
    before = snapshot.current_name(proc.snapshot_dir(0))
    out = _batch(proc, _items(5, "b"), 5)
    gap_first = proc.next_offset[0] + 8  # 8 records of another producer in between
    n = sum(1 for t, _, _ in out.records if t == CHANGELOG)
    out.offsets[(CHANGELOG, 0)] = gap_first + n - 1
    out.first[(CHANGELOG, 0)] = gap_first
    proc.on_commit(out)
    assert proc.replay == {0}
    assert proc.maintain() == [0]
    proc.close()  # the loop failed before the rebuild began
    assert snapshot.current_name(proc.snapshot_dir(0)) == before


class _Uploads:
    def __init__(self) -> None:
        self.submitted: list[tuple[int, str]] = []

    def submit(self, p: int, path: Path, folder: str) -> None:
        self.submitted.append((p, Path(path).name))

    def poll(self) -> list[Any]:
        return []

    def running(self) -> None:
        return None

    def close(self, timeout: float) -> bool:
        return True


def test_a_revoke_hands_over_the_snapshot_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no change since the snapshot being written, the revoke still waits for it and
    shares it: the next owner starts from the newest committed state."""
    from confluent_kafka import TopicPartition

    from tests.unit.test_replication import EMBEDDED

    _slow_snapshots(monkeypatch, 0.5)
    proc = _proc(tmp_path)
    proc.uploads = _Uploads()
    proc.remote = object()
    monkeypatch.setattr(proc, "_shared_folder", lambda p: f"tid/{p}")
    _commit(proc, _batch(proc, _items(5, "a"), 0))
    proc.snapshots.wait(0, 30)
    proc.reap_snapshots()
    out = _batch(proc, _items(5, "b"), 5)
    out.first[(CHANGELOG, 0)] = proc.next_offset[0]
    proc.last_snapshot[0] = 0  # due by time
    _commit(proc, out)
    assert proc.snapshots.busy(0) and proc.dirty[0] == 0
    proc.on_revoke([TopicPartition(EMBEDDED, 0)])
    assert not proc.snapshots.busy(0)
    newest = snapshot.current_name(proc.snapshot_dir(0))
    assert newest is not None and newest.startswith("snap-000000000010-")
    assert (0, newest) in proc.uploads.submitted


def test_a_hung_writer_is_killed_after_the_write_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "items_bytes", _hangs)
    proc = _with(
        _proc(tmp_path),
        tmp_path,
        **{
            "snapshot.interval_s": 0.2,
            "snapshot.interval_items": 1,
            "snapshot.write_timeout_s": 0.5,
        },
    )
    proc.metrics = Metrics(runtime=False)
    _commit(proc, _batch(proc, _items(5, "a"), 0))
    hung = proc.snapshots._children[0].pid
    deadline = time.monotonic() + 10
    while proc.snapshots.busy(0) and time.monotonic() < deadline:
        time.sleep(0.1)
        proc.reap_snapshots()  # between batches
    assert not proc.snapshots.busy(0) and _gone_or_zombie(hung)
    assert proc.metrics.registry.get_sample_value("infogrowth_snapshot_failures_total") == 1
    assert proc.dirty[0] > 0, "its changes are still to be saved"


def test_a_revoke_of_many_partitions_keeps_one_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from confluent_kafka import TopicPartition

    from tests.unit.test_replication import EMBEDDED

    proc = _dirty_partitions(_with(_proc(tmp_path), tmp_path, drain=1.0), [0, 1, 2])
    parts = sorted(proc.owned)
    monkeypatch.setattr(snapshot, "items_bytes", _hangs)
    t0 = time.monotonic()
    proc.on_revoke([TopicPartition(EMBEDDED, p) for p in parts])
    assert time.monotonic() - t0 < 1.6, "bounded by kafka.drain_timeout_s, not once a partition"
    assert not proc.snapshots.in_flight


def test_shutdown_writes_every_partitions_last_snapshot_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = _dirty_partitions(_with(_proc(tmp_path), tmp_path, drain=1.5), [0, 1, 2])
    parts = sorted(proc.owned)
    _slow_snapshots(monkeypatch, 0.6)  # three of them fit the deadline only side by side
    proc.close()
    assert all(snapshot.current_name(proc.snapshot_dir(p)) for p in parts)


def test_shutdown_waits_only_until_the_signals_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog counts the grace period from the signal: close must be done before it."""
    proc = _proc(tmp_path)
    proc.states[0] = _state(30)
    proc.dirty[0] = 5
    monkeypatch.setattr(snapshot, "items_bytes", _hangs)
    proc.drain_by = time.monotonic() + 0.5
    t0 = time.monotonic()
    proc.close()
    assert time.monotonic() - t0 < 1.5 and not proc.snapshots.in_flight


def test_pruning_keeps_the_newest_by_changelog_offset(tmp_path: Path) -> None:
    """Names start with the item count, which drops after a seed --reset: the old epoch's
    bigger snapshot must not outlive the new epoch's previous one."""
    big = _state(120)
    big.changelog_offset = 1000
    snapshot.save(big, tmp_path, "fp", keep=2, epoch=1)
    small = _state(20, seed=1)
    small.changelog_offset = 2000
    snapshot.save(small, tmp_path, "fp", keep=2, epoch=2)
    _grow(small, 10, 2)
    small.changelog_offset = 2100
    snapshot.save(small, tmp_path, "fp", keep=2, epoch=2)
    left = sorted(snapshot.name_offset(p.name) for p in tmp_path.glob("snap-*"))
    assert left == [2000, 2100]


def test_a_failed_background_insert_leaves_no_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = _state(30)

    def failed() -> None:
        raise RuntimeError("insert failed")

    monkeypatch.setattr(st, "wait", failed)
    with pytest.raises(RuntimeError):
        SnapshotWriter().start(0, st, tmp_path, "fp")
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_killed_writers_grandchild_is_reaped_under_pid_1(tmp_path: Path) -> None:
    """In the image the stage is PID 1, so the hnswlib grandchild of a writer the OOM killer
    picks (it dies of PDEATHSIG) becomes the stage's child: it is reaped, not left a zombie.
    PID 1 is stood in for by a child subreaper."""
    import ctypes
    import signal

    from infogrowth.index import SpaceIndex

    r, w = os.pipe()
    stage = os.fork()
    if stage == 0:  # pragma: no cover - the stand-in stage
        code = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
            save = SpaceIndex.save

            def slow_save(self: SpaceIndex, path: str) -> None:
                time.sleep(5)
                save(self, path)

            SpaceIndex.save = slow_save  # type: ignore[method-assign]
            wr = SnapshotWriter()
            wr.start(0, _state(30), tmp_path, "fp")
            time.sleep(0.5)  # the grandchild is saving
            os.kill(wr._children[0].pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            res: list[Result] = []
            while not res and time.monotonic() < deadline:
                res = wr.poll()
                time.sleep(0.05)
            time.sleep(0.5)
            zombies = []
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        with open(f"/proc/{d}/stat") as fh:
                            stat = fh.read().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    if int(stat[1]) == os.getpid() and stat[0] == "Z":
                        zombies.append(int(d))
            os.write(w, json.dumps({"error": res[0].error if res else None, "z": zombies}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    got = json.loads(os.read(r, 4096) or b"{}")
    os.close(r)
    os.waitpid(stage, 0)
    assert got["error"] and "killed by signal 9" in got["error"]
    assert got["z"] == [], "no zombie left under the stage"
