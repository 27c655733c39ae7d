"""Rebuilding one select partition's state: verified snapshot, then the changelog from its offset.

The restore runs in steps (a generator that yields after every changelog record), so the
transactional loop can interleave ``consume()`` calls and a long restore never stalls a
rebalance; closing the generator cancels the restore and releases its reader at once.

What a restore keeps: only changelog records of the running calibration epoch whose vectors have
the expected spaces and dimensions. Records of another epoch (written before a ``seed --reset``)
or another model's dimension are skipped, counted and logged once, never raised: a new model or a
new seed must not make every restore fail.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from infogrowth import snapshot
from infogrowth.config import Settings
from infogrowth.index import PartitionState
from infogrowth.kafka import control
from infogrowth.kafka.clients import position
from infogrowth.kafka.reader import PartitionReader
from infogrowth.messages import embedded_from_record
from infogrowth.online import OnlineState
from infogrowth.schema import Embedded, unpack
from infogrowth.snapremote import RemoteStore

log = logging.getLogger(__name__)
T = TypeVar("T")
FETCH_TRIES = 3
"""Shared snapshots a restore fetches at most before it replays the changelog instead."""
SETTLE_S = 0.05
"""How long a restore step waits for the previous batch's inserts before yielding to the loop."""
SETTLE_POLL_S = 0.25
"""How often a restore waiting for open transactions to end (:attr:`PartitionRestore.settle`)
asks for the last stable offset again."""
SETTLE_GRACE_S = 10.0
"""Past ``kafka.transaction_timeout_ms`` by this much, a transaction still open is logged as an
error (and again after as long each time): the coordinator should have aborted it by then."""


