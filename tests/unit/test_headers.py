"""Kafka headers and the dead-letter topic without a broker: fake messages, a recording output.
The same behaviour is checked on a real broker in tests/integration/test_conventions.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest

from infogrowth.codec import CODECS, codec
from infogrowth.kafka.embed import EmbedProcessor
from infogrowth.kafka.headers import (
    dead_letter_headers,
    header,
    record_headers,
    valid_traceparent,
)
from infogrowth.kafka.select import SelectProcessor
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import Embedded, SchemaError
from infogrowth.select import Thresholds
from tests.fixtures.helpers import make_settings
from tests.unit.test_replication import Msg, Out, _msg

TRACE = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
INGEST = "infogrowth.ingest"
DLQ = "infogrowth.dead"


# ------------------------------------------------------------------------------ the codec


def test_every_schema_kind_has_a_codec_naming_its_schema_file() -> None:
    assert {k: (c.schema, c.version, c.content_type) for k, c in CODECS.items()} == {
        "ingest": ("ingest-sample", 1, "application/x-msgpack"),
        "output": ("output-record", 1, "application/x-msgpack"),
        "embedded": ("embedded-sample", 1, "application/x-msgpack"),
        "changelog": ("changelog-entry", 1, "application/x-msgpack"),
        "calibration": ("calibration", 1, "application/x-msgpack"),
    }
    rec = {"v": 1, "state": {"seen": 1}}
    assert codec("changelog").decode(codec("changelog").encode(rec), max_bytes=1 << 20) == rec
    with pytest.raises(SchemaError):
        codec("changelog").encode({"v": 2})


# ----------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (TRACE, True),
        (TRACE.decode(), True),
        (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", True),
        (TRACE + b"-extra", False),  # version 00 has exactly four fields
        (b"ff" + TRACE[2:], False),  # version ff is invalid
        (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", False),  # zero trace id
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01", False),
        (TRACE.upper(), False),
        (b"00-4bf92f35-00f067aa0ba902b7-01", False),
        (b"", False),
        (None, False),
        (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-" + b"x" * 600, False),
    ],
)
def test_traceparent_is_passed_only_when_valid(value: Any, ok: bool) -> None:
    got = valid_traceparent(value)
    assert (got is not None) is ok
    if ok:
        assert got == (value.encode() if isinstance(value, str) else value)


def test_record_headers_name_the_schema_and_the_decision() -> None:
    hs = record_headers("output", decision="rejected", reason="duplicate", traceparent=TRACE)
    assert hs == [
        ("content-type", b"application/x-msgpack"),
        ("infogrowth.schema", b"output-record"),
        ("infogrowth.schema.version", b"1"),
        ("decision", b"rejected"),
        ("reason", b"duplicate"),
        ("traceparent", TRACE),
    ]
    accepted = dict(record_headers("output", decision="accepted"))
    assert accepted["decision"] == b"accepted" and "reason" not in accepted
    assert "traceparent" not in accepted
    assert dict(record_headers("changelog"))["infogrowth.schema"] == b"changelog-entry"


def test_dead_letter_headers_keep_the_original_ones_and_replace_old_errors() -> None:
    detail = "é" * 600  # 1200 bytes: cut to at most 1000 on a character boundary
    hs = dead_letter_headers(
        [("traceparent", TRACE), ("infogrowth.error.reason", b"old"), ("x", "text")],
        reason="malformed",
        detail=detail,
        source={"topic": INGEST, "partition": 2, "offset": 41},
    )
    assert hs[:2] == [("traceparent", TRACE), ("x", b"text")]
    assert header(hs, "infogrowth.error.reason") == b"malformed"
    assert [k for k, _ in hs].count("infogrowth.error.reason") == 1
    cut = header(hs, "infogrowth.error.detail")
    assert cut is not None and len(cut) <= 1000 and cut.decode() == "é" * 500
    assert header(hs, "infogrowth.error.topic") == INGEST.encode()
    assert header(hs, "infogrowth.error.partition") == b"2"
    assert header(hs, "infogrowth.error.offset") == b"41"


# -------------------------------------------------------------------- the select stage


def _select() -> SelectProcessor:
    settings = make_settings(**{"index.threads": 1})
    t = Thresholds(policy="all", k=2, epsilon={"image": 0.01})
    proc = SelectProcessor(settings, t, None, "test")
    proc.owned = {0}
    return proc


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=8).astype(np.float32)
    return v / np.linalg.norm(v)


def test_select_outputs_carry_decision_reason_and_the_trace() -> None:
    proc, out = _select(), Out()
    a = Embedded(id="a", vectors={"image": _unit(1)})
    copy = Embedded(id="copy", vectors={"image": _unit(1)})
    traced = _msg(copy, 0, 1)
    traced._headers = [("traceparent", TRACE)]
    untraced = _msg(a, 0, 0)
    untraced._headers = [("traceparent", b"not-a-trace")]
    proc.process([untraced, traced], out)  # type: ignore[arg-type]
    by_topic: dict[str, list[dict[str, bytes]]] = {}
    for (topic, _, _), hs in zip(out.records, out.headers, strict=True):
        assert hs is not None, topic
        by_topic.setdefault(topic, []).append(dict(hs))
    (acc,) = by_topic["infogrowth.accepted"]
    assert acc["decision"] == b"accepted" and "reason" not in acc
    assert "traceparent" not in acc  # an invalid one is not passed on
    (rej,) = by_topic["infogrowth.rejected"]
    assert (rej["decision"], rej["reason"], rej["traceparent"]) == (
        b"rejected",
        b"duplicate",
        TRACE,
    )
    assert rej["infogrowth.schema"] == b"output-record"
    for hs in by_topic["infogrowth.changelog"]:  # kept item and the state record
        assert hs["infogrowth.schema"] == b"changelog-entry"
        assert hs["content-type"] == b"application/x-msgpack"


# --------------------------------------------------------------------- the embed stage


@dataclass
class RawOut:
    """Records as produced: topic, key, value, headers (values not decoded)."""

    records: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = field(
        default_factory=list
    )

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.records.append((topic, key, value, list(headers or [])))


def _embed(dead_letter: str | None) -> EmbedProcessor:
    topics: dict[str, Any] = {"ingest": INGEST}
    if dead_letter:
        topics["dead_letter"] = dead_letter
    settings = make_settings(kafka={"topics": topics}, **{"clean.enabled": False})
    stage = EmbedStage(settings, None, spaces=("image",), dims={"image": 4})
    t = Thresholds(policy="all", k=2, epsilon={"image": 0.01})
    return EmbedProcessor(settings, stage, t, None, 1)


def _ingest(value: bytes | None, offset: int, hs: Any = None, key: bytes | None = None) -> Msg:
    m = Msg(value, 0, offset, INGEST, key, hs)  # type: ignore[arg-type]
    return m


GOOD = msgpack.packb({"v": 1, "id": "good", "embedding": {"image": [1.0, 0.0, 0.0, 0.0]}})
BAD = b"\xc1 not msgpack"
WRONG = msgpack.packb({"v": 1, "id": "wrong-dim", "embedding": {"image": [1.0, 2.0]}})


def _run(proc: EmbedProcessor) -> RawOut:
    out = RawOut()
    msgs = [
        _ingest(GOOD, 0, [("traceparent", TRACE)]),
        _ingest(BAD, 1, [("traceparent", TRACE), ("app", b"x")], key=b"k1"),
        _ingest(WRONG, 2),
        _ingest(None, 3),
    ]
    proc.process(msgs, out)  # type: ignore[arg-type]
    return out


def test_embed_without_dead_letter_rejects_malformed_with_headers() -> None:
    proc = _embed(None)
    out = _run(proc)
    topics = [t for t, *_ in out.records]
    assert topics == [
        "infogrowth.embedded",
        "infogrowth.rejected",
        "infogrowth.rejected",
        "infogrowth.rejected",
    ]
    emb = dict(out.records[0][3])
    assert emb["infogrowth.schema"] == b"embedded-sample" and emb["traceparent"] == TRACE
    bad = dict(out.records[1][3])
    assert (bad["decision"], bad["reason"], bad["traceparent"]) == (
        b"rejected",
        b"malformed",
        TRACE,
    )
    assert proc.pending == 3


def test_embed_sends_malformed_input_to_the_dead_letter_topic_as_it_came() -> None:
    proc = _embed(DLQ)
    out = _run(proc)
    assert [t for t, *_ in out.records] == ["infogrowth.embedded", DLQ, DLQ, DLQ]
    _, key, value, hs = out.records[1]
    assert (key, value) == (b"k1", BAD)  # the original record, byte for byte
    h = dict(hs)
    assert h["traceparent"] == TRACE and h["app"] == b"x"  # its own headers kept
    assert h["infogrowth.error.reason"] == b"malformed"
    assert b"undecodable msgpack" in h["infogrowth.error.detail"]
    assert (h["infogrowth.error.topic"], h["infogrowth.error.partition"]) == (INGEST.encode(), b"0")
    assert h["infogrowth.error.offset"] == b"1"
    assert out.records[2][2] == WRONG  # decoded fine, failed validation: also dead-lettered
    assert b"dimension" in dict(out.records[2][3])["infogrowth.error.detail"]
    assert out.records[3][2] is None  # a null value stays null
    assert proc.pending == 3  # each is its input's one output


def test_dead_letter_must_be_a_topic_of_its_own() -> None:
    from infogrowth.errors import ConfigError

    with pytest.raises(ConfigError, match=r"kafka\.topics\.dead_letter"):
        make_settings(kafka={"topics": {"dead_letter": "infogrowth.rejected"}})


def test_topic_specs_add_the_dead_letter_topic_only_when_configured() -> None:
    from infogrowth.kafka.admin import topic_specs

    plain = make_settings().kafka.topics
    assert len(topic_specs(plain)) == 7
    with_dlq = make_settings(kafka={"topics": {"dead_letter": DLQ, "output_partitions": 3}})
    spec = {s.name: s for s in topic_specs(with_dlq.kafka.topics)}[DLQ]
    assert spec.partitions == 3 and spec.config["cleanup.policy"] == "delete"
