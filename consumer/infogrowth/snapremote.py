"""A shared copy of every partition's snapshots (``snapshot.remote``), so that whichever pod takes
a partition starts from a snapshot, not from the whole changelog.

Layout: ``<remote>/<embedded topic>-<partition>/snap-<count>-<offset>/`` holds the files of a
local snapshot, ``manifest.json`` uploaded last: a folder without its manifest is an upload that
did not finish and is never read. Nothing fetched is trusted: it goes through the same checks as a
local snapshot (manifest, index params, model, calibration, changelog topic id and end, sha256 of
every file) before it is used, and a restore falls back to the next snapshot, then to the
changelog.

Several pods may write one partition's folder (an old owner finishing an upload after a
rebalance, a zombie). That is safe: every snapshot holds a committed prefix of the changelog and
names the offset it includes, so any complete one is a correct start; a restore takes the newest
that verifies and replays the changelog after it.

Uploads run on one background thread of the select stage (:class:`Uploader`), from hard links of
the snapshot's files made when it is published, so the local pruning of older snapshots cannot
pull a file away mid-upload.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import queue
import shutil
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.callbacks import Callback

from infogrowth import locations
from infogrowth.config import StorageConfig
from infogrowth.snapshot import RUN, name_offset

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STAGING = ".upload-"
"""Prefix of the folder of hard links an upload reads from (next to the partition's snapshots;
named with this run's token, so the local pruning clears those a crash left)."""


def staging_path(snap: Path) -> Path:
    """Where :func:`stage` puts the hard links of ``snap`` in this run."""
    return snap.parent / f"{STAGING}{snap.name}.{RUN}"


class _Cancellable(Callback):  # type: ignore[misc]
    """An fsspec transfer callback that stops a download between chunks once ``cancel`` is set
    (for stores that report progress: s3fs, gcsfs; a local copy runs to its end)."""

    def __init__(self, cancel: threading.Event, what: str) -> None:
        super().__init__()
        self.cancel = cancel
        self.what = what

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self.cancel.is_set():
            raise InterruptedError(f"fetch of {self.what} cancelled")


class RemoteStore:
    """Snapshot folders under one URL."""

    def __init__(self, url: str, storage: StorageConfig | None) -> None:
        self.url = url
        self.fs: Any
        self.fs, root = locations.filesystem(url, storage)
        self.root = root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _ls(self, path: str) -> list[str]:
        """Names in ``path``, listed afresh: s3fs and gcsfs cache listings without expiry, and
        other pods write here."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(str(e).rstrip("/")) for e in entries]

    def snapshots(self, folder: str) -> list[str]:
        """Names of the complete snapshots in ``folder``, the newest (highest changelog offset)
        first."""
        snaps = sorted(
            (n for n in set(self._ls(self._path(folder))) if name_offset(n) is not None),
            key=lambda n: (name_offset(n), n),
            reverse=True,
        )
        return [n for n in snaps if MANIFEST in self._ls(self._path(folder, n))]

    def upload(self, files: Path, folder: str, name: str, keep: int) -> int:
        """Upload the snapshot files in the local folder ``files`` as ``folder/name``, the
        manifest last (under a temporary name, then moved), then prune ``folder`` to the newest
        ``keep``; the bytes uploaded (0: that snapshot is there already)."""
        dest = self._path(folder, name)
        if MANIFEST in self._ls(dest):
            return 0
        self.fs.makedirs(dest, exist_ok=True)
        order = sorted(os.listdir(files), key=lambda n: (n == MANIFEST, n))
        if MANIFEST not in order:
            raise FileNotFoundError(f"{files}: no {MANIFEST}")
        size = 0
        for fname in order:
            target = posixpath.join(dest, fname)
            if fname == MANIFEST:
                staged = posixpath.join(dest, f".{MANIFEST}.tmp")
                self.fs.put_file(str(files / fname), staged)
                self.fs.mv(staged, target)
            else:
                self.fs.put_file(str(files / fname), target)
            size += (files / fname).stat().st_size
        try:
            self.prune(folder, keep)
        except Exception as exc:  # the upload itself is complete
            log.warning("shared snapshots in %s not pruned: %r", self._path(folder), exc)
        return size

    def prune(self, folder: str, keep: int) -> None:
        """Remove complete snapshots beyond the newest ``keep``, and unfinished uploads older
        than the oldest one kept."""
        complete = self.snapshots(folder)
        if len(complete) < keep:
            return
        kept = complete[:keep]
        oldest_kept = name_offset(kept[-1]) or 0
        for n in self._ls(self._path(folder)):
            off = name_offset(n)
            if off is None or n in kept:
                continue
            if n in complete or off < oldest_kept:
                self.fs.rm(self._path(folder, n), recursive=True)

    def fetch(
        self,
        folder: str,
        name: str,
        into: Path,
        cancel: threading.Event | None = None,
        check: Callable[[Path], object] | None = None,
    ) -> int:
        """Download ``folder/name`` into the new local folder ``into``; the bytes fetched.

        The manifest comes first and ``check`` sees it alone (a snapshot of another model or
        epoch is refused before its data is fetched); then the files it lists. ``cancel`` set:
        stop at the next chunk or file. Whatever ends it early removes ``into``.
        """
        into.mkdir(parents=True)
        src = self._path(folder, name)
        stop = cancel or threading.Event()
        try:
            self.fs.get_file(posixpath.join(src, MANIFEST), str(into / MANIFEST))
            if check is not None:
                check(into)
            try:
                listed = json.loads((into / MANIFEST).read_text())["files"]
                names = [str(f) for f in listed]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{src}: manifest names no files: {exc!r}") from None
            size = (into / MANIFEST).stat().st_size
            for fname in names:
                if posixpath.basename(fname) != fname or fname.startswith("."):
                    raise ValueError(f"{src}: manifest names a file outside it: {fname!r}")
                if stop.is_set():
                    raise InterruptedError(f"fetch of {src} cancelled")
                self.fs.get_file(
                    posixpath.join(src, fname), str(into / fname), callback=_Cancellable(stop, src)
                )
                size += (into / fname).stat().st_size
            if stop.is_set():
                raise InterruptedError(f"fetch of {src} cancelled")
            return size
        except BaseException:
            shutil.rmtree(into, ignore_errors=True)
            raise


def stage(snap: Path, in_use: Collection[Path] = ()) -> Path:
    """Hard links of ``snap``'s files in a folder of their own next to it (copies where the
    filesystem cannot link); the partition's other staging folders are removed unless
    ``in_use`` (an earlier run's, left by a crash)."""
    for old in snap.parent.glob(f"{STAGING}*"):
        if old not in in_use:
            shutil.rmtree(old, ignore_errors=True)
    staged = staging_path(snap)
    staged.mkdir()
    try:
        for f in snap.iterdir():
            try:
                os.link(f, staged / f.name)
            except OSError:
                shutil.copyfile(f, staged / f.name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


@dataclass(frozen=True)
class Upload:
    """One upload that ended."""

    partition: int
    name: str
    bytes: int
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class _Job:
    partition: int
    staged: Path
    folder: str
    name: str


class Uploader:
    """Uploads snapshots on one background thread, one at a time. Per partition at most one
    upload runs and one waits: a newer snapshot submitted meanwhile replaces the waiting one."""

    def __init__(self, store: RemoteStore, keep: int) -> None:
        self.store = store
        self.keep = keep
        self._todo: queue.Queue[_Job | None] = queue.Queue()
        self._cond = threading.Condition()
        self._ended: list[Upload] = []
        self._running: dict[int, _Job] = {}
        """Per partition, the upload queued or in flight."""
        self._next: dict[int, _Job] = {}
        """Per partition, the upload that goes once the running one ends."""
        self._thread: threading.Thread | None = None
        self._closed = False
        self._since: tuple[_Job, float] | None = None
        """The upload in flight and when it started."""

    def submit(self, partition: int, snap: Path, folder: str) -> None:
        """Upload the published local snapshot ``snap`` as ``folder/<its name>``: now, or after
        the partition's running upload (replacing the one that waited for it). Nothing once
        :meth:`close` was called (revoke callbacks run after it, as the consumer leaves)."""
        with self._cond:
            if self._closed:
                return
            target = staging_path(snap)
            if any(j.staged == target for j in self._running.values()):
                return  # this very snapshot is being uploaded
            self._next.pop(partition, None)  # replaced: its staging folder goes below
            in_use = {j.staged for j in (*self._running.values(), *self._next.values())}
            job = _Job(partition, stage(snap, in_use), folder, snap.name)
            if partition in self._running:
                self._next[partition] = job
                return
            self._running[partition] = job
        self._todo.put(job)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="infogrowth-snapshot-upload", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            t0 = time.monotonic()
            with self._cond:
                self._since = (job, t0)
            try:
                size = self.store.upload(job.staged, job.folder, job.name, self.keep)
                up = Upload(job.partition, job.name, size, time.monotonic() - t0)
            except Exception as exc:  # handed to the stage, which logs and counts it
                up = Upload(job.partition, job.name, 0, time.monotonic() - t0, f"{exc!r}")
            finally:
                shutil.rmtree(job.staged, ignore_errors=True)
            with self._cond:
                self._since = None
                self._ended.append(up)
                nxt = self._next.pop(job.partition, None)
                if nxt is None:
                    del self._running[job.partition]
                else:
                    self._running[job.partition] = nxt
                    self._todo.put(nxt)
                self._cond.notify_all()

    def poll(self) -> list[Upload]:
        """The uploads that ended since the last call."""
        with self._cond:
            ended, self._ended = self._ended, []
        return ended

    def running(self) -> tuple[int, str, float] | None:
        """The upload in flight: its partition, snapshot name and seconds since it started."""
        with self._cond:
            if self._since is None:
                return None
            job, t0 = self._since
            return job.partition, job.name, time.monotonic() - t0

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every submitted upload to end; whether they did."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._running, max(0.0, timeout))

    def close(self, timeout: float) -> bool:
        """Wait as :meth:`wait`, then let the thread end; an upload still running is left to
        the process's exit (its snapshot stays incomplete remotely and is never read)."""
        with self._cond:
            self._closed = True
        done = self.wait(timeout)
        if self._thread is not None:
            self._todo.put(None)
            self._thread = None
        return done
