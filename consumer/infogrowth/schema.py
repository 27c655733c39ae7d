"""Message types, the msgpack codec and validation against ``schemas/*.json``.

Parsing never raises on bad input: it returns a :class:`Malformed` carrying the reason and the
original bytes, so the caller can emit a ``rejected/malformed`` record and move on.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import fastjsonschema
import msgpack
import numpy as np

from infogrowth.config import LimitsConfig
from infogrowth.errors import DataError

SPACES: tuple[str, ...] = ("image", "text")
SCHEMA_FILES = {
    "ingest": "ingest-sample.v1.json",
    "output": "output-record.v1.json",
    "embedded": "embedded-sample.v1.json",
    "changelog": "changelog-entry.v1.json",
    "calibration": "calibration.v1.json",
}
BINARY_FIELDS = ("image", "payload")


class SchemaError(DataError):
    """A record does not match its JSON Schema."""


@dataclass(frozen=True, slots=True)
class Sample:
    """A validated ingest sample. ``embedding`` vectors are float32 and not yet normalised."""

    id: str
    text: str | None = None
    image: bytes | None = None
    label: str | None = None
    embedding: Mapping[str, np.ndarray] | None = None
    image_uri: str | None = None
    meta: dict[str, Any] | None = None
    source: dict[str, str | int] | None = None
    payload: bytes = field(default=b"", repr=False, compare=False)
    """The message or line it was parsed from: what a rejection after parsing (a vector of the
    wrong dimension, an image that does not decode, an encoder failure) carries back."""


@dataclass(frozen=True, slots=True)
class Malformed:
    """Input that could not be parsed or validated."""

    id: str | None
    detail: str
    payload: bytes
    source: dict[str, str | int] | None = None


@dataclass(slots=True)
class Embedded:
    """A sample after the embed stage: unit vectors per space and the cleaner's verdict."""

    id: str
    vectors: dict[str, np.ndarray]
    text: str | None = None
    label: str | None = None
    image: bytes | None = None
    meta: dict[str, Any] | None = None
    alignment: float | None = None
    original_alignment: float | None = None
    original_text: str | None = None
    original_label: str | None = None
    fix: str | None = None
    cell: int = 0
    source: dict[str, str | int] | None = None
    image_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def schema_path(kind: str) -> Path:
    return Path(str(resources.files("infogrowth") / "schemas" / SCHEMA_FILES[kind]))


@cache
def load_schema(kind: str) -> dict[str, Any]:
    text = (resources.files("infogrowth") / "schemas" / SCHEMA_FILES[kind]).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator(kind: str) -> Callable[[Any], Any]:
    fn: Callable[[Any], Any] = fastjsonschema.compile(load_schema(kind))
    return fn


def _json_view(obj: Any) -> Any:
    """Replace bytes by text so JSON Schema (which has no binary type) can check the rest."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return ""
    if isinstance(obj, dict):
        return {k: _json_view(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_view(v) for v in obj]
    return obj


def validate(kind: str, obj: Any) -> None:
    """Raise :class:`SchemaError` when ``obj`` does not match the schema ``kind``.

    Records the structural fast check accepts skip the generic validator (it would walk every
    embedding float); anything else goes through the compiled JSON Schema, which stays the
    contract and writes the error message. The fast checks are tested against the schemas.
    """
    fast = _FAST_CHECKS.get(kind)
    if fast is not None and fast(obj):
        return
    try:
        _validator(kind)(_json_view(obj))
    except fastjsonschema.JsonSchemaValueException as exc:
        msg = exc.message.replace("data.", "").replace("data ", "record ")
        raise SchemaError(msg) from None
    except RecursionError:
        raise SchemaError("record nests too deeply") from None


# -- structural fast checks ----------------------------------------------------------------
# Each returns True only for objects its JSON Schema accepts after ``_json_view`` (bytes read
# as text); False means "let the schema decide", never "invalid" on its own. They mirror the
# schema's rules exactly (fastjsonschema's semantics: integers include integral floats, numbers
# exclude bool), so a valid record never pays for the generic pass.

_BINARY = (bytes, bytearray, memoryview)
_TEXTUAL = (str, *_BINARY)
_NUMBER_TYPES = frozenset({float, int})
_INGEST_KEYS = frozenset({"v", "id", "text", "image", "image_uri", "label", "embedding", "meta"})
_SPACE_KEYS = frozenset(SPACES)
_EMBEDDED_KEYS = frozenset(
    {
        "v",
        "id",
        "text",
        "label",
        "image",
        "image_uri",
        "meta",
        "vectors",
        "alignment",
        "original_alignment",
        "original_text",
        "original_label",
        "fix",
        "cell",
        "epoch",
        "replica",
        "source",
    }
)
_EMBEDDED_REQUIRED = frozenset({"v", "id", "vectors", "cell"})
_EMBEDDED_OPT_TEXT = (
    "text",
    "label",
    "image",
    "image_uri",
    "original_text",
    "original_label",
    "fix",
)


def _is_one(x: Any) -> bool:
    """``{"const": 1}``: equal to 1 and a JSON number (fastjsonschema: int or float, not bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and x == 1


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | Decimal) and not isinstance(x, bool)


