"""File sources (JSONL, WebDataset tar shards as img2dataset writes them, Parquet and other
tables via :mod:`infogrowth.tabular`), local or remote, and the JSONL sinks."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import msgpack

from infogrowth.config import ColumnsConfig, LimitsConfig, Settings, StorageConfig
from infogrowth.errors import DataError
from infogrowth.imaging import ImageError, load_image_field
from infogrowth.locations import Location, base_name, exists, is_dir, open_stream
from infogrowth.schema import (
    Malformed,
    Sample,
    parse_json_sample,
    sample_from_obj,
    to_json_safe,
    writable,
)
from infogrowth.tabular import count_rows, read_folder, read_parquet

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TEXT_EXTS = (".txt", ".caption")
LABEL_EXTS = (".cls", ".label")
_SHARD_EXTS = frozenset((*IMAGE_EXTS, *TEXT_EXTS, *LABEL_EXTS, ".json"))
OUTPUTS = ("accepted", "relabeled", "rejected")


def _image_loader(base_dir: Path, root: Path, max_bytes: int) -> Any:
    def load(value: str) -> bytes:
        try:
            return load_image_field(value, base_dir, max_bytes=max_bytes, root=root)
        except ImageError as exc:
            raise DataError(f"image: {exc}") from None

    return load


def read_jsonl(
    path: Path, limits: LimitsConfig, image_root: Path | None = None
) -> Iterator[Sample | Malformed]:
    """One item per non-blank line; lines are read as bytes so bad UTF-8 is rejected, not lost.

    An ``image`` that names a file is read only if it is a regular file under ``image_root``
    (default: the file's own folder; relative paths start at that folder) of at most
    ``limits.max_image_bytes``; anything else (``/proc/self/environ``, ``../../etc/passwd``, a
    symlink out of the root, a FIFO) makes the line malformed, never the run fail.
    """
    loader = _image_loader(path.parent, image_root or path.parent, limits.max_image_bytes)
    with path.open("rb") as fh:
        yield from _jsonl_lines(fh, path.name, limits, loader)


OVERSIZE_KEPT = 64 * 1024
"""Bytes of an over-long JSONL line kept in its rejection (the rest is read past, not held)."""


def _jsonl_lines(
    fh: IO[bytes], name: str, limits: LimitsConfig, loader: Any
) -> Iterator[Sample | Malformed]:
    limit = limits.max_message_bytes
    for lineno, (raw, size) in enumerate(_bounded_lines(fh, limit + 1), start=1):
        source: dict[str, str | int] = {"file": name, "line": lineno}
        if size > limit + 1:  # too long even without a "\r": not held, read past
            detail = f"line of {size} bytes exceeds {limit} (its first {OVERSIZE_KEPT} kept)"
            yield Malformed(None, detail, raw[:OVERSIZE_KEPT], source)
            continue
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        yield parse_json_sample(line, limits, loader, source)


def _bounded_lines(fh: IO[bytes], keep: int) -> Iterator[tuple[bytes, int]]:
    """The lines of ``fh`` without their newline, each as (its first ``keep`` bytes, its size):
    a line longer than that is read past in chunks, never held whole."""
    held = bytearray()
    size = 0
    while chunk := fh.read(1 << 20):
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            stop = len(chunk) if nl < 0 else nl
            if len(held) < keep:
                held += chunk[start : min(stop, start + keep - len(held))]
            size += stop - start
            if nl < 0:
                break
            yield bytes(held), size
            held.clear()
            size = 0
            start = nl + 1
    if size:
        yield bytes(held), size


def _split_key(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    dot = base.find(".")
    if dot <= 0:
        return name, ""
    return name[: len(name) - len(base) + dot], base[dot:].lower()


def read_tar(
    path: Path, limits: LimitsConfig, name: str | None = None
) -> Iterator[Sample | Malformed]:
    """Samples of a WebDataset shard: members sharing a key (``key.jpg``, ``key.txt``, ``key.json``,
    ``key.cls``) form one sample whose id is the key (img2dataset writes the same key into
    ``key.json``). A truncated or corrupt shard yields a malformed record for the key being read.
    ``name`` is the shard's name in sources (default: the file's)."""
    shard = name or path.name
    current: str | None = None
    parts: dict[str, bytes] = {}
    errors: list[str] = []

    def flush() -> Sample | Malformed | None:
        if current is None:
            return None
        source: dict[str, str | int] = {
            "file": writable(shard) or "",
            "key": writable(current) or "",
        }
        obj: dict[str, Any] = {"id": current}
        meta: dict[str, Any] | None = None
        try:
            for ext, data in parts.items():
                if ext in IMAGE_EXTS:
                    obj["image"] = data
                elif ext in TEXT_EXTS:
                    obj["text"] = data.decode("utf-8")
                elif ext in LABEL_EXTS:
                    obj["label"] = data.decode("utf-8").strip()
                elif ext == ".json":
                    meta = json.loads(data)
            if meta is not None:
                if not isinstance(meta, dict):
                    raise DataError("key.json must hold an object")
                obj["meta"] = meta
                if obj.get("text") is None and isinstance(meta.get("caption"), str):
                    obj["text"] = meta["caption"]
        except (UnicodeDecodeError, ValueError) as exc:
            errors.append(str(exc))
        except RecursionError:
            errors.append("key.json nests too deeply")
        try:
            payload = msgpack.packb(obj, use_bin_type=True)
        except (OverflowError, ValueError, TypeError) as exc:  # a >64-bit integer, a surrogate
            errors.append(f"cannot be carried as a message: {type(exc).__name__}: {exc}")
            payload = msgpack.packb({"image": obj["image"]} if "image" in obj else {})
        if errors:
            return Malformed(writable(current), "; ".join(errors), payload, source)
        return sample_from_obj(obj, payload, limits, source=source)

    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key != current:
                    item = flush()
                    if item is not None:
                        yield item
                    current, parts, errors = key, {}, []
                if ext not in _SHARD_EXTS:
                    continue  # never read: a shard may hold anything beside its samples
                held = sum(len(v) for v in parts.values())
                if held + member.size > limits.max_message_bytes:
                    errors.append(f"{member.name}: {member.size} bytes exceeds the message limit")
                    continue
                fh = tar.extractfile(member)
                if fh is not None:
                    parts[ext] = fh.read()
            end = tar.offset
        item = flush()
        if item is not None:
            yield item
        if path.name.lower().endswith(".tar") and not _has_end_marker(path, end):
            current = None  # the last key was complete; what followed it is lost
            raise tarfile.ReadError("archive ends without its end-of-archive marker (truncated)")
    except (tarfile.TarError, OSError, EOFError) as exc:
        # The key being read may be incomplete: report it (and the rest of the shard) as bad.
        key = current if current is not None else "EOF"
        yield Malformed(current, f"corrupt tar shard: {exc}", b"", {"file": shard, "key": key})


def _has_end_marker(path: Path, offset: int) -> bool:
    """A complete tar ends with two zero blocks; a cut on a header boundary lacks them."""
    with path.open("rb") as fh:
        fh.seek(offset)
        tail = fh.read(1024)
    return len(tail) == 1024 and not tail.strip(b"\0")


OutputFormat = Literal["jsonl", "parquet"]
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
TABLE_EXTS = (".parquet",)


def read_inputs(
    paths: Sequence[Location],
    limits: LimitsConfig,
    image_root: Path | None = None,
    *,
    columns: ColumnsConfig | None = None,
    storage: StorageConfig | None = None,
) -> Iterator[Sample | Malformed]:
    """Samples of JSONL files, tar shards, Parquet files and table folders (Parquet files, a
    Hugging Face ``save_to_disk`` folder, clip-retrieval embeddings), local or URLs, in order.

    See :func:`read_jsonl` for ``image_root``; ``columns`` maps table columns to fields."""
    cols = columns or ColumnsConfig()
    shared = {n for n, c in Counter(base_name(loc) for loc in paths).items() if c > 1}
    for loc in paths:
        if not exists(loc, storage):
            raise FileNotFoundError(f"input not found: {loc}")
        # two inputs of one base name (train/part-0, val/part-0) are named as given instead
        given = str(loc) if base_name(loc) in shared else None
        name = base_name(loc).lower()
        local = loc if isinstance(loc, Path) else None
        if is_dir(loc, storage):
            loader = _table_images(local, image_root or local, limits)
            yield from read_folder(loc, limits, cols, storage, loader)
        elif name.endswith(TABLE_EXTS):
            base = None if local is None else local.parent
            loader = _table_images(base, image_root or base, limits)
            yield from read_parquet(loc, limits, cols, storage, loader, name=given)
        elif name.endswith(TAR_EXTS):
            with _local_copy(loc, storage) as path:
                yield from read_tar(path, limits, name=given or base_name(loc))
        elif local is not None:
            yield from read_jsonl(local, limits, image_root)
        else:
            with open_stream(loc, storage) as fh:
                yield from _jsonl_lines(fh, base_name(loc), limits, _inline_images(limits))


def settings_inputs(
    settings: Settings, paths: Sequence[Location], image_root: Path | None = None
) -> Iterator[Sample | Malformed]:
    """:func:`read_inputs` with the column mapping and storage options of ``settings``."""
    return read_inputs(
        paths,
        settings.limits,
        image_root,
        columns=settings.inputs.columns,
        storage=settings.storage,
    )


def open_outputs(out_dir: Path, fmt: OutputFormat) -> OutputWriter | Any:
    """The three outputs of a curate run as JSONL files or Parquet tables."""
    if fmt == "parquet":
        from infogrowth.parquet_out import ParquetWriter

        return ParquetWriter(out_dir)
    return OutputWriter(out_dir)


def _table_images(base: Path | None, root: Path | None, limits: LimitsConfig) -> Any:
    """Image paths in a local table resolve from its folder and stay under ``root``."""
    if base is None or root is None:
        return _inline_images(limits)
    return _image_loader(base, root, limits.max_image_bytes)


def _inline_images(limits: LimitsConfig) -> Any:
    """For remote inputs: ``image`` text must be a data: URI or base64, never a local path."""

    def load(value: str) -> bytes:
        try:
            return load_image_field(value, None, max_bytes=limits.max_image_bytes, paths=False)
        except ImageError as exc:
            raise DataError(f"image: {exc}") from None

    return load


@contextmanager
def _local_copy(loc: Location, storage: StorageConfig | None) -> Iterator[Path]:
    """``loc`` as a local file (a remote shard is copied to a temporary file first)."""
    if isinstance(loc, Path):
        yield loc
        return
    with tempfile.TemporaryDirectory(prefix="infogrowth-in-") as tmp:
        path = Path(tmp) / base_name(loc)
        with open_stream(loc, storage) as src, path.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield path


def count_inputs(paths: Sequence[Location], storage: StorageConfig | None = None) -> int | None:
    """Number of JSONL lines and Parquet rows (for the progress bar); None when a tar shard,
    a folder or a remote JSONL file is among the inputs."""
    total = 0
    for p in paths:
        name = base_name(p).lower()
        if name.endswith(TABLE_EXTS):
            rows = count_rows(p, storage)
            if rows is None:
                return None
            total += rows
            continue
        if not isinstance(p, Path) or p.is_dir() or name.endswith(TAR_EXTS):
            return None
        with p.open("rb") as fh:
            total += sum(1 for line in fh if line.strip())
    return total


class OutputWriter:
    """The three JSONL outputs, written to temp files and renamed into place on close."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self._fh: dict[str, IO[str]] = {}
        for name in OUTPUTS:
            self._fh[name] = (out_dir / f".{name}.jsonl.tmp").open("w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        fh = self._fh[record["decision"]]
        fh.write(json.dumps(to_json_safe(record), ensure_ascii=False, sort_keys=True))
        fh.write("\n")

    def close(self, commit: bool = True) -> None:
        for name, fh in self._fh.items():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            tmp = self.dir / f".{name}.jsonl.tmp"
            if commit:
                os.replace(tmp, self.dir / f"{name}.jsonl")
            else:
                tmp.unlink(missing_ok=True)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(commit=exc_type is None)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(to_json_safe(obj), fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
