"""The compacted control topic: the published calibration every replica reads at start."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from infogrowth.calibrate import Calibration
from infogrowth.config import Settings
from infogrowth.kafka.clients import consumer_config
from infogrowth.schema import pack, unpack

log = logging.getLogger(__name__)
CALIBRATION_KEY = b"calibration"


_NOT_YET = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)
"""Errors of a topic created a moment ago whose partition has no leader yet: wait, then retry."""


def _high_watermark(c: Consumer, tp: TopicPartition, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, high = c.get_watermark_offsets(tp, timeout=timeout_s)
            return int(high)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            code = err.code() if isinstance(err, KafkaError) else None
            if code not in _NOT_YET or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_partition_to_end(
    settings: Settings,
    topic: str,
    partition: int,
    start: int = -2,
    timeout_s: float = 60.0,
    batch: int = 1000,
) -> Any:
    """Yield committed messages of one partition from ``start`` (-2 = beginning) to its end."""
    conf = consumer_config(
        settings,
        f"infogrowth-reader-{uuid.uuid4().hex[:8]}",
        **{"enable.partition.eof": True, "partition.assignment.strategy": "range"},
    )
    c = Consumer(conf)
    try:
        high = _high_watermark(c, TopicPartition(topic, partition), timeout_s)
        if high <= 0 or (start >= 0 and start >= high):
            return
        c.assign([TopicPartition(topic, partition, start)])
        deadline = time.monotonic() + timeout_s
        while True:
            msgs = c.consume(batch, 0.5)
            done = False
            for m in msgs:
                err = m.error()
                if err is None:
                    yield m
                elif err.code() == KafkaError._PARTITION_EOF:
                    done = True
                else:
                    raise RuntimeError(f"reading {topic}[{partition}]: {err}")
            if done:
                return
            if msgs:
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}[{partition}] timed out")
    finally:
        c.close()


def end_offset(settings: Settings, topic: str, partition: int, timeout_s: float = 30.0) -> int:
    """The partition's log end offset (high watermark)."""
    conf = consumer_config(settings, f"infogrowth-reader-{uuid.uuid4().hex[:8]}")
    c = Consumer(conf)
    try:
        _, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
        return int(high)
    finally:
        c.close()


def calibration_id(cal: Calibration | None) -> str | None:
    """A short digest of the published calibration (None when nothing was seeded)."""
    if cal is None:
        return None
    return hashlib.sha256(pack("calibration", cal.as_record(), check=False)).hexdigest()[:16]


def read_calibration(settings: Settings) -> Calibration | None:
    """The latest calibration on the control topic, or None when nothing was seeded."""
    latest: dict[str, Any] | None = None
    for m in read_partition_to_end(settings, settings.kafka.topics.control, 0):
        if m.key() == CALIBRATION_KEY and m.value():
            latest = unpack("calibration", m.value(), max_bytes=256 * 1024 * 1024)
    if latest is None:
        return None
    return Calibration.from_record(latest)
