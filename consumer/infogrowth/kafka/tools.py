"""``produce`` (files → ingest topic) and ``audit`` (exactly one output per ingest message)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from infogrowth.config import Settings
from infogrowth.files import settings_inputs
from infogrowth.kafka.clients import base_config, consumer_config, producer_config, watermarks
from infogrowth.kafka.headers import (
    ERROR_OFFSET,
    ERROR_PARTITION,
    ERROR_REASON,
    ERROR_TOPIC,
    Headers,
    header,
    record_headers,
)
from infogrowth.kafka.reader import read_topic
from infogrowth.locations import Location
from infogrowth.messages import sample_record, source_key
from infogrowth.schema import Malformed, pack

INGEST_HEADERS = record_headers("ingest")


def produce(
    settings: Settings,
    paths: list[Location],
    topic: str | None = None,
    progress: Callable[[int], None] | None = None,
    raw: list[bytes] | None = None,
    image_root: Path | None = None,
) -> int:
    """Load samples of JSONL, WebDataset shards, Parquet and table folders (local or URLs; see
    :func:`~infogrowth.files.read_inputs`) as msgpack into the ingest topic; returns the count.

    Lines that fail validation are sent as they are (without headers: they are not msgpack),
    so the curator rejects them: a producer never filters what the pipeline must account for.
    Valid samples carry the ingest schema's headers. Image paths are confined to ``image_root``
    (default: each JSONL file's folder); a refused path is sent as its line, never as file bytes.
    """
    topic = topic or settings.kafka.topics.ingest
    p = Producer(producer_config(settings, None))
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    n = 0

    def send(value: bytes, key: bytes | None, headers: Headers | None) -> None:
        nonlocal n
        while True:
            try:
                p.produce(topic, value=value, key=key, on_delivery=on_delivery, headers=headers)
                break
            except BufferError:
                p.poll(0.1)
        n += 1
        if progress is not None and n % 500 == 0:
            progress(500)

    for item in settings_inputs(settings, paths, image_root):
        if isinstance(item, Malformed):
            send(item.payload, item.id.encode() if item.id else None, None)
        else:
            value = pack("ingest", sample_record(item), check=False)
            send(value, item.id.encode(), INGEST_HEADERS)
    for value in raw or []:
        send(value, None, None)
    p.flush(120)
    if progress is not None:
        progress(n % 500)
    if errors:
        raise RuntimeError(f"{len(errors)} messages not delivered: {errors[:3]}")
    return n


def _partitions(settings: Settings, topic: str) -> list[int]:
    admin = AdminClient(base_config(settings))
    md = admin.list_topics(topic, timeout=30)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        raise RuntimeError(f"topic {topic} not found: {t.error if t else 'missing'}")
    return sorted(t.partitions)


def ingest_id(value: bytes | None, src: dict[str, str | int], max_bytes: int) -> str:
    """The id the pipeline reports for an ingest message (source position when it has none).

    Mirrors :func:`infogrowth.schema.parse_msgpack_sample`: an oversized message is rejected
    before it is decoded, so it is known by its position too.
    """
    if value is not None and len(value) > max_bytes:
        return source_key(src)
    try:
        obj = msgpack.unpackb(value or b"", raw=False)
        if isinstance(obj, dict) and isinstance(obj.get("id"), str) and obj["id"]:
            return str(obj["id"])[:512]
    except Exception:
        pass
    return source_key(src)


def dead_letter_id(m: Any, max_bytes: int) -> tuple[str, str]:
    """(the ingest id, the error reason) of a dead-letter record: its value is the ingest
    message's, its error headers say where that message was."""
    hs = m.headers()

    def get(name: str) -> str:
        value = header(hs, name)
        return "" if value is None else value.decode("utf-8", "replace")

    part, off = get(ERROR_PARTITION), get(ERROR_OFFSET)
    src: dict[str, str | int] = {
        "topic": get(ERROR_TOPIC),
        "partition": int(part) if part.lstrip("-").isdigit() else part,
        "offset": int(off) if off.lstrip("-").isdigit() else off,
    }
    return ingest_id(m.value(), src, max_bytes), get(ERROR_REASON) or "unknown"


@dataclass
class AuditResult:
    ingest: int = 0
    outputs: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    missing: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    decisions: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    embedded: int = 0
    """Committed records on the embedded topic, replica records not counted."""
    embedded_duplicated: list[str] = field(default_factory=list)
    """Ingest positions (``topic:partition:offset``) embedded more than once."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected or self.embedded_duplicated)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "ingest": self.ingest,
            "outputs": dict(self.outputs),
            "reasons": dict(self.reasons),
            "missing": self.missing[:50],
            "duplicated": self.duplicated[:50],
            "unexpected": self.unexpected[:50],
            "missing_count": len(self.missing),
            "duplicated_count": len(self.duplicated),
            "unexpected_count": len(self.unexpected),
            "embedded": self.embedded,
            "embedded_duplicated": self.embedded_duplicated[:50],
            "embedded_duplicated_count": len(self.embedded_duplicated),
        }


def audit(settings: Settings) -> AuditResult:
    """Every ingest message has exactly one output record across the three output topics and
    the dead-letter topic (when configured; counted as ``dead_letter`` in ``outputs``)."""
    t = settings.kafka.topics
    res = AuditResult()
    expected: Counter[str] = Counter()
    for m in read_topic(settings, t.ingest):
        src: dict[str, str | int] = {
            "topic": m.topic(),
            "partition": m.partition(),
            "offset": m.offset(),
        }
        expected[ingest_id(m.value(), src, settings.limits.max_message_bytes)] += 1
        res.ingest += 1
    got: Counter[str] = Counter()
    for name in ("accepted", "relabeled", "rejected"):
        for m in read_topic(settings, getattr(t, name)):
            rec = msgpack.unpackb(m.value(), raw=False)
            got[rec["id"]] += 1
            res.outputs[name] += 1
            res.reasons[f"{name}/{rec.get('reason')}" if rec.get("reason") else name] += 1
            res.decisions[rec["id"]] = (rec["decision"], rec.get("reason"))
    if t.dead_letter is not None:
        for m in read_topic(settings, t.dead_letter):
            sid, reason = dead_letter_id(m, settings.limits.max_message_bytes)
            got[sid] += 1
            res.outputs["dead_letter"] += 1
            res.reasons[f"dead_letter/{reason}"] += 1
            res.decisions[sid] = ("rejected", reason)
    for sid, n in expected.items():
        if got[sid] < n:
            res.missing.append(sid)
        elif got[sid] > n:
            res.duplicated.append(sid)
    res.unexpected = [sid for sid in got if sid not in expected]
    res.embedded, res.embedded_duplicated = audit_embedded(settings)
    return res


def audit_embedded(settings: Settings) -> tuple[int, list[str]]:
    """Each ingest offset is embedded at most once across committed transactions.

    Returns the number of (non-replica) embedded records and the ingest positions that occur
    more than once. Replica records (boundary replication) repeat a kept item on purpose and
    carry ``replica: true``; they are not embeddings of an ingest message and are skipped.
    """
    seen: Counter[str] = Counter()
    for m in read_topic(settings, settings.kafka.topics.embedded):
        rec = msgpack.unpackb(m.value(), raw=False)
        if not isinstance(rec, dict) or rec.get("replica"):
            continue
        src = rec.get("source")
        if isinstance(src, dict) and "offset" in src:
            seen[source_key(src)] += 1
        else:  # no ingest position: count it by its own position so it is still seen
            seen[f"@{m.topic()}:{m.partition()}:{m.offset()}"] += 1
    return sum(seen.values()), sorted(k for k, n in seen.items() if n > 1)


def audit_json(settings: Settings) -> str:
    return json.dumps(audit(settings).as_dict(), indent=2, sort_keys=True)


def group_drained(settings: Settings, group: str, topic: str, timeout_s: float = 10.0) -> bool:
    """True when ``group`` has committed past every committed message of ``topic``.

    Transaction markers occupy offsets, so "committed == end offset" is not the test; instead a
    probe consumer (not a group member) reads from the committed offsets and must find nothing.
    """
    conf = consumer_config(
        settings,
        group,
        **{"enable.partition.eof": True, "partition.assignment.strategy": "range"},
    )
    c = Consumer(conf)
    try:
        parts = [TopicPartition(topic, p) for p in _partitions(settings, topic)]
        committed = c.committed(parts, timeout=timeout_s)
        todo: list[TopicPartition] = []
        for tp in committed:
            low, high = watermarks(c, TopicPartition(topic, tp.partition), timeout_s)
            start = tp.offset if tp.offset >= 0 else low
            if start < high:
                todo.append(TopicPartition(topic, tp.partition, start))
        if not todo:
            return True
        c.assign(todo)
        pending = {tp.partition for tp in todo}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for m in c.consume(100, 0.5):
                err = m.error()
                if err is None:
                    return False
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition())
        return not pending
    finally:
        c.close()