def _is_integer(x: Any) -> bool:
    """JSON Schema ``integer`` as fastjsonschema reads it (integral floats included)."""
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, float) and x.is_integer())


def _number_array(values: Any) -> bool:
    """``{"type": "array", "items": {"type": "number"}, "minItems": 1}`` without a Python loop
    over the items in the common case (every item a plain float or int)."""
    if not isinstance(values, list | tuple) or not values:
        return False
    if _NUMBER_TYPES.issuperset(map(type, values)):
        return True
    return all(map(_is_number, values))


def _ingest_ok(obj: Any) -> bool:
    if not isinstance(obj, dict) or "id" not in obj or not _INGEST_KEYS.issuperset(obj):
        return False
    sid = obj["id"]
    if isinstance(sid, _BINARY):
        sid = ""
    if not isinstance(sid, str) or not 1 <= len(sid) <= 512:
        return False
    if "v" in obj and not _is_one(obj["v"]):
        return False
    text = obj.get("text")
    if text is not None and not isinstance(text, _TEXTUAL):
        return False
    image = obj.get("image")
    if image is not None and not isinstance(image, _TEXTUAL):
        return False
    uri = obj.get("image_uri")
    if uri is not None and not (isinstance(uri, str) and 1 <= len(uri) <= 4096):
        return False
    label = obj.get("label")
    if label is not None and not isinstance(label, _TEXTUAL) and not _is_integer(label):
        return False
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return False
    emb = obj.get("embedding")
    if emb is None:
        return True
    if not isinstance(emb, dict) or not emb or not _SPACE_KEYS.issuperset(emb):
        return False
    return all(_number_array(v) for v in emb.values())


def _embedded_ok(obj: Any) -> bool:
    if not isinstance(obj, dict) or not _EMBEDDED_KEYS.issuperset(obj):
        return False
    if not _EMBEDDED_REQUIRED.issubset(obj):
        return False
    v, sid, cell, vectors = obj["v"], obj["id"], obj["cell"], obj["vectors"]
    if not _is_one(v):
        return False
    if isinstance(sid, _BINARY):
        sid = ""
    if not isinstance(sid, str) or not sid:
        return False
    if not _is_integer(cell) or cell < 0:
        return False
    if not isinstance(vectors, dict) or not vectors or not _SPACE_KEYS.issuperset(vectors):
        return False
    if not all(isinstance(b, _TEXTUAL) for b in vectors.values()):
        return False
    for key in _EMBEDDED_OPT_TEXT:
        x = obj.get(key)
        if x is not None and not isinstance(x, _TEXTUAL):
            return False
    for key in ("alignment", "original_alignment"):
        x = obj.get(key)
        if x is not None and not _is_number(x):
            return False
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return False
    if "replica" in obj and not isinstance(obj["replica"], bool):
        return False
    if "epoch" in obj and not (_is_integer(obj["epoch"]) and obj["epoch"] >= 0):
        return False
    source = obj.get("source")
    if source is None:
        return True
    if not isinstance(source, dict):
        return False
    return all(isinstance(x, _TEXTUAL) or _is_integer(x) for x in source.values())


_FAST_CHECKS: dict[str, Callable[[Any], bool]] = {"ingest": _ingest_ok, "embedded": _embedded_ok}


# -- msgpack codec ------------------------------------------------------------------------