def fast_threads(settings: Settings, n_spaces: int) -> int:
    """Insert threads per index of a fast rebuild: ``restore.threads`` (0: every core) shared
    by the spaces, at least one each."""
    total = settings.restore.threads or os.cpu_count() or 1
    return max(1, total // max(1, n_spaces))


@dataclass
class Layout:
    """What a restored state must match. ``spaces``/``dims`` None: learnt from the first record
    (an unseeded run whose model the select stage does not load)."""

    fingerprint: str
    epoch: int = 0
    spaces: tuple[str, ...] | None = None
    dims: dict[str, int] | None = None
    topic_id: str | None = None
    calibration: str | None = None

    def learn(self, vectors: dict[str, Any]) -> None:
        if self.dims is None:
            self.spaces = tuple(s for s in ("image", "text") if s in vectors)
            self.dims = {s: len(vectors[s]) // 4 for s in self.spaces}


def apply_items(
    state: PartitionState | None,
    buf: list[tuple[Embedded, int]],
    layout: Layout,
    settings: Settings,
    *,
    insert_threads: int = 1,
) -> PartitionState:
    """Add replayed items in order; an id already present (here or earlier) is skipped.

    The inserts run in the background (the state is ``busy`` until they are done); with
    ``insert_threads`` 1 (the default) the graph is the one the live stage built.
    """
    if state is None:
        assert layout.spaces is not None and layout.dims is not None
        state = PartitionState.empty(layout.spaces, layout.dims, settings.index)
    fresh: list[tuple[Embedded, int]] = []
    seen: set[str] = set()
    for e, o in buf:
        if e.id not in state and e.id not in seen:
            seen.add(e.id)
            fresh.append((e, o))
    if fresh:
        state.add(
            [e.id for e, _ in fresh],
            {s: np.stack([e.vectors[s] for e, _ in fresh]) for s in state.spaces},
            [e.label for e, _ in fresh],
            [e.fix is not None for e, _ in fresh],
            insert_threads=insert_threads,
            background=True,
        )
    state.changelog_offset = max(state.changelog_offset, buf[-1][1])
    return state


@dataclass
class PartitionRestore:
    """One partition's restore; iterate :meth:`steps`, its return value is the state."""

    settings: Settings
    partition: int
    directory: Path
    layout: Layout
    end: int | None = None
    """The changelog offset after the restored state (its reader's end; None if not read)."""
    replayed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    fast: bool = False
    """This restore rebuilds with multi-threaded inserts (``restore.fast_rebuild``, no
    snapshot)."""
    settle: bool = False
    """Before reading, wait until no transaction is open in what the changelog holds: until the
    last stable offset reaches the high watermark seen when the restore starts."""
    waiting: bool = False
    """The restore is waiting for that: its steps do no work (the caller gives the turn on)."""
    waited_s: float = 0.0
    remote: RemoteStore | None = None
    """The shared snapshot store (``snapshot.remote``), if any; ``folder`` is this partition's
    folder there."""
    folder: str = ""
    source: str = "changelog"
    """Where the restore started: ``local`` or ``remote`` snapshot, or ``changelog`` (none)."""

    def steps(self) -> Generator[None, None, PartitionState | None]:
        t0 = time.perf_counter()
        settled_end = yield from self._settle()
        state = yield from self._start(settled_end)
        start = state.changelog_offset + 1 if state is not None else -2
        reader = PartitionReader(
            self.settings, self.settings.kafka.topics.changelog, self.partition, start
        )
        records = reader.__iter__()
        try:
            pairs = ((m.value() or b"", position(m)[2]) for m in records)
            state = yield from self.replay(state, pairs)
        finally:
            records.close()
        self.end = reader.end
        self.seconds = time.perf_counter() - t0
        self._report(state)
        return state

    def replay(
        self, state: PartitionState | None, records: Iterable[tuple[bytes, int]]
    ) -> Generator[None, None, PartitionState | None]:
        """Apply changelog ``(value, offset)`` records onto ``state`` (None: nothing yet).

        Items go to the index in batches of ``restore.batch_items``, in changelog order; while
        one batch inserts in the background the next is read and decoded, and a step that
        would wait for the inserts yields instead, so the loop keeps polling. Starting from
        nothing with ``restore.fast_rebuild`` on, the inserts are multi-threaded.
        """
        self.fast = state is None and self.settings.restore.fast_rebuild
        batch = self.settings.restore.batch_items
        buf: list[tuple[Embedded, int]] = []
        online: tuple[dict[str, Any], int] | None = None
        for value, offset in records:
            item = self._read(value)
            if isinstance(item, dict):  # items never change the online state: last one wins
                online = (item, offset)
            elif item is not None:
                buf.append((item, offset))
                if len(buf) >= batch:
                    yield from _settled(state)
                    state = self._apply(state, buf)
                    buf = []
            yield
        if buf:
            yield from _settled(state)
            state = self._apply(state, buf)
        yield from _settled(state)
        if self.fast and state is not None and self._insert_threads() > 1:
            state.continue_levels()  # the racing threads lost level draws; a snapshot won't
        return self._online(state, online)

    def _settle(self) -> Generator[None, None, int | None]:
        """Yield until the transactions open in the changelog when the restore starts have
        ended (the last stable offset reaches the high watermark seen then).

        A read_committed reader stops at the first transaction still open. A zombie's (a
        member frozen past its session, its changelog records written, its offsets not yet
        sent) hides every later commit until the coordinator aborts it: this stage's own
        after it took the partition over, or those of an owner in between. A state rebuilt
        meanwhile would lack them, and the input would resume after them. Nothing this stage
        reads is kept waiting: the partition stays paused and the other restores go on. A
        transaction open past the transaction timeout is logged as an error (an operator can
        abort a hanging transaction with ``kafka-transactions.sh``); the restore goes on
        waiting rather than rebuild a state short of committed records. Returns the last
        stable offset it saw last (None without ``settle``)."""
        if not self.settle:
            return None
        topic = self.settings.kafka.topics.changelog
        target = control.end_offset(self.settings, topic, self.partition, committed=False)
        t0 = time.monotonic()
        grace = self.settings.kafka.transaction_timeout_ms / 1000.0 + SETTLE_GRACE_S
        alarm = t0 + grace
        end = control.end_offset(self.settings, topic, self.partition)
        if end >= target:
            return end
        log.warning(
            "partition %d: a transaction is open in the changelog (last stable offset %d, "
            "written to %d), a zombie's or another writer's; the restore waits for it to end",
            self.partition,
            end,
            target,
        )
        self.waiting = True
        while end < target:
            pause = time.monotonic() + SETTLE_POLL_S
            yield  # at least one step between two asks
            while time.monotonic() < pause:
                yield
            end = control.end_offset(self.settings, topic, self.partition)
            now = time.monotonic()
            if end < target and now > alarm:
                log.error(
                    "partition %d: a changelog transaction is still open after %.0f s (last "
                    "stable offset %d, written to %d); the restore keeps waiting: a hanging "
                    "transaction needs `kafka-transactions.sh find-hanging` / `abort`",
                    self.partition,
                    now - t0,
                    end,
                    target,
                )
                alarm = now + grace
        self.waiting = False
        self.waited_s = time.monotonic() - t0
        log.info("partition %d: waited %.1f s for the changelog", self.partition, self.waited_s)
        return end

    def _start(self, end: int | None) -> Generator[None, None, PartitionState | None]:
        """The state to replay the changelog onto: the newest snapshot that verifies, local or
        in the shared store (a shared one newer than the local is fetched first; the others
        only when the local one is missing or refused), else None."""
        lay = self.layout
        remote: list[str] = []
        if self.remote is not None and lay.spaces is not None:
            store, folder = self.remote, self.folder
            try:
                remote = yield from in_thread(
                    lambda: store.snapshots(folder), self.settings.snapshot.remote_timeout_s
                )
            except Exception as exc:
                log.warning(
                    "partition %d: shared snapshots at %s not listed: %r",
                    self.partition,
                    self.remote.url,
                    exc,
                )
            if remote and end is None:
                end = self._end()
        here = snapshot.name_offset(snapshot.current_name(self.directory) or "")
        shared = remote[:FETCH_TRIES]  # newest first: those newer than the local one lead
        cut = sum(here is None or (snapshot.name_offset(n) or -1) > here for n in shared)
        for name in shared[:cut]:
            state = yield from self._fetch(name, end)
            if state is not None:
                return state
        state = self._snapshot(end)
        yield
        if state is not None:
            self.source = "local"
            return state
        for name in shared[cut:]:
            state = yield from self._fetch(name, end)
            if state is not None:
                return state
        return None

    def _checks(self, end: int | None) -> dict[str, Any]:
        """What a snapshot must match to be used (:func:`snapshot.load_dir`), checked against
        the changelog's end (``end``: the last stable offset already read, else asked for)."""
        lay = self.layout
        return {
            "fingerprint": lay.fingerprint,
            "spaces": lay.spaces,
            "dims": lay.dims,
            "topic_id": lay.topic_id,
            "calibration": lay.calibration,
            "epoch": lay.epoch,
            "end_offset": end if end is not None else self._end(),
        }

    def _end(self) -> int:
        return control.end_offset(
            self.settings, self.settings.kafka.topics.changelog, self.partition
        )

    def _fetch(self, name: str, end: int | None) -> Generator[None, None, PartitionState | None]:
        """Fetch the shared snapshot ``name`` (on a thread; the steps go on yielding), verify and
        load it; once loaded it becomes the local current snapshot too. None if it fails."""
        assert self.remote is not None and self.layout.spaces is not None
        assert self.layout.dims is not None
        store, folder = self.remote, self.folder
        # a name of its own: a cancelled fetch may still be writing its folder until it stops
        tmp = self.directory / f".tmp-remote-{name}-{snapshot.RUN}-{uuid.uuid4().hex[:8]}"
        self.directory.mkdir(parents=True, exist_ok=True)
        cancel = threading.Event()
        checks = self._checks(end)
        cfg = self.settings.index
        t0 = time.perf_counter()
        try:
            size = yield from in_thread(
                lambda: store.fetch(
                    folder, name, tmp, cancel, lambda d: snapshot.check_manifest(d, cfg, **checks)
                ),
                self.settings.snapshot.remote_timeout_s,
                cancel,
                lambda: shutil.rmtree(tmp, ignore_errors=True),
            )
        except Exception as exc:  # fetch removed its folder; one given up on, once it stops
            self._refused(folder, name, exc)
            return None
        try:
            state = snapshot.load_dir(tmp, cfg, **checks)
            snapshot.adopt(self.directory, tmp, name, self.settings.snapshot.keep)
        except Exception as exc:  # a damaged copy: the next one
            self._refused(folder, name, exc)
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        self.source = "remote"
        log.info(
            "partition %d: shared snapshot %s with %d items fetched (%.0f MiB) and loaded in "
            "%.1f s",
            self.partition,
            name,
            state.count,
            size / (1 << 20),
            time.perf_counter() - t0,
        )
        return state

    def _refused(self, folder: str, name: str, exc: Exception) -> None:
        log.warning(
            "partition %d: shared snapshot %s/%s not used: %s",
            self.partition,
            folder,
            name,
            exc if isinstance(exc, snapshot.SnapshotError) else repr(exc),
        )

    def _snapshot(self, end: int | None = None) -> PartitionState | None:
        """The verified snapshot, checked against the changelog's end (``end``: the last stable
        offset already read, else asked for)."""
        lay = self.layout
        if lay.spaces is None or lay.dims is None:
            return None
        try:
            state = snapshot.load(self.directory, self.settings.index, **self._checks(end))
        except snapshot.NoSnapshot:
            log.info(
                "partition %d: first start (no snapshot yet); replaying the changelog",
                self.partition,
            )
            return None
        except snapshot.SnapshotError as exc:
            log.warning("partition %d: %s; replaying the changelog", self.partition, exc)
            return None
        log.info("partition %d: snapshot with %d items loaded", self.partition, state.count)
        return state

    def _skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def _read(self, value: bytes) -> Embedded | dict[str, Any] | None:
        """An item, an online-state record, or None for a record this state does not take."""
        try:
            rec = unpack("changelog", value, max_bytes=1 << 30)
        except ValueError:
            self._skip("unreadable")
            return None
        if int(rec.get("epoch", 0)) != self.layout.epoch:
            self._skip(f"calibration epoch {rec.get('epoch', 0)}")
            return None
        if "state" in rec:
            state: dict[str, Any] = rec["state"]
            return state
        self.layout.learn(rec["vectors"])
        try:
            e = embedded_from_record(rec, self.layout.dims)
        except ValueError as exc:
            self._skip(f"vectors not matching {self.layout.dims} ({exc})")
            return None
        if rec.get("fixed"):
            e.fix = "replayed"
        return e

    def _apply(
        self, state: PartitionState | None, buf: list[tuple[Embedded, int]]
    ) -> PartitionState:
        self.replayed += len(buf)
        return apply_items(
            state, buf, self.layout, self.settings, insert_threads=self._insert_threads()
        )

    def _insert_threads(self) -> int:
        if self.fast and self.layout.spaces is not None:
            return fast_threads(self.settings, len(self.layout.spaces))
        return 1

    def _online(
        self, state: PartitionState | None, online: tuple[dict[str, Any], int] | None
    ) -> PartitionState | None:
        if online is None:
            return state
        lay = self.layout
        if state is None and lay.spaces is not None and lay.dims is not None:
            # decisions happened but nothing was kept yet: the state is only online
            state = PartitionState.empty(lay.spaces, lay.dims, self.settings.index)
        if state is not None:
            state.online = OnlineState.from_record(online[0])
            state.changelog_offset = max(state.changelog_offset, online[1])
        return state

    def _report(self, state: PartitionState | None) -> None:
        p = self.partition
        if self.skipped:
            log.warning(
                "partition %d: changelog records discarded (not this state's calibration epoch "
                "%d / layout): %s",
                p,
                self.layout.epoch,
                ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())),
            )
        log.info(
            "partition %d: restored %d items (%d replayed%s) in %.2fs",
            p,
            state.count if state else 0,
            self.replayed,
            ", fast rebuild: multi-threaded inserts" if self.fast else "",
            self.seconds,
        )


