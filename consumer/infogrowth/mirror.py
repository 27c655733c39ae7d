"""The float32 copy of an index's vectors, held in fixed-size blocks.

The selector recomputes decision distances from stored vectors in float64 (hnswlib's own
distances depend on its SIMD code), and reading vectors back through hnswlib costs tens of
microseconds each, so every index keeps this copy. Blocks make growth free of copies: a partition
that doubles its capacity allocates new blocks and never holds two copies of the old ones, and
pages of a block not yet written are not resident.
"""

from __future__ import annotations

import numpy as np

BLOCK_BYTES = 64 << 20
"""Target size of one block (rows = this / row size, at least ``min_rows``)."""


class VectorMirror:
    """Rows ``0..count-1`` of float32 vectors of one dimension, growable without copying."""

    def __init__(self, dim: int, min_rows: int = 1, block_bytes: int = BLOCK_BYTES) -> None:
        self.dim = dim
        self.rows = max(1, min_rows, block_bytes // (4 * max(dim, 1)))
        self.blocks: list[np.ndarray] = []

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.rows

    @property
    def nbytes(self) -> int:
        """Bytes allocated (resident only where rows have been written)."""
        return sum(b.nbytes for b in self.blocks)

    def reserve(self, n: int) -> None:
        """Room for ``n`` rows."""
        while self.capacity < n:
            self.blocks.append(np.empty((self.rows, self.dim), dtype=np.float32))

    def write(self, start: int, vectors: np.ndarray) -> None:
        """Rows ``start..start+len(vectors)-1`` := ``vectors``."""
        end = start + len(vectors)
        self.reserve(end)
        at = start
        while at < end:
            b, r = divmod(at, self.rows)
            m = min(end - at, self.rows - r)
            self.blocks[b][r : r + m] = vectors[at - start : at - start + m]
            at += m

    def scatter(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Row ``rows[i]`` := ``vectors[i]`` for every i (rows in any order)."""
        if len(rows) == 0:
            return
        self.reserve(int(rows.max()) + 1)
        blk, off = np.divmod(rows, self.rows)
        for b in np.unique(blk):
            sel = blk == b
            self.blocks[int(b)][off[sel]] = vectors[sel]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """A new (len(rows), dim) array of the given rows."""
        if len(self.blocks) == 1:
            one: np.ndarray = self.blocks[0][rows]
            return one
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        blk, off = np.divmod(rows, self.rows)
        for b in np.unique(blk):
            sel = blk == b
            out[sel] = self.blocks[int(b)][off[sel]]
        return out

    def rows_view(self, start: int, end: int) -> np.ndarray | None:
        """Rows ``start..end-1`` as a view when they sit in one block, else ``None``."""
        b, r = divmod(start, self.rows)
        if end - start <= self.rows - r and b < len(self.blocks):
            return self.blocks[b][r : r + end - start]
        return None

    def head(self, n: int) -> np.ndarray:
        """Rows ``0..n-1`` as one array: a view when they sit in the first block, else a copy."""
        if n <= self.rows and self.blocks:
            return self.blocks[0][:n]
        return self.take(np.arange(n, dtype=np.int64))