def pack(kind: str, obj: dict[str, Any], *, check: bool = True) -> bytes:
    """Validate ``obj`` against schema ``kind`` and encode it as msgpack."""
    if check:
        validate(kind, obj)
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def unpack(kind: str, data: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Decode msgpack bytes and validate them; DataError (or SchemaError) on bad input."""
    if len(data) > max_bytes:
        raise DataError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=1_000_000,
            max_map_len=10_000,
        )
    except Exception as exc:  # msgpack raises many types on garbage
        raise DataError(f"undecodable msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a msgpack map, got {type(obj).__name__}")
    validate(kind, obj)
    return obj


def vector_to_bytes(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def vector_from_bytes(b: bytes, dim: int | None = None) -> np.ndarray:
    if len(b) % 4:
        raise DataError(f"vector of {len(b)} bytes is not float32")
    v = np.frombuffer(b, dtype="<f4").astype(np.float32)
    if dim is not None and v.shape[0] != dim:
        raise DataError(f"vector has dimension {v.shape[0]}, expected {dim}")
    return v


# -- ingest parsing ---------------------------------------------------------------------


def _guess_id(obj: Any) -> str | None:
    if isinstance(obj, dict):
        v = obj.get("id")
        if isinstance(v, str) and v:
            return v[:512]
    return None


def sample_from_obj(
    obj: Any,
    payload: bytes,
    limits: LimitsConfig,
    *,
    image_loader: Callable[[str], bytes] | None = None,
    source: dict[str, str | int] | None = None,
) -> Sample | Malformed:
    """Validate a decoded ingest object (from msgpack or JSON) and build a :class:`Sample`.

    ``image_loader`` resolves a textual ``image`` field (JSONL: path, data URI or base64).
    """
    sid = _guess_id(obj)
    try:
        if not isinstance(obj, dict):
            raise SchemaError(f"expected an object, got {type(obj).__name__}")
        version = obj.get("v", 1)
        if version != 1:
            raise SchemaError(f"unknown schema version {version!r} (this build reads version 1)")
        validate("ingest", obj)
        sid = obj["id"]
        if len(sid) > limits.max_id_chars:
            raise SchemaError(f"id longer than {limits.max_id_chars} characters")
        _check_utf8(sid, "id")
        text = _text(obj.get("text"), "text")
        if text is not None and len(text) > limits.max_text_chars:
            raise SchemaError(f"text of {len(text)} characters exceeds {limits.max_text_chars}")
        image = obj.get("image")
        image_bytes: bytes | None
        if image is None:
            image_bytes = None
        elif isinstance(image, bytes | bytearray | memoryview):
            image_bytes = bytes(image)
        elif isinstance(image, str):
            if image_loader is None:
                raise SchemaError("image must be binary in msgpack messages")
            image_bytes = image_loader(image)
        else:  # pragma: no cover - schema guarantees the type
            raise SchemaError("image: wrong type")
        if image_bytes is not None and len(image_bytes) > limits.max_image_bytes:
            raise SchemaError(
                f"image of {len(image_bytes)} bytes exceeds {limits.max_image_bytes} bytes"
            )
        image_uri = obj.get("image_uri")
        label = obj.get("label")
        if isinstance(label, bool):
            raise SchemaError("label: must be a string or integer")
        label_str = None if label is None else str(_text(label, "label"))
        if label_str is not None and len(label_str) > limits.max_label_chars:
            raise SchemaError(
                f"label of {len(label_str)} characters exceeds {limits.max_label_chars}"
            )
        emb = _parse_embedding(obj.get("embedding"), limits)
        if text is None and image_bytes is None and emb is None and image_uri is None:
            raise SchemaError("sample has no text, image, image_uri or embedding")
        meta = obj.get("meta")
        if meta is not None:
            check_meta(meta, limits)
        return Sample(
            id=sid,
            text=text,
            image=image_bytes,
            label=label_str,
            embedding=emb,
            meta=meta,
            source=source,
            image_uri=image_uri,
            payload=payload,
        )
    except (SchemaError, ValueError, OSError) as exc:
        return Malformed(id=writable(sid), detail=str(exc), payload=payload, source=source)
    except RecursionError:
        detail = "record nests too deeply"
        return Malformed(id=writable(sid), detail=detail, payload=payload, source=source)


def writable(text: str | None) -> str | None:
    """``text`` with what UTF-8 cannot encode (lone surrogates: from JSON, or a tar member
    name that was not UTF-8) escaped, so that the rejection naming it can be written."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _text(value: Any, what: str) -> Any:
    """``value`` as text: bytes (msgpack bin) decoded as strict UTF-8, a string checked to be
    encodable (JSON admits lone surrogates, which no writer can encode); other types as they
    are (the schema has checked them)."""
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SchemaError(f"{what}: binary, and not UTF-8 text ({exc.reason})") from None
    if isinstance(value, str):
        _check_utf8(value, what)
    return value


def _check_utf8(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SchemaError(f"{what}: not valid Unicode text ({exc.reason})") from None


def check_meta(meta: Any, limits: LimitsConfig) -> None:
    """Raise :class:`SchemaError` when ``meta`` nests deeper than ``limits.max_meta_depth`` or
    holds more than ``limits.max_meta_bytes`` (strings and bytes by length, 8 per scalar and
    per container entry). Stops at the first excess, so a hostile tree costs little."""
    budget = limits.max_meta_bytes
    stack: list[tuple[Any, int]] = [(meta, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list | tuple):
            if depth > limits.max_meta_depth:
                raise SchemaError(f"meta nests deeper than {limits.max_meta_depth} levels")
            budget -= 8 * len(node)
            if budget < 0:
                break
            items = node.items() if isinstance(node, dict) else ((None, v) for v in node)
            for k, v in items:
                if k is not None:
                    stack.append((k, depth))
                stack.append((v, depth + 1))
        elif isinstance(node, str | bytes | bytearray):
            budget -= len(node)
            if isinstance(node, str):
                _check_utf8(node, "meta")
        else:
            budget -= 8
            if isinstance(node, int) and not -(2**63) <= node < 2**64:
                raise SchemaError("meta: an integer beyond 64 bits (msgpack cannot carry it)")
        if budget < 0:
            break
    if budget < 0:
        raise SchemaError(f"meta is larger than {limits.max_meta_bytes} bytes")


_SQ_NORM_LOW = 1e-80
_SQ_NORM_HIGH = 9e76
"""(3e38)^2: below it no value exceeds the float32 range checked below."""


def _parse_embedding(raw: Any, limits: LimitsConfig) -> dict[str, np.ndarray] | None:
    if raw is None:
        return None
    out: dict[str, np.ndarray] = {}
    for space, values in raw.items():
        if len(values) > limits.max_embedding_dim:
            raise SchemaError(
                f"embedding.{space}: dimension {len(values)} exceeds {limits.max_embedding_dim}"
            )
        try:
            arr = np.asarray(values, dtype=np.float64)
        except OverflowError:  # a JSON integer beyond float64
            raise SchemaError(f"embedding.{space}: value out of float32 range") from None
        # The common case in one reduction: a squared norm in (1e-80, 9e76) means every value is
        # finite, none beyond float32's range (x_i^2 <= the sum) and some far from underflowing.
        sq = float(arr.dot(arr))
        if _SQ_NORM_LOW < sq < _SQ_NORM_HIGH:
            out[space] = arr.astype(np.float32)
            continue
        # One reduction answers both checks on magnitude: max |x| is NaN or Inf exactly when
        # some value is (NaN propagates through max), and above 3e38 when one is out of range.
        peak = float(np.abs(arr).max())
        if not math.isfinite(peak):
            raise SchemaError(f"embedding.{space}: contains NaN or Inf")
        if sq == 0.0:
            raise SchemaError(f"embedding.{space}: zero vector")
        if peak > 3.0e38:
            raise SchemaError(f"embedding.{space}: value out of float32 range")
        f32 = arr.astype(np.float32)
        if not f32.any():  # every value underflows float32: normalising would give NaN
            raise SchemaError(f"embedding.{space}: zero vector in float32 (values underflow)")
        out[space] = f32
    return out


def parse_msgpack_sample(
    data: bytes, limits: LimitsConfig, source: dict[str, str | int] | None = None
) -> Sample | Malformed:
    """Parse one ingest message from Kafka."""
    if len(data) > limits.max_message_bytes:
        return Malformed(
            None, f"message of {len(data)} bytes exceeds {limits.max_message_bytes}", data, source
        )
    # containers: four times what meta may hold, so an oversized meta is still refused with its
    # id known (by check_meta), while a message of empty maps stops after a few MiB
    budget = [4 * (limits.max_meta_bytes // 8) + 1024]

    def counted(container: Any) -> Any:
        budget[0] -= 1
        if budget[0] < 0:  # a small message of empty maps unpacks ~70x its size
            raise ValueError("more maps and arrays than any ingest message holds")
        return container

    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_map_len=10_000,
            max_array_len=max(limits.max_embedding_dim, 1024),
            object_hook=counted,
            list_hook=counted,
        )
    except Exception as exc:
        return Malformed(None, f"undecodable msgpack: {type(exc).__name__}: {exc}", data, source)
    return sample_from_obj(obj, data, limits, source=source)


def parse_json_sample(
    line: bytes,
    limits: LimitsConfig,
    image_loader: Callable[[str], bytes] | None,
    source: dict[str, str | int] | None = None,
) -> Sample | Malformed:
    """Parse one JSONL line."""
    if len(line) > limits.max_message_bytes:
        return Malformed(
            None, f"line of {len(line)} bytes exceeds {limits.max_message_bytes}", line, source
        )
    try:
        obj = json.loads(line)  # NaN/Infinity parse, then fail validation with the id known
    except (ValueError, UnicodeDecodeError) as exc:
        return Malformed(None, f"invalid JSON: {exc}", line, source)
    except RecursionError:
        return Malformed(None, "invalid JSON: nests too deeply", line, source)
    return sample_from_obj(obj, line, limits, image_loader=image_loader, source=source)


def to_json_safe(obj: Any) -> Any:
    """Make a record JSON-serialisable: bytes become base64 text, non-finite floats null."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json_safe(v) for v in obj]
    return obj
