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

import logging
import os
import posixpath
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infogrowth import locations
from infogrowth.config import StorageConfig
from infogrowth.snapshot import name_offset

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STAGING = ".upload-"
"""Prefix of the folder of hard links an upload reads from (next to the partition's snapshots)."""


class RemoteStore:
    """Snapshot folders under one URL."""

    def __init__(self, url: str, storage: StorageConfig | None) -> None:
        self.url = url
        self.fs: Any
        self.fs, root = locations.filesystem(url, storage)
        self.root = root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def snapshots(self, folder: str) -> list[str]:
        """Names of the complete snapshots in ``folder``, the newest (highest changelog offset)
        first."""
        try:
            entries = self.fs.ls(self._path(folder), detail=False)
        except FileNotFoundError:
            return []
        names = {posixpath.basename(str(e).rstrip("/")) for e in entries}
        snaps = sorted(
            (n for n in names if name_offset(n) is not None),
            key=lambda n: (name_offset(n), n),
            reverse=True,
        )
        return [n for n in snaps if self.fs.exists(self._path(folder, n, MANIFEST))]

    def upload(self, files: Path, folder: str, name: str, keep: int) -> int:
        """Upload the snapshot files in the local folder ``files`` as ``folder/name`` (the
        manifest last), then prune ``folder`` to the newest ``keep``; the bytes uploaded."""
        dest = self._path(folder, name)
        self.fs.makedirs(dest, exist_ok=True)
        order = sorted(os.listdir(files), key=lambda n: (n == MANIFEST, n))
        if MANIFEST not in order:
            raise FileNotFoundError(f"{files}: no {MANIFEST}")
        size = 0
        for fname in order:
            self.fs.put_file(str(files / fname), posixpath.join(dest, fname))
            size += (files / fname).stat().st_size
        self.prune(folder, keep)
        return size

    def prune(self, folder: str, keep: int) -> None:
        """Remove complete snapshots beyond the newest ``keep``, and unfinished uploads older
        than the oldest one kept."""
        complete = self.snapshots(folder)
        if len(complete) < keep:
            return
        oldest_kept = name_offset(complete[keep - 1]) or 0
        try:
            entries = self.fs.ls(self._path(folder), detail=False)
        except FileNotFoundError:
            return
        for e in entries:
            n = posixpath.basename(str(e).rstrip("/"))
            off = name_offset(n)
            if off is None or n in complete[:keep]:
                continue
            if n in complete or off < oldest_kept:
                self.fs.rm(self._path(folder, n), recursive=True)

    def fetch(self, folder: str, name: str, into: Path) -> int:
        """Download ``folder/name`` into the new local folder ``into``; the bytes fetched."""
        into.mkdir(parents=True)
        src = self._path(folder, name)
        size = 0
        for entry in self.fs.ls(src, detail=False):
            fname = posixpath.basename(str(entry).rstrip("/"))
            self.fs.get_file(posixpath.join(src, fname), str(into / fname))
            size += (into / fname).stat().st_size
        return size


def stage(snap: Path) -> Path:
    """Hard links of ``snap``'s files in a folder of their own next to it (a copy where the
    filesystem cannot link); earlier staging folders of the partition are removed first."""
    for old in snap.parent.glob(f"{STAGING}*"):
        shutil.rmtree(old, ignore_errors=True)
    staged = snap.parent / f"{STAGING}{snap.name}"
    staged.mkdir()
    for f in snap.iterdir():
        try:
            os.link(f, staged / f.name)
        except OSError:
            shutil.copyfile(f, staged / f.name)
    return staged


@dataclass(frozen=True)
class Upload:
    """One upload that ended."""

    partition: int
    name: str
    bytes: int
    seconds: float
    error: str | None = None


class Uploader:
    """Uploads snapshots on one background thread, one at a time, at most one per partition
    queued or in flight."""

    def __init__(self, store: RemoteStore, keep: int) -> None:
        self.store = store
        self.keep = keep
        self._todo: queue.Queue[tuple[int, Path, str, str] | None] = queue.Queue()
        self._cond = threading.Condition()
        self._ended: list[Upload] = []
        self._open = 0
        """Uploads submitted that have not ended."""
        self._busy: set[int] = set()
        self._thread: threading.Thread | None = None

    def busy(self, partition: int) -> bool:
        return partition in self._busy

    def submit(self, partition: int, snap: Path, folder: str) -> bool:
        """Queue an upload of the published local snapshot ``snap`` as ``folder/<its name>``;
        False (nothing queued) while the partition has one queued or in flight."""
        if partition in self._busy:
            return False
        staged = stage(snap)
        self._busy.add(partition)
        with self._cond:
            self._open += 1
        self._todo.put((partition, staged, folder, snap.name))
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="infogrowth-snapshot-upload", daemon=True
            )
            self._thread.start()
        return True

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            partition, staged, folder, name = job
            t0 = time.monotonic()
            try:
                size = self.store.upload(staged, folder, name, self.keep)
                up = Upload(partition, name, size, time.monotonic() - t0)
            except Exception as exc:  # handed to the stage, which logs and counts it
                up = Upload(partition, name, 0, time.monotonic() - t0, f"{exc!r}")
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            with self._cond:
                self._ended.append(up)
                self._open -= 1
                self._cond.notify_all()

    def poll(self) -> list[Upload]:
        """The uploads that ended since the last call."""
        with self._cond:
            ended, self._ended = self._ended, []
        for up in ended:
            self._busy.discard(up.partition)
        return ended

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every submitted upload to end; whether they did."""
        with self._cond:
            return self._cond.wait_for(lambda: self._open == 0, max(0.0, timeout))

    def close(self, timeout: float) -> bool:
        """Wait as :meth:`wait`, then let the thread end; an upload still running is left to
        the process's exit (its snapshot stays incomplete remotely and is never read)."""
        done = self.wait(timeout)
        if self._thread is not None:
            self._todo.put(None)
            self._thread = None
        return done
