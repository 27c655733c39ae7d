import logging
from pathlib import Path

import pytest

from infogrowth.config import LimitsConfig
from infogrowth.membudget import MemoryBudget, cgroup_limit, resolve_budget, rss_bytes


def test_cgroup_limit_reads_v2_then_v1(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    assert cgroup_limit((v2, v1)) is None  # neither file: no limit
    v1.write_text("9223372036854771712\n")  # v1 without a limit
    assert cgroup_limit((v2, v1)) is None
    v1.write_text("2147483648\n")
    assert cgroup_limit((v2, v1)) == 2 << 30
    v2.write_text("max\n")
    assert cgroup_limit((v2, v1)) is None
    v2.write_text("1073741824\n")
    assert cgroup_limit((v2, v1)) == 1 << 30


def test_budget_from_bytes_or_a_share_of_the_cgroup_limit() -> None:
    assert resolve_budget(LimitsConfig(memory_budget_bytes=123), cgroup=1 << 30) == 123
    assert resolve_budget(LimitsConfig(), cgroup=1000) == 900
    assert resolve_budget(LimitsConfig(memory_budget_fraction=0.0), cgroup=1000) is None


def test_over_budget_is_unready_with_one_error_line(caplog: pytest.LogCaptureFixture) -> None:
    rss = [100]
    budget = MemoryBudget(150, read_rss=lambda: rss[0])
    assert budget.check() is None
    rss[0] = 200
    with caplog.at_level(logging.INFO, logger="infogrowth.membudget"):
        first, second = budget.check(), budget.check()
    assert first and "memory budget exceeded" in first and second == first
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "limits.memory_budget_bytes" in errors[0].getMessage()
    rss[0] = 100
    assert budget.check() is None


def test_no_budget_never_unready() -> None:
    assert MemoryBudget(None, read_rss=lambda: 1 << 50).check() is None
    assert rss_bytes() > 0


def test_runtime_readiness_follows_the_budget() -> None:
    import threading
    from types import SimpleNamespace
    from typing import Any

    from infogrowth.kafka.run import Runtime
    from tests.fixtures.helpers import make_settings

    rss = [10]
    rt = Runtime(make_settings(), "all", memory=MemoryBudget(100, read_rss=lambda: rss[0]))
    started, assigned = threading.Event(), threading.Event()
    started.set()
    assigned.set()
    loop: Any = SimpleNamespace(
        started=started, assigned_once=assigned, stuck=None, restoring=False
    )
    rt.loops = [loop]
    assert rt.ready_status() == (True, "ready")
    rss[0] = 500
    ok, why = rt.ready_status()
    assert not ok and why.startswith("memory budget exceeded")
    rss[0] = 10
    assert rt.ready_status() == (True, "ready")


def test_state_memory_estimate_tracks_what_it_holds() -> None:
    import numpy as np

    from infogrowth.index import PartitionState
    from tests.fixtures.helpers import make_settings

    cfg = make_settings().index
    st = PartitionState.empty(("image",), {"image": 64}, cfg)
    assert st.memory_bytes() == 0
    v = np.random.default_rng(0).normal(size=(100, 64)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    st.add([f"i{i}" for i in range(100)], {"image": v}, [None] * 100)
    per = st.memory_bytes() / 100
    assert 2 * 4 * 64 < per < 2 * 4 * 64 + 8 * cfg.m + 600  # vectors twice, links, bookkeeping


def test_a_childs_copied_pages_count_against_the_budget() -> None:
    """Pages the parent writes after a fork become the child's own: the budget sees them."""
    import os
    import time

    from infogrowth.membudget import children_private_bytes, resident_bytes

    block = bytearray(64 << 20)
    block[::4096] = b"\x02" * len(block[::4096])  # resident, then shared with the child
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # hold the shared pages until the parent has written its copy
        os._exit(0)
    os.close(r)
    try:
        before = children_private_bytes()
        for i in range(0, len(block), 4096):
            block[i] = 1  # copy-on-write: the child now holds the old pages alone
        deadline = time.monotonic() + 5
        while children_private_bytes() < before + (48 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        held = children_private_bytes()
        assert held >= before + (48 << 20)
        assert resident_bytes() >= rss_bytes() + (48 << 20)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
    # relative: every child of the test process counts (the test broker's JVM, in a full run)
    assert children_private_bytes() < held - (32 << 20)
