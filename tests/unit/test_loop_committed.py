"""The loop's committed-offsets lookup (before a restore, after an abort): offsets a killed
member's transaction left pending hold a read_committed lookup until the coordinator aborts
that transaction, so "not yet" answers are asked again, within a bound; "never" ends the stage."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from infogrowth.config import load_settings
from infogrowth.kafka import loop as loop_mod
from infogrowth.kafka.loop import TransactionalLoop


class _Consumer:
    """Answers ``committed()`` from a script: an exception to raise or offsets to return."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls = 0
        self.seeks: list[TopicPartition] = []

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return [TopicPartition(tp.topic, tp.partition, step) for tp in parts]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append(tp)


class _Processor:
    name = "test"
    stateful = False


def _loop(consumer: _Consumer, txn_timeout_ms: int = 60_000) -> Any:
    settings = load_settings(None, **{"kafka.transaction_timeout_ms": txn_timeout_ms})
    lp = TransactionalLoop(settings, _Processor(), group="g", topics=["in"], transactional_id="x")  # type: ignore[arg-type]
    lp.consumer = consumer  # type: ignore[assignment]
    return lp


def _err(code: int, **flags: bool) -> KafkaException:
    return KafkaException(KafkaError(code, "scripted", **flags))


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_mod.time, "sleep", lambda s: None)


def test_a_lookup_that_times_out_is_asked_again() -> None:
    consumer = _Consumer([_err(KafkaError._TIMED_OUT), _err(KafkaError.NOT_COORDINATOR), 42])
    got = _loop(consumer)._committed([TopicPartition("in", 0)])
    assert [tp.offset for tp in got] == [42] and consumer.calls == 3


def test_a_partitions_own_error_is_asked_again_not_read_as_the_beginning() -> None:
    """A partition answered with an error and offset -1001 must not be sought to the start
    (every output produced again)."""

    class _PartError(_Consumer):
        def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
            self.calls += 1
            if self.calls == 1:  # TopicPartition's error is read-only: a stand-in
                err = KafkaError(KafkaError.UNSTABLE_OFFSET_COMMIT)
                return [SimpleNamespace(topic="in", partition=0, offset=-1001, error=err)]  # type: ignore[list-item]
            return [TopicPartition("in", 0, 7)]

    consumer = _PartError([])
    lp = _loop(consumer)
    lp._rewind([TopicPartition("in", 0)])
    assert consumer.calls == 2 and [tp.offset for tp in consumer.seeks] == [7]


def test_an_error_that_will_not_pass_ends_the_stage_at_once() -> None:
    consumer = _Consumer([_err(KafkaError.GROUP_AUTHORIZATION_FAILED), 1])
    with pytest.raises(KafkaException):
        _loop(consumer)._committed([TopicPartition("in", 0)])
    assert consumer.calls == 1


def test_the_lookup_gives_up_after_twice_the_transaction_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr(loop_mod.time, "monotonic", lambda: now[0])

    def sleep(s: float) -> None:
        now[0] += s

    monkeypatch.setattr(loop_mod.time, "sleep", sleep)
    consumer = _Consumer([_err(KafkaError._TIMED_OUT)] * 100)
    with pytest.raises(KafkaException):
        _loop(consumer, txn_timeout_ms=10_000)._committed([TopicPartition("in", 0)])
    assert 3 < consumer.calls < 20 and now[0] <= 20.0
