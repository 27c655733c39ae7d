"""Reading a partition's watermarks while its leader moves (a cluster broker died)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from infogrowth.kafka.tools import watermarks


class _Flaky:
    def __init__(self, errors: list[int]) -> None:
        self.errors = list(errors)
        self.calls = 0

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return 3, 17


def test_a_moving_leader_is_asked_again() -> None:
    c: Any = _Flaky([KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE])
    assert watermarks(c, TopicPartition("t", 0), 5) == (3, 17)
    assert c.calls == 3


def test_a_dropped_broker_handle_is_asked_again() -> None:
    """A killed cluster node leaves the metadata while a request waits on it (seen in the
    cluster-coordinator chaos scenario at a stage's start-up)."""
    c: Any = _Flaky([KafkaError._DESTROY_BROKER])
    assert watermarks(c, TopicPartition("t", 0), 5) == (3, 17)
    assert c.calls == 2


def test_other_errors_raise_at_once() -> None:
    c: Any = _Flaky([KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException):
        watermarks(c, TopicPartition("t", 0), 5)
    assert c.calls == 1


def test_a_leader_that_never_comes_back_times_out() -> None:
    c: Any = _Flaky([KafkaError.NOT_LEADER_FOR_PARTITION] * 1000)
    with pytest.raises(KafkaException):
        watermarks(c, TopicPartition("t", 0), 0.5)
    assert 1 < c.calls < 1000
