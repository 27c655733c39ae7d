"""Partition snapshots written by a forked child while the select stage goes on.

:meth:`SnapshotWriter.start` finishes the partition's pending inserts, makes the hash objects,
forks and returns: that is the whole stall. The child holds a frozen copy-on-write image of the
state at that instant (so the snapshot contains exactly the changelog offset the state had). It
touches no Kafka client and takes no lock another thread could hold: the garbage collector is
off (no finaliser of a parent object runs there), it logs nothing, and it only writes files,
hashes and calls hnswlib's save, then leaves with ``os._exit``. hnswlib holds the GIL while it
saves, so each index is saved by a grandchild into a pipe and the child hashes the bytes as it
writes them to the file (one pass, no read-back). The child reports success or its error on a
pipe.

The parent reaps finished children without blocking (:meth:`poll`, between batches), checks the
exit status, the report and the files against the manifest, and only then publishes the snapshot
(``CURRENT`` swapped by rename). A failed child leaves the previous snapshot current; its temp
directory is removed. One child per partition at a time; :meth:`wait` and :meth:`close` wait with
a deadline and kill what is still running then (its process group: the grandchild too).

Where ``fork`` is unavailable (no ``os.fork`` or no ``/proc/self/fd``), disabled
(``snapshot.fork: false``) or fails, the snapshot is written on the calling thread as before.

Memory: the child shares every page with the parent; a page is copied only when the parent
writes it while the child runs (new items, the links they change, a capacity growth of hnswlib),
see :mod:`infogrowth.membudget`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from infogrowth import snapshot
from infogrowth.index import HEADER_BYTES, PartitionState, SpaceIndex
from infogrowth.snapshot import Hasher, Pending, SnapshotError, SnapshotInfo

log = logging.getLogger(__name__)

REPORT_LIMIT = 4000
"""Characters of a child's error message that reach the parent."""
SLOW_STALL_S = 0.1
"""A fork that holds the stage longer than this is logged once, with the likely fix."""
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    """libc's ``prctl``, looked up now: a child must not ``dlopen`` (another thread may have held
    the loader's lock at the fork)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux), so a writer never outlives the stage
    (an orphan would hold the whole image alone); if the parent is already gone, exit now."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def fork_available() -> bool:
    """Whether snapshots can be written by a forked child on this platform."""
    return hasattr(os, "fork") and os.path.isdir("/proc/self/fd")


@dataclass(frozen=True)
class Result:
    """How one snapshot ended."""

    partition: int
    info: SnapshotInfo | None
    """The published snapshot; None when it failed or was abandoned."""
    error: str | None
    stall_s: float
    """Seconds the caller of :meth:`SnapshotWriter.start` was held."""
    write_s: float
    """Seconds the write took (in the child, or on the calling thread)."""
    forked: bool


@dataclass
class _Child:
    partition: int
    pid: int
    report: int
    pending: Pending
    keep: int
    stall_s: float
    started: float


class SnapshotWriter:
    """Writes partition snapshots in forked children (or in-process); see the module doc."""

    def __init__(self, fork: bool = True) -> None:
        self.forking = fork and fork_available()
        self._children: dict[int, _Child] = {}
        self._done: list[Result] = []
        self._slow_logged = False

    def busy(self, partition: int) -> bool:
        """A child is writing this partition's snapshot."""
        return partition in self._children

    @property
    def in_flight(self) -> list[int]:
        return sorted(self._children)

    def start(
        self,
        partition: int,
        state: PartitionState,
        directory: Path,
        fingerprint: str,
        *,
        keep: int = 2,
        topic_id: str | None = None,
        calibration: str | None = None,
        epoch: int = 0,
    ) -> float:
        """Begin a snapshot of ``state`` as it is now; the stall in seconds. Its :class:`Result`
        comes from :meth:`poll` (at once when it was written in-process)."""
        if partition in self._children:
            raise RuntimeError(f"partition {partition}: a snapshot is already being written")
        t0 = time.perf_counter()
        if self.forking:
            state.wait()  # the child has no insert thread: nothing may be pending at the fork
        try:
            pending = snapshot.prepare(
                state,
                directory,
                fingerprint,
                topic_id=topic_id,
                calibration=calibration,
                epoch=epoch,
            )
        except OSError as exc:
            log.error("partition %d: cannot start a snapshot in %s: %s", partition, directory, exc)
            spent = time.perf_counter() - t0
            self._done.append(Result(partition, None, str(exc), spent, spent, self.forking))
            return spent
        if self.forking:
            hashers: dict[str, Hasher] = {f: hashlib.sha256() for f in pending.files}
            try:
                pid, report = _fork(state, pending, hashers)
            except OSError as exc:
                log.warning(
                    "partition %d: fork failed (%s); writing the snapshot in-process",
                    partition,
                    exc,
                )
            else:
                stall = time.perf_counter() - t0
                self._children[partition] = _Child(
                    partition, pid, report, pending, keep, stall, time.monotonic()
                )
                self._note_slow_fork(partition, stall)
                return stall
        self._done.append(_in_process(partition, state, pending, keep, t0))
        return self._done[-1].stall_s

    def poll(self) -> list[Result]:
        """Reap the children that finished (never blocks); every result since the last call."""
        for c in list(self._children.values()):
            pid, status = _waitpid(c.pid)
            if pid:
                self._finish(c, status)
        done, self._done = self._done, []
        return done

    def overdue(self, timeout_s: float) -> list[int]:
        """The partitions whose writer has been running for longer than ``timeout_s``."""
        return sorted(p for p, c in self._children.items() if self._age(c) > timeout_s)

    def wait(self, partition: int, timeout_s: float) -> None:
        """Block until the partition's child is done, at most ``timeout_s``; a child still
        running then is killed and its snapshot abandoned. The result comes from :meth:`poll`."""
        c = self._children.get(partition)
        if c is None:
            return
        deadline = time.monotonic() + timeout_s
        pause = 0.002
        while True:
            pid, status = _waitpid(c.pid)
            if pid:
                self._finish(c, status)
                return
            if time.monotonic() >= deadline:
                self.abandon(partition, f"still writing after {timeout_s:g} s")
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def abandon(self, partition: int, why: str = "abandoned") -> None:
        """Kill the partition's child (and its grandchild) and remove what it wrote."""
        c = self._children.pop(partition, None)
        if c is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.pid, signal.SIGKILL)  # not yet in its own group
        with contextlib.suppress(ChildProcessError):
            os.waitpid(c.pid, 0)
        _reap_group(c.pid)
        os.close(c.report)
        snapshot.discard(c.pending)
        log.warning("partition %d: snapshot %s abandoned: %s", partition, c.pending.name, why)
        self._done.append(
            Result(partition, None, f"abandoned: {why}", c.stall_s, self._age(c), True)
        )

    def close(self, timeout_s: float) -> None:
        """Wait for every child (``timeout_s`` in all), abandoning those still running then."""
        deadline = time.monotonic() + timeout_s
        for p in self.in_flight:
            self.wait(p, max(0.0, deadline - time.monotonic()))

    def _note_slow_fork(self, partition: int, stall: float) -> None:
        if stall <= SLOW_STALL_S or self._slow_logged:
            return
        self._slow_logged = True
        log.warning(
            "partition %d: the snapshot fork held the stage %.0f ms: the kernel copies a "
            "page-table entry for every 4 KiB page; with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
            "(set in the image) and transparent huge pages at 'madvise' or 'always', hnswlib's "
            "memory is on 2 MiB pages and the fork takes a few ms (GLIBC_TUNABLES=%s)",
            partition,
            stall * 1e3,
            os.environ.get("GLIBC_TUNABLES") or "unset",
        )

    @staticmethod
    def _age(c: _Child) -> float:
        return time.monotonic() - c.started

    def _finish(self, c: _Child, status: int | None) -> None:
        """A child exited: publish what it wrote if it says it succeeded and the files agree.
        ``status`` None: someone else reaped it, and its report alone tells."""
        del self._children[c.partition]
        report = _read_report(c.report)
        if status is None:
            code = 0 if report.get("ok") else 1
        else:
            code = os.waitstatus_to_exitcode(status)
        error: str | None = None
        info: SnapshotInfo | None = None
        if code != 0 or not report.get("ok"):
            how = f"exit status {code}" if code >= 0 else f"killed by signal {-code}"
            error = f"{how}: {report.get('error') or 'no report'}"
            if code < 0:  # its grandchild died with it and may have become ours (PID 1)
                _reap_group(c.pid)
        else:
            try:
                info = snapshot.publish(c.pending, c.keep)
            except (SnapshotError, OSError) as exc:
                error = f"not published: {exc}"
        if info is None:
            snapshot.discard(c.pending)
            log.error(
                "partition %d: snapshot %s failed (%s); the previous snapshot stays current",
                c.partition,
                c.pending.name,
                error,
            )
        write_s = float(report.get("write_s") or self._age(c))
        self._done.append(Result(c.partition, info, error, c.stall_s, write_s, True))


