"""Clustered unit vectors with injected near-duplicates, generated as whole arrays.

Two spaces share each sample's cluster (as an image and its caption do) but have their own
centres and noise. A duplicate copies an earlier sample (of the prefill or of the stream; half of
them a recent one, as re-posts come in bursts) plus noise far below the cluster spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPACES = ("image", "text")
_BLOCK = 65_536


@dataclass
class Vectors:
    """``prefill`` rows are indexed before the run; ``stream`` rows are the measured input."""

    prefill: dict[str, np.ndarray]
    stream: dict[str, np.ndarray]
    dup: np.ndarray
    """Stream rows that are injected near-duplicates."""
    dup_source: np.ndarray
    """For duplicates, the global row copied (prefill rows first, then stream rows); else -1."""
    cluster: np.ndarray
    """Cluster of every global row."""

    @property
    def dim(self) -> int:
        return int(next(iter(self.stream.values())).shape[1])


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def at_distance(x: np.ndarray, direction: np.ndarray, distance: float) -> np.ndarray:
    """Rows at cosine distance ``distance`` from the unit rows ``x``: ``cos t * x + sin t * u``.

    ``u`` is ``direction`` made orthogonal to ``x`` and unit, and ``1 - cos t = distance``.
    """
    x64 = np.asarray(x, dtype=np.float64)
    x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    u = np.asarray(direction, dtype=np.float64)
    u = u - np.einsum("ij,ij->i", u, x64)[:, None] * x64
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cos = 1.0 - distance
    sin = np.sqrt(max(0.0, 1.0 - cos * cos))
    out: np.ndarray = (cos * x64 + sin * u).astype(np.float32)
    return out


def make(
    n_prefill: int,
    n_stream: int,
    *,
    dim: int = 256,
    spaces: tuple[str, ...] = SPACES,
    clusters: int = 1000,
    spread: float = 1.0,
    dup_rate: float = 0.1,
    dup_noise: float = 0.01,
    dup_distance: float | None = None,
    seed: int = 0,
) -> Vectors:
    """Vectors around ``clusters`` centres; ``spread`` is the noise norm relative to a centre's.

    A duplicate adds noise of norm ``dup_noise`` (cosine distance about ``dup_noise**2 / 2``),
    or, with ``dup_distance``, sits at exactly that cosine distance from its original in every
    space (see :func:`at_distance`).
    """
    total = n_prefill + n_stream
    crng = np.random.default_rng(1234)
    centres = {s: crng.normal(size=(clusters, dim)) / np.sqrt(dim) for s in spaces}
    # Prefill and stream come from their own generators: the same prefill for any stream size.
    prng = np.random.default_rng([seed, 0])
    rng = np.random.default_rng([seed, 1])
    cluster = np.concatenate(
        [prng.integers(clusters, size=n_prefill), rng.integers(clusters, size=n_stream)]
    )
    out: dict[str, np.ndarray] = {}
    for s in spaces:
        # Row blocks: the same draws as one call (a generator's stream does not depend on how
        # it is cut), with float64 temporaries of one block, so millions of rows fit in memory.
        out[s] = np.empty((total, dim), dtype=np.float32)
        for gen, lo, hi in ((prng, 0, n_prefill), (rng, n_prefill, total)):
            for a in range(lo, hi, _BLOCK):
                b = min(a + _BLOCK, hi)
                noise = gen.normal(scale=spread / np.sqrt(dim), size=(b - a, dim))
                out[s][a:b] = _unit(centres[s][cluster[a:b]] + noise)
    dup = np.zeros(n_stream, dtype=bool)
    source = np.full(n_stream, -1, dtype=np.int64)
    if n_stream > 1 and dup_rate > 0:
        dup[1:] = rng.random(n_stream - 1) < dup_rate
        rows = np.flatnonzero(dup)
        g = n_prefill + rows  # global row of each duplicate
        recent = rng.random(len(rows)) < 0.5
        start = np.where(recent, np.maximum(g - 1000, 0), 0)
        src = start + (rng.random(len(rows)) * (g - start)).astype(np.int64)
        # Copy from a row that is itself original, so a chain never drifts.
        for i, (gi, si) in enumerate(zip(g.tolist(), src.tolist(), strict=True)):
            while si >= n_prefill and dup[si - n_prefill]:
                si = int(source[si - n_prefill])
            src[i] = si
            source[gi - n_prefill] = si
        cluster[g] = cluster[src]
        for s in spaces:
            noise = rng.normal(scale=dup_noise / np.sqrt(dim), size=(len(rows), dim))
            if dup_distance is None:
                out[s][g] = _unit(out[s][src].astype(np.float64) + noise)
            else:
                out[s][g] = at_distance(out[s][src], noise, dup_distance)
    return Vectors(
        prefill={s: out[s][:n_prefill] for s in spaces},
        stream={s: out[s][n_prefill:] for s in spaces},
        dup=dup,
        dup_source=source,
        cluster=cluster,
    )
