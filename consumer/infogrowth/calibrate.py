"""Thresholds fitted on a known-clean seed set, and their resolution against the config.

Seed statistics are exact (brute force): each seed item's k nearest *other* seed items give its
leave-one-out gain and nearest-neighbour distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infogrowth.config import Settings
from infogrowth.schema import SPACES, Embedded
from infogrowth.select import NO_NEIGHBOUR_GAIN, ROUND, Thresholds

MAX_SEED_STATS = 20_000
"""Seed items used for statistics; larger seeds are thinned deterministically."""


@dataclass
class SeedStats:
    count: int = 0
    alignments: list[float] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    nn: dict[str, list[float]] = field(default_factory=dict)
    knn_mean: dict[str, list[float]] = field(default_factory=dict)


def seed_stats(seed: Sequence[Embedded], spaces: Sequence[str], k: int) -> SeedStats:
    """Leave-one-out gains and nearest-neighbour distances of the seed items."""
    stats = SeedStats(count=len(seed))
    items = list(seed)
    if len(items) > MAX_SEED_STATS:
        step = len(items) / MAX_SEED_STATS
        items = [items[int(i * step)] for i in range(MAX_SEED_STATS)]
    stats.alignments = [it.alignment for it in items if it.alignment is not None]
    n = len(items)
    if n < 2:
        return stats
    per_space_gain = []
    for s in spaces:
        m = np.stack([it.vectors[s] for it in items]).astype(np.float64)
        kk = min(k, n - 1)
        gains = np.empty(n)
        nn = np.empty(n)
        for lo in range(0, n, 1024):
            d = 1.0 - m[lo : lo + 1024] @ m.T
            rows = np.arange(lo, min(lo + 1024, n))
            d[rows - lo, rows] = np.inf
            part = np.partition(d, kk - 1, axis=1)[:, :kk]
            part.sort(axis=1)
            gains[lo : lo + len(rows)] = part.mean(axis=1)
            nn[lo : lo + len(rows)] = part[:, 0]
        per_space_gain.append(gains)
        stats.nn[s] = nn.tolist()
        stats.knn_mean[s] = gains.tolist()
    stats.gains = np.mean(per_space_gain, axis=0).tolist()
    return stats


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), ROUND)


def resolve_thresholds(
    settings: Settings, spaces: Sequence[str], stats: SeedStats | None
) -> Thresholds:
    """Config values win; the seed calibrates what the config leaves open."""
    sel = settings.select
    delta = settings.clean.delta
    if delta is None and stats is not None and stats.alignments and settings.clean.enabled:
        delta = _pct(stats.alignments, settings.clean.delta_percentile)

    eps: dict[str, float] = {}
    for s in SPACES:  # every space, so records do not depend on which ones a run has
        if sel.epsilon is not None:
            eps[s] = sel.epsilon
        elif stats is not None and stats.nn.get(s):
            p = _pct(stats.nn[s], sel.epsilon_percentile)
            # identical seed items give distances of about -1e-7: a floor is never negative
            eps[s] = max(0.0, round((p or 0.0) * sel.epsilon_fraction, ROUND))
        else:
            eps[s] = sel.epsilon_default

    g_scale = sel.g_scale
    if g_scale is None and stats is not None and stats.gains:
        g_scale = _pct(stats.gains, sel.g_scale_percentile)
        if g_scale is not None and g_scale <= 0:
            g_scale = None
    tau = sel.tau
    if tau is None and stats is not None and stats.gains and sel.policy == "threshold":
        tau = _pct(stats.gains, sel.tau_percentile)

    radius = settings.clean.neighbour_radius
    if radius is None and stats is not None and stats.knn_mean:
        label_space = "image" if "image" in stats.knn_mean else next(iter(stats.knn_mean))
        if sel.label_space in stats.knn_mean:
            label_space = sel.label_space
        radius = _pct(stats.knn_mean[label_space], settings.clean.neighbour_radius_percentile)

    policy = sel.policy
    if policy == "auto":
        policy = "sample" if g_scale is not None else "all"
    if policy == "sample" and g_scale is None:
        raise ValueError(
            "select.policy=sample needs select.g_scale or a seed set to calibrate it (--seed)"
        )
    if policy == "threshold" and tau is None:
        tau = 0.0
    return Thresholds(
        policy=policy,
        k=sel.k,
        epsilon=eps,
        delta=delta if settings.clean.enabled else None,
        g_scale=g_scale,
        tau=tau,
        seed=sel.seed,
        radius=radius,
    )


__all__ = ["NO_NEIGHBOUR_GAIN", "SeedStats", "resolve_thresholds", "seed_stats"]


@dataclass
class Calibration:
    """What ``infogrowth seed`` publishes and every replica reads: thresholds fixed at seed time,
    the embedding layout and the cell routing."""

    thresholds: Thresholds
    spaces: tuple[str, ...]
    dims: dict[str, int]
    seed_count: int = 0
    fingerprint: str | None = None
    cells: dict[str, Any] | None = None

    def as_record(self) -> dict[str, Any]:
        t = self.thresholds
        return {
            "v": 1,
            "spaces": list(self.spaces),
            "dims": dict(self.dims),
            "k": t.k,
            "policy": t.policy,
            "delta": t.delta,
            "epsilon": dict(t.epsilon),
            "g_scale": t.g_scale,
            "tau": t.tau,
            "radius": t.radius,
            "sample_seed": t.seed,
            "seed_count": self.seed_count,
            "fingerprint": self.fingerprint,
            "cells": self.cells,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Calibration:
        t = Thresholds(
            policy=rec["policy"],
            k=rec["k"],
            epsilon=dict(rec.get("epsilon") or {}),
            delta=rec.get("delta"),
            g_scale=rec.get("g_scale"),
            tau=rec.get("tau"),
            seed=rec.get("sample_seed", 0),
            radius=rec.get("radius"),
        )
        return cls(
            thresholds=t,
            spaces=tuple(rec["spaces"]),
            dims={k: int(v) for k, v in rec["dims"].items()},
            seed_count=int(rec.get("seed_count", 0)),
            fingerprint=rec.get("fingerprint"),
            cells=rec.get("cells"),
        )
