"""Each schema kind paired with its wire encoding: the one seam where another serde (a Schema
Registry, say) would plug in.

Today every kind travels as msgpack, validated against ``schemas/<name>.v<version>.json``; the
pairing names the schema and its version so records can say what they hold (Kafka headers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infogrowth.schema import SCHEMA_FILES, pack, unpack

MSGPACK = "application/x-msgpack"


@dataclass(frozen=True)
class Codec:
    """How records of one schema kind are encoded, and what they are called on the wire."""

    kind: str
    """The schema kind (``ingest``, ``embedded``, ``changelog``, ``calibration``, ``output``)."""
    schema: str
    """The schema's name, e.g. ``output-record``."""
    version: int
    content_type: str = MSGPACK

    def encode(self, obj: dict[str, Any], *, check: bool = True) -> bytes:
        """Encode ``obj`` (validated against the schema when ``check``)."""
        return pack(self.kind, obj, check=check)

    def decode(self, data: bytes, *, max_bytes: int) -> dict[str, Any]:
        """Decode and validate; raises ValueError on bad input."""
        return unpack(self.kind, data, max_bytes=max_bytes)


def _from_file(kind: str, filename: str) -> Codec:
    stem = filename.removesuffix(".json")  # "output-record.v1"
    name, _, version = stem.rpartition(".v")
    return Codec(kind=kind, schema=name, version=int(version))


CODECS: dict[str, Codec] = {kind: _from_file(kind, f) for kind, f in SCHEMA_FILES.items()}


def codec(kind: str) -> Codec:
    """The codec of schema ``kind``; KeyError for an unknown kind."""
    return CODECS[kind]
