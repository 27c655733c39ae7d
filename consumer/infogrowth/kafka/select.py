"""Select stage on Kafka: per-partition HNSW state, restored from snapshot + changelog.

Partition ``p`` of the embedded topic owns partition ``p`` of the changelog. Its state is a
materialised view of that changelog partition: restore = load the local snapshot (if it verifies)
and replay the changelog from the offset the snapshot includes. Kept items go to the changelog
in the same transaction as the outputs and the input offsets.

Boundary replication: a kept item whose other cells lie within ``kafka.cells_replication_margin``
of its nearest one is also sent, in the same transaction, as a *replica* record to those cells'
partitions of the embedded topic. The owner of such a partition adds the replica to its index
and to its own changelog partition, in input order, and writes no output record for it. So every
changelog partition still has a single writer, and a near-copy that lands across the border
still meets its original.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Message, TopicPartition

from infogrowth.calibrate import Calibration
from infogrowth.cells import Cells, random_centroids
from infogrowth.config import Settings
from infogrowth.index import PartitionState
from infogrowth.kafka.admin import topic_id
from infogrowth.kafka.clients import fits, position, record_limit, source_of
from infogrowth.kafka.control import ControlWatcher, calibration_id, read_calibration
from infogrowth.kafka.headers import TRACEPARENT, record_headers, traceparent_of
from infogrowth.kafka.loop import Output, StaleBatch
from infogrowth.kafka.restore import SETTLE_S, Layout, PartitionRestore, run_to_end
from infogrowth.messages import (
    Outcome,
    changelog_record,
    embedded_from_record,
    output_record,
    replica_record,
    source_key,
    state_record,
    too_large,
)
from infogrowth.schema import Embedded, Malformed, pack, unpack
from infogrowth.select import Selector, Thresholds
from infogrowth.snapfork import SnapshotWriter
from infogrowth.snapremote import RemoteStore, Uploader

__all__ = ["SelectProcessor", "replica_partitions"]

log = logging.getLogger(__name__)
TOPIC_ID_RETRY_S = 60.0
"""How long after a failed lookup of the changelog topic's id it is asked for again."""


STATE_KEY = b"\x00state"
CHANGELOG_HEADERS = record_headers("changelog")
EMBEDDED_HEADERS = record_headers("embedded")
"""Changelog key of a partition's online state records (compaction keeps the latest)."""


def replica_partitions(
    cells: Cells | None, items: list[Embedded], home: int, partitions: int, margin: float
) -> list[list[tuple[int, int]]]:
    """For each kept item, the (cell, partition) pairs it is replicated to (not ``home``)."""
    if cells is None or partitions <= 1 or margin <= 0 or not items:
        return [[] for _ in items]
    spaces = [s for s in cells.spaces if s in items[0].vectors]
    vecs = {s: np.stack([e.vectors[s] for e in items]) for s in spaces}
    out = []
    for targets in cells.replicas(vecs, margin):
        seen: dict[int, int] = {}
        for c in targets:
            q = c % partitions
            if q != home and q not in seen:
                seen[q] = c
        out.append([(c, q) for q, c in seen.items()])
    return out


class EpochAhead(StaleBatch):
    """An embedded record of a calibration epoch newer than this stage's: abort the batch and
    change epoch before deciding it."""


