"""Gain-weighted samplers over a materialised curated set (InfoGrowth's training-side sampling).

Gains are cosine distances in ``[0, 2]``; every sampler first turns them into weights
``q = clip(g / g_scale, 0, 1)`` with the authors' normalisation: ``g_scale`` given, else the
99th percentile (``g_percentile``) of the set's own gains (never the maximum: one isolated item
would shrink everyone's ``q``). Samples the stream already sampled online (policy ``sample``)
keep ``q = 1`` whatever the scale, so no sample is sampled by gain twice unless
``resample_online`` asks for it (:func:`~infogrowth.sampling.records.gain_weights`).

Draws come from ``numpy`` generators seeded by ``(seed, purpose, epoch)``: the same seed and
epoch give the same indices in every process and on every rank, and no global RNG is touched.
Call ``set_epoch(epoch)`` before each epoch, as with torch's ``DistributedSampler``.
``expected_counts(epoch)`` is how often each index is expected in that epoch; the samplers that
take an index at most once per epoch also give the exact ``inclusion_probabilities(epoch)``
(useful for ``1 / p`` importance weights).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from torch.utils.data import Sampler

from infogrowth.errors import ConfigError
from infogrowth.sampling.records import (
    DEFAULT_G_PERCENTILE,
    GainWeights,
    gain_array,
    gain_weights,
)

log = logging.getLogger(__name__)

_STATIC, _ORDER, _DYNAMIC, _TWO_PHASE = 1, 2, 3, 4

MAX_ROUNDS = 10_000
"""A :class:`GainSampler` epoch that would need more Bernoulli rounds than this (on average)
is refused: its weights are almost all zero."""
_COINS_PER_BATCH = 1 << 22


@runtime_checkable
class HasGains(Protocol):
    """A set with per-item gains that knows its sampling weights (:class:`CuratedSet`)."""

    gains: np.ndarray

    def weights(
        self,
        g_scale: float | None = None,
        g_percentile: float | None = None,
        resample_online: bool | None = None,
    ) -> GainWeights: ...

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


def _id_keys(data: GainsLike, n: int) -> np.ndarray | None:
    """A 64-bit hash of each item's id when ``data`` has ids (:class:`CuratedSet`), else None."""
    ids = getattr(data, "ids", None)
    if ids is None or len(ids) != n:
        return None
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
            for i in ids
        ),
        dtype=np.uint64,
        count=n,
    )


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def _weights_of(
    data: GainsLike,
    g_scale: float | None,
    g_percentile: float | None,
    resample_online: bool | None = None,
) -> tuple[np.ndarray, GainWeights]:
    if isinstance(data, HasGains):
        w = data.weights(g_scale, g_percentile, resample_online)
        return np.asarray(data.gains, dtype=np.float64), w
    own = getattr(data, "gains", None)  # another dataset that carries a gains array
    if isinstance(own, np.ndarray):
        gains = np.asarray(own, dtype=np.float64).reshape(-1)
    elif isinstance(data, np.ndarray):
        gains = np.asarray(data, dtype=np.float64).reshape(-1)
    else:
        gains = gain_array(data)
    percentile = DEFAULT_G_PERCENTILE if g_percentile is None else g_percentile
    return gains, gain_weights(gains, g_scale=g_scale, percentile=percentile)


