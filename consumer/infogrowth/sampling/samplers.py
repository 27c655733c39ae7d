"""Gain-weighted samplers over a materialised curated set (InfoGrowth's training-side sampling).

Gains are cosine distances in ``[0, 2]``; every sampler first normalises them to
``q = clip(g / g_scale, 0, 1)`` (``g_scale`` given, else the set's, else the largest gain) and
draws with probabilities built from ``q``. Draws come from ``numpy`` generators seeded by
``(seed, purpose, epoch)``: the same seed and epoch give the same indices in every process and on
every rank, and no global RNG is touched. Call ``set_epoch(epoch)`` before each epoch, as with
torch's ``DistributedSampler``. ``inclusion_probabilities(epoch)`` returns the exact probability
that each index is in that epoch (useful for ``1 / p`` importance weights).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from torch.utils.data import Sampler

from infogrowth.sampling.records import gain_array, normalise_gains, resolve_g_scale

_STATIC, _ORDER, _DYNAMIC, _TWO_PHASE = 1, 2, 3, 4


@runtime_checkable
class HasGains(Protocol):
    """A set with per-item gains and a scale (:class:`CuratedSet`)."""

    gains: np.ndarray
    g_scale: float

    def __len__(self) -> int: ...


GainsLike = HasGains | Sequence[float | None] | np.ndarray


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: torch.distributed when initialised, else the
    ``RANK`` / ``WORLD_SIZE`` environment (torchrun), else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *tags]))


def _gains_of(data: GainsLike) -> tuple[np.ndarray, float | None]:
    if isinstance(data, HasGains):
        return np.asarray(data.gains, dtype=np.float64), float(data.g_scale)
    if isinstance(data, np.ndarray):
        return np.asarray(data, dtype=np.float64).reshape(-1), None
    return gain_array(data), None


class GainSamplerBase(Sampler[int], ABC):
    """Shared machinery: normalised gains, seeded per-epoch draws, epoch caching."""

    def __init__(self, data: GainsLike, *, g_scale: float | None = None, seed: int = 0) -> None:
        super().__init__()
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        gains, recorded = _gains_of(data)
        self.gains = gains
        self.g_scale = resolve_g_scale(g_scale, [recorded], gains)
        self.q = normalise_gains(gains, self.g_scale)
        """Normalised gains ``clip(g / g_scale, 0, 1)``."""
        self.seed = seed
        self.epoch = 0
        self._cache: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration draws (its draw is a function of seed and epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The indices of ``epoch`` (default: the current one), in iteration order."""
        e = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != e:
            self._cache = (e, self._draw(e))
        return self._cache[1]

    @abstractmethod
    def inclusion_probabilities(self, epoch: int | None = None) -> np.ndarray:
        """Probability that each index appears in ``epoch``, by this sampler's definition."""

    @abstractmethod
    def _draw(self, epoch: int) -> np.ndarray: ...

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return len(self.epoch_indices())


