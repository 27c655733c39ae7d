"""Cells: the cut of the embedding space that keys the embedded topic.

Near neighbours should meet in the same select partition, so a sample's key is its cell: the
nearest k-means centroid fitted on the seed set, or, without a seed, the sign pattern of a fixed
set of random hyperplanes. Both are pure functions of the published calibration, so every replica
routes identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

HYPERPLANE_SEED = 20240528


@dataclass(frozen=True)
class Cells:
    kind: Literal["kmeans", "hyperplanes"]
    space: str
    vectors: np.ndarray
    """(n_cells, dim) unit centroids, or (bits, dim) hyperplane normals."""
    n_cells: int

    def route(self, v: np.ndarray) -> int:
        """Cell of one unit vector."""
        if self.n_cells <= 1:
            return 0
        if self.kind == "kmeans":
            return int(np.argmax(self.vectors @ v))
        bits = (self.vectors @ v) >= 0
        code = int(sum(1 << i for i, b in enumerate(bits.tolist()) if b))
        return code % self.n_cells

    def as_record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "space": self.space,
            "vectors": [[float(x) for x in row] for row in self.vectors],
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any], n_cells: int) -> Cells:
        vec = np.asarray(rec["vectors"], dtype=np.float32)
        return cls(rec["kind"], rec["space"], vec, n_cells)


def hyperplanes(space: str, dim: int, n_cells: int) -> Cells:
    bits = max(1, math.ceil(math.log2(max(n_cells, 2))))
    rng = np.random.default_rng(HYPERPLANE_SEED)
    return Cells("hyperplanes", space, rng.normal(size=(bits, dim)).astype(np.float32), n_cells)


def kmeans(space: str, x: np.ndarray, n_cells: int, iters: int = 25, seed: int = 0) -> Cells:
    """Spherical k-means with k-means++ initialisation; deterministic for a given input."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n_cells <= 1 or n < n_cells:
        if n_cells > 1:
            return hyperplanes(space, x.shape[1], n_cells)
        return Cells("kmeans", space, x[:1].astype(np.float32), 1)
    rng = np.random.default_rng(seed)
    centres = [x[int(rng.integers(n))]]
    d2 = np.full(n, np.inf)
    for _ in range(1, n_cells):
        d2 = np.minimum(d2, 1.0 - x @ centres[-1])
        p = np.clip(d2, 0, None)
        total = p.sum()
        idx = int(rng.choice(n, p=p / total)) if total > 0 else int(rng.integers(n))
        centres.append(x[idx])
    c = np.stack(centres)
    for _ in range(iters):
        assign = np.argmax(x @ c.T, axis=1)
        new = np.stack(
            [x[assign == j].sum(axis=0) if np.any(assign == j) else c[j] for j in range(n_cells)]
        )
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        if np.allclose(new, c):
            break
        c = new
    return Cells("kmeans", space, c.astype(np.float32), n_cells)
