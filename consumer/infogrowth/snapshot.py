"""Atomic, verified snapshots of a :class:`~infogrowth.index.PartitionState`.

Layout under a partition directory::

    CURRENT                   name of the live snapshot (replaced atomically)
    snap-<count>-<offset>/    space-<name>.bin (hnswlib), items.msgpack, manifest.json

A snapshot is written in three steps: :func:`prepare` names it and makes its temp directory,
:func:`write` writes every file there (hashed as it is written, fsynced) and the manifest last,
:func:`publish` checks what was written, renames the directory into place and swaps ``CURRENT``
by rename. :func:`save` runs all three on the calling thread; :mod:`infogrowth.snapfork` runs
:func:`write` in a forked child. Loading verifies the manifest (format, params, model
fingerprint, dimensions, count, sha256 of every file) before hnswlib reads a byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack

from infogrowth.config import IndexConfig
from infogrowth.index import HEADER_BYTES, PartitionState, SpaceIndex, saved_count
from infogrowth.online import OnlineState

log = logging.getLogger(__name__)
FORMAT = 1
CHUNK = 1 << 20
RUN = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
"""Marks this process's temp folders (``.tmp-…-<RUN>…``): pruning removes only other runs'
(a crashed process's), never one that a forked writer or a fetch of this process is filling. A
pid alone would not do: in a container the stage is often pid 1 in every run."""


class SnapshotError(RuntimeError):
    """A snapshot is missing, damaged or from an incompatible configuration."""


class NoSnapshot(SnapshotError):
    """No snapshot was ever completed in the directory (a first start on this volume)."""


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


SaveIndex = Callable[[SpaceIndex, Path, Hasher], int]
"""Writes one index to a path, feeding every byte to the hasher; returns the bytes written."""


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    count: int
    changelog_offset: int
    created: float
    bytes: int


@dataclass(frozen=True)
class Pending:
    """A snapshot being written into ``tmp``, not yet current."""

    directory: Path
    name: str
    tmp: Path
    count: int
    changelog_offset: int
    files: tuple[str, ...]
    manifest: dict[str, Any]
    """Every manifest field but ``created``, ``files`` and ``sizes`` (added by :func:`write`)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
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


def prepare(
    state: PartitionState,
    directory: Path,
    fingerprint: str,
    *,
    topic_id: str | None = None,
    calibration: str | None = None,
    epoch: int = 0,
) -> Pending:
    """Name the snapshot of ``state`` as it is now and make its (empty) temp directory."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"snap-{state.count:012d}-{state.changelog_offset + 1:012d}"
    tmp = directory / f".tmp-{name}-{RUN}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    manifest = {
        "format": FORMAT,
        "spaces": list(state.spaces),
        "dims": dict(state.dims),
        "params": _params(state.cfg),
        "fingerprint": fingerprint,
        "count": state.count,
        "changelog_offset": state.changelog_offset,
        "changelog_topic_id": topic_id,
        "calibration": calibration,
        "epoch": epoch,
    }
    files = (*(f"space-{s}.bin" for s in state.spaces), "items.msgpack")
    return Pending(directory, name, tmp, state.count, state.changelog_offset, files, manifest)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_hashed(path: Path, data: bytes, h: Hasher) -> int:
    """Write ``data`` to a new file at ``path``, hashing it on the way; fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        for lo in range(0, len(view), CHUNK):
            part = view[lo : lo + CHUNK]
            h.update(part)
            write_all(fd, part)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def check_index_bytes(head: bytes, size: int, idx: SpaceIndex) -> None:
    """Raise :class:`SnapshotError` unless ``head`` (the first bytes of a saved index of
    ``size`` bytes) is an hnswlib header for ``idx``'s item count (hnswlib's own save reports
    no write error, so a short file is caught here)."""
    count = saved_count(head, size)
    if count != idx.count:
        raise SnapshotError(
            f"hnswlib wrote {size} bytes holding {count} items, expected {idx.count}"
        )


def save_then_hash(idx: SpaceIndex, path: Path, h: Hasher) -> int:
    """hnswlib writes the file, then a second pass reads it back into the hasher (the
    in-process path: hnswlib holds the GIL while it saves, so nothing can hash alongside)."""
    idx.save(str(path))
    _fsync_file(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(HEADER_BYTES)
        h.update(head)
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    check_index_bytes(head, size, idx)
    return size


def items_bytes(state: PartitionState) -> bytes:
    return msgpack.packb(  # type: ignore[no-any-return]
        {
            "ids": state.ids,
            "labels": state.labels,
            "fixed": state.fixed,
            "online": state.online.as_record(),
        },
        use_bin_type=True,
    )


def write(
    state: PartitionState,
    pending: Pending,
    *,
    save_index: SaveIndex = save_then_hash,
    hashers: dict[str, Hasher] | None = None,
) -> int:
    """Write every file of ``pending`` (indexes, items, then the manifest) into its temp
    directory, fsynced; the bytes written (manifest not counted).

    ``hashers`` (one per file name, fresh) lets a forked child use hash objects made before the
    fork; ``save_index`` writes one index (see :func:`save_then_hash`).
    """
    hs: dict[str, Hasher] = hashers or {f: hashlib.sha256() for f in pending.files}
    sizes: dict[str, int] = {}
    for s in state.spaces:
        fname = f"space-{s}.bin"
        sizes[fname] = save_index(state.indexes[s], pending.tmp / fname, hs[fname])
    sizes["items.msgpack"] = write_hashed(
        pending.tmp / "items.msgpack", items_bytes(state), hs["items.msgpack"]
    )
    manifest = dict(pending.manifest)
    manifest["created"] = time.time()
    manifest["files"] = {f: hs[f].hexdigest() for f in pending.files}
    manifest["sizes"] = sizes
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    write_hashed(pending.tmp / "manifest.json", text, hashlib.sha256())
    _fsync_dir(pending.tmp)
    return sum(sizes.values())


def publish(pending: Pending, keep: int = 2) -> SnapshotInfo:
    """Check the written files against their manifest (count, offset, sizes), move the
    snapshot into place, make it current and prune older ones beyond ``keep``."""
    tmp = pending.tmp
    try:
        manifest = json.loads((tmp / "manifest.json").read_text())
        sizes = {str(k): int(v) for k, v in manifest["sizes"].items()}
        count, offset = int(manifest["count"]), int(manifest["changelog_offset"])
        created = float(manifest["created"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"{tmp}: no complete manifest: {exc}") from None
    if (count, offset) != (pending.count, pending.changelog_offset):
        raise SnapshotError(
            f"{tmp}: manifest says {count} items at offset {offset}, "
            f"expected {pending.count} at {pending.changelog_offset}"
        )
    if set(sizes) != set(pending.files) or set(manifest.get("files", {})) != set(pending.files):
        raise SnapshotError(f"{tmp}: manifest lists {sorted(sizes)}, expected {pending.files}")
    for fname, size in sizes.items():
        try:
            got = (tmp / fname).stat().st_size
        except OSError:
            got = -1
        if got != size:
            raise SnapshotError(f"{tmp}: {fname} holds {got} bytes, the manifest says {size}")
    final = adopt(pending.directory, tmp, pending.name, keep)
    return SnapshotInfo(final, count, offset, created, sum(sizes.values()))


def adopt(directory: Path, tmp: Path, name: str, keep: int = 2) -> Path:
    """Move the complete snapshot in ``tmp`` into place as ``name``, make it current and prune
    older ones beyond ``keep``; its final path."""
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
    return final


def discard(pending: Pending) -> None:
    """Remove an unpublished snapshot's temp directory (CURRENT is left as it was)."""
    shutil.rmtree(pending.tmp, ignore_errors=True)


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
    """Write a snapshot of ``state`` on this thread and make it current; prune older ones
    beyond ``keep``.

    ``topic_id`` names the changelog topic the state's offset refers to, ``calibration`` and
    ``epoch`` the calibration it was decided under: a snapshot is only valid against all three.
    """
    pending = prepare(
        state, directory, fingerprint, topic_id=topic_id, calibration=calibration, epoch=epoch
    )
    try:
        write(state, pending)
        return publish(pending, keep)
    except BaseException:
        discard(pending)
        raise


def _prune(directory: Path, keep: int, current: str) -> None:
    """Keep ``current`` and the newest by changelog offset (names start with the item count,
    which drops after a ``seed --reset``), up to ``keep`` in all."""
    snaps = sorted(
        (p for p in directory.glob("snap-*") if p.is_dir() and name_offset(p.name) is not None),
        key=lambda p: (name_offset(p.name), p.name),
    )
    old = [p for p in snaps if p.name != current][: max(0, len(snaps) - keep)]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    for pattern in (".tmp-snap-*", ".tmp-remote-*", ".upload-*"):
        for p in directory.glob(pattern):
            if RUN not in p.name:  # another run's, left by a crash
                shutil.rmtree(p, ignore_errors=True)


_NAME = re.compile(r"^snap-(\d+)-(\d+)$")


def name_offset(name: str) -> int | None:
    """The changelog offset a snapshot named ``name`` includes (None: not a snapshot name)."""
    m = _NAME.match(name)
    return int(m.group(2)) - 1 if m else None


def current_name(directory: Path) -> str | None:
    """The name ``CURRENT`` points at, None without one."""
    try:
        return (directory / "CURRENT").read_text().strip() or None
    except OSError:
        return None


def load(directory: Path, cfg: IndexConfig, **checks: Any) -> PartitionState:
    """Load and verify the current snapshot in ``directory``; ``checks`` as :func:`load_dir`
    takes them. :class:`NoSnapshot` when none was ever made there."""
    cur = directory / "CURRENT"
    if not cur.is_file():
        raise NoSnapshot(f"no snapshot in {directory}")
    return load_dir(directory / cur.read_text().strip(), cfg, **checks)


def check_manifest(
    snap: Path,
    cfg: IndexConfig,
    *,
    fingerprint: str,
    spaces: tuple[str, ...],
    dims: dict[str, int],
    topic_id: str | None = None,
    calibration: str | None = None,
    epoch: int = 0,
    end_offset: int | None = None,
) -> dict[str, Any]:
    """The manifest in folder ``snap`` if the snapshot it describes may be used (the checks of
    :func:`load_dir` that need no other file); :class:`SnapshotError` otherwise."""
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
    if not isinstance(files, dict) or set(files) != expected:
        raise SnapshotError(f"{snap}: manifest lists {sorted(files)}, expected {sorted(expected)}")
    return manifest


def load_dir(
    snap: Path,
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
    """Load and verify the snapshot in folder ``snap``; raise :class:`SnapshotError` on any
    mismatch.

    A snapshot belongs to one changelog topic (``topic_id``: topics recreated under the same
    name get a new id) and one calibration (digest and ``epoch``); it is refused when either
    differs, or when its offset is not below ``end_offset`` (the changelog partition's end),
    since then the log it was taken from is gone.
    """
    manifest = check_manifest(
        snap,
        cfg,
        fingerprint=fingerprint,
        spaces=spaces,
        dims=dims,
        topic_id=topic_id,
        calibration=calibration,
        epoch=epoch,
        end_offset=end_offset,
    )
    for fname, digest in manifest["files"].items():
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
