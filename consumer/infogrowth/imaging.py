"""Safe decoding of untrusted image bytes.

Every failure is an :class:`ImageError` whose message says what was wrong, so callers can reject the
sample as malformed without knowing anything about Pillow's exception zoo.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import stat
import warnings
from pathlib import Path
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "decode_image", "load_image_field", "read_regular_file"]

# A value this long cannot be a file path on any common filesystem; skip the stat() for it.
_MAX_PATH_CHARS = 4096
MAX_JPEG_SCANS = 256
"""Progressive JPEGs hold about 10 scans; libjpeg-turbo's own tools bound them likewise."""
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageError(ValueError):
    """The image is missing, too large, malformed or in an unsupported format."""


def decode_image(
    data: bytes, *, max_bytes: int, max_pixels: int, fit: int | None = None
) -> Image.Image:
    """Decode ``data`` into an RGB image, enforcing size limits before any pixel is decoded.

    ``max_pixels`` is checked against the dimensions in the header. Pillow's own decompression-bomb
    guard (``Image.MAX_IMAGE_PIXELS``) still applies and is reported as an :class:`ImageError` too.
    EXIF orientation is applied; transparency is composited onto white.

    With ``fit``, an image whose shorter side is longer is scaled down (aspect kept) so that
    side is ``fit`` pixels: JPEG decodes at a reduced scale right away (``draft``), other
    formats are reduced right after decoding, so what a batch holds is bounded by the model's
    input size, not the file's (a 131 KB PNG can decode to 119 MB).
    """
    if not data:
        raise ImageError("image data is empty")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {max_bytes} bytes")
    if data[:2] == b"\xff\xd8" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        # a progressive JPEG decodes every scan over the whole image: thousands of tiny scans
        # cost minutes (0xFFDA cannot occur inside entropy-coded data: 0xFF is stuffed there)
        raise ImageError(f"JPEG with {scans} scans, over the limit of {MAX_JPEG_SCANS}")
    try:
        # Not thread-safe by itself (the filter list is process-global), but the explicit pixel
        # check below does not depend on it: a lost filter only means a warning instead of an error.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError(f"image has an empty size ({width}x{height})")
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, "
                    f"over the limit of {max_pixels} pixels"
                )
            if fit is not None and min(width, height) > fit:
                scale = fit / min(width, height)
                img.draft(
                    None, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
                )
            img.load()
            return _shrink(_to_rgb(img), fit)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("data is not an image in any supported format") from exc
    except MemoryError as exc:
        raise ImageError("image needs too much memory to decode") from exc
    except Exception as exc:
        # Decoder plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError
        # ... on hostile input; all of them mean the same thing here.
        raise ImageError(f"image is corrupt or truncated: {type(exc).__name__}: {exc}") from exc