def _in_process(
    partition: int, state: PartitionState, pending: Pending, keep: int, t0: float
) -> Result:
    try:
        snapshot.write(state, pending)
        info = snapshot.publish(pending, keep)
    except (SnapshotError, OSError) as exc:
        snapshot.discard(pending)
        log.error(
            "partition %d: snapshot %s failed (%s); the previous snapshot stays current",
            partition,
            pending.name,
            exc,
        )
        spent = time.perf_counter() - t0
        return Result(partition, None, str(exc), spent, spent, False)
    spent = time.perf_counter() - t0
    return Result(partition, info, None, spent, spent, False)


def _waitpid(pid: int) -> tuple[int, int | None]:
    """``os.waitpid(pid, WNOHANG)``; (pid, None) when another part of the process reaped it."""
    try:
        return os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return pid, None


def _reap_group(pgid: int, within_s: float = 1.0) -> None:
    """Reap what is left of a killed writer's group that became this process's child (when it
    is PID 1 in a container, orphans are re-parented to it)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return  # none of the group is (or will become) our child
        if pid == 0:
            time.sleep(0.01)


def _read_report(fd: int) -> dict[str, Any]:
    """The child's report (it has exited, so all of it is in the pipe); {} when none."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        report = json.loads(b"".join(chunks))
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _fork(state: PartitionState, pending: Pending, hashers: dict[str, Hasher]) -> tuple[int, int]:
    """Fork the writer; (its pid, the read end of its report pipe)."""
    r, w = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        _child(state, pending, hashers, w, parent)
    os.close(w)
    return pid, r


