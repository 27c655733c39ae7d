"""Fetching ``image_uri`` references, only from allow-listed locations (``limits.image_uri_allow``).

``http(s)://`` and ``s3://`` go through fsspec (aiohttp, s3fs) with a timeout and a size limit
checked before the body is read (``Content-Length`` / object size) and again while it is read;
redirects are not followed (they could leave the allowed prefix). Local files (``file://`` or an
absolute path) are read with the same rules as JSONL image paths: the real path, symlinks
resolved, must lie under an allowed ``file://`` prefix and be a regular file, opened without
following a final symlink. A location outside the allow-list is refused before any request or
``open`` is made, so nothing is fetched for it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from infogrowth.config import LimitsConfig, StorageConfig
from infogrowth.errors import ConfigError

SCHEMES = ("file", "http", "https", "s3")
MAX_URI_CHARS = 4096


class FetchError(ValueError):
    """An image reference could not (or may not) be fetched; the sample is malformed."""


@dataclass(frozen=True, slots=True)
class Location:
    """A parsed reference (or allow-list entry): ``host`` is the bucket for ``s3``; ``None``
    (entries only) matches any host; ``path`` is percent-decoded (``""``: any path)."""

    scheme: str
    host: str | None
    path: str

    def covers(self, loc: Location) -> bool:
        """True when ``loc`` lies under this entry (path prefixes end on a ``/`` boundary)."""
        if self.scheme != loc.scheme or (self.host is not None and self.host != loc.host):
            return False
        prefix = self.path
        if prefix in ("", "/"):
            return True
        if prefix.endswith("/"):
            return loc.path.startswith(prefix)
        return loc.path == prefix or loc.path.startswith(prefix + "/")


def _has_dot_segment(path: str) -> bool:
    return any(seg in (".", "..") for seg in path.split("/"))


def _parse(text: str, what: str) -> Location:
    if len(text) > MAX_URI_CHARS or "\x00" in text or "\\" in text:
        raise FetchError(f"{what} is too long or holds NUL / backslash characters")
    if text.startswith("/"):
        text = "file://" + text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - a port that is not a number raises here, not at the fetch
    except ValueError as exc:
        raise FetchError(f"{what}: not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        shown = scheme or "none (a relative path)"
        raise FetchError(f"{what}: scheme {shown} is not one of {', '.join(SCHEMES)}")
    if parts.username is not None or parts.password is not None:
        raise FetchError(f"{what}: credentials in the location are not accepted")
    if parts.query or parts.fragment:
        raise FetchError(f"{what}: a query or fragment is not accepted")
    path = unquote(parts.path)
    if _has_dot_segment(path):
        raise FetchError(f"{what}: '.' and '..' path segments are not accepted")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"{what}: file locations must be local (file:///path)")
        return Location("file", None, path)
    return Location(scheme, parts.netloc.lower() or None, path)


def parse_allow_entry(entry: str) -> Location:
    """An allow-list entry: a scheme (``https://``), or a prefix (``s3://bucket/dir/``,
    ``file:///data/images/`` or ``/data/images/``). Raises ValueError naming the entry."""
    try:
        loc = _parse(entry.strip(), f"allow-list entry {entry!r}")
    except FetchError as exc:
        raise ConfigError(str(exc)) from None
    if loc.scheme == "s3" and loc.host is None and loc.path not in ("", "/"):
        raise ConfigError(f"allow-list entry {entry!r}: s3 prefixes name a bucket (s3://bucket/)")
    return loc


def parse_reference(uri: str) -> Location:
    """A reference as the fetcher reads it: local paths become their real path (symlinks
    resolved), so a prefix check sees where the file really is."""
    loc = _parse(uri.strip(), "image_uri")
    if loc.scheme != "file":
        if loc.host is None:
            raise FetchError(f"image_uri {uri!r} names no host or bucket")
        return loc
    if not loc.path.startswith("/"):
        raise FetchError("image_uri: local paths must be absolute")
    return Location("file", None, os.path.realpath(loc.path))


class ImageFetcher:
    """Fetches allowed references on a thread pool of ``limits.image_fetch_concurrency``."""

    def __init__(self, limits: LimitsConfig, storage: StorageConfig) -> None:
        self.allow = [self._resolved(parse_allow_entry(e)) for e in limits.image_uri_allow]
        self.max_bytes = limits.max_image_bytes
        self.timeout_s = limits.image_fetch_timeout_s
        self.concurrency = limits.image_fetch_concurrency
        self.options = storage.options
        self._pool: ThreadPoolExecutor | None = None
        self._fs: dict[str, Any] = {}

    @staticmethod
    def _resolved(entry: Location) -> Location:
        if entry.scheme != "file" or entry.path in ("", "/"):
            return entry
        real = os.path.realpath(entry.path)
        return Location("file", None, real + "/" if entry.path.endswith("/") else real)

    def check(self, uri: str) -> Location:
        """The parsed reference, or FetchError when the allow-list does not cover it."""
        loc = parse_reference(uri)
        if not any(entry.covers(loc) for entry in self.allow):
            why = "is empty" if not self.allow else "does not cover it"
            shown = uri if len(uri) <= 200 else uri[:197] + "..."
            raise FetchError(f"image_uri {shown!r} not fetched: limits.image_uri_allow {why}")
        return loc

    def fetch(self, uri: str) -> bytes:
        """The bytes at ``uri``; FetchError (allow-list, missing, too large, HTTP error...)."""
        loc = self.check(uri)
        deadline = time.monotonic() + self.timeout_s
        try:
            if loc.scheme == "file":
                return self._read_local(loc.path)
            return self._read_remote(loc, uri.strip(), deadline)
        except FetchError:
            raise
        except FileNotFoundError as exc:
            cause = exc.__cause__  # fsspec reports any failed HEAD/GET (a timeout too) as this
            why = "not found" if cause is None else f"{type(cause).__name__}: {cause}"
            raise FetchError(f"image_uri {uri!r}: {why}"[:500]) from None
        except Exception as exc:  # aiohttp, botocore and OS errors all mean "cannot fetch"
            raise FetchError(f"image_uri {uri!r}: {type(exc).__name__}: {exc}"[:500]) from None

    def submit(self, uris: list[str]) -> list[Future[bytes]]:
        """Start fetching ``uris``; a refused reference fails its future at once (no fetch)."""
        futures: list[Future[bytes]] = []
        for uri in uris:
            try:
                self.check(uri)
            except FetchError as exc:
                done: Future[bytes] = Future()
                done.set_exception(exc)
                futures.append(done)
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="fetch")
            futures.append(self._pool.submit(self.fetch, uri))
        return futures

    def batch_timeout(self, n: int) -> float:
        """Seconds ``n`` fetches submitted together may take: each is bounded by
        ``image_fetch_timeout_s`` once it runs, ``concurrency`` at a time."""
        return self.timeout_s * (1 + -(-n // self.concurrency))

    def result(self, future: Future[bytes], deadline_s: float) -> bytes:
        """A submitted fetch's bytes, waiting at most ``deadline_s`` more; FetchError else."""
        try:
            return future.result(timeout=max(deadline_s, 0.0))
        except TimeoutError:
            future.cancel()
            raise FetchError(f"image_uri fetch timed out after {self.timeout_s:g} s") from None
        except FetchError:
            raise
        except Exception as exc:  # pragma: no cover - fetch() turns errors into FetchError
            raise FetchError(f"image_uri: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- reading ---------------------------------------------------------------------------

    def _too_large(self, size: int) -> FetchError:
        return FetchError(f"image_uri: {size} bytes, over the limit of {self.max_bytes} bytes")

    def _read_local(self, real: str) -> bytes:
        from infogrowth.imaging import ImageError, read_regular_file

        try:
            return read_regular_file(Path(real), self.max_bytes)
        except ImageError as exc:
            raise FetchError(f"image_uri: {exc}") from None

    def _filesystem(self, scheme: str) -> Any:
        fs = self._fs.get(scheme)
        if fs is not None:
            return fs
        import fsspec

        opts: dict[str, Any] = dict(self.options.get(scheme, {}))
        if scheme in ("http", "https"):
            import aiohttp

            opts.setdefault("client_kwargs", {"timeout": aiohttp.ClientTimeout(self.timeout_s)})
        elif scheme == "s3":
            t = self.timeout_s
            opts.setdefault(
                "config_kwargs",
                {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 1}},
            )
        fs = fsspec.filesystem(scheme, skip_instance_cache=True, **opts)
        self._fs[scheme] = fs
        return fs

    def _read_remote(self, loc: Location, uri: str, deadline: float) -> bytes:
        fs = self._filesystem(loc.scheme)
        http = loc.scheme in ("http", "https")
        path = uri if http else f"{loc.host}{loc.path}"
        extra: dict[str, Any] = {"allow_redirects": False} if http else {}
        info = fs.info(path, **extra)
        if info.get("type") not in (None, "file"):
            raise FetchError(f"image_uri {uri!r} is not a file")
        size = info.get("size")
        if isinstance(size, int) and size > self.max_bytes:
            raise self._too_large(size)
        if http:  # stream, with the size known so fsspec does not ask again
            opened = fs.open(path, "rb", block_size=0, size=size or self.max_bytes, **extra)
        else:
            opened = fs.open(path, "rb")
        with opened as fh:
            status = getattr(getattr(fh, "r", None), "status", 200)
            if 300 <= status < 400:
                raise FetchError(f"image_uri {uri!r}: HTTP {status} redirect not followed")
            return self._read_bounded(fh, deadline)

    def _read_bounded(self, fh: Any, deadline: float) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while total <= self.max_bytes:
            if time.monotonic() > deadline:
                raise FetchError(f"image_uri fetch timed out after {self.timeout_s:g} s")
            chunk = fh.read(min(self.max_bytes + 1 - total, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > self.max_bytes:
            raise self._too_large(total)
        if total == 0:
            raise FetchError("image_uri: the referenced file is empty")
        return b"".join(chunks)
