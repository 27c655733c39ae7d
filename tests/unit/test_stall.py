"""/healthz turns unhealthy when a stage is hung in a call (not restoring, not draining), so
liveness restarts the process (found by the cluster-coordinator chaos scenario)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from infogrowth.kafka.run import Runtime
from tests.fixtures.helpers import make_settings


def _loop(idle_s: float, started: bool = True) -> Any:
    ev = threading.Event()
    if started:
        ev.set()
    return SimpleNamespace(
        last_progress=time.monotonic() - idle_s,
        started=ev,
        processor=SimpleNamespace(name="select"),
    )


def _runtime(idle_s: float, **kw: Any) -> Runtime:
    settings = make_settings(
        **{"kafka.max_poll_interval_ms": 10_000, "kafka.transaction_timeout_ms": 15_000}
    )
    rt = Runtime(settings, "all")
    rt.loops = [_loop(idle_s, **kw)]
    return rt


def test_a_stage_back_in_its_loop_is_healthy() -> None:
    assert _runtime(5).healthy() == (True, "ok")
    assert _runtime(59).healthy() == (True, "ok")  # bound: max(2 x 30 s, 10 s + 15 s)


def test_a_stage_hung_past_the_bound_is_unhealthy() -> None:
    ok, why = _runtime(61).healthy()
    assert not ok and "select stage has not returned to its loop" in why


def test_restoring_draining_or_starting_is_not_a_hang() -> None:
    rt = _runtime(600)
    rt.select = SimpleNamespace(restoring=True)  # type: ignore[assignment]
    assert rt.healthy()[0]
    rt = _runtime(600)
    rt.stop.set()
    assert rt.healthy()[0]
    assert _runtime(600, started=False).healthy()[0]


def test_the_bound_follows_the_poll_interval_and_transaction_timeout() -> None:
    settings = make_settings(
        **{"kafka.max_poll_interval_ms": 300_000, "kafka.transaction_timeout_ms": 60_000}
    )
    rt = Runtime(settings, "all")
    rt.loops = [_loop(300)]
    assert rt.healthy()[0]  # 300 s < 360 s
    rt.loops = [_loop(370)]
    assert not rt.healthy()[0]