def _settled(state: PartitionState | None) -> Generator[None, None, None]:
    """Yield until ``state``'s background inserts are done (waiting a little each step)."""
    while state is not None and not state.settle(SETTLE_S):
        yield


def in_thread(
    fn: Callable[[], T],
    timeout: float,
    cancel: threading.Event | None = None,
    discard: Callable[[], None] | None = None,
) -> Generator[None, None, T]:
    """Run ``fn`` on a thread of its own, yielding until it returns; its result, or its
    exception raised here. Past ``timeout`` seconds :class:`TimeoutError` is raised. Either that
    or closing the generator (a cancelled restore) sets ``cancel``, for ``fn`` to stop early,
    and leaves ``fn``'s result to ``discard``: called once ``fn`` has ended, on its thread if it
    is still running (whatever it wrote is removed only after it stopped writing)."""
    box: dict[str, Any] = {}
    lock = threading.Lock()
    gave_up = False

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        with lock:
            box["ended"] = True
            late = gave_up
        if late and discard is not None:
            discard()

    t = threading.Thread(target=run, name="infogrowth-restore-fetch", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    try:
        while "ended" not in box:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from the shared snapshot store in {timeout:.0f} s")
            t.join(SETTLE_S)
            yield
    except BaseException:
        if cancel is not None:
            cancel.set()
        with lock:
            gave_up = True
            ended = "ended" in box
        if ended and discard is not None:
            discard()
        raise
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def run_to_end(restore: PartitionRestore) -> PartitionState | None:
    """Restore in one go (after an aborted transaction, in tests)."""
    return run_to_end_of(restore.steps())


def run_to_end_of(
    steps: Generator[None, None, PartitionState | None],
) -> PartitionState | None:
    """Drive restore steps (:meth:`PartitionRestore.steps` or ``replay``) to their result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            state: PartitionState | None = done.value
            return state
