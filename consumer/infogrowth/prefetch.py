"""A bounded prefetch queue: prepare the next items on a background thread while the caller
works on the current one.

``prefetch(jobs, prepare, depth)`` yields ``prepare(job)`` for every job, in order. One producer
thread runs ``prepare`` ahead of the consumer, holding at most ``depth`` prepared results that
the consumer has not taken yet, so memory stays bounded however fast preparation is. An
exception raised by ``prepare`` is raised to the consumer at that job's position; leaving the
loop early (``break``, an exception in the consumer) stops the producer after the job it is on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from infogrowth.errors import ConfigError

__all__ = ["prefetch"]

J = TypeVar("J")
R = TypeVar("R")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(
    jobs: Iterable[J], prepare: Callable[[J], R], depth: int = 2, *, name: str = "prefetch"
) -> Iterator[R]:
    """``prepare(job)`` for each job, in order, computed up to ``depth`` jobs ahead.

    ``depth`` 0 prepares each job only when the consumer asks for it (no thread).
    """
    if depth < 0:
        raise ConfigError("prefetch depth must be >= 0")
    if depth == 0:
        for job in jobs:
            yield prepare(job)
        return
    # A slot is taken before a job is prepared and given back when the consumer takes its
    # result, so at most `depth` results exist that the consumer has not taken.
    slots = threading.Semaphore(depth)
    results: queue.SimpleQueue[object] = queue.SimpleQueue()
    stop = threading.Event()

    def produce() -> None:
        try:
            for job in jobs:
                slots.acquire()
                if stop.is_set():
                    return
                try:
                    results.put(prepare(job))
                except BaseException as exc:  # handed to the consumer, raised there
                    results.put(_Failure(exc))
                    return
        finally:
            results.put(_DONE)

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = results.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            slots.release()
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        slots.release()  # wake a producer waiting for a slot, so it sees `stop` and ends
        worker.join()
