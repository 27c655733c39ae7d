"""Per-partition state that follows the stream: the keep-rate controller and the online ε.

Both are updated item by item in stream order, so a batch gives the same values as the same items
one at a time, and both are part of the partition state: snapshots store them and the changelog
carries them (one compacted ``state`` record per transaction), so restore == replay holds for them
as it does for the index.

**Keep-rate controller** (``select.keep_fraction`` = f). The ``sample`` policy keeps an item with
``p = clip(g / scale, 0, 1)``. After every item that reaches the policy, ``log(scale)`` moves by
``rate * (kept - f)``: up after a keep, down after a drop. The sum of ``kept - f`` over the stream
is therefore ``Δlog(scale) / rate``, bounded whatever the gains do, so the realised keep rate
converges to f while the scale tracks gains that fall as the index grows.

**Online ε** (unless ``select.epsilon`` is set). A histogram of log10 nearest-neighbour distances
at arrival, exponentially forgetting (half-life ``EPS_HALF_LIFE`` items). ε sits in the valley
between the bulk of originals and the mode of near-copies below it (see :func:`valley_epsilon`).
Without a copies mode it stays half a decade below the originals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPS_BINS = 128
EPS_LOG_MIN = -6.0
EPS_LOG_MAX = math.log10(2.0)
EPS_HALF_LIFE = 8192
EPS_REFIT_EVERY = 64
EPS_SMOOTH = 5
EPS_VALLEY_Z = 2.0
EPS_VALLEY_DEPTH = 0.15
EPS_LOW_PERCENTILE = 0.5
EPS_NO_VALLEY_DECADES = 0.5
EPS_MAX = 0.5
"""ε never exceeds this distance (cosine distance 0.5 is 60°: no copy is that far)."""
KEEP_RATE = 0.05
"""Step of the keep-rate controller in log(scale) per item."""
_DECAY = 0.5 ** (1.0 / EPS_HALF_LIFE)
_RESCALE = 1e100


def _bin(d: float) -> int:
    x = math.log10(max(d, 10.0**EPS_LOG_MIN))
    b = int((x - EPS_LOG_MIN) / (EPS_LOG_MAX - EPS_LOG_MIN) * EPS_BINS)
    return min(max(b, 0), EPS_BINS - 1)


def _edge(b: float) -> float:
    return float(10.0 ** (EPS_LOG_MIN + b * (EPS_LOG_MAX - EPS_LOG_MIN) / EPS_BINS))


def valley_epsilon(hist: np.ndarray) -> float:
    """ε from a histogram of log10 nearest-neighbour distances.

    Exact copies (the lowest bin) are copies whatever else holds; they are left out of the
    shape. On the smoothed rest, every local minimum below the bulk's mode is a candidate
    valley; its prominence is the lower of the two peaks around it minus its own height. The
    most prominent valley wins if it is real: deeper than ``EPS_VALLEY_Z`` counting-noise
    deviations and than ``EPS_VALLEY_DEPTH`` of its left peak. ε is then at the valley's bottom.
    Without a real valley there is no near-copies mode: ε goes ``EPS_NO_VALLEY_DECADES`` below
    the ``EPS_LOW_PERCENTILE``-th percentile of the distances.
    """
    h = np.asarray(hist, dtype=np.float64).copy()
    h[0] = 0.0
    total = float(h.sum())
    if total <= 0:
        return round(_edge(1), 9)
    s = np.convolve(h / total, np.ones(EPS_SMOOTH) / EPS_SMOOTH, mode="same")
    mode = int(np.argmax(s))
    best, best_pos = 0.0, -1
    for v in range(1, mode):
        if not (s[v] < s[v - 1] and s[v] <= s[v + 1]):
            continue
        left = float(s[:v].max())
        right = float(s[v + 1 : mode + 1].max())
        prominence = min(left, right) - float(s[v])
        noise = math.sqrt(max(float(s[v]), 1.0 / total) / (EPS_SMOOTH * total))
        if prominence >= max(EPS_VALLEY_Z * noise, EPS_VALLEY_DEPTH * left) and prominence > best:
            best, best_pos = prominence, v
    if best_pos >= 0:
        return round(min(math.sqrt(_edge(best_pos) * _edge(best_pos + 1)), EPS_MAX), 9)
    cdf = np.cumsum(h) / total
    low = _edge(int(np.searchsorted(cdf, EPS_LOW_PERCENTILE / 100)))
    return round(min(float(low * 10.0**-EPS_NO_VALLEY_DECADES), EPS_MAX), 9)


@dataclass
class EpsilonEstimate:
    """Forgetting histogram of log nearest-neighbour distances of one space."""

    hist: np.ndarray = field(default_factory=lambda: np.zeros(EPS_BINS))
    weight: float = 1.0
    count: int = 0
    epsilon: float = 0.0

    def observe(self, d: float) -> None:
        self.hist[_bin(d)] += self.weight
        self.count += 1
        self.weight /= _DECAY
        if self.weight > _RESCALE:
            self.hist /= self.weight
            self.weight = 1.0

    def as_record(self) -> dict[str, Any]:
        # Raw counts and weight (not normalised), so a restored estimate continues bit for bit.
        return {
            "hist": [float(x) for x in self.hist],
            "weight": self.weight,
            "count": self.count,
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> EpsilonEstimate:
        hist = np.asarray(rec["hist"], dtype=np.float64)
        return cls(hist, float(rec["weight"]), int(rec["count"]), float(rec["epsilon"]))


@dataclass
class OnlineState:
    """The stream-following part of one partition's state."""

    scale: float | None = None
    """Current keep scale of the ``sample`` policy under a keep fraction (None: not started)."""
    seen: int = 0
    """Items that reached the keep policy."""
    kept: int = 0
    eps: dict[str, EpsilonEstimate] = field(default_factory=dict)

    @property
    def keep_rate(self) -> float | None:
        return self.kept / self.seen if self.seen else None

    def keep_step(self, kept: bool, fraction: float | None) -> None:
        """Count one policy decision; under a keep fraction, move the scale toward it."""
        self.seen += 1
        self.kept += int(kept)
        if fraction is not None and self.scale is not None:
            self.scale = self.scale * math.exp(KEEP_RATE * (float(kept) - fraction))

    def observe_nn(self, space: str, d: float, warmup: int) -> None:
        """Record one arrival's nearest-neighbour distance; refit ε on a fixed item cadence."""
        est = self.eps.get(space)
        if est is None:
            est = self.eps[space] = EpsilonEstimate()
        est.observe(d)
        if (est.count >= warmup and est.count % EPS_REFIT_EVERY == 0) or est.count == warmup:
            est.epsilon = valley_epsilon(est.hist)

    def epsilon(self, space: str, default: float, warmup: int) -> float:
        est = self.eps.get(space)
        if est is None or est.count < warmup:
            return default
        return est.epsilon

    def as_record(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "seen": self.seen,
            "kept": self.kept,
            "eps": {s: e.as_record() for s, e in sorted(self.eps.items())},
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any] | None) -> OnlineState:
        if not rec:
            return cls()
        return cls(
            scale=rec.get("scale"),
            seen=int(rec.get("seen", 0)),
            kept=int(rec.get("kept", 0)),
            eps={s: EpsilonEstimate.from_record(e) for s, e in (rec.get("eps") or {}).items()},
        )

    def copy(self) -> OnlineState:
        return OnlineState.from_record(self.as_record())
