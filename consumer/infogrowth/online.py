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

**Online ε** (unless ``select.epsilon`` is set). It measures each arrival's *relative* nearest
distance, the nearest accepted item's distance divided by the ``select.epsilon_ref_k``-th one's
(:func:`relative_distance`): a copy sits far closer to its original than to anything else, while
an original in a dense region has close neighbours but several of them, so the ratio separates
the two where a raw distance mixes dense originals with copies in sparse regions. A histogram of
log10 relative distances at arrival, exponentially forgetting (half-life ``EPS_HALF_LIFE``
items), is fitted as a mode of near copies below the bulk of originals; ε flags at most
``select.epsilon_false_flags`` of the originals (see :func:`mixture_epsilon`). Without a copies
mode it stays half a decade below the originals.
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
EPS_LOW_PERCENTILE = 0.5
EPS_NO_VALLEY_DECADES = 0.5
EPS_EM_ROUNDS = 200
EPS_EM_TOL = 1e-6
"""EM stops once no share, mean or deviation (log10 units) moves by more than this."""
EPS_COPY_Z = 2.3263478740408408
"""The copies mode's reach: its mean plus this many deviations (its 99th percentile)."""
EPS_MIN_COPIES = 10.0
"""A copies mode needs at least this many (weighted) items."""
EPS_SEPARATION = 3.0
"""... and a mean this many of the bulk's deviations below the bulk's (one bulk fitted as two
modes never puts them that far apart)."""
EPS_MAX = 0.5
"""ε never exceeds this ratio: a duplicate's nearest accepted item is at most half as far as its
reference neighbour."""
EPS_EXACT = 1e-6
"""A nearest distance at or below this is an exact copy (float rounding of identical unit vectors
is about 1e-7): its relative distance is 0, whatever the reference neighbour's distance."""
EPS_STAT = "relative"
"""What the estimate's histogram holds; a stored estimate of another statistic starts afresh."""
EPS_SMOOTH_BINS = 5
"""Width of the moving average that finds the valley between the two modes."""
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


def reference_distance(d: np.ndarray, ref_k: int) -> float:
    """The ``ref_k``-th nearest distance of a non-empty ascending row (the farthest when fewer)."""
    return float(d[min(ref_k, len(d)) - 1])


def relative_distance(d: np.ndarray, ref_k: int) -> float | None:
    """Nearest distance / :func:`reference_distance`, from a row of ascending distances; 0 for
    an exact copy, None without neighbours."""
    if not len(d):
        return None
    d1 = float(d[0])
    if d1 <= EPS_EXACT:
        return 0.0
    return min(d1 / reference_distance(d, ref_k), 1.0)


