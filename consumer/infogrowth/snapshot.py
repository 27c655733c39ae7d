"""Atomic, verified snapshots of a :class:`~infogrowth.index.PartitionState`.

Layout under a partition directory::

    CURRENT                   name of the live snapshot (replaced atomically)
    snap-<count>-<offset>/    space-<name>.bin (hnswlib), items.msgpack, manifest.json

A snapshot is written to a temp directory, every file fsynced, the directory renamed into place,
then ``CURRENT`` swapped by rename. Loading verifies the manifest (format, params, model
fingerprint, dimensions, count, sha256 of every file) before hnswlib reads a byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from infogrowth.config import IndexConfig
from infogrowth.index import PartitionState, SpaceIndex
from infogrowth.online import OnlineState

log = logging.getLogger(__name__)
FORMAT = 1


class SnapshotError(RuntimeError):
    """A snapshot is missing, damaged or from an incompatible configuration."""


class NoSnapshot(SnapshotError):
    """No snapshot was ever completed in the directory (a first start on this volume)."""


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    count: int
    changelog_offset: int
    created: float
    bytes: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _params(cfg: IndexConfig) -> dict[str, Any]:
    return {"m": cfg.m, "ef_construction": cfg.ef_construction, "random_seed": cfg.random_seed}


def save(
    state: PartitionState,
    directory: Path,
    fingerprint: str,
    keep: int = 2,
    *,
    topic_id: str | None = None,
    calibration: str | None = None,
    epoch: int = 0,
) -> SnapshotInfo:
    """Write a snapshot of ``state`` and make it current; prune older ones beyond ``keep``.

    ``topic_id`` names the changelog topic the state's offset refers to, ``calibration`` and
    ``epoch`` the calibration it was decided under: a snapshot is only valid against all three.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"snap-{state.count:012d}-{state.changelog_offset + 1:012d}"
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: dict[str, str] = {}
    for s in state.spaces:
        fname = f"space-{s}.bin"
        state.indexes[s].save(str(tmp / fname))
        files[fname] = ""
    items = tmp / "items.msgpack"
    items.write_bytes(
        msgpack.packb(
            {
                "ids": state.ids,
                "labels": state.labels,
                "fixed": state.fixed,
                "online": state.online.as_record(),
            },
            use_bin_type=True,
        )
    )
    files["items.msgpack"] = ""
    total = 0
    for fname in files:
        p = tmp / fname
        _fsync_file(p)
        files[fname] = _sha256(p)
        total += p.stat().st_size
    created = time.time()
    manifest = {
        "format": FORMAT,
        "spaces": list(state.spaces),
        "dims": state.dims,
        "params": _params(state.cfg),
        "fingerprint": fingerprint,
        "count": state.count,
        "changelog_offset": state.changelog_offset,
        "changelog_topic_id": topic_id,
        "calibration": calibration,
        "epoch": epoch,
        "created": created,
        "files": files,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync_file(tmp / "manifest.json")
    _fsync_dir(tmp)
    final = directory / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    cur_tmp = directory / f".CURRENT.{os.getpid()}"
    cur_tmp.write_text(name)
    _fsync_file(cur_tmp)
    os.replace(cur_tmp, directory / "CURRENT")
    _fsync_dir(directory)
    _prune(directory, keep, name)
    return SnapshotInfo(final, state.count, state.changelog_offset, created, total)


def _prune(directory: Path, keep: int, current: str) -> None:
    snaps = sorted(p for p in directory.glob("snap-*") if p.is_dir())
    old = [p for p in snaps if p.name != current][: max(0, len(snaps) - keep)]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    for p in directory.glob(".tmp-snap-*"):
        shutil.rmtree(p, ignore_errors=True)


def load(
    directory: Path,
    cfg: IndexConfig,
    *,
    fingerprint: str,
    spaces: tuple[str, ...],
    dims: dict[str, int],
    topic_id: str | None = None,
    calibration: str | None = None,
    epoch: int = 0,
    end_offset: int | None = None,
) -> PartitionState:
    """Load and verify the current snapshot; raise :class:`SnapshotError` on any mismatch.

    A snapshot belongs to one changelog topic (``topic_id``: topics recreated under the same
    name get a new id) and one calibration (digest and ``epoch``); it is refused when either
    differs, or when its offset is not below ``end_offset`` (the changelog partition's end),
    since then the log it was taken from is gone.
    """
    cur = directory / "CURRENT"
    if not cur.is_file():
        raise NoSnapshot(f"no snapshot in {directory}")
    snap = directory / cur.read_text().strip()
    try:
        manifest = json.loads((snap / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{snap}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{snap}: manifest is not an object")
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{snap}: format {manifest.get('format')!r}, expected {FORMAT}")
    if manifest.get("fingerprint") != fingerprint:
        raise SnapshotError(
            f"{snap}: made with model {manifest.get('fingerprint')!r}, "
            f"this run uses {fingerprint!r}"
        )
    if tuple(manifest.get("spaces", ())) != spaces or manifest.get("dims") != dims:
        raise SnapshotError(f"{snap}: spaces/dims {manifest.get('dims')} differ from {dims}")
    if manifest.get("params") != _params(cfg):
        raise SnapshotError(f"{snap}: index params {manifest.get('params')} differ")
    if manifest.get("changelog_topic_id") != topic_id:
        raise SnapshotError(
            f"{snap}: taken from changelog topic id {manifest.get('changelog_topic_id')!r}, "
            f"the topic's id is now {topic_id!r} (topics recreated?)"
        )
    if manifest.get("calibration") != calibration:
        raise SnapshotError(
            f"{snap}: made under calibration {manifest.get('calibration')!r}, "
            f"this run uses {calibration!r}"
        )
    if manifest.get("epoch", 0) != epoch:
        raise SnapshotError(
            f"{snap}: made under calibration epoch {manifest.get('epoch', 0)!r}, "
            f"this run is at epoch {epoch}"
        )
    offset = manifest.get("changelog_offset")
    if not isinstance(offset, int):
        raise SnapshotError(f"{snap}: no changelog offset")
    if end_offset is not None and offset >= end_offset:
        raise SnapshotError(
            f"{snap}: includes changelog offset {offset}, beyond the log end {end_offset}"
        )
    files = manifest.get("files", {})
    expected = {f"space-{s}.bin" for s in spaces} | {"items.msgpack"}
    if set(files) != expected:
        raise SnapshotError(f"{snap}: manifest lists {sorted(files)}, expected {sorted(expected)}")
    for fname, digest in files.items():
        p = snap / fname
        if not p.is_file():
            raise SnapshotError(f"{snap}: missing {fname}")
        if _sha256(p) != digest:
            raise SnapshotError(f"{snap}: checksum mismatch in {fname}")
    try:
        items = msgpack.unpackb((snap / "items.msgpack").read_bytes(), raw=False)
        ids: list[str] = list(items["ids"])
        labels: list[str | None] = list(items["labels"])
        fixed: list[bool] = [bool(x) for x in items.get("fixed", [False] * len(ids))]
        online = OnlineState.from_record(items.get("online"))
    except Exception as exc:
        raise SnapshotError(f"{snap}: bad items file: {exc}") from None
    count = int(manifest["count"])
    if len(ids) != count or len(labels) != count or len(fixed) != count:
        raise SnapshotError(f"{snap}: item count {len(ids)} != manifest count {count}")
    indexes = {}
    for s in spaces:
        try:
            idx = SpaceIndex.load(str(snap / f"space-{s}.bin"), dims[s], cfg)
        except Exception as exc:
            raise SnapshotError(f"{snap}: hnswlib could not load {s}: {exc}") from None
        if idx.count != count:
            raise SnapshotError(f"{snap}: {s} index holds {idx.count} items, expected {count}")
        indexes[s] = idx
    return PartitionState(
        spaces=spaces,
        dims=dict(dims),
        cfg=cfg,
        indexes=indexes,
        ids=ids,
        labels=labels,
        id_pos={sid: i for i, sid in enumerate(ids)},
        changelog_offset=int(manifest["changelog_offset"]),
        fixed=fixed,
        online=online,
    )