def _child(
    state: PartitionState, pending: Pending, hashers: dict[str, Hasher], w: int, parent: int
) -> NoReturn:
    """The forked writer: file I/O, hashing and hnswlib saves only, then ``os._exit``."""
    code = 1
    try:
        gc.disable()
        _die_with_parent(parent)
        os.setpgid(0, 0)  # a terminal's Ctrl-C is the parent's to handle; abandon kills the group
        t0 = time.perf_counter()
        try:
            total = snapshot.write(state, pending, save_index=_save_piped, hashers=hashers)
            msg: dict[str, Any] = {"ok": True, "bytes": total, "write_s": time.perf_counter() - t0}
        except BaseException as exc:  # reported to the parent, which logs and counts it
            msg = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:REPORT_LIMIT]}
        snapshot.write_all(w, json.dumps(msg).encode())
        code = 0 if msg["ok"] else 1
    finally:
        os._exit(code)


def _save_piped(idx: SpaceIndex, path: Path, h: Hasher) -> int:
    """hnswlib saves ``idx`` into a pipe from a grandchild; this process hashes the bytes as it
    writes them to ``path`` (fsynced). The bytes written."""
    r, w = os.pipe()
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, snapshot.CHUNK)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _die_with_parent(parent)
            os.close(r)
            idx.save(f"/proc/self/fd/{w}")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    total, head = 0, b""
    try:
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(bytearray(snapshot.CHUNK))
            while n := os.readv(r, [view]):
                part = view[:n]
                if len(head) < HEADER_BYTES:
                    head += bytes(part[: HEADER_BYTES - len(head)])
                h.update(part)
                snapshot.write_all(out, part)
                total += n
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(r)  # a grandchild still writing gets EPIPE and ends
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SnapshotError(f"hnswlib save of {path.name} ended with status {code}")
    snapshot.check_index_bytes(head, total, idx)
    return total
