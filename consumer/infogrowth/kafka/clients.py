"""librdkafka configuration built from the settings: our keys plus ``kafka.client`` unchanged."""

from __future__ import annotations

import socket
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from infogrowth.config import LimitsConfig, Settings

RECORD_OVERHEAD = 1024
"""Bytes reserved per record for the batch and record headers when checking a record's size."""


def record_limit(limits: LimitsConfig) -> int:
    """The largest record batch this pipeline produces or accepts: a topic's
    ``max.message.bytes`` and the producer's ``message.max.bytes``.

    One ``limits.max_message_bytes`` input plus 64 KiB for what stages add (vectors, decision
    fields), never below the broker default (1 MiB), so batching producers keep working.
    """
    return max(limits.max_message_bytes + 65536, 1048588)


def fits(limits: LimitsConfig, value: bytes, key: bytes | None = None, extra: int = 0) -> bool:
    """Whether one record (value + key + headers, plus ``extra`` bytes of headroom) fits
    :func:`record_limit`."""
    return len(value) + len(key or b"") + RECORD_OVERHEAD + extra <= record_limit(limits)


def position(m: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed message."""
    topic, part, off = m.topic(), m.partition(), m.offset()
    assert topic is not None and part is not None and off is not None
    return topic, part, off


def source_of(m: Message) -> dict[str, str | int]:
    topic, part, off = position(m)
    return {"topic": topic, "partition": part, "offset": off}


def base_config(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {"bootstrap.servers": settings.kafka.bootstrap_servers}
    conf.update(settings.kafka.client)
    return conf


def instance_id(settings: Settings) -> str:
    return settings.kafka.instance_id or socket.gethostname()


def consumer_config(settings: Settings, group: str, **extra: Any) -> dict[str, Any]:
    """A read_committed consumer that never auto-commits (offsets go through transactions)."""
    k = settings.kafka
    conf = base_config(settings)
    conf.update(
        {
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": k.session_timeout_ms,
            "max.poll.interval.ms": k.max_poll_interval_ms,
            "fetch.max.bytes": max(settings.limits.max_message_bytes * 4, 52428800),
            "max.partition.fetch.bytes": max(settings.limits.max_message_bytes + 1024, 1048576),
        }
    )
    if k.static_membership:
        conf["group.instance.id"] = f"{group}-{instance_id(settings)}"
    conf.update(extra)
    return conf


def producer_config(settings: Settings, transactional_id: str | None) -> dict[str, Any]:
    k = settings.kafka
    conf = base_config(settings)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.max.bytes": record_limit(settings.limits),
        }
    )
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = k.transaction_timeout_ms
    return conf


_MOVING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._DESTROY_BROKER,
    }
)
"""Errors of a partition whose leader is moving (a cluster broker died) or that has no leader
yet (a topic created a moment ago): ask again. ``_DESTROY_BROKER``: the client dropped the handle
of a broker that left the cluster's metadata while the request waited on it."""


def watermarks(c: Consumer, tp: TopicPartition, timeout_s: float = 30.0) -> tuple[int, int]:
    """(low, high) of a partition, asked again while the error is retriable: on a cluster a
    partition's leader moves (a broker died, a preferred leader came back) under a reader, and a
    just-created topic's partition has no leader for a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = c.get_watermark_offsets(tp, timeout=timeout_s)
            return int(low), int(high)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            moving = isinstance(err, KafkaError) and (err.retriable() or err.code() in _MOVING)
            if not moving:
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
