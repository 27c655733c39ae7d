"""The bounded prefetch queue (infogrowth.prefetch): order, the bound, errors, early exit."""

from __future__ import annotations

import threading
import time

import pytest

from infogrowth.prefetch import prefetch


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_results_in_job_order(depth: int) -> None:
    jobs = list(range(23))

    def prepare(j: int) -> int:
        time.sleep(0.001 * (j % 3))  # uneven preparation times
        return j * j

    assert list(prefetch(jobs, prepare, depth)) == [j * j for j in jobs]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_producer_never_more_than_depth_ahead(depth: int) -> None:
    """With a slow consumer, prepared-but-untaken results never exceed ``depth``, and the
    producer does work ahead (it is not lock-step)."""
    lock = threading.Lock()
    state = {"prepared": 0, "taken": 0, "max_ahead": 0}

    def prepare(j: int) -> int:
        with lock:
            state["prepared"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["prepared"] - state["taken"])
        return j

    for j in prefetch(range(12), prepare, depth):
        with lock:
            state["taken"] += 1
        assert j == state["taken"] - 1
        time.sleep(0.01)  # let the producer run as far ahead as it may
    assert state["max_ahead"] == depth


def test_depth_zero_prepares_lazily_without_a_thread() -> None:
    seen: list[int] = []
    gen = prefetch(range(5), lambda j: seen.append(j) or j, 0, name="lazy-prefetch")
    assert seen == []
    assert next(gen) == 0
    assert seen == [0]
    assert not _threads("lazy-prefetch")


def test_error_raised_at_its_position_and_production_stops() -> None:
    calls: list[int] = []

    def prepare(j: int) -> int:
        calls.append(j)
        if j == 3:
            raise ValueError("bad job 3")
        return j

    got: list[int] = []
    with pytest.raises(ValueError, match="bad job 3"):
        for r in prefetch(range(10), prepare, 2, name="err-prefetch"):
            got.append(r)
    assert got == [0, 1, 2]
    assert calls == [0, 1, 2, 3]  # nothing prepared after the failing job
    assert not _threads("err-prefetch")


def test_leaving_early_stops_the_producer() -> None:
    calls: list[int] = []

    def prepare(j: int) -> int:
        calls.append(j)
        return j

    for r in prefetch(range(1000), prepare, 2, name="early-prefetch"):
        if r == 4:
            break
    assert not _threads("early-prefetch")
    assert len(calls) <= 4 + 1 + 2  # taken, the one in hand, at most depth ahead


def test_consumer_error_stops_the_producer() -> None:
    with pytest.raises(RuntimeError, match="consumer"):
        for r in prefetch(range(1000), lambda j: j, 3, name="cons-prefetch"):
            if r == 2:
                raise RuntimeError("consumer failed")
    assert not _threads("cons-prefetch")


def test_negative_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        list(prefetch([1], lambda j: j, -1))
