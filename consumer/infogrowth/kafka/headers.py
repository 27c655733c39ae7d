"""Kafka record headers: what every produced record says about itself, the W3C trace context
carried from ingest to outputs, and the error headers of dead-letter records.

Headers let Connect SMTs, ksqlDB and plain consumers route records without decoding them:

- ``content-type`` (``application/x-msgpack``), ``infogrowth.schema`` (e.g. ``output-record``)
  and ``infogrowth.schema.version`` (e.g. ``1``) on every record the pipeline produces;
- ``decision`` and ``reason`` (absent when the decision has none) on output records;
- ``traceparent``, copied from the ingest record when it carries a valid one (W3C Trace
  Context), on the embedded record and on the input's output (or dead-letter) record;
- ``infogrowth.error.reason``, ``.detail``, ``.topic``, ``.partition``, ``.offset`` on
  dead-letter records, next to the original record's own headers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from infogrowth.codec import codec

HeaderValue = str | bytes | None
Headers = list[tuple[str, HeaderValue]]
"""Headers as the producer takes them."""
RawHeaders = Mapping[str, HeaderValue] | Sequence[tuple[str, HeaderValue]] | None
"""Headers as a consumed message (or a caller) gives them."""

CONTENT_TYPE = "content-type"
SCHEMA = "infogrowth.schema"
SCHEMA_VERSION = "infogrowth.schema.version"
DECISION = "decision"
REASON = "reason"
TRACEPARENT = "traceparent"
ERROR_PREFIX = "infogrowth.error."
ERROR_REASON = ERROR_PREFIX + "reason"
ERROR_DETAIL = ERROR_PREFIX + "detail"
ERROR_TOPIC = ERROR_PREFIX + "topic"
ERROR_PARTITION = ERROR_PREFIX + "partition"
ERROR_OFFSET = ERROR_PREFIX + "offset"
MAX_DETAIL_BYTES = 1000
"""An error detail is cut to this many bytes (it may quote the input)."""

_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def record_headers(
    kind: str,
    *,
    decision: str | None = None,
    reason: str | None = None,
    traceparent: bytes | None = None,
) -> Headers:
    """Headers of a record of schema ``kind`` (plus the decision of an output record)."""
    c = codec(kind)
    out: Headers = [
        (CONTENT_TYPE, c.content_type.encode()),
        (SCHEMA, c.schema.encode()),
        (SCHEMA_VERSION, str(c.version).encode()),
    ]
    if decision is not None:
        out.append((DECISION, decision.encode()))
    if reason is not None:
        out.append((REASON, reason.encode()))
    if traceparent is not None:
        out.append((TRACEPARENT, traceparent))
    return out


def valid_traceparent(value: bytes | str | None) -> bytes | None:
    """``value`` if it is a W3C ``traceparent`` a tracer would continue, else None.

    Version ``ff`` and all-zero trace or parent ids are invalid; version ``00`` has exactly
    four fields, later versions may append more (the spec's forward compatibility).
    """
    if value is None:
        return None
    raw = value.encode() if isinstance(value, str) else bytes(value)
    m = _TRACEPARENT.fullmatch(raw)
    if m is None or len(raw) > 512:
        return None
    version, trace_id, parent_id, _, rest = m.groups()
    if version == b"ff" or trace_id == b"0" * 32 or parent_id == b"0" * 16:
        return None
    if version == b"00" and rest:
        return None
    return raw


def _items(headers: RawHeaders) -> list[tuple[str, HeaderValue]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def header(headers: RawHeaders, name: str) -> bytes | None:
    """The last value of header ``name`` (Kafka allows repeats), or None."""
    found: bytes | None = None
    for key, value in _items(headers):
        if key == name and value is not None:
            found = _bytes(value)
    return found


def traceparent_of(message: Any) -> bytes | None:
    """The valid ``traceparent`` header of a consumed message, or None."""
    return valid_traceparent(header(message.headers(), TRACEPARENT))


def dead_letter_headers(
    original: RawHeaders,
    *,
    reason: str,
    detail: str,
    source: dict[str, str | int],
) -> Headers:
    """The original record's headers (error headers of an earlier hop dropped) and ours."""
    kept: Headers = [
        (k, _bytes(v))
        for k, v in _items(original)
        if v is not None and not k.startswith(ERROR_PREFIX)
    ]
    return [
        *kept,
        (ERROR_REASON, reason.encode()),
        (ERROR_DETAIL, _cut(detail, MAX_DETAIL_BYTES)),
        (ERROR_TOPIC, str(source.get("topic", "")).encode()),
        (ERROR_PARTITION, str(source.get("partition", "")).encode()),
        (ERROR_OFFSET, str(source.get("offset", "")).encode()),
    ]


def _cut(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes on a character boundary."""
    return text.encode()[:limit].decode("utf-8", "ignore").encode()


def size(headers: RawHeaders) -> int:
    """Bytes the headers add to a record (names, values and a few bytes of framing each)."""
    return sum(len(k) + len(_bytes(v or b"")) + 8 for k, v in _items(headers))