class SelectProcessor:
    name = "select"
    stateful = True

    def __init__(
        self,
        settings: Settings,
        thresholds: Thresholds,
        calibration: Calibration | None,
        fingerprint: str,
        metrics: Any = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.topics = settings.kafka.topics
        self.states: dict[int, PartitionState] = {}
        self.selectors: dict[int, Selector] = {}
        self.dirty: dict[int, int] = defaultdict(int)
        """Changes per partition since its last snapshot."""
        self.uncommitted: set[int] = set()
        """Partitions whose state holds changes of a transaction that has not committed (yet)."""
        self.last_snapshot: dict[int, float] = {}
        self.snapshots = SnapshotWriter(settings.snapshot.fork)
        self._snapshot_dirty: dict[int, int] = {}
        """Changes held by the snapshot being written per partition (back to ``dirty`` if it
        fails)."""
        self._snapshot_failed: dict[int, float] = {}
        """When the partition's last snapshot failed (the next try waits an interval)."""
        snap = settings.snapshot
        self.remote = RemoteStore(snap.remote, settings.storage) if snap.remote else None
        # two at least: a new owner may be fetching the one before the old owner's last
        self.uploads = Uploader(self.remote, max(2, snap.keep)) if self.remote else None
        self._unshared_warned = False
        self._to_upload: dict[int, Path] = {}
        """Per partition, its newest published snapshot not yet uploaded to the shared store."""
        self._last_upload: dict[int, float] = {}
        self.restores: dict[int, tuple[PartitionRestore, Generator[None, None, Any]]] = {}
        """Partitions being restored in steps (see :meth:`restore_step`)."""
        self._restoring_now = False
        self.restore_seconds: list[float] = []
        self.next_offset: dict[int, int] = {}
        """Where this stage's next changelog record should land per partition: a record found
        beyond it means someone else wrote in between (a seed, a zombie), so the partition is
        replayed."""
        self.replay: set[int] = set()
        """Partitions to rebuild before they are processed again (a gap at commit, an abort whose
        rebuild could not reach this stage's own commits)."""
        self.covered: dict[int, int] = {}
        """Per owned partition, the last changelog offset this stage's own transactions
        committed since its state was last rebuilt: the rebuild after an abort, which does not
        wait, must reach it. A read_committed reader stops at the last stable offset, which
        another producer's open transaction below (a zombie's, frozen past its session) holds
        back until it ends; a rebuild in steps waits for that itself."""
        fixer = settings.clean.fixer
        self.neighbour_fixer = fixer in ("auto", "neighbours")
        self.pending = 0
        self.committed_outputs = 0
        self.owned: set[int] = set()
        k = settings.kafka
        self.partitions = k.topics.embedded_partitions
        self.n_cells = k.cells or self.partitions
        self.margin = k.cells_replication_margin
        self.replicas_sent = 0
        self.replicas_applied = 0
        self.stale_epoch = 0
        """Embedded records rejected (or replicas dropped) for an older calibration epoch."""
        self.watcher: ControlWatcher | None = None
        self._next_cal: Calibration | None = None
        self._unpublished: set[int] = set()
        """Epochs newer than this stage's that the control topic did not know when looked up."""
        self._changelog_id: str | None = None
        self._changelog_id_known = False
        self._changelog_id_retry = -math.inf
        """When the topic id may be asked for again after the broker did not give it."""
        self._closed = False
        self.drain_by: float | None = None
        """``time.monotonic()`` by which a shutdown must be done (set when it is asked for):
        close and the revokes then wait for snapshots and uploads only until then."""
        self._slow_upload: tuple[int, str] | None = None
        """The upload last logged as running past ``snapshot.remote_timeout_s``."""
        self._calibrate(thresholds, calibration, fingerprint)

    def _calibrate(
        self, thresholds: Thresholds, calibration: Calibration | None, fingerprint: str
    ) -> None:
        """Take up a calibration (at start, or at an epoch change with all state dropped)."""
        self.t = thresholds
        self.cal = calibration
        self.fingerprint = fingerprint
        self.epoch = calibration.epoch if calibration else 0
        self.spaces: tuple[str, ...] | None = calibration.spaces if calibration else None
        self.dims: dict[str, int] | None = dict(calibration.dims) if calibration else None
        self.cells: Cells | None = None
        if calibration is not None and calibration.cells:
            self.cells = Cells.from_record(calibration.cells, self.n_cells)
        self.calibration_id = calibration_id(calibration)

    @property
    def restoring(self) -> bool:
        return bool(self.restores) or self._restoring_now

    @property
    def changelog_id(self) -> str | None:
        """The changelog topic's id at the broker (looked up once; snapshots name it). A lookup
        that failed is tried again after :data:`TOPIC_ID_RETRY_S`, not on every call."""
        now = time.monotonic()
        if not self._changelog_id_known and now >= self._changelog_id_retry:
            self._changelog_id = topic_id(self.settings, self.topics.changelog)
            self._changelog_id_known = self._changelog_id is not None
            self._changelog_id_retry = now + TOPIC_ID_RETRY_S
        return self._changelog_id

    @changelog_id.setter
    def changelog_id(self, value: str | None) -> None:
        self._changelog_id, self._changelog_id_known = value, True

    # -- state lifecycle ----------------------------------------------------------------

    def snapshot_dir(self, partition: int) -> Path:
        return Path(self.settings.snapshot.directory) / f"{self.topics.embedded}-{partition}"

    def _selector(self, p: int, state: PartitionState) -> None:
        self.states[p] = state
        self.selectors[p] = Selector(
            state, self.t, self.settings.select, self.settings.clean, self.neighbour_fixer
        )
        if self.metrics is not None:
            self.metrics.set_index_items(p, state.count, state.memory_bytes())
            self.metrics.observe_thresholds(str(p), self.t, state.spaces)
            self.metrics.observe_online(str(p), state.online)

    def _layout(self) -> Layout:
        return Layout(
            fingerprint=self.fingerprint,
            epoch=self.epoch,
            spaces=self.spaces,
            dims=self.dims,
            topic_id=self.changelog_id,
            calibration=self.calibration_id,
        )

    def _new_restore(self, p: int, *, wait: bool = True) -> PartitionRestore:
        """A restore of ``p``; with ``wait`` it first waits for the transactions open in the
        changelog to end (:attr:`PartitionRestore.settle`)."""
        folder = self._shared_folder(p) if wait else None  # not inside a poll: no store I/O
        return PartitionRestore(
            self.settings,
            p,
            self.snapshot_dir(p),
            self._layout(),
            settle=wait,
            remote=self.remote if folder is not None else None,
            folder=folder or "",
        )

    def _shared_folder(self, p: int) -> str | None:
        """The partition's folder in the shared store, under the changelog topic's id (a
        recreated topic, or another deployment sharing the store, never meets these
        snapshots); None without a store, or without the topic id (then nothing is shared)."""
        if self.remote is None:
            return None
        tid = self.changelog_id
        if tid is None:
            if not self._unshared_warned:
                self._unshared_warned = True
                log.warning(
                    "snapshot.remote is set but the changelog topic's id is unknown (describe "
                    "denied?): snapshots are not shared, since they could not be told apart "
                    "from those of a recreated topic"
                )
            return None
        # librdkafka prints the id in standard base64 ('/', '+'); Kafka's own tools URL-safe
        return f"{tid.replace('/', '_').replace('+', '-')}/{self.snapshot_dir(p).name}"

    def _finish_restore(self, r: PartitionRestore, state: PartitionState | None) -> None:
        """Adopt a finished restore's result: the state, where the changelog ended, metrics."""
        p = r.partition
        if self.dims is None and r.layout.dims is not None:
            self.spaces, self.dims = r.layout.spaces, r.layout.dims
        self.next_offset[p] = r.end if r.end is not None else 0
        self.restore_seconds.append(r.seconds)
        if self.metrics is not None:
            self.metrics.restore_duration.observe(r.seconds)
            self.metrics.replayed_items.inc(r.replayed)
            self.metrics.restores.labels(source=r.source).inc()
        if state is not None:
            self._selector(p, state)
            self.last_snapshot.setdefault(p, time.time())
        self.covered.pop(p, None)  # the state holds every commit up to its end now

    def restore(self, p: int) -> PartitionState | None:
        """Snapshot (verified) + changelog replay in one go; the state is also installed.

        It does not wait (it runs inside the poll loop): if the changelog's committed view ends
        before this stage's own commits, nothing is installed and ``p`` is queued for a rebuild
        in steps (:meth:`maintain`), which waits for it."""
        self._restoring_now = True
        try:
            r = self._new_restore(p, wait=False)
            state = run_to_end(r)
            cover = self.covered.get(p)
            if cover is not None and (r.end is None or r.end <= cover):
                log.warning(
                    "partition %d: the changelog's committed view ends at %s, before this "
                    "stage's own commits (to %d): another producer's transaction is open below "
                    "them; rebuilding once it ends",
                    p,
                    r.end,
                    cover,
                )
                self.replay.add(p)
                return None
            self._finish_restore(r, state)
            return state
        finally:
            self._restoring_now = False

    def begin_restore(self, partition: int) -> None:
        """Drop the partition's state and start rebuilding it (see :meth:`restore_step`)."""
        self._cancel(partition)
        self._drop(partition)
        r = self._new_restore(partition)
        self.restores[partition] = (r, r.steps())

    def restore_step(self, budget_s: float) -> list[int]:
        """Advance the restores in progress for about ``budget_s``; the partitions finished."""
        deadline = time.monotonic() + budget_s
        done: list[int] = []
        for p in sorted(self.restores):
            r, steps = self.restores[p]
            try:
                while time.monotonic() < deadline:
                    next(steps)
                    if r.waiting:  # for open transactions to end: the next restore's turn
                        break
            except StopIteration as fin:
                del self.restores[p]
                self._finish_restore(r, fin.value)
                done.append(p)
                continue
            if time.monotonic() >= deadline:
                break
        if self.restores and all(r.waiting for r, _ in self.restores.values()):
            time.sleep(SETTLE_S)  # nothing to do but wait: do not spin the loop
        return done

    def _cancel(self, p: int) -> None:
        entry = self.restores.pop(p, None)
        if entry is not None:
            entry[1].close()  # closes the changelog reader
            log.info("partition %d: restore cancelled", p)

    def save_snapshot(self, p: int, *, wait: bool = True, deadline: float | None = None) -> None:
        """Snapshot the partition's state as it is (committed) in a forked child
        (:mod:`infogrowth.snapfork`). ``wait`` (revoke, close) waits for the one in flight first
        and then for this one, both until ``deadline`` (``time.monotonic()``; default
        ``kafka.drain_timeout_s`` from now); without it the stage goes on at once, and nothing is
        started while one is still being written."""
        state = self.states.get(p)
        if state is None:
            return
        if deadline is None:
            deadline = time.monotonic() + self.settings.kafka.drain_timeout_s
        if wait:
            self.snapshots.wait(p, max(0.0, deadline - time.monotonic()))
        self.reap_snapshots()
        if self.snapshots.busy(p):
            return
        if wait and time.monotonic() >= deadline:
            log.warning(
                "partition %d: no time left to snapshot its last %d changes (the next owner "
                "replays them from the changelog)",
                p,
                self.dirty[p],
            )
            return
        stall = self.snapshots.start(
            p,
            state,
            self.snapshot_dir(p),
            self.fingerprint,
            keep=self.settings.snapshot.keep,
            topic_id=self.changelog_id,
            calibration=self.calibration_id,
            epoch=self.epoch,
        )
        self._snapshot_dirty[p] = self.dirty[p]
        self.dirty[p] = 0
        self.last_snapshot[p] = time.time()
        if self.metrics is not None:
            self.metrics.snapshot_stall.observe(stall)
        if wait:
            self.snapshots.wait(p, max(0.0, deadline - time.monotonic()))
        self.reap_snapshots()

    def reap_snapshots(self) -> None:
        """Adopt the snapshots that ended: a published one sets the snapshot metrics; a failed
        one is counted, its changes count as not snapshotted again, and the partition waits
        ``snapshot.interval_s`` before the next try. A writer past ``snapshot.write_timeout_s``
        is killed first (then it counts as failed)."""
        limit = self.settings.snapshot.write_timeout_s
        for p in self.snapshots.overdue(limit):
            self.snapshots.abandon(p, f"still writing after {limit:g} s (snapshot.write_timeout_s)")
        for r in self.snapshots.poll():
            p = r.partition
            held = self._snapshot_dirty.pop(p, 0)
            owned = p in self.states
            if r.info is None:
                if owned:
                    self.dirty[p] += held
                    self._snapshot_failed[p] = time.time()
                if self.metrics is not None:
                    self.metrics.snapshot_failures.inc()
                continue
            if self.metrics is not None:
                self.metrics.snapshot_duration.observe(r.write_s)
                if owned:
                    self.metrics.mark_snapshot(str(p), r.info.created, size_bytes=r.info.bytes)
            if owned and self.uploads is not None:
                self._to_upload[p] = r.info.path
                self._maybe_upload(p)
        self.reap_uploads()

    def _maybe_upload(self, p: int, *, force: bool = False) -> None:
        """Upload the partition's newest published snapshot to the shared store when
        ``snapshot.upload_interval_s`` has passed since its last upload (``force``: whatever
        the time, for a partition about to leave this stage)."""
        path = self._to_upload.get(p)
        if self.uploads is None or path is None:
            return
        due = time.monotonic() - self._last_upload.get(p, -math.inf)
        if not force and due < self.settings.snapshot.upload_interval_s:
            return
        folder = self._shared_folder(p)
        if folder is None:  # nothing can be shared now; the next snapshot tries again
            del self._to_upload[p]
            return
        try:
            self.uploads.submit(p, path, folder)
        except OSError as exc:  # the snapshot was pruned meanwhile: the next one goes
            log.warning("partition %d: snapshot %s not uploaded: %s", p, path.name, exc)
            return
        del self._to_upload[p]
        self._last_upload[p] = time.monotonic()

    def reap_uploads(self) -> None:
        """Log and count the uploads that ended; warn once of one running past
        ``snapshot.remote_timeout_s`` (a store that hangs holds every later upload back)."""
        if self.uploads is None:
            return
        running = self.uploads.running()
        limit = self.settings.snapshot.remote_timeout_s
        if running is not None and running[2] > limit and running[:2] != self._slow_upload:
            self._slow_upload = running[:2]
            log.warning(
                "partition %d: the upload of snapshot %s to %s has run for %.0f s "
                "(snapshot.remote_timeout_s %.0f); later uploads wait behind it",
                running[0],
                running[1],
                self.settings.snapshot.remote,
                running[2],
                limit,
            )
        for up in self.uploads.poll():
            if self.metrics is not None:
                self.metrics.snapshot_uploads.labels(result="failed" if up.error else "ok").inc()
                self.metrics.snapshot_upload_duration.observe(up.seconds)
            if up.error:
                log.warning(
                    "partition %d: snapshot %s not uploaded to %s: %s",
                    up.partition,
                    up.name,
                    self.settings.snapshot.remote,
                    up.error,
                )
            else:
                log.info(
                    "partition %d: snapshot %s uploaded (%.0f MiB in %.1f s)",
                    up.partition,
                    up.name,
                    up.bytes / (1 << 20),
                    up.seconds,
                )

    def _maybe_snapshot(self, p: int) -> None:
        cfg = self.settings.snapshot
        now = time.time()
        if self.snapshots.busy(p) or now - self._snapshot_failed.get(p, -math.inf) < cfg.interval_s:
            return
        due_items = self.dirty[p] >= cfg.interval_items
        due_time = now - self.last_snapshot.get(p, 0.0) >= cfg.interval_s
        if self.dirty[p] and (due_items or due_time):
            self.save_snapshot(p, wait=False)

    def _drop(self, p: int) -> None:
        self.states.pop(p, None)
        self.selectors.pop(p, None)
        self.dirty.pop(p, None)
        self._snapshot_dirty.pop(p, None)
        self._snapshot_failed.pop(p, None)
        self._to_upload.pop(p, None)
        self.uncommitted.discard(p)
        self.next_offset.pop(p, None)
        if self.metrics is not None:
            self.metrics.drop_partition(str(p), "select")

    # -- calibration epochs -------------------------------------------------------------

    def maintain(self) -> list[int]:
        """Between batches: a new calibration epoch on the control topic (every owned partition
        is rebuilt under it) or a changelog gap seen at commit (that partition is replayed).
        Snapshots whose upload waited for ``snapshot.upload_interval_s`` go once it passed."""
        self.reap_snapshots()
        for p in list(self._to_upload):
            self._maybe_upload(p)
        if self.watcher is None:
            self.watcher = ControlWatcher(self.settings)
        cal = self._next_cal or self.watcher.poll()
        self._next_cal = None
        if cal is not None and cal.epoch != self.epoch:
            self.change_epoch(cal)
            self.replay.clear()
            return sorted(self.owned)
        again, self.replay = sorted(self.replay & self.owned), set()
        for p in again:  # it misses records: nothing may snapshot it before its rebuild
            self._drop(p)
        return again

    def change_epoch(self, cal: Calibration) -> None:
        """Drop every partition's state (no snapshot: it belongs to the old epoch) and take up
        ``cal``; the loop then restores each owned partition from the changelog records of the
        new epoch: the new seed and whatever was kept under it since."""
        log.warning(
            "calibration epoch %d -> %d (a seed --reset): dropping the state of partitions %s, "
            "rebuilding it from the new epoch's changelog records",
            self.epoch,
            cal.epoch,
            sorted(set(self.states) | set(self.restores)) or "-",
        )
        for p in list(self.restores):
            self._cancel(p)
        for p in self.snapshots.in_flight:
            self.snapshots.abandon(p, f"calibration epoch {cal.epoch} replaces {self.epoch}")
        self.snapshots.poll()  # the old epoch's: neither counted nor marked
        for p in list(self.states):
            self._drop(p)
        self.last_snapshot.clear()
        fingerprint = cal.fingerprint or self.fingerprint
        self._calibrate(cal.thresholds, cal, fingerprint)
        self._unpublished.clear()

    def _check_epoch(self, rec: dict[str, Any]) -> str | None:
        """None if ``rec`` belongs to this stage's epoch, else why it is stale. A newer epoch
        that the control topic confirms raises :class:`EpochAhead` (change first, then decide)."""
        epoch = int(rec.get("epoch", 0))
        if epoch == self.epoch:
            return None
        if epoch > self.epoch:
            if epoch not in self._unpublished:  # looked up once per epoch, not per record
                cal = read_calibration(self.settings)
                if cal is not None and cal.epoch > self.epoch:
                    self._next_cal = cal
                    raise EpochAhead(f"record of calibration epoch {epoch}, stage at {self.epoch}")
                self._unpublished.add(epoch)
            return f"calibration epoch {epoch} is not published on {self.topics.control}"
        return (
            f"embedded under calibration epoch {epoch}, replaced by epoch {self.epoch} "
            "(seed --reset): re-produce the sample"
        )

    # -- Processor protocol -------------------------------------------------------------

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """Nothing is restored here, inside the rebalance: the loop pauses the partitions and
        calls :meth:`begin_restore` once their committed offsets are known."""
        self.owned |= {tp.partition for tp in partitions}

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Snapshot and share what leaves, then drop it. After :meth:`close` (the consumer
        leaving the group revokes everything) the snapshots were taken there: only drop."""
        self.owned -= {tp.partition for tp in partitions}
        deadline = self._deadline()  # one for the whole callback, not one per partition
        for tp in partitions:
            p = tp.partition
            self.covered.pop(p, None)
            self._cancel(p)
            if self._closed:
                self._drop(p)
                continue
            self._finish_snapshot(p, deadline)  # the newest goes to the next owner
            # Not a state that misses records: one queued for a rebuild (a gap, a short restore).
            if self.dirty.get(p) and p not in self.uncommitted and p not in self.replay:
                self.save_snapshot(p, deadline=deadline)
            self._maybe_upload(p, force=True)  # its next owner may start from it
            self._drop(p)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self.owned -= {tp.partition for tp in partitions}
        for tp in partitions:
            self.covered.pop(tp.partition, None)
            self._cancel(tp.partition)
            self._drop(tp.partition)

    def on_abort(self, partitions: list[TopicPartition]) -> None:
        """State may hold items of the aborted batch: rebuild it from snapshot + changelog
        (unless an epoch change is due: then everything is rebuilt under the new epoch)."""
        self.pending = 0
        rebuild = {tp.partition for tp in partitions}
        deadline = self._deadline()
        for p in sorted(self.uncommitted | rebuild):
            self._finish_snapshot(p, deadline)
            self._drop(p)
        self.uncommitted.clear()
        if self._next_cal is None:
            for p in sorted(rebuild - self.replay):  # those are rebuilt in steps anyway
                self.restore(p)

    def _deadline(self) -> float:
        """``kafka.drain_timeout_s`` from now, or the shutdown's own deadline if sooner."""
        deadline = time.monotonic() + self.settings.kafka.drain_timeout_s
        return deadline if self.drain_by is None else min(deadline, self.drain_by)

    def _finish_snapshot(self, p: int, deadline: float) -> None:
        """Before the partition's state is dropped: let its snapshot in flight end (until
        ``deadline``) and adopt it. It holds committed state, so a rebuild or the next owner
        starts from it instead of an older one (and it is uploaded, the state being still
        here), and its forked writer no longer pins the dropped state's pages while a new
        state is loaded (three copies at the peak otherwise)."""
        if self.snapshots.busy(p):
            self.snapshots.wait(p, max(0.0, deadline - time.monotonic()))
            self.reap_snapshots()

    def on_commit(self, out: Output) -> None:
        self.committed_outputs += self.pending
        self.pending = 0
        self.uncommitted.clear()
        for (topic, p), offset in out.offsets.items():
            if topic != self.topics.changelog or p not in self.states:
                continue
            first = out.first.get((topic, p), offset)
            expected = self.next_offset.get(p)
            if expected is not None and first > expected:
                log.warning(
                    "partition %d: changelog records %d..%d were written by someone else "
                    "(a seed, a zombie); replaying the partition",
                    p,
                    expected,
                    first - 1,
                )
                self.replay.add(p)
            self.states[p].changelog_offset = max(self.states[p].changelog_offset, offset)
            self.next_offset[p] = offset + 2  # after this transaction's commit marker
            self.covered[p] = max(self.covered.get(p, -1), offset)
        for p in list(self.states):
            if self.metrics is not None:
                st = self.states[p]
                self.metrics.set_index_items(p, st.count, st.memory_bytes())
            if p not in self.replay:
                self._maybe_snapshot(p)

    def close(self) -> None:
        """Snapshot what matches the committed changelog; drop state that a transaction which
        never committed has changed (a dirty close: fenced, fatal error, an abort that gave up).
        Kafka Streams likewise never checkpoints a task that closes dirty under EOS."""
        self._closed = True
        for p in list(self.restores):
            self._cancel(p)
        deadline = self._deadline()
        for p in list(self.states):
            if p in self.uncommitted:
                log.warning("partition %d: closing with uncommitted changes; state dropped", p)
                self._drop(p)
        for p in self.snapshots.in_flight:  # those started before: then every last one at once
            self._finish_snapshot(p, deadline)
        for p in list(self.states):
            if self.dirty.get(p) and p not in self.replay and time.monotonic() < deadline:
                self.save_snapshot(p, wait=False)
        self.snapshots.close(max(0.0, deadline - time.monotonic()))
        self.reap_snapshots()
        if self.uploads is not None:
            for p in list(self._to_upload):
                self._maybe_upload(p, force=True)
            if not self.uploads.close(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "snapshot uploads still running at the drain deadline were left unfinished "
                    "(the shared store keeps the previous snapshots)"
                )
            self.reap_uploads()
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    def reject(self, message: Message, reason: str, detail: str, out: Output) -> None:
        """A trimmed rejection for an embedded record that no transaction could carry; a
        replica record (not an ingest message) needs no output. State is left as it is."""
        try:
            rec = unpack("embedded", message.value() or b"", max_bytes=1 << 30)
        except Exception:
            rec = {}
        if rec.get("replica"):
            return
        src = rec.get("source") if isinstance(rec.get("source"), dict) else source_of(message)
        sid = str(rec.get("id") or source_key(src))
        o = Outcome(id=sid, decision="rejected", reason=reason, detail=detail, source=src)
        self.pending += 1
        value = pack(
            "output", output_record(o, self.t, include_image=False, epoch=self.epoch), check=False
        )
        hdrs = record_headers(
            "output", decision="rejected", reason=reason, traceparent=traceparent_of(message)
        )
        out.produce(self.topics.rejected, value, key=sid.encode(), headers=hdrs)

    def process(self, messages: list[Message], out: Output) -> None:
        by_part: dict[int, list[Message]] = defaultdict(list)
        for m in messages:
            by_part[position(m)[1]].append(m)
        stale = sorted(set(by_part) - self.owned)
        if stale:  # revoked or lost while these were in flight: their state is gone
            raise StaleBatch(f"partitions {stale} are no longer owned")
        restoring = sorted(set(by_part) & set(self.restores))
        if restoring:
            raise StaleBatch(f"partitions {restoring} are still restoring")
        rebuild = sorted(set(by_part) & self.replay)
        if rebuild:  # their state misses records (or is gone): rebuilt before they go on
            raise StaleBatch(f"partitions {rebuild} await a rebuild")
        for p, msgs in sorted(by_part.items()):
            self._process_partition(p, msgs, out)

    def _cells(self, e: Embedded) -> Cells | None:
        """The calibration's cells; without one, the random centroids the embed stage uses."""
        if self.cells is None and self.partitions > 1 and self.margin > 0:
            spaces: tuple[str, ...] = tuple(s for s in ("image", "text") if s in e.vectors)
            dims = {s: int(e.vectors[s].shape[0]) for s in spaces}
            self.cells = random_centroids(spaces, dims, self.n_cells)
        return self.cells

    def _ensure_selector(self, p: int, first: Embedded) -> None:
        if p in self.selectors:
            return
        if self.spaces is None:
            self.spaces = tuple(s for s in ("image", "text") if s in first.vectors)
            self.dims = {s: int(first.vectors[s].shape[0]) for s in self.spaces}
        assert self.dims is not None
        self._selector(p, PartitionState.empty(self.spaces, self.dims, self.settings.index))

    def _process_partition(self, p: int, msgs: list[Message], out: Output) -> None:
        """Decide the partition's records in input order; replica records only grow the state."""
        results: list[Embedded | Outcome] = []
        replica = [False] * len(msgs)
        for n, m in enumerate(msgs):
            try:
                rec = unpack("embedded", m.value() or b"", max_bytes=1 << 30)
            except ValueError as exc:
                src = source_of(m)
                results.append(Outcome.malformed(Malformed(None, str(exc), m.value() or b"", src)))
                continue
            replica[n] = bool(rec.get("replica"))
            results.append(self._item(rec, m))
        # Runs of ordinary records are decided as one batch; a replica between two runs enters
        # the state after the first run and before the second, as the input orders them.
        lo = 0
        while lo < len(results):
            hi = lo
            while hi < len(results) and replica[hi] == replica[lo]:
                hi += 1
            if replica[lo]:
                self._apply_replicas(p, [r for r in results[lo:hi] if isinstance(r, Embedded)], out)
            else:
                self._decide(p, results[lo:hi], out)
            lo = hi

    def _item(self, rec: dict[str, Any], m: Message) -> Embedded | Outcome:
        """The record's item, or its rejection: ``stale_epoch`` for another calibration epoch
        (checked first: an old model's vectors are stale, not malformed), else malformed."""
        stale = self._check_epoch(rec)
        if stale is not None:
            self.stale_epoch += 1
            e = Embedded(
                id=rec["id"],
                vectors={},
                text=rec.get("text"),
                label=rec.get("label"),
                image=rec.get("image"),
                image_uri=rec.get("image_uri"),
                meta=rec.get("meta"),
                source=rec.get("source") or source_of(m),
            )
            return Outcome.rejected(e, "stale_epoch", stale)
        try:
            e = embedded_from_record(rec, self.dims)
        except ValueError as exc:
            return Outcome.malformed(Malformed(None, str(exc), m.value() or b"", source_of(m)))
        trace = traceparent_of(m)
        if trace is not None:
            e.extra[TRACEPARENT] = trace
        return e

    def _apply_replicas(self, p: int, items: list[Embedded], out: Output) -> None:
        """Index replicas of this epoch (a stale one came back as an Outcome: dropped)."""
        if not items:
            return
        self._ensure_selector(p, items[0])
        state = self.states[p]
        fresh: list[Embedded] = []
        seen: set[str] = set()
        for e in items:
            if e.id not in state and e.id not in seen:
                fresh.append(e)
                seen.add(e.id)
        if not fresh:
            return
        state.add(
            [e.id for e in fresh],
            {s: np.stack([e.vectors[s] for e in fresh]) for s in state.spaces},
            [e.label for e in fresh],
            [e.fix is not None for e in fresh],
        )
        for e in fresh:
            out.produce(
                self.topics.changelog,
                pack("changelog", changelog_record(e, epoch=self.epoch), check=False),
                key=e.id.encode(),
                partition=p,
                headers=CHANGELOG_HEADERS,
            )
        self.dirty[p] += len(fresh)
        self.uncommitted.add(p)
        self.replicas_applied += len(fresh)
        if self.metrics is not None:
            self.metrics.cell_replicas.labels(direction="applied").inc(len(fresh))

    def _decide(self, p: int, results: list[Embedded | Outcome], out: Output) -> None:
        batch = [r for r in results if isinstance(r, Embedded)]
        if batch:
            self._ensure_selector(p, batch[0])
            self.uncommitted.add(p)  # before deciding: a decision may change the state
        verdicts = iter(self.selectors[p].decide(batch)) if batch else iter(())
        outcomes: list[Outcome] = []
        kept: list[Embedded] = []
        for r in results:
            if isinstance(r, Embedded):
                v = next(verdicts)
                o = Outcome.from_verdict(v)
                if v.decision != "rejected":
                    out.produce(
                        self.topics.changelog,
                        pack("changelog", changelog_record(v.result(), self.epoch), check=False),
                        key=v.item.id.encode(),
                        partition=p,
                        headers=CHANGELOG_HEADERS,
                    )
                    self.dirty[p] += 1
                    kept.append(v.result())
            else:
                o = r
            outcomes.append(o)
            self.pending += 1
            rec = output_record(
                o, self.t, include_image=self.settings.outputs_include_image, epoch=self.epoch
            )
            value = pack("output", rec, check=False)
            if not fits(self.settings.limits, value, o.id.encode()):
                # The embed stage leaves headroom for this; should a decision still outgrow
                # the limit, a trimmed record beats an abort loop (the item stays indexed).
                o = too_large(o, "output record", len(value), record_limit(self.settings.limits))
                rec = output_record(o, self.t, include_image=False, epoch=self.epoch)
                value = pack("output", rec, check=False)
                outcomes[-1] = o
            trace = r.extra.get(TRACEPARENT) if isinstance(r, Embedded) else None
            hdrs = record_headers("output", decision=o.decision, reason=o.reason, traceparent=trace)
            out.produce(getattr(self.topics, o.decision), value, key=o.id.encode(), headers=hdrs)
        if batch:
            state = self.states[p]
            out.produce(
                self.topics.changelog,
                pack("changelog", state_record(state, self.epoch), check=False),
                key=STATE_KEY,
                partition=p,
                headers=CHANGELOG_HEADERS,
            )
            self.dirty[p] += 1
        if kept:
            cells = self._cells(kept[0])
            targets = replica_partitions(cells, kept, p, self.partitions, self.margin)
            sent = 0
            for e, tq in zip(kept, targets, strict=True):
                for c, q in tq:
                    out.produce(
                        self.topics.embedded,
                        pack("embedded", replica_record(e, c, self.epoch), check=False),
                        key=str(c).encode(),
                        partition=q,
                        headers=EMBEDDED_HEADERS,
                    )
                    sent += 1
            self.replicas_sent += sent
            if sent and self.metrics is not None:
                self.metrics.cell_replicas.labels(direction="sent").inc(sent)
        if self.metrics is not None:
            self.metrics.observe_outcomes(
                "select", [(o.decision, o.reason, o.gain, o.alignment) for o in outcomes]
            )
            if batch:
                self.metrics.observe_online(str(p), self.states[p].online)
