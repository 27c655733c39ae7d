"""Per-partition selection state: one hnswlib index per embedding space plus the id map.

Items are appended in a fixed order with a single insertion thread per index, so the same sequence
of adds always builds the same graph (restore == replay). Queries are multi-threaded. With
``index.threads`` other than 1, each index inserts on its own background thread (still one
thread per index, batches in order): the spaces fill side by side, and the caller goes on with
its batch (verdicts, records, produce) while hnswlib inserts. Anything that reads the hnswlib
graph (a query, a save) first waits for the index's pending insert, so every graph is identical
to a sequential build.

Every index keeps a float32 mirror of its vectors (:mod:`infogrowth.mirror`): the selector
recomputes decision distances from the stored vectors, and hnswlib's ``get_items`` costs tens of
microseconds a vector. The mirror costs ``4 * dim`` bytes an item, next to hnswlib's
``4 * dim + 8 * M + 16`` and its bookkeeping; it grows in blocks, so growing never copies it.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import time
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from infogrowth.config import IndexConfig
from infogrowth.errors import DataError
from infogrowth.mirror import VectorMirror
from infogrowth.online import OnlineState

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
"""hnswlib 0.8 ``saveIndex`` header: offsetLevel0, max_elements, count, size_data_per_element,
label_offset, offsetData, maxlevel, enterpoint, maxM, maxM0, M, mult, ef_construction."""
HEADER_BYTES = _HEADER.size

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="index-add")
    return _POOL


def _threads(cfg: IndexConfig) -> int:
    return cfg.threads if cfg.threads > 0 else max(1, os.cpu_count() or 1)


def saved_count(head: bytes, size: int) -> int | None:
    """Items in a saved hnswlib index whose first bytes are ``head`` and whose length is
    ``size``; None when ``size`` is too short for them (a truncated write) or there is no header.
    """
    if len(head) < _HEADER.size:
        return None
    count, per_elem = _HEADER.unpack(head[: _HEADER.size])[2:4]
    if size < _HEADER.size + count * (per_elem + 4):  # level-0 data + a link-list size each
        return None
    return int(count)


def read_vectors(path: str, dim: int, chunk_bytes: int = 32 << 20) -> np.ndarray | None:
    """Vectors of a saved hnswlib index, row = label (see :func:`read_vectors_into`)."""
    mirror = VectorMirror(dim)
    n = read_vectors_into(path, mirror, chunk_bytes)
    if n is None:
        return None
    return mirror.take(np.arange(n, dtype=np.int64))


def read_vectors_into(path: str, mirror: VectorMirror, chunk_bytes: int = 32 << 20) -> int | None:
    """Copy the vectors of a saved hnswlib index into ``mirror`` (row = label); their count.

    ``None`` when the file does not look like an hnswlib 0.8 index of ``mirror.dim`` float32
    vectors with labels ``0..count-1``; callers then fall back to ``get_items``. Reads
    sequentially in chunks of about ``chunk_bytes``.
    """
    dim = mirror.dim
    p = Path(path)
    size = p.stat().st_size
    if size < _HEADER.size:
        return None
    with p.open("rb") as fh:
        head = _HEADER.unpack(fh.read(_HEADER.size))
        _, _, count, per_elem, label_off, data_off = head[:6]
        if count == 0:
            return 0
        if (
            data_off + 4 * dim > label_off
            or label_off + 8 > per_elem
            or _HEADER.size + count * per_elem > size
        ):
            return None
        mirror.reserve(count)
        seen = np.zeros(count, dtype=bool)
        rows = max(1, chunk_bytes // per_elem)
        buf = np.empty((min(rows, count), per_elem), dtype=np.uint8)
        for lo in range(0, count, rows):
            m = min(rows, count - lo)
            part = buf[:m]
            if fh.readinto(part.data.cast("B")) != m * per_elem:
                return None
            labels = part[:, label_off : label_off + 8].copy().view(np.uint64).ravel()
            if int(labels.max()) >= count:
                return None
            at = labels.astype(np.int64)
            mirror.scatter(at, part[:, data_off : data_off + 4 * dim].copy().view(np.float32))
            seen[at] = True
    return int(count) if bool(seen.all()) else None


_MINSTD_M = 2**31 - 1
_MINSTD_A = 16807
_DRAWS_PER_NODE = 2
"""hnswlib draws a node's level with ``uniform_real_distribution<double>`` from a
``std::default_random_engine``: libstdc++'s minstd_rand0, two draws for 53 bits."""


def _level_seed(seed: int, count: int) -> int:
    """The level generator's state after ``count`` nodes, as a seed that restores it."""
    start = seed % _MINSTD_M or 1
    return start * pow(_MINSTD_A, _DRAWS_PER_NODE * count, _MINSTD_M) % _MINSTD_M


