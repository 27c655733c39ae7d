"""Cells: the cut of the embedding space that keys the embedded topic.

Near neighbours should meet in the same select partition, so a sample's key is its cell: the
nearest of ``n_cells`` centroids. The centroids live in the *routing space*, the concatenation of
the sample's per-space unit vectors (image and text where both are present), each block scaled
by ``1/sqrt(number of spaces)`` so the concatenation is a unit vector too and every space weighs
the same. With a seed the centroids are fitted by spherical k-means; without one they are
``n_cells`` random unit vectors drawn from a constant seed and the dimensions. Either way there
are exactly ``n_cells`` regions (nearest centroid wins), and routing is a pure function of the
published calibration, so every replica routes identically.

Records written before routing used both spaces name one ``space``; they still load. Their
``hyperplanes`` kind (a sign pattern folded onto the cells with a modulo, which merged unrelated
regions when the count is not a power of two) is kept only to route such a calibration as it
was routed when it was published; new calibrations never use it.

Boundary replication (as IVF/SPANN indexes do): an item whose other cells lie within a relative
margin of its nearest one (``d_j <= (1 + margin) * d_1``, cosine distances to the centroids) is
also inserted into those cells' indexes, so a near-copy that lands across the border still finds
it. :meth:`Cells.replicas` gives those cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from infogrowth.errors import DataError

HYPERPLANE_SEED = 20240528
CENTROID_SEED = 20240528

Kind = Literal["kmeans", "random", "hyperplanes"]


def routing_vectors(
    vectors: Mapping[str, np.ndarray], spaces: Sequence[str], dims: Mapping[str, int] | None = None
) -> np.ndarray:
    """The routing space: per-space unit vectors concatenated, each scaled by 1/sqrt(#spaces).

    ``vectors[space]`` is one vector (dim,) or a matrix (n, dim). A space an item lacks
    contributes zeros (its block's width from ``dims``).
    """
    scale = 1.0 / math.sqrt(len(spaces))
    first = next(iter(vectors.values()))
    lead = np.asarray(first).shape[:-1]
    blocks = []
    for s in spaces:
        v = vectors.get(s)
        if v is None:
            if dims is None or s not in dims:
                raise DataError(f"routing needs the {s} vector")
            blocks.append(np.zeros((*lead, dims[s]), dtype=np.float64))
            continue
        v = np.asarray(v, dtype=np.float64)
        norm = np.linalg.norm(v, axis=-1, keepdims=True)
        blocks.append(v / np.where(norm > 0, norm, 1.0) * scale)
    return np.concatenate(blocks, axis=-1)


@dataclass(frozen=True)
class Cells:
    kind: Kind
    spaces: tuple[str, ...]
    vectors: np.ndarray
    """(n_cells, routing dim) unit centroids, or, legacy, (bits, dim) hyperplane normals."""
    n_cells: int
    widths: tuple[int, ...] = ()
    """Width of each space's block in the routing space (default: an equal split)."""

    @property
    def dims(self) -> dict[str, int]:
        if self.widths:
            return dict(zip(self.spaces, self.widths, strict=True))
        total = int(self.vectors.shape[1])
        return {s: total // len(self.spaces) for s in self.spaces}

    def _x(self, vectors: Mapping[str, np.ndarray]) -> np.ndarray:
        return routing_vectors(vectors, self.spaces, self.dims)

    def route(self, vectors: Mapping[str, np.ndarray] | np.ndarray) -> int:
        """Cell of one item (its vectors by space; a bare array is the only space's vector)."""
        if self.n_cells <= 1:
            return 0
        vecs = vectors if isinstance(vectors, Mapping) else {self.spaces[0]: vectors}
        return int(self.route_many(vecs)[0])

    def route_many(self, vectors: Mapping[str, np.ndarray]) -> np.ndarray:
        """Cells of n items: ``vectors[space]`` is (n, dim)."""
        x = np.atleast_2d(self._x(vectors))
        if self.n_cells <= 1:
            return np.zeros(len(x), dtype=np.int64)
        if self.kind == "hyperplanes":
            bits = (x @ self.vectors.T.astype(np.float64)) >= 0
            code = bits.astype(np.int64) @ (1 << np.arange(bits.shape[1], dtype=np.int64))
            return np.asarray(code % self.n_cells, dtype=np.int64)  # legacy records only
        return np.asarray(np.argmax(x @ self.vectors.T.astype(np.float64), axis=1), dtype=np.int64)

    def replicas(self, vectors: Mapping[str, np.ndarray], margin: float) -> list[list[int]]:
        """For n items, the cells besides the nearest whose distance is within ``margin``.

        Cell j is a replica target when ``d_j <= (1 + margin) * d_1`` (cosine distances to the
        centroids, d_1 the nearest), nearest first. Margin 0 (or one cell): none.
        """
        x = np.atleast_2d(self._x(vectors))
        n = len(x)
        if margin <= 0 or self.n_cells <= 1 or self.kind == "hyperplanes":
            return [[] for _ in range(n)]
        d = 1.0 - x @ self.vectors.T.astype(np.float64)
        order = np.argsort(d, axis=1, kind="stable")
        d_sorted = np.take_along_axis(d, order, axis=1)
        limit = (1.0 + margin) * np.maximum(d_sorted[:, :1], 0.0)
        within = d_sorted[:, 1:] <= limit
        return [order[i, 1:][within[i]].tolist() for i in range(n)]

    def as_record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "spaces": list(self.spaces),
            "dims": [int(self.dims[s]) for s in self.spaces],
            "vectors": [[float(x) for x in row] for row in self.vectors],
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any], n_cells: int) -> Cells:
        vec = np.asarray(rec["vectors"], dtype=np.float32)
        spaces = tuple(rec["spaces"]) if rec.get("spaces") else (str(rec["space"]),)
        widths = tuple(int(w) for w in rec.get("dims") or ())
        if rec["kind"] != "hyperplanes":
            n_cells = len(vec)  # the record's centroids are the cells
        return cls(rec["kind"], spaces, vec, n_cells, widths)


def random_centroids(spaces: Sequence[str], dims: Mapping[str, int], n_cells: int) -> Cells:
    """``n_cells`` random unit centroids in the routing space, from a constant seed and the dims.

    Exactly ``n_cells`` regions (nearest wins); the same for every replica without a seed.
    """
    sp = tuple(spaces)
    rng = np.random.default_rng([CENTROID_SEED, n_cells, *(int(dims[s]) for s in sp)])
    blocks = {s: rng.normal(size=(n_cells, int(dims[s]))) for s in sp}
    c = routing_vectors(blocks, sp)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return Cells("random", sp, c.astype(np.float32), n_cells, tuple(int(dims[s]) for s in sp))


def hyperplanes(space: str, dim: int, n_cells: int) -> Cells:
    """Legacy cut (sign pattern folded with a modulo); kept for tests of old records only."""
    bits = max(1, math.ceil(math.log2(max(n_cells, 2))))
    rng = np.random.default_rng(HYPERPLANE_SEED)
    return Cells("hyperplanes", (space,), rng.normal(size=(bits, dim)).astype(np.float32), n_cells)


def kmeans(
    spaces: Sequence[str],
    vectors: Mapping[str, np.ndarray],
    n_cells: int,
    iters: int = 25,
    seed: int = 0,
) -> Cells:
    """Spherical k-means (k-means++ start) in the routing space; deterministic for its input.

    ``vectors[space]`` is (n, dim). Fewer items than cells: random centroids.
    """
    sp = tuple(spaces)
    x = routing_vectors({s: vectors[s] for s in sp}, sp)
    n = len(x)
    dims = {s: int(np.asarray(vectors[s]).shape[1]) for s in sp}
    widths = tuple(dims[s] for s in sp)
    if n_cells > 1 and n < n_cells:
        return random_centroids(sp, dims, n_cells)
    if n_cells <= 1:
        c1 = x.sum(axis=0, keepdims=True) if n else np.ones((1, x.shape[1]))
        c1 /= max(float(np.linalg.norm(c1)), 1e-12)
        return Cells("kmeans", sp, c1.astype(np.float32), 1, widths)
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
    return Cells("kmeans", sp, c.astype(np.float32), n_cells, widths)
