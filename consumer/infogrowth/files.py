"""File sources (JSONL, WebDataset tar shards as img2dataset writes them) and JSONL sinks."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import msgpack

from infogrowth.config import LimitsConfig
from infogrowth.imaging import ImageError, load_image_field
from infogrowth.schema import Malformed, Sample, parse_json_sample, sample_from_obj, to_json_safe

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TEXT_EXTS = (".txt", ".caption")
LABEL_EXTS = (".cls", ".label")
OUTPUTS = ("accepted", "relabeled", "rejected")


def _image_loader(base_dir: Path, root: Path, max_bytes: int) -> Any:
    def load(value: str) -> bytes:
        try:
            return load_image_field(value, base_dir, max_bytes=max_bytes, root=root)
        except ImageError as exc:
            raise ValueError(f"image: {exc}") from None

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
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            yield parse_json_sample(line, limits, loader, {"file": path.name, "line": lineno})


def _split_key(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    dot = base.find(".")
    if dot <= 0:
        return name, ""
    return name[: len(name) - len(base) + dot], base[dot:].lower()


def read_tar(path: Path, limits: LimitsConfig) -> Iterator[Sample | Malformed]:
    """Samples of a WebDataset shard: members sharing a key (``key.jpg``, ``key.txt``, ``key.json``,
    ``key.cls``) form one sample whose id is the key (img2dataset writes the same key into
    ``key.json``). A truncated or corrupt shard yields a malformed record for the key being read."""
    current: str | None = None
    parts: dict[str, bytes] = {}
    errors: list[str] = []

    def flush() -> Sample | Malformed | None:
        if current is None:
            return None
        source: dict[str, str | int] = {"file": path.name, "key": current}
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
                    raise ValueError("key.json must hold an object")
                obj["meta"] = meta
                if obj.get("text") is None and isinstance(meta.get("caption"), str):
                    obj["text"] = meta["caption"]
        except (UnicodeDecodeError, ValueError) as exc:
            errors.append(str(exc))
        payload = msgpack.packb(obj, use_bin_type=True)
        if errors:
            return Malformed(current, "; ".join(errors), payload, source)
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
                if member.size > limits.max_message_bytes:
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
        yield Malformed(current, f"corrupt tar shard: {exc}", b"", {"file": path.name, "key": key})


def _has_end_marker(path: Path, offset: int) -> bool:
    """A complete tar ends with two zero blocks; a cut on a header boundary lacks them."""
    with path.open("rb") as fh:
        fh.seek(offset)
        tail = fh.read(1024)
    return len(tail) == 1024 and not tail.strip(b"\0")


def read_inputs(
    paths: list[Path], limits: LimitsConfig, image_root: Path | None = None
) -> Iterator[Sample | Malformed]:
    """Samples of JSONL files and tar shards in order; see :func:`read_jsonl` for ``image_root``."""
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
        name = p.name.lower()
        if name.endswith((".tar", ".tar.gz", ".tgz")):
            yield from read_tar(p, limits)
        else:
            yield from read_jsonl(p, limits, image_root)


def count_inputs(paths: list[Path]) -> int | None:
    """Number of JSONL lines (for the progress bar); None when a tar shard is among the inputs."""
    total = 0
    for p in paths:
        if p.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
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