class GainSamplerBase(Sampler[int], ABC):
    """Shared machinery: normalised gains, seeded per-epoch draws, epoch caching.

    ``g_scale`` (wins over every default) and ``g_percentile`` (default: the set's, else 99)
    choose the normalisation; ``resample_online`` (default: the set's, else off) weights the
    samples the stream already sampled online by gain too. See the module docstring.
    """

    def __init__(
        self,
        data: GainsLike,
        *,
        g_scale: float | None = None,
        g_percentile: float | None = None,
        resample_online: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        gains, weights = _weights_of(data, g_scale, g_percentile, resample_online)
        self.gains = gains
        self.g_scale = weights.g_scale
        """The scale applied to the gain-weighted items."""
        self.q = weights.q
        """Per-index weight ``clip(g / g_scale, 0, 1)`` (1 for items sampled online)."""
        self.unweighted = weights.unweighted
        """Items held at ``q = 1`` because the stream already sampled them online."""
        self.seed = seed
        self.epoch = 0
        self._cache: tuple[int, np.ndarray] | None = None
        self._keys = _id_keys(data, len(self.q))
        if self.unweighted.any():
            log.warning(
                "%d of %d curated samples were already sampled online by the stream "
                "(thresholds.policy=sample): %s leaves them at q = 1 instead of sampling them "
                "by gain a second time; pass resample_online=True to weight them by gain anyway",
                int(self.unweighted.sum()),
                len(self.q),
                type(self).__name__,
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration draws (its draw is a function of seed and epoch)."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The indices of ``epoch`` (default: the current one), in iteration order."""
        e = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != e:
            self._cache = (e, self._draw(e))
        return self._cache[1]

    @abstractmethod
    def expected_counts(self, epoch: int | None = None) -> np.ndarray:
        """How often each index is expected to appear in ``epoch``, by this sampler's
        definition."""

    def coins(self, purpose: int, epoch: int) -> np.ndarray:
        """One uniform in ``[0, 1)`` per item for a keep decision. Over a set with ids each is
        a hash of ``(id, seed, purpose, epoch)``, as the select stage draws its coin: an item
        keeps its decision when others are added or the order changes. Without ids, by
        position from the seeded generator."""
        if self._keys is None:
            return _rng(self.seed, purpose, epoch).random(len(self.q))
        salt = hashlib.blake2b(f"{self.seed}:{purpose}:{epoch}".encode(), digest_size=8).digest()
        mixed = _mix(self._keys ^ np.uint64(int.from_bytes(salt, "little")))
        return (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53

    @abstractmethod
    def _draw(self, epoch: int) -> np.ndarray: ...

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return len(self.epoch_indices())


class StaticGainSampler(GainSamplerBase):
    """The authors' static selection: index ``i`` is kept with ``p = q_i``, once (the kept set
    depends on ``seed`` only); every epoch iterates the same kept set, reshuffled per epoch when
    ``shuffle``. Each index appears at most once per epoch."""

    def __init__(
        self,
        data: GainsLike,
        *,
        g_scale: float | None = None,
        g_percentile: float | None = None,
        resample_online: bool | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(
            data,
            g_scale=g_scale,
            g_percentile=g_percentile,
            resample_online=resample_online,
            seed=seed,
        )
        self.shuffle = shuffle
        self.kept = np.flatnonzero(self.coins(_STATIC, 0) < self.q)
        """The selected indices, ascending."""

    def inclusion_probabilities(self, epoch: int | None = None) -> np.ndarray:
        """Exact: ``P(i in every epoch) = q_i`` (over seeds)."""
        return self.q.copy()

    def expected_counts(self, epoch: int | None = None) -> np.ndarray:
        return self.inclusion_probabilities(epoch)

    def _draw(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.kept.copy()
        return _rng(self.seed, _ORDER, epoch).permutation(self.kept)


class GainSampler(GainSamplerBase):
    """The authors' dynamic sampling: every epoch holds exactly ``N = num_samples`` indices
    (default: the set's size), gathered by repeated Bernoulli rounds.

    A round keeps each index ``i`` independently with probability ``q_i`` and shuffles what it
    kept; rounds are appended until the epoch holds ``N`` indices, and the last round that
    overshoots contributes only its first ``N - filled`` (shuffled, so a uniform subset of its
    hits). An index therefore appears at most once per round but may recur across rounds, about
    ``N * q_i / sum(q)`` times per epoch: items recur in proportion to ``q``. Everything is a
    function of ``(seed, epoch)``; :meth:`epoch_rounds` shows the rounds.

    ``expected_counts`` returns that rate ``N * q_i / sum(q)`` (every full round contributes
    exactly ``q_i``); only the truncated last round makes the exact expectation differ, by at
    most about one round's share (``q_i``) and, because it keeps a uniform subset, by far less
    on large sets. Needs a positive weight somewhere; an epoch
    that would take more than :data:`MAX_ROUNDS` rounds on average raises ``ValueError``.
    """

    def __init__(
        self,
        data: GainsLike,
        *,
        num_samples: int | None = None,
        g_scale: float | None = None,
        g_percentile: float | None = None,
        resample_online: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            data,
            g_scale=g_scale,
            g_percentile=g_percentile,
            resample_online=resample_online,
            seed=seed,
        )
        n = len(self.q)
        self.num_samples = n if num_samples is None else num_samples
        if self.num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {self.num_samples}")
        self.round_size = float(self.q.sum())
        """``sum(q)``: the expected number of indices one Bernoulli round keeps."""
        if self.num_samples > 0:
            if self.round_size <= 0:
                raise ConfigError("GainSampler needs at least one item with a positive weight")
            rounds = self.num_samples / self.round_size
            if rounds > MAX_ROUNDS:
                raise ConfigError(
                    f"an epoch of {self.num_samples} would need about {rounds:.0f} Bernoulli "
                    f"rounds (sum of weights {self.round_size:.3g}); more than {MAX_ROUNDS}: "
                    "check g_scale"
                )

    def expected_counts(self, epoch: int | None = None) -> np.ndarray:
        if self.num_samples == 0:
            return np.zeros(len(self.q))
        return self.q * (self.num_samples / self.round_size)

    def epoch_rounds(self, epoch: int | None = None) -> list[np.ndarray]:
        """The Bernoulli rounds of ``epoch`` (default: the current one), in order; the last one
        is truncated. Their concatenation is the epoch."""
        e = self.epoch if epoch is None else epoch
        rng = _rng(self.seed, _DYNAMIC, e)
        positive = np.flatnonzero(self.q > 0)
        q = self.q[positive]
        rounds: list[np.ndarray] = []
        need = self.num_samples
        while need > 0:
            # Draw several rounds' coins at once; how many depends on the data only, so the
            # draw stays a function of (seed, epoch).
            batch = math.ceil(need / self.round_size) + 1
            batch = max(1, min(batch, _COINS_PER_BATCH // max(1, len(q))))
            coins = rng.random((batch, len(q))) < q
            for row in coins:
                hits = rng.permutation(positive[row])
                if len(hits) >= need:
                    rounds.append(hits[:need])
                    need = 0
                    break
                rounds.append(hits)
                need -= len(hits)
        return rounds

    def _draw(self, epoch: int) -> np.ndarray:
        rounds = self.epoch_rounds(epoch)
        if not rounds:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(rounds).astype(np.int64, copy=False)


class TwoPhaseGainSampler(GainSamplerBase):
    """The authors' two-phase schedule: in high-gain epochs index ``i`` is drawn with
    ``p = q_i``, in low-gain epochs with ``p = max(floor, 1 - q_i)``, independently per index
    and epoch (so each index appears at most once per epoch). Phases switch every ``period``
    epochs, starting with ``start``. Items the stream already sampled online are taken in both
    phases (``p = 1``), as they are not weighted by gain again. Epoch lengths vary; ``len()`` is
    the current epoch's."""

    def __init__(
        self,
        data: GainsLike,
        *,
        floor: float = 0.1,
        period: int = 1,
        start: Literal["high", "low"] = "high",
        g_scale: float | None = None,
        g_percentile: float | None = None,
        resample_online: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            data,
            g_scale=g_scale,
            g_percentile=g_percentile,
            resample_online=resample_online,
            seed=seed,
        )
        if not 0.0 <= floor <= 1.0:
            raise ConfigError(f"floor must be in [0, 1], got {floor}")
        if period < 1:
            raise ConfigError(f"period must be >= 1, got {period}")
        self.floor = floor
        self.period = period
        if start not in ("high", "low"):
            raise ConfigError(f"start must be 'high' or 'low', got {start!r}")
        self.start = start

    def phase(self, epoch: int | None = None) -> Literal["high", "low"]:
        """Which emphasis ``epoch`` (default: the current one) has."""
        e = self.epoch if epoch is None else epoch
        first = (e // self.period) % 2 == 0
        if first:
            return self.start
        return "low" if self.start == "high" else "high"

    def inclusion_probabilities(self, epoch: int | None = None) -> np.ndarray:
        """Exact probability that each index is in ``epoch``."""
        if self.phase(epoch) == "high":
            return self.q.copy()
        return np.where(self.unweighted, 1.0, np.maximum(self.floor, 1.0 - self.q))

    def expected_counts(self, epoch: int | None = None) -> np.ndarray:
        return self.inclusion_probabilities(epoch)

    def _draw(self, epoch: int) -> np.ndarray:
        p = self.inclusion_probabilities(epoch)
        kept = np.flatnonzero(self.coins(_TWO_PHASE, epoch) < p)
        return _rng(self.seed, _TWO_PHASE, epoch).permutation(kept)


class DistributedGainSampler(Sampler[int]):
    """Shards a gain sampler's epoch across ranks, like torch's ``DistributedSampler``.

    Every rank builds the same inner sampler (same data order, seed and epoch), so all draw the
    same epoch; rank ``r`` of ``R`` takes positions ``r, r + R, ...`` of it (an index that
    recurs in a :class:`GainSampler` epoch may land on several ranks, once per occurrence).
    ``remainder``: ``pad`` (default) repeats positions from the start of the epoch so every
    rank gets ``ceil(len / R)`` (DDP needs equal step counts); ``drop`` cuts the tail to a
    multiple of ``R``; ``uneven`` splits the positions disjointly, shard lengths differing by at
    most one.
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
            raise ConfigError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        if remainder not in ("pad", "drop", "uneven"):
            raise ConfigError(f"remainder must be 'pad', 'drop' or 'uneven', got {remainder!r}")
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
