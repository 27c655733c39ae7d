"""A memory budget that turns the process unready before the kernel's OOM killer acts.

The budget is ``limits.memory_budget_bytes`` when set, else ``limits.memory_budget_fraction`` of
the container's cgroup memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``); with
neither there is no budget. Going over it is logged once (ERROR, with the figures and the keys)
and makes readiness answer "memory budget exceeded" until resident memory is back under it.

Resident memory is this process's plus what its children hold alone: a snapshot child
(:mod:`infogrowth.snapfork`) shares every page with the stage at the fork, but each page the
stage writes while the child runs (new items, the links their inserts rewrite, a capacity growth
of hnswlib) is copied, and the child's old page is then its own. The cgroup is charged for
those pages, so the budget counts them (the child's private pages). At the default snapshot
interval the extra is what the partition inserts during one write; a capacity growth of hnswlib
during a write costs a whole copy of that index for the length of the write.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from infogrowth.config import LimitsConfig

log = logging.getLogger(__name__)

_CGROUP_FILES = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)
_NO_LIMIT = 1 << 60
"""cgroup v1 reports "no limit" as a page-rounded 2^63 - 1."""


def cgroup_limit(files: tuple[Path, ...] = _CGROUP_FILES) -> int | None:
    """The container's memory limit in bytes, or None when it has none."""
    for f in files:
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if 0 < value < _NO_LIMIT else None
    return None


def rss_bytes() -> int:
    """Resident set size of this process (from /proc/self/statm)."""
    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE")


def _private_bytes(pid: str) -> int:
    """Bytes only process ``pid`` maps (Private_Clean + Private_Dirty); 0 once it is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def children_private_bytes(task_dir: Path = Path("/proc/self/task")) -> int:
    """Memory this process's children hold alone (snapshot children's copied-on-write pages)."""
    total = 0
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(_private_bytes(pid) for pid in pids)
    return total


def resident_bytes() -> int:
    """This process's resident set plus its children's private pages."""
    return rss_bytes() + children_private_bytes()


def resolve_budget(limits: LimitsConfig, cgroup: int | None = None) -> int | None:
    """The budget in bytes for these settings (None: no budget)."""
    if limits.memory_budget_bytes > 0:
        return limits.memory_budget_bytes
    if limits.memory_budget_fraction <= 0:
        return None
    limit = cgroup if cgroup is not None else cgroup_limit()
    return int(limit * limits.memory_budget_fraction) if limit else None


class MemoryBudget:
    """Checks resident memory against the budget; :meth:`check` is cheap enough for a probe."""

    def __init__(self, budget: int | None, read_rss: Callable[[], int] = resident_bytes) -> None:
        self.budget = budget
        self._read = read_rss
        self._over = False
        self._lock = threading.Lock()

    def check(self) -> str | None:
        """None while under budget (or without one), else why the process is not ready."""
        if self.budget is None:
            return None
        rss = self._read()
        over = rss > self.budget
        with self._lock:
            changed, self._over = over != self._over, over
        if over and changed:
            log.error(
                "memory budget exceeded: resident %.2f GiB > budget %.2f GiB "
                "(limits.memory_budget_bytes / limits.memory_budget_fraction); not ready until "
                "it falls back under; give the pod more memory or fewer partitions",
                rss / 2**30,
                self.budget / 2**30,
            )
        elif changed:
            log.info("memory back under budget: resident %.2f GiB", rss / 2**30)
        if over:
            return f"memory budget exceeded ({rss / 2**30:.2f} GiB > {self.budget / 2**30:.2f} GiB)"
        return None
