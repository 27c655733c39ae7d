"""The pure parts of the new chaos scenarios (the scenarios themselves run in tests/chaos)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from infogrowth.chaos import (
    CLUSTER_VICTIMS,
    SCENARIOS,
    Proc,
    _after_checks,
    oversized_messages,
)
from infogrowth.chaos_cluster import KillLog
from infogrowth.chaos_state import STALE_MARK, stale_discards
from infogrowth.config import LimitsConfig
from infogrowth.kafka.clients import fits, record_limit


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