def _shrink(img: Image.Image, fit: int | None) -> Image.Image:
    """``img`` with its shorter side scaled down to ``fit`` (unchanged when already that small)."""
    w, h = img.size
    if fit is None or min(w, h) <= fit:
        return img
    scale = fit / min(w, h)
    img.thumbnail((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        # 16-bit greyscale: convert("RGB") would clip everything above 255 to white.
        img = img.point(lambda v: v / 257, "L")
    has_alpha = img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image_field(
    value: str,
    base_dir: Path | None,
    *,
    max_bytes: int | None = None,
    root: Path | None = None,
    paths: bool = True,
) -> bytes:
    """Return the raw bytes an image field of a JSONL record refers to.

    ``value`` is tried, in order, as a ``data:`` URI, a path to an existing file (relative paths are
    resolved against ``base_dir``, or the working directory when it is ``None``), and raw base64
    (standard or URL-safe alphabet, padding optional). ``max_bytes``, when given, rejects oversized
    payloads before they are read or decoded.

    ``root``, when given, confines paths: a path that exists but resolves (symlinks followed)
    outside ``root``, a ``~`` path, or anything but a regular file is an :class:`ImageError`, and
    the file is opened without following a final symlink, so untrusted records cannot read
    ``/proc/self/environ``, ``../../etc/passwd``, a FIFO or a device. Input readers always pass it.
    ``paths=False`` (records from a remote input) never reads a file: data URI or base64 only.
    """
    if not isinstance(value, str):
        raise ImageError(f"image field must be a string, not {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ImageError("image field is empty")
    if text[:5].lower() == "data:":
        return _from_data_uri(text, max_bytes)
    if paths and root is not None:
        path = _confined_file(text, base_dir if base_dir is not None else root, root)
        if path is not None:
            return _read_file(path, max_bytes, confined=True)
    elif paths:
        path = _existing_file(text, base_dir)
        if path is not None:
            return _read_file(path, max_bytes)
    if _BASE64_RE.fullmatch("".join(text.split())) is not None:
        return _from_base64(text, max_bytes)
    where = f" under {base_dir}" if base_dir is not None else ""
    shown = text if len(text) <= 80 else text[:77] + "..."
    raise ImageError(
        f"image field {shown!r} is neither a data: URI, an existing file{where}, nor base64"
    )


def _from_data_uri(uri: str, max_bytes: int | None) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ImageError("data: URI has no ',' separating the header from the payload")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"data: URI has media type {media_type!r}, expected image/*")
    if "base64" in params[1:]:
        return _from_base64(payload, max_bytes)
    raw = unquote_to_bytes(payload)
    _check_size(len(raw), max_bytes)
    return raw


def _from_base64(text: str, max_bytes: int | None) -> bytes:
    joined = "".join(text.split())
    if not joined:
        raise ImageError("base64 payload is empty")
    if _BASE64_RE.fullmatch(joined) is None:
        raise ImageError("base64 payload contains characters outside the base64 alphabet")
    compact = joined.rstrip("=").encode("ascii")
    _check_size(len(compact) * 3 // 4, max_bytes)  # exact decoded length, checked before decoding
    if len(compact) % 4 == 1:
        raise ImageError("base64 payload has an impossible length")
    padded = compact + b"=" * (-len(compact) % 4)
    try:
        if b"-" in padded or b"_" in padded:
            raw = base64.urlsafe_b64decode(padded)
        else:
            raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"base64 payload is invalid: {exc}") from exc
    if not raw:
        raise ImageError("base64 payload is empty")
    return raw


def _existing_file(text: str, base_dir: Path | None) -> Path | None:
    if len(text) > _MAX_PATH_CHARS or "\x00" in text:
        return None
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return path if path.is_file() else None
    except OSError:  # name too long, permission denied on a parent...
        return None


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _confined_file(text: str, base_dir: Path, root: Path) -> Path | None:
    """The resolved path ``text`` names under ``root``; None when nothing exists there (the value
    may still be base64); :class:`ImageError` when it exists but is out of bounds."""
    if len(text) > _MAX_PATH_CHARS or "\x00" in text:
        return None
    if text.startswith("~"):
        raise ImageError(f"image path {_shown(text)}: '~' paths are outside the image root")
    path = Path(text)
    if not path.is_absolute():
        path = base_dir / path
    if not os.path.lexists(path):
        return None  # also a JPEG's base64 ("/9j/..."), which looks like an absolute path
    try:
        resolved = path.resolve(strict=True)
        real_root = root.resolve(strict=True)
        st = resolved.stat()
    except (OSError, RuntimeError):  # a dangling or looping symlink, a parent we may not read
        raise ImageError(f"image path {_shown(text)} cannot be resolved") from None
    if not resolved.is_relative_to(real_root):
        raise ImageError(f"image path {_shown(text)} is outside the image root {root}")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"image path {_shown(text)} is not a regular file")
    return resolved


def _read_file(path: Path, max_bytes: int | None, *, confined: bool = False) -> bytes:
    # Confined: the path is already resolved, so a final symlink can only be a swap since then;
    # O_NONBLOCK keeps a FIFO swapped in from blocking; fstat checks what was actually opened.
    flags = os.O_RDONLY | (os.O_NOFOLLOW | os.O_NONBLOCK if confined else 0)
    try:
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if confined and not stat.S_ISREG(st.st_mode):
                raise ImageError(f"image file {path} is not a regular file")
            _check_size(st.st_size, max_bytes)
            # Read one byte past the limit so a file that grew after stat() is still caught.
            raw = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    _check_size(len(raw), max_bytes)
    if not raw:
        raise ImageError(f"image file {path} is empty")
    return raw


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` (already resolved and checked against its allowed root by the
    caller) if it is still a regular file of at most ``max_bytes``: no final symlink is
    followed and a FIFO or device never blocks the read."""
    return _read_file(path, max_bytes, confined=True)


def _check_size(n: int, max_bytes: int | None) -> None:
    if max_bytes is not None and n > max_bytes:
        raise ImageError(f"image payload is {n} bytes, over the limit of {max_bytes} bytes")
