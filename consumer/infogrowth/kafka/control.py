"""The compacted control topic: the published calibration every replica reads at start."""

from __future__ import annotations

import logging
import time
import uuid
from hashlib import sha256
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from infogrowth.calibrate import Calibration
from infogrowth.config import Settings
from infogrowth.kafka.clients import consumer_config, watermarks
from infogrowth.kafka.reader import PartitionReader
from infogrowth.messages import calibration_from_record, calibration_record
from infogrowth.schema import pack, unpack

log = logging.getLogger(__name__)
CALIBRATION_KEY = b"calibration"


def end_offset(
    settings: Settings,
    topic: str,
    partition: int,
    timeout_s: float = 30.0,
    *,
    committed: bool = True,
) -> int:
    """The partition's end offset: with ``committed`` (the consumers' read_committed view) its
    last stable offset, else the high watermark (past open transactions and commit markers)."""
    extra = {} if committed else {"isolation.level": "read_uncommitted"}
    conf = consumer_config(settings, f"infogrowth-reader-{uuid.uuid4().hex[:8]}", **extra)
    c = Consumer(conf)
    try:
        return watermarks(c, TopicPartition(topic, partition), timeout_s)[1]
    finally:
        c.close()


def calibration_id(cal: Calibration | None) -> str | None:
    """A short digest of the published calibration (None when nothing was seeded)."""
    if cal is None:
        return None
    return sha256(pack("calibration", calibration_record(cal), check=False)).hexdigest()[:16]


def read_calibration(settings: Settings, settle_s: float = 30.0) -> Calibration | None:
    """The latest calibration on the control topic, or None when nothing was seeded.

    A seed's transaction counts once it has committed, but its commit markers reach the log a
    moment after ``commit_transaction`` returns; until then a read_committed reader ends before
    it. So the read is repeated (up to ``settle_s``) until it reaches the high watermark (read
    uncommitted: a read_committed client's watermark is the lagging last stable offset too): a
    seed run right after another one must see the first one's epoch.
    """
    deadline = time.monotonic() + settle_s
    while True:
        latest: dict[str, Any] | None = None
        reader = PartitionReader(settings, settings.kafka.topics.control, 0)
        for m in reader:
            value = m.value()
            if m.key() == CALIBRATION_KEY and value:
                latest = unpack("calibration", value, max_bytes=256 * 1024 * 1024)
        # The log end as a read_uncommitted client sees it: a read_committed consumer's watermark
        # is the last stable offset, which lags the commit markers just as the read does.
        log_end = end_offset(settings, settings.kafka.topics.control, 0, committed=False)
        settled = reader.end is None or reader.end >= log_end
        if settled or time.monotonic() > deadline:
            if not settled:
                log.warning("control topic: a transaction is still open; using what committed")
            return None if latest is None else calibration_from_record(latest)
        time.sleep(0.2)


class ControlWatcher:
    """Follows the control topic while a stage runs and reports a newly published calibration.

    Assigned (not subscribed) to the topic's single partition from its beginning; read_committed,
    so a seed's calibration shows only once its changelog records are committed with it.
    """

    def __init__(self, settings: Settings) -> None:
        conf = consumer_config(settings, f"infogrowth-control-{uuid.uuid4().hex[:8]}")
        self.consumer = Consumer(conf)
        self.consumer.assign([TopicPartition(settings.kafka.topics.control, 0, -2)])

    def poll(self) -> Calibration | None:
        """The latest calibration published since the last poll (None: nothing new)."""
        latest: Calibration | None = None
        for m in self.consumer.consume(100, 0):
            value = m.value()
            if m.error() is not None or m.key() != CALIBRATION_KEY or not value:
                continue
            try:
                rec = unpack("calibration", value, max_bytes=256 * 1024 * 1024)
                latest = calibration_from_record(rec)
            except (ValueError, KeyError) as exc:
                log.error("control topic: unreadable calibration at offset %s: %s", m.offset(), exc)
        return latest

    def close(self) -> None:
        self.consumer.close()
