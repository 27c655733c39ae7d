"""Synthetic clustered samples with known duplicates and label noise (chaos runs, benchmarks,
tests). Real data lives in the demo and the eval; this is for scale and ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Synthetic:
    samples: list[dict[str, Any]]
    duplicates: set[str] = field(default_factory=set)
    flipped: dict[str, str] = field(default_factory=dict)
    """id -> true label of samples whose label was flipped."""


def clustered(
    n: int,
    *,
    dim: int = 32,
    clusters: int = 8,
    spaces: tuple[str, ...] = ("image", "text"),
    dup_rate: float = 0.0,
    flip_rate: float = 0.0,
    spread: float = 0.35,
    seed: int = 0,
    prefix: str = "s",
    centre_seed: int = 1234,
) -> Synthetic:
    """``n`` samples around ``clusters`` centres (fixed by ``centre_seed``); label = cluster.

    Duplicates are copies of an earlier sample with tiny noise; flipped samples carry another
    cluster's label."""
    crng = np.random.default_rng(centre_seed)
    centres = {s: crng.normal(size=(clusters, dim)) for s in spaces}
    rng = np.random.default_rng(seed)
    out = Synthetic(samples=[])
    for i in range(n):
        sid = f"{prefix}{i:06d}"
        if out.samples and rng.random() < dup_rate:
            src = out.samples[int(rng.integers(len(out.samples)))]
            emb = {
                s: (np.asarray(v) + rng.normal(scale=1e-4, size=dim)).tolist()
                for s, v in src["embedding"].items()
            }
            out.samples.append({"id": sid, "embedding": emb, "label": src["label"]})
            out.duplicates.add(sid)
            continue
        c = int(rng.integers(clusters))
        emb = {s: (centres[s][c] + rng.normal(scale=spread, size=dim)).tolist() for s in spaces}
        label = f"c{c}"
        if rng.random() < flip_rate:
            other = (c + 1 + int(rng.integers(clusters - 1))) % clusters
            out.flipped[sid] = label
            label = f"c{other}"
        out.samples.append({"id": sid, "embedding": emb, "label": label})
    return out