class StaticGainSampler(GainSamplerBase):
    """The authors' static selection: index ``i`` is kept with ``p = q_i = clip(g / g_scale, 0,
    1)``, once (the kept set depends on ``seed`` only); every epoch iterates the same kept set,
    reshuffled per epoch when ``shuffle``."""

    def __init__(
        self,
        data: GainsLike,
        *,
        g_scale: float | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(data, g_scale=g_scale, seed=seed)
        self.shuffle = shuffle
        self.kept = np.flatnonzero(_rng(seed, _STATIC).random(len(self.q)) < self.q)
        """The selected indices, ascending."""

    def inclusion_probabilities(self, epoch: int | None = None) -> np.ndarray:
        return self.q.copy()

    def _draw(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.kept.copy()
        return _rng(self.seed, _ORDER, epoch).permutation(self.kept)


def pps_probabilities(q: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities ``pi_i = min(1, c * q_i)`` with ``sum(pi) = k``: sampling ``k``
    items without replacement proportionally to ``q`` (items that would exceed 1 are taken
    surely and ``c`` grows for the rest). Needs ``k <=`` the number of positive ``q``."""
    n = len(q)
    pi = np.zeros(n, dtype=np.float64)
    if k <= 0:
        return pi
    positive = int(np.count_nonzero(q > 0))
    if k > positive:
        raise ValueError(f"cannot draw {k} items by gain: only {positive} have a positive gain")
    order = np.argsort(-q, kind="stable")
    qs = q[order]
    suffix = np.cumsum(qs[::-1])[::-1]
    for capped in range(k + 1):
        rest = float(suffix[capped]) if capped < n else 0.0
        if capped == k or rest <= 0:
            c = 0.0
        else:
            c = (k - capped) / rest
            if c * qs[capped] > 1.0:
                continue
        pi[order[:capped]] = 1.0
        pi[order[capped:]] = np.minimum(1.0, c * qs[capped:])
        return pi
    raise AssertionError("unreachable: capping all k items always satisfies the constraint")


def systematic_sample(pi: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``k`` indices whose inclusion probabilities are exactly ``pi`` (each in ``[0, 1]``,
    summing to ``k``): systematic sampling in a random order. Returns sorted indices."""
    n = len(pi)
    if k == 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    perm = rng.permutation(n)
    cum = np.cumsum(pi[perm])
    cum *= k / cum[-1]  # remove float drift so the k points fall inside [0, k)
    points = rng.random() + np.arange(k)
    pos = np.minimum(np.searchsorted(cum, points, side="right"), n - 1)
    return np.unique(perm[pos])


class GainSampler(GainSamplerBase):
    """The authors' dynamic scheme, redrawn every epoch with a fixed epoch length ``L``.

    Our reading of "draw by gain, refill to the epoch length": each epoch draws
    ``k = min(B, L)`` indices without replacement with inclusion probability proportional to the
    normalised gain (``pi_i = min(1, c * q_i)``, ``sum(pi) = k``; exact, by systematic sampling
    in a random order), where ``B`` (``sum(q)`` rounded) is the static selection's expected
    size; then refills ``L - k`` indices uniformly from the rest. So
    ``P(i in epoch) = pi_i + (1 - pi_i) * (L - k) / (n - k)``. ``num_samples`` is ``L``
    (default ``B``: the static budget, redrawn every epoch, no refill).
    """

    def __init__(
        self,
        data: GainsLike,
        *,
        num_samples: int | None = None,
        g_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(data, g_scale=g_scale, seed=seed)
        n = len(self.q)
        self.budget = math.floor(float(self.q.sum()) + 0.5)
        self.num_samples = self.budget if num_samples is None else num_samples
        if not 0 <= self.num_samples <= n:
            raise ValueError(f"num_samples must be in [0, {n}], got {self.num_samples}")
        self.by_gain = min(self.budget, self.num_samples)
        self.pi = pps_probabilities(self.q, self.by_gain)
        rest = n - self.by_gain
        self.refill_probability = (self.num_samples - self.by_gain) / rest if rest else 0.0

    def inclusion_probabilities(self, epoch: int | None = None) -> np.ndarray:
        return self.pi + (1.0 - self.pi) * self.refill_probability

    def _draw(self, epoch: int) -> np.ndarray:
        rng = _rng(self.seed, _DYNAMIC, epoch)
        n = len(self.q)
        chosen = systematic_sample(self.pi, self.by_gain, rng)
        need = self.num_samples - len(chosen)
        if need > 0:
            rest = np.setdiff1d(np.arange(n), chosen, assume_unique=True)
            chosen = np.concatenate([chosen, rng.choice(rest, size=need, replace=False)])
        return rng.permutation(chosen)


class TwoPhaseGainSampler(GainSamplerBase):
    """Alternating emphasis: in high-gain epochs index ``i`` is drawn with ``p = q_i``, in
    low-gain epochs with ``p = max(floor, 1 - q_i)``, independently per index and epoch, where
    ``q = clip(g / g_scale, 0, 1)`` (the raw gain is a distance in ``[0, 2]``, so it is
    normalised before it can be a probability). Phases switch every ``period`` epochs, starting
    with ``start``. Epoch lengths vary; ``len()`` is the current epoch's."""

    def __init__(
        self,
        data: GainsLike,
        *,
        floor: float = 0.1,
        period: int = 1,
        start: Literal["high", "low"] = "high",
        g_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(data, g_scale=g_scale, seed=seed)
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.floor = floor
        self.period = period
        self.start = start

    def phase(self, epoch: int | None = None) -> Literal["high", "low"]:
        """Which emphasis ``epoch`` (default: the current one) has."""
        e = self.epoch if epoch is None else epoch
        first = (e // self.period) % 2 == 0
        if first:
            return self.start
        return "low" if self.start == "high" else "high"

    def inclusion_probabilities(self, epoch: int | None = None) -> np.ndarray:
        if self.phase(epoch) == "high":
            return self.q.copy()
        return np.maximum(self.floor, 1.0 - self.q)

    def _draw(self, epoch: int) -> np.ndarray:
        rng = _rng(self.seed, _TWO_PHASE, epoch)
        p = self.inclusion_probabilities(epoch)
        return rng.permutation(np.flatnonzero(rng.random(len(p)) < p))


class DistributedGainSampler(Sampler[int]):
    """Shards a gain sampler's epoch across ranks, like torch's ``DistributedSampler``.

    Every rank builds the same inner sampler (same data order, seed and epoch), so all draw the
    same epoch; rank ``r`` of ``R`` takes positions ``r, r + R, ...``. ``remainder``: ``pad``
    (default) repeats indices from the start of the epoch so every rank gets
    ``ceil(len / R)`` (DDP needs equal step counts); ``drop`` cuts the tail to a multiple of
    ``R``; ``uneven`` keeps shards disjoint with lengths differing by at most one.
    ``num_replicas`` / ``rank`` default to torch.distributed, else ``WORLD_SIZE`` / ``RANK``.
    """

    def __init__(
        self,
        sampler: GainSamplerBase,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        remainder: Literal["pad", "drop", "uneven"] = "pad",
    ) -> None:
        super().__init__()
        auto_rank, auto_world = distributed_rank()
        self.sampler = sampler
        self.num_replicas = auto_world if num_replicas is None else num_replicas
        self.rank = auto_rank if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        self.remainder = remainder

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def shard(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices of ``epoch`` (default: the current one)."""
        idx = self.sampler.epoch_indices(epoch)
        n, r = len(idx), self.num_replicas
        if self.remainder == "pad" and n % r:
            total = math.ceil(n / r) * r
            idx = np.resize(idx, total)  # repeats from the start (as often as needed)
        elif self.remainder == "drop":
            idx = idx[: (n // r) * r]
        return idx[self.rank :: r]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard().tolist())

    def __len__(self) -> int:
        return len(self.shard())
