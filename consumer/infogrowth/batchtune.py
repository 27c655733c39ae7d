"""Choose the encoder's batch size by a short warm-up that stops before running out of memory.

Starting from the configured size, the batch doubles while three things hold: the next size
stays under the cap, its predicted peak memory (the fixed part plus the per-item part measured
so far, times the new size) stays under the budget, and the last doubling still paid (items/s
grew by at least ``min_gain``). A trial that runs out of memory anyway ends the search at the
last size that worked. The device work is a callable, so the search itself runs anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from infogrowth.errors import ConfigError

__all__ = ["Trial", "TuneResult", "is_oom", "tune_batch_size"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trial:
    """One timed forward pass at a batch size: wall seconds and peak device bytes."""

    seconds: float
    peak_bytes: int


@dataclass
class TuneResult:
    batch_size: int
    reason: str
    """Why the search stopped: ``cap``, ``memory``, ``no gain``, ``out of memory``."""
    tried: list[tuple[int, float, int]] = field(default_factory=list)
    """(batch size, items/s, peak bytes) of every trial that ran to the end."""


def is_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a RuntimeError saying the same (older torch, cuDNN)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def tune_batch_size(
    trial: Callable[[int], Trial],
    *,
    start: int,
    cap: int,
    budget_bytes: int,
    base_bytes: int = 0,
    min_gain: float = 0.05,
) -> TuneResult:
    """The batch size to run with; ``trial(b)`` runs one forward pass of ``b`` items.

    ``base_bytes`` is what the device holds before any batch (weights): peak memory is modelled
    as ``base_bytes + b * per_item``. A first trial that runs out of memory halves ``start``
    until one fits (down to 1, where the error propagates: nothing fits).
    """
    if start <= 0 or cap <= 0:
        raise ConfigError("batch sizes must be positive")
    size = min(start, cap)
    tried: list[tuple[int, float, int]] = []
    while True:
        try:
            first = trial(size)
            break
        except Exception as exc:
            if not is_oom(exc) or size == 1:
                raise
            log.warning("warm-up: batch size %d ran out of memory; trying %d", size, size // 2)
            size //= 2
    tried.append((size, size / max(first.seconds, 1e-9), first.peak_bytes))
    while True:
        b, rate, peak = tried[-1]
        nxt = 2 * b
        if nxt > cap:
            return TuneResult(b, "cap", tried)
        per_item = max(peak - base_bytes, 0) / b
        if base_bytes + per_item * nxt > budget_bytes:
            return TuneResult(b, "memory", tried)
        try:
            t = trial(nxt)
        except Exception as exc:
            if not is_oom(exc):
                raise
            return TuneResult(b, "out of memory", tried)
        tried.append((nxt, nxt / max(t.seconds, 1e-9), t.peak_bytes))
        if tried[-1][1] < rate * (1 + min_gain):
            return TuneResult(b, "no gain", tried)