def _reseeded(state: tuple[Any, ...], seed: int) -> hnswlib.Index:
    """An index made from hnswlib's pickle ``state`` with its level generator at ``seed``."""
    state[0]["seed"] = seed
    fresh: hnswlib.Index = hnswlib.Index.__new__(hnswlib.Index)
    fresh.__setstate__(state)
    return fresh


_GRAPH = ("cur_element_count", "max_level", "enterpoint_node", "element_levels", "data_level0")


@functools.cache
def _levels_continue() -> bool:
    """Whether :func:`_reseeded` at :func:`_level_seed` reproduces the live graph with this
    hnswlib build (checked once: a build with another standard library's random engine would
    not). Any error in the check counts as no, with its own warning."""
    try:
        rng = np.random.default_rng(7)
        x = rng.normal(size=(300, 8)).astype(np.float32)

        def fresh() -> hnswlib.Index:
            i = hnswlib.Index(space="ip", dim=8)
            i.init_index(max_elements=300, M=4, ef_construction=20, random_seed=11)
            return i

        live, part = fresh(), fresh()
        live.add_items(x, np.arange(300), num_threads=1)
        part.add_items(x[:200], np.arange(200), num_threads=1)
        resumed = _reseeded(part.__getstate__(), _level_seed(11, 200))
        resumed.add_items(x[200:], np.arange(200, 300), num_threads=1)
        a, b = live.__getstate__()[0], resumed.__getstate__()[0]
        same = all(np.array_equal(a[k], b[k]) for k in _GRAPH)
        # upper-level links: the lists are laid out in node order, each its level's size
        return same and bytes(a["link_lists"]) == bytes(b["link_lists"])
    except Exception as exc:
        log.warning("the check of hnswlib's level generator failed: %r", exc)
        return False


def load_continued(path: str, dim: int, seed: int) -> hnswlib.Index:
    """Load the hnswlib index saved at ``path`` so that its next inserts get the levels the live
    index would have given them.

    hnswlib's saved file does not hold the level generator: a loaded index restarts it from a
    fixed state, so items inserted after a snapshot load would get other levels, and so another
    graph, than the live stage gave them (restore == replay would hold only up to HNSW recall).
    Nodes are only ever inserted one writer at a time in changelog order, so after ``count`` of
    them the generator's state is ``seed`` advanced by two draws a node; the loaded index is
    rebuilt through hnswlib's pickle state with that seed. The loaded index is released before
    the new one is made: at most one extra copy of the index is held. Where this does not
    reproduce the live graph (checked once), the index is returned as loaded, with a warning.
    """
    index = hnswlib.Index(space="ip", dim=dim)
    index.load_index(path)
    if not _levels_continue():
        _warn_levels()
        return index
    count = int(index.get_current_count())
    state = index.__getstate__()
    del index  # the only reference: freed before the copy is made
    return _reseeded(state, _level_seed(seed, count))


@functools.cache
def _warn_levels() -> None:
    log.warning(
        "this hnswlib build's level generator is not libstdc++'s minstd_rand0: items inserted "
        "after a snapshot load get other levels than the live stage gave them, so a restored "
        "partition decides as a full replay would only up to HNSW recall"
    )