def two_modes(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shares, means and deviations (low mode first) of two Gaussians
    fitted by EM to binned data: bin centres ``x`` with weights ``w``. Deterministic: a narrow,
    light low mode starts at the ``EPS_LOW_PERCENTILE``-th percentile, the bulk at the median."""
    cdf = np.cumsum(w) / w.sum()
    spread = math.sqrt(float(np.average((x - np.average(x, weights=w)) ** 2, weights=w)))
    floor = float(x[1] - x[0]) / 4  # one bin holds a mode of equal distances
    mu = np.asarray(
        [x[np.searchsorted(cdf, EPS_LOW_PERCENTILE / 100)], x[np.searchsorted(cdf, 0.5)]],
        dtype=np.float64,
    )
    sd = np.maximum(np.asarray([spread / 4, spread / 2]), floor)
    pi = np.asarray([0.05, 0.95])
    for _ in range(EPS_EM_ROUNDS):
        before = (pi, mu, sd)
        z = (x[:, None] - mu) / sd
        lik = pi * np.exp(-0.5 * z * z) / sd
        tot = lik.sum(axis=1, keepdims=True)
        r = np.divide(lik, tot, out=np.full_like(lik, 0.5), where=tot > 0) * w[:, None]
        n = np.maximum(r.sum(axis=0), 1e-300)
        pi = n / n.sum()
        mu = (r * x[:, None]).sum(axis=0) / n
        sd = np.maximum(np.sqrt((r * (x[:, None] - mu) ** 2).sum(axis=0) / n), floor)
        moved = max(float(np.abs(a - b).max()) for a, b in zip(before, (pi, mu, sd), strict=True))
        if moved < EPS_EM_TOL:
            break  # converged: further rounds move nothing that ε depends on
    order = np.argsort(mu, kind="stable")
    return pi[order], mu[order], sd[order]


def mixture_epsilon(hist: np.ndarray, false_flags: float, weight: float = 1.0) -> float:
    """ε from a histogram of log10 nearest-neighbour distances, for a stated false-flag rate.

    Exact copies (the lowest bin) are copies whatever else holds; they are left out of the
    shape. The rest is fitted as two Gaussians in log distance: near copies (the low mode) and
    originals (the bulk). Where a real copies mode exists (at least ``EPS_MIN_COPIES`` items
    whose mean lies ``EPS_SEPARATION`` of the bulk's deviations below the bulk's), ε is the
    lower of

    * the copies mode's reach, its 99th percentile: beyond it there is nothing left to catch,
      so separated modes cost no originals; and
    * the largest bin edge below which at most ``false_flags`` of the originals lie: the share
      of originals below an edge is what the histogram holds below it minus what the copies
      mode accounts for, and the copies mode is credited with nothing above the valley (the
      lowest point of the smoothed histogram between the two means). A Gaussian copies mode
      would otherwise claim the originals' skewed low tail as copies and let ε spend more than
      the stated rate; everything above the valley counts as an original. Where the modes
      overlap (real embeddings), this is what binds: ε goes as far into the originals' low tail
      as the stated rate allows.

    Without a copies mode ε goes ``EPS_NO_VALLEY_DECADES`` below the ``EPS_LOW_PERCENTILE``-th
    percentile of the distances: nothing to catch, so (almost) nothing is flagged.
    """
    h = np.asarray(hist, dtype=np.float64).copy()
    h[0] = 0.0
    total = float(h.sum())
    if total <= 0:
        return round(_edge(1), 9)
    edges = np.linspace(EPS_LOG_MIN, EPS_LOG_MAX, EPS_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    pi, mu, sd = two_modes(centres[1:], h[1:])
    if pi[0] * total / weight < EPS_MIN_COPIES or mu[1] - mu[0] < EPS_SEPARATION * sd[1]:
        cdf = np.cumsum(h) / total
        low = _edge(int(np.searchsorted(cdf, EPS_LOW_PERCENTILE / 100)))
        return round(max(min(float(low * 10.0**-EPS_NO_VALLEY_DECADES), EPS_MAX), _edge(1)), 9)
    below = np.cumsum(h) / total  # share below each bin's upper edge
    # the copies mode as the fit saw it: its density at the bin centres, normalised over bins
    dens = np.exp(-0.5 * ((centres[1:] - mu[0]) / sd[0]) ** 2)
    copies_below = pi[0] * np.concatenate([[0.0], np.cumsum(dens) / dens.sum()])
    lo, hi = (int(np.searchsorted(centres, m)) for m in mu)
    if hi > lo:
        smooth = np.convolve(h, np.ones(EPS_SMOOTH_BINS) / EPS_SMOOTH_BINS, mode="same")
        valley = lo + int(np.argmin(smooth[lo:hi]))
        copies_below = np.minimum(copies_below, below[valley])
    originals_below = (below - copies_below) / max(1.0 - float(copies_below[-1]), 1e-12)
    over = np.flatnonzero(originals_below > false_flags)
    spare = _edge(int(over[0])) if len(over) else EPS_MAX
    reach = float(10.0 ** (mu[0] + EPS_COPY_Z * sd[0]))
    return round(max(min(spare, reach, EPS_MAX), _edge(1)), 9)


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
            "stat": EPS_STAT,
            "hist": [float(x) for x in self.hist],
            "weight": self.weight,
            "count": self.count,
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> EpsilonEstimate:
        if rec.get("stat") != EPS_STAT:
            # an estimate of raw nearest distances (earlier versions): its bins mean another thing
            return cls()
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

    def observe_nn(self, space: str, d: float, warmup: int, false_flags: float) -> None:
        """Record one arrival's relative nearest distance; refit ε on a fixed item cadence."""
        est = self.eps.get(space)
        if est is None:
            est = self.eps[space] = EpsilonEstimate()
        est.observe(d)
        if (est.count >= warmup and est.count % EPS_REFIT_EVERY == 0) or est.count == warmup:
            est.epsilon = mixture_epsilon(est.hist, false_flags, est.weight)

    def warm(self, space: str, warmup: int) -> bool:
        """Whether the estimate of ``space`` has seen its warm-up and decides."""
        est = self.eps.get(space)
        return est is not None and est.count >= warmup

    def epsilon(self, space: str, default: float, warmup: int) -> float:
        """The estimated ε once warm, else ``default`` (the warm-up floor)."""
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
