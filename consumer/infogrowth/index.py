"""Per-partition selection state: one hnswlib index per embedding space plus the id map.

Items are appended in a fixed order with a single insertion thread, so the same sequence of adds
always builds the same graph (restore == replay). Queries are multi-threaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import hnswlib
import numpy as np

from infogrowth.config import IndexConfig


def _threads(cfg: IndexConfig) -> int:
    return cfg.threads if cfg.threads > 0 else max(1, os.cpu_count() or 1)


class SpaceIndex:
    """An hnswlib inner-product index over unit vectors (distance = 1 - cosine)."""

    def __init__(self, dim: int, cfg: IndexConfig, capacity: int | None = None) -> None:
        self.dim = dim
        self.cfg = cfg
        self._index = hnswlib.Index(space="ip", dim=dim)
        cap = max(capacity or cfg.initial_capacity, 1)
        self._index.init_index(
            max_elements=cap,
            M=cfg.m,
            ef_construction=cfg.ef_construction,
            random_seed=cfg.random_seed,
        )
        self._index.set_ef(cfg.ef)
        self._query_threads = _threads(cfg)
        self._exact: np.ndarray | None = np.empty((cap, dim), dtype=np.float32)

    @property
    def count(self) -> int:
        return int(self._index.get_current_count())

    @property
    def capacity(self) -> int:
        return int(self._index.get_max_elements())

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64) and hnswlib distances (float32) of the ``min(k, count)`` nearest items."""
        n = self.count
        kk = min(k, n)
        if kk == 0 or len(queries) == 0:
            return (
                np.empty((len(queries), 0), dtype=np.int64),
                np.empty((len(queries), 0), dtype=np.float32),
            )
        if self._exact is not None:
            return self._knn_exact(queries, kk)
        labels, dists = self._index.knn_query(queries, k=kk, num_threads=self._query_threads)
        return labels.astype(np.int64, copy=False), dists

    def _knn_exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force: float32 scores pick candidates, float64 re-ranks them (ties by id)."""
        assert self._exact is not None
        n = self.count
        mat = self._exact[:n]
        scores = queries @ mat.T
        c = min(n, max(2 * k, k + 8))
        if c < n:
            cand = np.argpartition(-scores, c - 1, axis=1)[:, :c]
        else:
            cand = np.broadcast_to(np.arange(n), (len(queries), n))
        q64 = queries.astype(np.float64)
        d = 1.0 - np.einsum("bd,bcd->bc", q64, mat[cand].astype(np.float64))
        order = np.lexsort((cand, d), axis=1)[:, :k]
        labels = np.take_along_axis(cand, order, axis=1).astype(np.int64)
        dists = np.take_along_axis(d, order, axis=1).astype(np.float32)
        return labels, dists

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Append items with consecutive integer ids; grows capacity geometrically."""
        need = self.count + len(vectors)
        if need > self.capacity:
            new_cap = self.capacity
            while new_cap < need:
                new_cap = int(new_cap * self.cfg.growth) + 1
            self._index.resize_index(new_cap)
        start = self.count
        self._index.add_items(vectors, ids, num_threads=1)
        self._track_exact(start, vectors)

    def _track_exact(self, start: int, vectors: np.ndarray) -> None:
        if self._exact is None:
            return
        end = start + len(vectors)
        if end > self.cfg.exact_below:
            self._exact = None  # large partition: HNSW from here on
            return
        if end > len(self._exact):
            grown = np.empty((max(end, 2 * len(self._exact)), self.dim), dtype=np.float32)
            grown[:start] = self._exact[:start]
            self._exact = grown
        self._exact[start:end] = vectors

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for ``ids`` as a float32 (n, dim) array."""
        if len(ids) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        out = self._index.get_items(ids, return_type="numpy")
        return np.asarray(out, dtype=np.float32)

    def save(self, path: str) -> None:
        self._index.save_index(path)

    @classmethod
    def load(cls, path: str, dim: int, cfg: IndexConfig) -> SpaceIndex:
        obj = cls.__new__(cls)
        obj.dim = dim
        obj.cfg = cfg
        obj._index = hnswlib.Index(space="ip", dim=dim)
        obj._index.load_index(path)
        obj._index.set_ef(cfg.ef)
        obj._query_threads = _threads(cfg)
        n = obj.count
        obj._exact = np.empty((max(n, 1), dim), dtype=np.float32)
        if n:
            obj._track_exact(0, obj.get(np.arange(n, dtype=np.int64)))
        return obj


@dataclass
class PartitionState:
    """Everything the select stage knows about one partition."""

    spaces: tuple[str, ...]
    dims: dict[str, int]
    cfg: IndexConfig
    indexes: dict[str, SpaceIndex]
    ids: list[str]
    labels: list[str | None]
    id_pos: dict[str, int]
    changelog_offset: int = -1
    """Highest changelog offset included in this state (-1: none)."""

    @classmethod
    def empty(cls, spaces: Sequence[str], dims: dict[str, int], cfg: IndexConfig) -> PartitionState:
        sp = tuple(spaces)
        return cls(
            spaces=sp,
            dims={s: dims[s] for s in sp},
            cfg=cfg,
            indexes={s: SpaceIndex(dims[s], cfg) for s in sp},
            ids=[],
            labels=[],
            id_pos={},
        )

    @property
    def count(self) -> int:
        return len(self.ids)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self.id_pos

    def add(
        self,
        ids: Sequence[str],
        vectors: dict[str, np.ndarray],
        labels: Sequence[str | None],
    ) -> None:
        """Append items in order. ``vectors[space]`` is (n, dim) float32, unit rows."""
        n = len(ids)
        if n == 0:
            return
        start = self.count
        pos = np.arange(start, start + n, dtype=np.int64)
        for s in self.spaces:
            v = np.ascontiguousarray(vectors[s], dtype=np.float32)
            if v.shape != (n, self.dims[s]):
                raise ValueError(f"{s}: expected shape {(n, self.dims[s])}, got {v.shape}")
            self.indexes[s].add(v, pos)
        for i, sid in enumerate(ids):
            self.id_pos[sid] = start + i
        self.ids.extend(ids)
        self.labels.extend(labels)
