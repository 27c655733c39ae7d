"""The loop's fetch: a full batch at once, a partial one after ``commit_idle_ms`` of quiet only
once every partition read is at its end, otherwise after ``commit_interval_ms``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from infogrowth.config import load_settings
from infogrowth.kafka.loop import TransactionalLoop

INTERVAL_MS, IDLE_MS = 400, 20


@dataclass
class _Err:
    code_: int

    def code(self) -> int:
        return self.code_


@dataclass
class _Msg:
    t: str
    p: int
    o: int
    eof: bool = False

    def error(self) -> _Err | None:
        return _Err(KafkaError._PARTITION_EOF) if self.eof else None

    def topic(self) -> str:
        return self.t

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o


@dataclass
class _Consumer:
    """Hands out the planned returns in order; with none left, waits out the timeout."""

    plan: list[list[_Msg]]
    calls: list[tuple[int, float]] = field(default_factory=list)

    def consume(self, num: int, timeout: float) -> list[_Msg]:
        self.calls.append((num, timeout))
        if self.plan:
            out = self.plan.pop(0)
            assert len(out) <= num
            return out
        time.sleep(timeout)
        return []

    def seek(self, tp: TopicPartition) -> None:
        pass


class _Processor:
    name = "test"
    stateful = False

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        pass


def _loop(consumer: _Consumer, parts: list[tuple[str, int]], max_messages: int = 10) -> Any:
    settings = load_settings(
        None,
        **{
            "kafka.commit_interval_ms": INTERVAL_MS,
            "kafka.commit_idle_ms": IDLE_MS,
            "kafka.commit_max_messages": max_messages,
        },
    )
    proc = _Processor()
    loop = TransactionalLoop(settings, proc, group="g", topics=["in"], transactional_id="x")  # type: ignore[arg-type]
    loop.consumer = consumer  # type: ignore[assignment]
    loop.assigned = set(parts)
    return loop


def _data(p: int, lo: int, n: int) -> list[_Msg]:
    return [_Msg("in", p, o) for o in range(lo, lo + n)]


def _timed(loop: Any) -> tuple[list[_Msg], float]:
    t0 = time.monotonic()
    msgs = loop._fetch(INTERVAL_MS / 1000)
    return msgs, time.monotonic() - t0


def test_a_full_batch_is_taken_without_waiting() -> None:
    c = _Consumer([_data(0, 0, 10)])
    msgs, took = _timed(_loop(c, [("in", 0)]))
    assert len(msgs) == 10 and c.calls == [(10, 0.0)] and took < 0.1


def test_the_end_of_a_burst_commits_after_the_idle_gap_not_the_interval() -> None:
    c = _Consumer([[*_data(0, 0, 3), _Msg("in", 0, 3, eof=True)]])
    msgs, took = _timed(_loop(c, [("in", 0)]))
    assert [m.o for m in msgs if not m.eof] == [0, 1, 2]
    assert took < INTERVAL_MS / 1000 / 2
    assert len(c.calls) == 2 and c.calls[1] == (7, IDLE_MS / 1000)  # one quiet slice, then go


def test_a_partial_batch_waits_out_the_interval_until_the_partitions_are_at_their_end() -> None:
    c = _Consumer([_data(0, 0, 3)])  # no EOF: more may be on its way
    msgs, took = _timed(_loop(c, [("in", 0)]))
    assert len(msgs) == 3 and took >= INTERVAL_MS / 1000 * 0.95


def test_every_partition_read_must_be_at_its_end() -> None:
    c = _Consumer([[*_data(0, 0, 3), _Msg("in", 0, 3, eof=True)]])
    _, took = _timed(_loop(c, [("in", 0), ("in", 1)]))
    assert took >= INTERVAL_MS / 1000 * 0.95
    # ...unless the other one is restoring (paused: nothing comes from it)
    c = _Consumer([[*_data(0, 0, 3), _Msg("in", 0, 3, eof=True)]])
    loop = _loop(c, [("in", 0), ("in", 1)])
    loop.restoring[("in", 1)] = None
    _, took = _timed(loop)
    assert took < INTERVAL_MS / 1000 / 2


def test_a_message_after_the_end_means_the_partition_is_no_longer_at_it() -> None:
    c = _Consumer([[_Msg("in", 0, 0, eof=True), *_data(0, 0, 2)]])
    _, took = _timed(_loop(c, [("in", 0)]))
    assert took >= INTERVAL_MS / 1000 * 0.95


def test_new_messages_keep_the_batch_open_and_fill_it() -> None:
    c = _Consumer([[*_data(0, 0, 3), _Msg("in", 0, 3, eof=True)], _data(0, 3, 4), _data(0, 7, 3)])
    msgs, _ = _timed(_loop(c, [("in", 0)]))
    assert [m.o for m in msgs if not m.eof] == list(range(10))  # full: no wait for quiet


def test_seek_and_revoke_forget_the_end() -> None:
    loop = _loop(_Consumer([]), [("in", 0)])
    loop._track_ends([_Msg("in", 0, 5, eof=True)])
    assert loop._all_at_end()
    loop._seek(TopicPartition("in", 0, 2))
    assert not loop._all_at_end()
    loop._track_ends([_Msg("in", 0, 5, eof=True)])
    loop._revoke(loop.consumer, [TopicPartition("in", 0)])
    assert loop._at_end == set()


def test_a_rebalance_ends_the_fetch() -> None:
    class Rebalancing(_Consumer):
        def consume(self, num: int, timeout: float) -> list[_Msg]:
            if len(self.calls) == 1:
                loop.rebalances += 1  # as an assign callback inside consume() would
            return super().consume(num, timeout)

    c = Rebalancing([])
    loop = _loop(c, [("in", 0)])
    _, took = _timed(loop)
    assert len(c.calls) == 2 and took < INTERVAL_MS / 1000 / 2
