"""The trainer's share of output topics: which partitions (or ids) a reader takes, committing an
epoch's ends, decoding output records. Topics are read by :mod:`infogrowth.kafka.reader`.
``confluent_kafka`` is imported inside the functions, so importing this module needs no Kafka.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgpack

from infogrowth.errors import ConfigError, DataError
from infogrowth.kafka.reader import PartitionRange, TopicPartitionKey


def id_bucket(sample_id: str, buckets: int) -> int:
    """A stable bucket in ``[0, buckets)`` for an id (blake2b; equal in every process)."""
    h = hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") % buckets


def reader_share(
    partitions: Sequence[TopicPartitionKey], reader: int, readers: int
) -> tuple[list[TopicPartitionKey], bool]:
    """The partitions reader ``reader`` of ``readers`` reads, and whether it must filter by id.

    With at least as many partitions as readers, reader ``r`` takes every ``readers``-th
    partition of the sorted list starting at ``r`` (round robin). With fewer, every reader reads
    every partition and keeps the records whose :func:`id_bucket` is ``r``.
    """
    if not 0 <= reader < readers:
        raise ConfigError(f"reader {reader} is not in [0, {readers})")
    ordered = sorted(partitions)
    if len(ordered) >= readers:
        return ordered[reader::readers], False
    return ordered, True


def commit_ends(consumer: Any, ranges: Sequence[PartitionRange]) -> None:
    """Commit each range's end offset to the consumer's group (synchronously)."""
    from confluent_kafka import TopicPartition

    if ranges:
        consumer.commit(
            offsets=[TopicPartition(r.topic, r.partition, r.end) for r in ranges],
            asynchronous=False,
        )


def decode_record(value: bytes | None, max_bytes: int) -> dict[str, Any]:
    """Decode an output record's msgpack; the schema check is the caller's (``validate``)."""
    if value is None:
        raise DataError("empty message")
    if len(value) > max_bytes:
        raise DataError(f"message of {len(value)} bytes exceeds {max_bytes}")
    obj = msgpack.unpackb(value, raw=False, strict_map_key=True)
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        raise DataError("not an output record")
    return obj
