"""One way to read a topic: each partition from a start offset to the end offset pinned when the
read begins, read_committed.

A read_committed consumer's end offset is the last stable offset, so everything before it is
decided: committed records are delivered, aborted ones and transaction markers never are, and
records committed after the read began are left for the next read. The trainer's
``CuratedStream``, ``infogrowth export``, the control topic, the audit and the select stage's
restore all read this way. ``confluent_kafka`` is imported inside the functions, so importing
this module needs no Kafka.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from infogrowth.config import Settings

log = logging.getLogger(__name__)

TopicPartitionKey = tuple[str, int]
StartPosition = Literal["earliest", "committed"] | Mapping[TopicPartitionKey, int]


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``[start, end)`` of one partition to read in an epoch."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def key(self) -> TopicPartitionKey:
        return (self.topic, self.partition)

    @property
    def span(self) -> int:
        """Offsets covered (an upper bound on records: markers and aborted records use offsets)."""
        return max(0, self.end - self.start)


def consumer_conf(settings: Settings, group: str) -> dict[str, Any]:
    """A read_committed, never auto-committing consumer that reports partition ends."""
    from infogrowth.kafka.clients import consumer_config

    conf = consumer_config(
        settings,
        group,
        **{
            "enable.partition.eof": True,
            "partition.assignment.strategy": "range",
            # A fetch at the end of a partition waits at most this long for data (default 500):
            # reads end on end-of-partition events, so a short wait ends them sooner.
            "fetch.wait.max.ms": 100,
        },
    )
    conf.pop("group.instance.id", None)  # assign() only: it never joins the group
    return conf


def open_consumer(settings: Settings, group: str) -> Any:
    from confluent_kafka import Consumer

    return Consumer(consumer_conf(settings, group))


def list_partitions(
    consumer: Any, topics: Sequence[str], timeout_s: float
) -> list[TopicPartitionKey]:
    """Sorted ``(topic, partition)`` pairs of ``topics``; a missing topic raises LookupError."""
    out: list[TopicPartitionKey] = []
    for topic in topics:
        md = consumer.list_topics(topic, timeout=timeout_s)
        t = md.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            reason = t.error if t is not None and t.error is not None else "missing"
            raise LookupError(f"topic {topic}: {reason}")
        out.extend((topic, p) for p in t.partitions)
    return sorted(out)


def end_offsets(
    consumer: Any, partitions: Sequence[TopicPartitionKey], timeout_s: float
) -> dict[TopicPartitionKey, int]:
    """The current end (last stable offset, for read_committed) of each partition."""
    from confluent_kafka import TopicPartition

    from infogrowth.kafka.clients import watermarks

    return {key: watermarks(consumer, TopicPartition(*key), timeout_s)[1] for key in partitions}


def plan_ranges(
    consumer: Any,
    partitions: Sequence[TopicPartitionKey],
    start: StartPosition,
    timeout_s: float,
    pinned_ends: Mapping[TopicPartitionKey, int] | None = None,
) -> list[PartitionRange]:
    """The non-empty ranges of an epoch.

    ``start``: ``earliest`` (the log start), ``committed`` (the consumer group's committed
    offsets, the log start where it has none) or an explicit ``{(topic, partition): offset}``
    (the log start for partitions it omits). Starts before the log start (deleted by retention)
    are moved up to it. Ends are ``pinned_ends`` where given, else the current end offsets.
    """
    from confluent_kafka import TopicPartition

    from infogrowth.kafka.clients import watermarks

    committed: dict[TopicPartitionKey, int] = {}
    if start == "committed":
        got = consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=timeout_s)
        committed = {(tp.topic, tp.partition): tp.offset for tp in got if tp.offset >= 0}
    ranges = []
    for key in sorted(partitions):
        low, high = watermarks(consumer, TopicPartition(*key), timeout_s)
        end = int(pinned_ends[key]) if pinned_ends and key in pinned_ends else int(high)
        if start == "earliest":
            first = low
        elif start == "committed":
            first = committed.get(key, low)
        else:
            first = start.get(key, low)
        first = max(int(first), int(low))
        if first < end:
            ranges.append(PartitionRange(key[0], key[1], first, end))
    return ranges


def read_ranges(
    consumer: Any, ranges: Sequence[PartitionRange], idle_timeout_s: float
) -> Iterator[tuple[PartitionRange, Any]]:
    """``(range, message)`` of every committed record in ``ranges``, each once.

    A partition is finished by its first record at or past its end, or by an end-of-partition
    event at or past it. Records of one partition come in offset order; partitions interleave.
    Raises TimeoutError when nothing arrives for ``idle_timeout_s`` while ranges are pending.
    """
    from confluent_kafka import KafkaError, TopicPartition

    pending = {r.key: r for r in ranges if r.span > 0}
    if not pending:
        return
    consumer.assign([TopicPartition(r.topic, r.partition, r.start) for r in pending.values()])

    def finish(key: TopicPartitionKey) -> None:
        del pending[key]
        consumer.pause([TopicPartition(*key)])

    last = time.monotonic()
    while pending:
        msgs = consumer.consume(500, 0.1)  # returns at 500 messages or the timeout
        if not msgs:
            if time.monotonic() - last > idle_timeout_s:
                left = sorted(pending)
                raise TimeoutError(f"no data for {idle_timeout_s}s; unfinished: {left}")
            continue
        last = time.monotonic()
        for m in msgs:
            key = (m.topic(), m.partition())
            r = pending.get(key)
            if r is None:
                continue  # a finished partition's read-ahead
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if m.offset() >= r.end:
                        finish(key)
                    continue
                if err.retriable() and not err.fatal():
                    log.warning("retriable consumer error on %s: %s", key, err)
                    continue
                raise RuntimeError(f"reading {key[0]}[{key[1]}]: {err}")
            off = int(m.offset())
            if off >= r.end:
                finish(key)
                continue
            yield r, m
            if off >= r.end - 1:
                finish(key)


def read_topic(settings: Settings, topic: str, timeout_s: float = 60.0) -> Iterator[Any]:
    """Every committed message of ``topic``, all partitions, from the log start to the ends
    pinned now (the audit's and the tests' view of a topic)."""
    consumer = open_consumer(settings, f"infogrowth-reader-{uuid.uuid4().hex[:8]}")
    try:
        parts = list_partitions(consumer, [topic], timeout_s)
        ranges = plan_ranges(consumer, parts, "earliest", timeout_s)
        for _, m in read_ranges(consumer, ranges, timeout_s):
            yield m
    finally:
        consumer.close()


class PartitionReader:
    """Committed messages of one partition from ``start`` (-2 = the log start) to the end pinned
    when the iteration begins.

    Iterate once; afterwards :attr:`end` is that end (the partition's last stable offset then:
    records of a transaction still open lie at or beyond it). Closing the iterator early
    (``close()``) releases the consumer at once.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        partition: int,
        start: int = -2,
        timeout_s: float = 60.0,
    ) -> None:
        self.settings, self.topic, self.partition = settings, topic, partition
        self.start, self.timeout_s = start, timeout_s
        self.end: int | None = None

    def __iter__(self) -> Generator[Any, None, None]:
        key = (self.topic, self.partition)
        consumer = open_consumer(self.settings, f"infogrowth-reader-{uuid.uuid4().hex[:8]}")
        try:
            ends = end_offsets(consumer, [key], self.timeout_s)
            self.end = max(ends[key], 0)
            start: StartPosition = {key: self.start} if self.start >= 0 else "earliest"
            ranges = plan_ranges(consumer, [key], start, self.timeout_s, ends)
            for _, m in read_ranges(consumer, ranges, self.timeout_s):
                yield m
        finally:
            consumer.close()
