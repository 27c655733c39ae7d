"""Trainer side: consume the curated stream with gain-weighted sampling.

* :class:`CuratedStream`: the ``accepted`` + ``relabeled`` topics as a torch ``IterableDataset``
  (read_committed, finite repeatable epochs, split across DataLoader workers and ranks).
* :class:`CuratedSet`: a materialised set (from the stream or an ``infogrowth export``) with gains.
* :class:`StaticGainSampler`, :class:`GainSampler`, :class:`TwoPhaseGainSampler`: the authors'
  seeded gain-weighted samplers over a set, with ``q = clip(g / g_scale, 0, 1)`` and
  ``g_scale`` the set's own 99th gain percentile unless given (:func:`gain_weights`); samples
  the stream already sampled online keep ``q = 1`` (one sampling step, never two).
  :class:`DistributedGainSampler` shards them across ranks.

Importing this package needs neither Kafka nor a GPU: torch-based classes load on first use and
``confluent_kafka`` only when a stream is read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from infogrowth.sampling.records import (
    CuratedSample,
    GainWeights,
    gain_weights,
    normalise_gains,
    percentile_g_scale,
    read_curated_records,
    resolve_g_scale,
)

if TYPE_CHECKING:
    from infogrowth.sampling.dataset import CuratedSet
    from infogrowth.sampling.samplers import (
        DistributedGainSampler,
        GainSampler,
        GainSamplerBase,
        StaticGainSampler,
        TwoPhaseGainSampler,
    )
    from infogrowth.sampling.stream import CuratedStream

__all__ = [
    "CuratedSample",
    "CuratedSet",
    "CuratedStream",
    "DistributedGainSampler",
    "GainSampler",
    "GainSamplerBase",
    "GainWeights",
    "StaticGainSampler",
    "TwoPhaseGainSampler",
    "gain_weights",
    "normalise_gains",
    "percentile_g_scale",
    "read_curated_records",
    "resolve_g_scale",
]

_LAZY = {
    "CuratedSet": "infogrowth.sampling.dataset",
    "CuratedStream": "infogrowth.sampling.stream",
    "DistributedGainSampler": "infogrowth.sampling.samplers",
    "GainSampler": "infogrowth.sampling.samplers",
    "GainSamplerBase": "infogrowth.sampling.samplers",
    "StaticGainSampler": "infogrowth.sampling.samplers",
    "TwoPhaseGainSampler": "infogrowth.sampling.samplers",
}


def __getattr__(name: str) -> Any:
    """Load the torch-based classes on first access (keeps ``infogrowth export`` light)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