def _rerank(
    q64: np.ndarray, mat: np.ndarray, cand: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of each row's candidates by float64 distance, ties by id."""
    d = 1.0 - np.einsum("bd,bcd->bc", q64, mat[cand].astype(np.float64))
    order = np.lexsort((cand, d), axis=1)[:, :k]
    labels = np.take_along_axis(cand, order, axis=1).astype(np.int64)
    dists = np.take_along_axis(d, order, axis=1).astype(np.float32)
    return labels, dists


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
        self._vectors = VectorMirror(dim, min_rows=cfg.exact_below)
        self._n = 0
        self._exact = True
        self._pending: Future[None] | None = None

    def wait(self) -> None:
        """Block until the pending background insert (if any) is in the graph."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    @property
    def busy(self) -> bool:
        """A background insert is still running (:meth:`wait` would block)."""
        return self._pending is not None and not self._pending.done()

    def settle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the pending insert; whether none is left (its error,
        if any, is raised here)."""
        pending = self._pending
        if pending is None:
            return True
        futures.wait([pending], timeout=timeout_s)
        if not pending.done():
            return False
        self.wait()
        return True

    @property
    def count(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return int(self._index.get_max_elements())

    @property
    def exact(self) -> bool:
        """Searched by brute force (at most ``index.exact_below`` items so far)."""
        return self._exact

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64) and hnswlib distances (float32) of the ``min(k, count)`` nearest items."""
        n = self.count
        kk = min(k, n)
        if kk == 0 or len(queries) == 0:
            return (
                np.empty((len(queries), 0), dtype=np.int64),
                np.empty((len(queries), 0), dtype=np.float32),
            )
        if self._exact:
            return self._knn_exact(queries, kk)
        self.wait()
        labels, dists = self._index.knn_query(queries, k=kk, num_threads=self._query_threads)
        return labels.astype(np.int64, copy=False), dists

    def _knn_exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force: float32 scores pick candidates, float64 re-ranks them (ties by id).

        The candidates are every item whose float32 score comes within its rounding error of
        the ``c``-th best: where more items than that tie (copies of one image under other
        captions), all of them are re-ranked, so which ones are the nearest never depends on
        how many items the index holds or on the partition's order."""
        n = self.count
        mat = self._vectors.head(n)
        scores = queries @ mat.T
        c = min(n, max(2 * k, k + 8))
        q64 = queries.astype(np.float64)
        if c >= n:
            cand = np.broadcast_to(np.arange(n), (len(queries), n))
            return _rerank(q64, mat, cand, k)
        cand = np.argpartition(-scores, c - 1, axis=1)[:, :c]
        tol = 8.0 * self.dim * float(np.finfo(np.float32).eps)
        floor = np.take_along_axis(scores, cand, axis=1).min(axis=1) - tol
        wide = np.flatnonzero((scores >= floor[:, None]).sum(axis=1) > c)
        labels, dists = _rerank(q64, mat, cand, k)
        for r in wide.tolist():  # ties beyond the c-th: all of them, ranked by (d, id)
            every = np.flatnonzero(scores[r] >= floor[r])[None, :]
            row_labels, row_dists = _rerank(q64[r : r + 1], mat, every, k)
            labels[r], dists[r] = row_labels[0], row_dists[0]
        return labels, dists

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` items now rather than growing on a later add."""
        self.wait()
        if capacity > self.capacity:
            self._index.resize_index(capacity)
        self._vectors.reserve(capacity)

    def add(
        self, vectors: np.ndarray, ids: np.ndarray, *, threads: int = 1, background: bool = False
    ) -> None:
        """Append items with consecutive integer ids; grows capacity geometrically.

        With ``background`` the hnswlib insert runs on a pool thread and this returns at once;
        the next query, add or save waits for it. ``threads`` other than 1 builds a graph that
        depends on thread timing: only for benchmark prefills, never for state that a replay
        must reproduce.
        """
        self.wait()
        need = self.count + len(vectors)
        if need > self.capacity:
            new_cap = self.capacity
            while new_cap < need:
                new_cap = int(new_cap * self.cfg.growth) + 1
            self._index.resize_index(new_cap)
        start = self.count
        self._mirror(start, vectors)
        rows = self._vectors.rows_view(start, start + len(vectors))
        if rows is None:  # spans two blocks: hnswlib gets its own contiguous copy
            rows = np.array(vectors, dtype=np.float32)
        if background:
            self._pending = _pool().submit(self._index.add_items, rows, ids, threads)
        else:
            self._index.add_items(rows, ids, num_threads=threads)

    def _mirror(self, start: int, vectors: np.ndarray) -> None:
        end = start + len(vectors)
        self._vectors.write(start, vectors)
        self._n = end
        if end > self.cfg.exact_below:
            self._exact = False  # large partition: HNSW from here on

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for ``ids`` as a float32 (n, dim) array."""
        if len(ids) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._vectors.take(np.asarray(ids, dtype=np.int64))

    @property
    def mirror_bytes(self) -> int:
        """Bytes allocated for the float32 mirror (resident as far as rows are written)."""
        return self._vectors.nbytes

    def memory_bytes(self) -> int:
        """Estimated resident bytes: hnswlib's per-item data and links, its bookkeeping, and the
        mirror's rows in use (an estimate from hnswlib's layout, not a measurement)."""
        m = self.cfg.m
        n = self._n
        level0 = 4 * self.dim + 4 * (2 * m + 1) + 8
        upper = 4 * (m + 1) / max(m - 1, 1)  # links above level 0: 1/(M-1) levels expected
        bookkeeping = 8 + 4 + 40 + 56  # link-list pointer, level, lock, label map entry
        return int(n * (level0 + upper + bookkeeping + 4 * self.dim))

    def save(self, path: str) -> None:
        self.wait()
        self._index.save_index(path)

    def continue_levels(self) -> None:
        """Put the level generator where a single writer's would be after the index's nodes,
        as a snapshot load does (:func:`load_continued`): after a multi-threaded build, whose
        threads race on the generator and lose draws, later inserts then get the levels a
        restart from its snapshot gives them. One extra copy of the index while it runs."""
        self.wait()
        if not _levels_continue():
            _warn_levels()
            return
        count = int(self._index.get_current_count())
        state = self._index.__getstate__()
        self._index = None  # freed before the copy is made
        self._index = _reseeded(state, _level_seed(self.cfg.random_seed, count))
        self._index.set_ef(self.cfg.ef)

    @classmethod
    def load(cls, path: str, dim: int, cfg: IndexConfig) -> SpaceIndex:
        obj = cls.__new__(cls)
        obj.dim = dim
        obj.cfg = cfg
        obj._index = load_continued(path, dim, cfg.random_seed)
        obj._index.set_ef(cfg.ef)
        obj._query_threads = _threads(cfg)
        n = int(obj._index.get_current_count())
        obj._vectors = VectorMirror(dim, min_rows=cfg.exact_below)
        obj._n = 0
        obj._exact = True
        obj._pending = None
        got_n = read_vectors_into(path, obj._vectors)
        if got_n is not None and got_n == n and _spot_check(obj._index, obj._vectors, n):
            obj._n = n
            obj._exact = n <= cfg.exact_below
            return obj
        obj._vectors = VectorMirror(dim, min_rows=cfg.exact_below)
        if n:
            got = obj._index.get_items(np.arange(n), return_type="numpy")
            obj._mirror(0, np.asarray(got, dtype=np.float32))
        return obj


def _spot_check(index: hnswlib.Index, vecs: VectorMirror, n: int) -> bool:
    """The file parse agrees with hnswlib on a few items."""
    if n == 0:
        return True
    probe = np.unique(np.linspace(0, n - 1, num=min(n, 8)).astype(np.int64))
    got = np.asarray(index.get_items(probe, return_type="numpy"), dtype=np.float32)
    return bool(np.array_equal(got, vecs.take(probe)))


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
    fixed: list[bool] = field(default_factory=list)
    """Per item: its label was changed by a fixer (such items do not vote by default)."""
    online: OnlineState = field(default_factory=OnlineState)

    def __post_init__(self) -> None:
        if len(self.fixed) < len(self.ids):
            self.fixed.extend([False] * (len(self.ids) - len(self.fixed)))

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

    def memory_bytes(self) -> int:
        """Estimated resident bytes of this state: the indexes (see
        :meth:`SpaceIndex.memory_bytes`) plus the id map (about 160 bytes an item)."""
        return sum(idx.memory_bytes() for idx in self.indexes.values()) + 160 * self.count

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self.id_pos

    def wait(self) -> None:
        """Block until every index's background insert is done."""
        for idx in self.indexes.values():
            idx.wait()

    @property
    def busy(self) -> bool:
        """Some index is still inserting in the background."""
        return any(idx.busy for idx in self.indexes.values())

    def settle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the background inserts; whether they are all done."""
        deadline = time.monotonic() + timeout_s
        for idx in self.indexes.values():
            if not idx.settle(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def continue_levels(self) -> None:
        """:meth:`SpaceIndex.continue_levels` for every space, one after the other."""
        for idx in self.indexes.values():
            idx.continue_levels()

    def add(
        self,
        ids: Sequence[str],
        vectors: dict[str, np.ndarray],
        labels: Sequence[str | None],
        fixed: Sequence[bool] | None = None,
        *,
        insert_threads: int = 1,
        background: bool | None = None,
    ) -> None:
        """Append items in order. ``vectors[space]`` is (n, dim) float32, unit rows.

        ``insert_threads`` > 1 inserts into each index with that many threads (in the
        background): the ids and vectors are the same, the graph depends on thread timing, so
        only for a fast rebuild that does not promise restore == replay. ``background``
        (default: ``index.threads`` ≠ 1) inserts on pool threads and returns at once.
        """
        n = len(ids)
        if n == 0:
            return
        start = self.count
        pos = np.arange(start, start + n, dtype=np.int64)
        mats = {}
        for s in self.spaces:
            v = np.asarray(vectors[s], dtype=np.float32)
            if v.shape != (n, self.dims[s]):
                raise DataError(f"{s}: expected shape {(n, self.dims[s])}, got {v.shape}")
            mats[s] = v
        # One insert thread per index, in the background unless the config asks for one thread.
        if background is None:
            background = _threads(self.cfg) > 1 or insert_threads > 1
        for s in self.spaces:
            self.indexes[s].add(mats[s], pos, threads=insert_threads, background=background)
        self.id_pos.update(zip(ids, range(start, start + n), strict=True))
        self.ids.extend(ids)
        self.labels.extend(labels)
        self.fixed.extend(fixed if fixed is not None else [False] * n)
