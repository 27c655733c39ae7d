"""The pure parts of the new chaos scenarios (the scenarios themselves run in tests/chaos)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from infogrowth.config import LimitsConfig
from infogrowth.kafka.clients import fits, record_limit
from infogrowth_dev.chaos import (
    CLUSTER_VICTIMS,
    SCENARIOS,
    Proc,
    _after_checks,
    oversized_messages,
)
from infogrowth_dev.chaos_cluster import KillLog
from infogrowth_dev.chaos_state import STALE_MARK, stale_discards


def test_every_new_scenario_is_listed() -> None:
    for name in ("fenced", "recreate", "reseed", "slow-churn", "oversized", *CLUSTER_VICTIMS):
        assert name in SCENARIOS


def test_oversized_messages_fit_the_topic_but_not_as_a_rejection() -> None:
    limits = LimitsConfig(max_message_bytes=65536)
    limit = record_limit(limits)
    msgs = oversized_messages(3, limit, seed=1)
    assert msgs == oversized_messages(3, limit, seed=1)  # deterministic
    assert len({m for m in msgs}) == 3
    for m in msgs:
        assert len(m) == limit - 600
        assert len(m) > limits.max_message_bytes  # rejected/malformed at the embed stage ...
        assert not fits(limits, m, None, 0)  # ... whose record carrying it would not fit


def _proc(tmp_path: Path, text: str) -> Proc:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serve: {port: 1}\n")
    p = Proc(cfg, tmp_path / "run.log")
    p.log_path.write_text(text)
    return p


def test_stale_discards_are_counted_from_the_log(tmp_path: Path) -> None:
    line = f"partition 0: snap: taken from changelog topic id 'a', now 'b' {STALE_MARK}\n"
    assert stale_discards(_proc(tmp_path, "nothing\n")) == 0
    assert stale_discards(_proc(tmp_path, line * 3)) == 3


def test_after_checks(tmp_path: Path) -> None:
    result: Any = SimpleNamespace(reasons={"rejected/too_large": 2})
    clean = _proc(tmp_path, "all fine\n")
    assert _after_checks("oversized", clean, result, 2) == []
    assert _after_checks("oversized", clean, result, 3) == [
        "2 rejected/too_large for 3 oversized messages"
    ]
    looping = _proc(tmp_path, "select: aborting transaction: MSG_SIZE_TOO_LARGE\n")
    assert any("abort loop" in f for f in _after_checks("oversized", looping, result, 2))
    assert _after_checks("recreate", clean, result, 0) != []
    stale = _proc(tmp_path, f"{STALE_MARK}\n{STALE_MARK}\n")
    assert _after_checks("recreate", stale, result, 0) == []
    assert _after_checks("kill9", looping, result, 0) == []


def test_kill_log_notes() -> None:
    log = KillLog(kills=["node 1 (x)", "node 2 (y, idle)"], mid_stream=1, restarts=[3.0, 5.0])
    assert log.notes() == [
        "mid-stream kills: 1/2",
        "consumer restarts: 0",
        "node restart → all replicas in sync: median 4.0 s",
        "kills: node 1 (x), node 2 (y, idle)",
    ]
    log.supervised.append("exited 1 after killing node 2")
    assert "consumer restarts: 1 (exited 1 after killing node 2)" in log.notes()


class _FakeProc:
    """What ``_supervise`` uses of :class:`Proc`."""

    def __init__(self, alive: bool, healthy: bool | None) -> None:
        self._alive, self._healthy = alive, healthy
        self.p = SimpleNamespace(returncode=None if alive else 1)
        self.calls: list[str] = []

    def alive(self) -> bool:
        return self._alive

    def healthy(self) -> bool | None:
        return self._healthy

    def signal(self, sig: int) -> None:
        self.calls.append(f"signal {sig}")
        self._alive = False

    def wait(self, timeout: float) -> int:
        return -9

    def start(self) -> None:
        self.calls.append("start")

    def wait_ready(self, timeout: float) -> float:
        return 1.0


def test_supervise_restarts_like_kubernetes() -> None:
    import signal

    from infogrowth_dev.chaos_cluster import _supervise

    log = KillLog()
    fine: Any = _FakeProc(alive=True, healthy=True)
    _supervise(fine, log, "x")
    starting: Any = _FakeProc(alive=True, healthy=None)  # /healthz not answering yet
    _supervise(starting, log, "x")
    assert fine.calls == starting.calls == [] and log.supervised == []

    dead: Any = _FakeProc(alive=False, healthy=None)
    _supervise(dead, log, "killing node 2")
    assert dead.calls == ["start"]
    hung: Any = _FakeProc(alive=True, healthy=False)
    _supervise(hung, log, "killing node 3")
    assert hung.calls == [f"signal {signal.SIGKILL}", "start"]
    assert log.supervised == [
        "exited 1 after killing node 2",
        "liveness failed after killing node 3",
    ]
