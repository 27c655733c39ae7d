"""Input and output locations: local paths, or URLs (``file://``, ``http(s)://``, ``s3://``...)
read and written through fsspec with ``storage.options`` for their protocol.

These are locations the operator names on the command line, not references inside records
(those go through :mod:`infogrowth.fetch` and its allow-list).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from infogrowth.config import StorageConfig

Location = Path | str
"""A local path, or a URL string."""
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(loc: Location) -> bool:
    return isinstance(loc, str) and _URL.match(loc) is not None


def as_location(text: str) -> Location:
    """A command-line value: a URL stays text (``file://`` becomes its path), else a Path."""
    if text.lower().startswith("file://"):
        return Path(text[len("file://") :])
    return text if is_url(text) else Path(text)


def base_name(loc: Location) -> str:
    """The last path segment (``shard-0001.parquet``), for sources and format detection."""
    if isinstance(loc, Path):
        return loc.name
    return posixpath.basename(loc.rstrip("/").split("?", 1)[0])


def filesystem(loc: Location, storage: StorageConfig | None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``loc``."""
    import fsspec

    if isinstance(loc, Path):
        return fsspec.filesystem("file"), str(loc)
    protocol = loc.split("://", 1)[0].lower()
    opts = dict((storage.options if storage else {}).get(protocol, {}))
    fs, path = fsspec.core.url_to_fs(loc, **opts)
    return fs, path


def join(loc: Location, name: str) -> Location:
    if isinstance(loc, Path):
        return loc / name
    return loc.rstrip("/") + "/" + name


@contextmanager
def open_seekable(loc: Location, storage: StorageConfig | None) -> Iterator[IO[bytes]]:
    """A seekable binary handle on ``loc``: the file itself, or a local spooled copy when the
    remote store cannot seek (an HTTP server without range requests)."""
    if isinstance(loc, Path):
        with loc.open("rb") as fh:
            yield fh
        return
    fs, path = filesystem(loc, storage)
    with fs.open(path, "rb") as remote:
        if _seekable(remote):
            yield remote
            return
        with tempfile.TemporaryFile() as local:
            shutil.copyfileobj(remote, local, 1 << 20)
            local.seek(0)
            yield local


def _seekable(fh: Any) -> bool:
    try:
        return bool(fh.seekable())
    except Exception:
        return False


@contextmanager
def open_stream(loc: Location, storage: StorageConfig | None) -> Iterator[IO[bytes]]:
    """A binary handle on ``loc`` read front to back."""
    if isinstance(loc, Path):
        with loc.open("rb") as fh:
            yield fh
        return
    fs, path = filesystem(loc, storage)
    with fs.open(path, "rb") as fh:
        yield fh


def exists(loc: Location, storage: StorageConfig | None) -> bool:
    if isinstance(loc, Path):
        return loc.exists()
    fs, path = filesystem(loc, storage)
    return bool(fs.exists(path))


def is_dir(loc: Location, storage: StorageConfig | None) -> bool:
    if isinstance(loc, Path):
        return loc.is_dir()
    if loc.endswith("/"):
        return True
    fs, path = filesystem(loc, storage)
    try:
        return bool(fs.isdir(path))
    except Exception:  # an HTTP server answers files, not listings
        return False


def find(loc: Location, suffix: str, storage: StorageConfig | None) -> list[Location]:
    """Files under the folder ``loc`` whose names end with ``suffix``, sorted by path."""
    if isinstance(loc, Path):
        return sorted(p for p in loc.rglob(f"*{suffix}") if p.is_file())
    fs, path = filesystem(loc, storage)
    protocol = loc.split("://", 1)[0]
    found = sorted(p for p in fs.find(path) if str(p).endswith(suffix))
    return [f"{protocol}://{str(p).lstrip('/')}" for p in found]


class OutputDir:
    """Where a run writes its files: a local folder, or a URL whose files are written to a
    local staging folder and uploaded on :meth:`publish` (``report.json`` last)."""

    def __init__(self, loc: Location, storage: StorageConfig | None) -> None:
        self.loc = loc
        self.storage = storage
        if isinstance(loc, Path):
            self.local = loc
            self._staging: str | None = None
        else:
            self._staging = tempfile.mkdtemp(prefix="infogrowth-out-")
            self.local = Path(self._staging)
        self.local.mkdir(parents=True, exist_ok=True)

    def publish(self, last: tuple[str, ...] = ("report.json", "export.json")) -> None:
        """Upload the staged files (files named in ``last`` after the others)."""
        if self._staging is None:
            return
        fs, root = filesystem(self.loc, self.storage)
        names = sorted(
            (p for p in os.listdir(self.local) if not p.startswith(".")),
            key=lambda n: (n in last, n),
        )
        fs.makedirs(root, exist_ok=True)
        for name in names:
            fs.put_file(str(self.local / name), root.rstrip("/") + "/" + name)

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
