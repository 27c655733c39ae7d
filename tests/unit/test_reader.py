"""The one topic reader: each partition from its start to the end offset pinned when the read
begins; records committed later wait for the next read (a fake consumer stands in for Kafka)."""

from __future__ import annotations

from typing import Any

import pytest

from infogrowth.kafka import reader
from infogrowth.kafka.reader import PartitionReader, read_topic
from tests.fixtures.helpers import make_settings
from tests.unit.test_replication import Msg


class GrowingConsumer:
    """Partitions whose logs grow by ``grow`` records once the reader has asked for the ends."""

    def __init__(self, logs: dict[tuple[str, int], int], grow: int = 0) -> None:
        self.logs, self.grow = dict(logs), grow
        self.queue: list[Msg] = []
        self.closed = False

    def list_topics(self, topic: str, timeout: float) -> Any:
        parts = {p: None for t, p in self.logs if t == topic}
        meta = type("T", (), {"partitions": parts, "error": None})()
        return type("M", (), {"topics": {topic: meta}})()

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        return 0, self.logs[(tp.topic, tp.partition)]

    def assign(self, tps: list[Any]) -> None:
        for tp in tps:
            key = (tp.topic, tp.partition)
            self.logs[key] += self.grow  # committed after the ends were pinned
            start = max(tp.offset, 0)
            self.queue += [Msg(b"v%d" % o, key[1], o, key[0]) for o in range(start, self.logs[key])]

    def consume(self, n: int, timeout: float) -> list[Msg]:
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def pause(self, tps: list[Any]) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def consumer(monkeypatch: pytest.MonkeyPatch) -> GrowingConsumer:
    c = GrowingConsumer({("t", 0): 5, ("t", 1): 3}, grow=4)
    monkeypatch.setattr(reader, "open_consumer", lambda settings, group: c)
    return c


def test_a_partition_is_read_to_the_end_pinned_when_the_read_began(
    consumer: GrowingConsumer,
) -> None:
    r = PartitionReader(make_settings(), "t", 0)
    assert [m.offset() for m in r] == [0, 1, 2, 3, 4]
    assert r.end == 5 and consumer.closed


def test_a_partition_read_from_an_offset(consumer: GrowingConsumer) -> None:
    r = PartitionReader(make_settings(), "t", 0, start=3)
    assert [m.value() for m in r] == [b"v3", b"v4"]
    assert r.end == 5


def test_a_start_at_the_end_reads_nothing(consumer: GrowingConsumer) -> None:
    r = PartitionReader(make_settings(), "t", 1, start=3)
    assert list(r) == [] and r.end == 3


def test_a_topic_is_read_whole_up_to_its_pinned_ends(consumer: GrowingConsumer) -> None:
    got = sorted((m.partition(), m.offset()) for m in read_topic(make_settings(), "t"))
    assert got == [(0, o) for o in range(5)] + [(1, o) for o in range(3)]
    assert consumer.closed


def test_closing_the_iteration_early_releases_the_consumer(consumer: GrowingConsumer) -> None:
    it = iter(PartitionReader(make_settings(), "t", 0))
    next(it)
    it.close()  # type: ignore[attr-defined]
    assert consumer.closed
