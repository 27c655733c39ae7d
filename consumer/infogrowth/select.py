"""Gain, duplicate floor, label vote and keep policies.

For a batch, the index is queried once (multi-threaded) and each item's neighbour set is the
index's k nearest merged with the items kept earlier in the same batch, so a batch decides exactly
as the same items would one at a time. All distances that feed a decision are recomputed in
float64 from the stored float32 vectors, so they do not depend on how the batch was cut.

The batch is decided with array operations, not item by item: one B x B similarity product per
space finds, for every item, the earlier batch items that could enter its k nearest (closer than
its k-th index neighbour, with a float32 error margin). Items with no such candidate, nearly all
of them once the index is large, are decided together from their index neighbours; only the rest
walk in order, seeing which earlier candidates were kept. The candidates' distances are recomputed
exactly, pair by pair, like every other decision distance.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from infogrowth.config import CleanConfig, SelectConfig
from infogrowth.index import PartitionState
from infogrowth.schema import Embedded

Decision = Literal["accepted", "relabeled", "rejected"]
NO_NEIGHBOUR_GAIN = 1.0
"""Gain of an item with no accepted neighbour yet: the distance of an orthogonal vector."""
ROUND = 9


@dataclass(frozen=True)
class Thresholds:
    """The resolved, recorded thresholds one select stage decides with."""

    policy: Literal["threshold", "sample", "all"]
    k: int
    epsilon: dict[str, float]
    delta: float | None = None
    g_scale: float | None = None
    tau: float | None = None
    seed: int = 0
    radius: float | None = None

    def as_record(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "k": self.k,
            "delta": self.delta,
            "epsilon": dict(self.epsilon),
            "g_scale": self.g_scale,
            "tau": self.tau,
            "seed": self.seed,
            "radius": self.radius,
        }


@dataclass
class Verdict:
    """The select stage's decision for one embedded sample."""

    item: Embedded
    decision: Decision
    reason: str | None
    gain: float | None = None
    gain_by_space: dict[str, float | None] = field(default_factory=dict)
    nn_distance: dict[str, float | None] = field(default_factory=dict)
    keep_probability: float | None = None
    detail: str | None = None


def coin(sample_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from (id, seed): the sampling policy's reproducible coin."""
    h = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def pair_distances(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1 - <q_i, v_i> row by row in float64 (q broadcast when it is one row)."""
    q64 = np.asarray(q, dtype=np.float64)
    v64 = np.asarray(v, dtype=np.float64)
    if q64.ndim == 1:
        q64 = np.broadcast_to(q64, v64.shape)
    dots: np.ndarray = np.einsum("ij,ij->i", q64, v64)
    return 1.0 - dots


def _vote(labels: Sequence[str | None]) -> Counter[str]:
    return Counter(lbl for lbl in labels if lbl is not None)


class Selector:
    """Decides a batch against one partition's state and grows the state with kept items."""

    def __init__(
        self,
        state: PartitionState,
        thresholds: Thresholds,
        cfg: SelectConfig,
        clean: CleanConfig,
        neighbour_fixer: bool,
    ) -> None:
        self.state = state
        self.t = thresholds
        self.cfg = cfg
        self.clean = clean
        self.neighbour_fixer = neighbour_fixer
        if cfg.label_space == "auto":
            self.label_space = "image" if "image" in state.spaces else state.spaces[0]
        else:
            if cfg.label_space not in state.spaces:
                raise ValueError(f"select.label_space={cfg.label_space} is not an index space")
            self.label_space = cfg.label_space

    def decide(self, batch: Sequence[Embedded], *, commit: bool = True) -> list[Verdict]:
        """Decide each item in order; with ``commit`` the kept items are added to the state."""
        st = self.state
        k = self.t.k
        spaces = st.spaces
        n = len(batch)
        if n == 0:
            return []
        q = {
            s: np.stack([it.vectors[s] for it in batch]).astype(np.float32, copy=False)
            for s in spaces
        }
        base = st.count

        # Ids already indexed are rejected outright; an id repeated within the batch is a
        # duplicate only if an earlier occurrence gets kept, so repeats are decided in order.
        ids = [it.id for it in batch]
        live = np.ones(n, dtype=bool)
        repeat = np.zeros(n, dtype=bool)
        first: set[str] = set()
        for i, sid in enumerate(ids):
            if sid in st:
                live[i] = False
            elif sid in first:
                repeat[i] = True
            else:
                first.add(sid)

        # Index neighbours, distances recomputed exactly from the stored vectors, in (d, id) order.
        idx_ids: dict[str, np.ndarray] = {}
        idx_d: dict[str, np.ndarray] = {}
        for s in spaces:
            labels, _ = st.indexes[s].knn(q[s], k)
            kk = labels.shape[1]
            if kk:
                stored = st.indexes[s].get(labels.reshape(-1))
                d = pair_distances(np.repeat(q[s], kk, axis=0), stored).reshape(n, kk)
                order = np.lexsort((labels, d), axis=1)
                labels = np.take_along_axis(labels, order, axis=1)
                d = np.take_along_axis(d, order, axis=1)
            else:
                d = np.empty((n, 0), dtype=np.float64)
            idx_ids[s], idx_d[s] = labels, d

        # Earlier batch items that could enter an item's k nearest, per space: a float32 screen
        # with a margin above its rounding error, then exact float64 distances for the pairs.
        cand: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        flagged = repeat & live
        if int(live.sum()) > 1:
            lower = np.tri(n, n, -1, dtype=bool) & live[None, :] & live[:, None]
            for s in spaces:
                qs = q[s]
                d_idx = idx_d[s]
                thr = d_idx[:, k - 1] if d_idx.shape[1] == k else np.full(n, np.inf)
                near = _screen(qs, thr) & lower
                ii, jj = np.nonzero(near)
                if len(ii):
                    exact = pair_distances(qs[ii], qs[jj])
                    starts = np.searchsorted(ii, np.arange(n + 1))
                    cand[s] = (ii, jj, exact, starts)
                    flagged |= np.bincount(ii, minlength=n) > 0

        verdicts: list[Verdict | None] = [None] * n
        kept = np.zeros(n, dtype=bool)
        for i in np.flatnonzero(~live).tolist():
            verdicts[i] = _duplicate_id(batch[i])

        # Items whose neighbours are their index neighbours whatever the batch keeps.
        bulk = np.flatnonzero(live & ~flagged)
        if len(bulk):
            no_intra: Callable[[int], str | None] = self._index_label
            rows = self._judge_rows(
                [batch[i] for i in bulk.tolist()],
                {s: idx_ids[s][bulk] for s in spaces},
                {s: idx_d[s][bulk] for s in spaces},
                no_intra,
                base,
            )
            for i, v in zip(bulk.tolist(), rows, strict=True):
                verdicts[i] = v
                kept[i] = v.decision != "rejected"

        # The rest in order: merge the index neighbours with the candidates kept so far.
        for i in np.flatnonzero(flagged).tolist():
            item = batch[i]
            if repeat[i] and any(kept[j] and ids[j] == item.id for j in range(i)):
                verdicts[i] = _duplicate_id(item)
                continue
            rank = np.cumsum(kept[:i])
            nb_ids: dict[str, np.ndarray] = {}
            nb_d: dict[str, np.ndarray] = {}
            for s in spaces:
                ids_s, d_s = idx_ids[s][i], idx_d[s][i]
                if s in cand:
                    ii, jj, exact, starts = cand[s]
                    lo, hi = int(starts[i]), int(starts[i + 1])
                    js = jj[lo:hi]
                    ok = kept[js]
                    if ok.any():
                        js = js[ok]
                        ids_s = np.concatenate([ids_s, base + rank[js] - 1])
                        d_s = np.concatenate([d_s, exact[lo:hi][ok]])
                        order = np.lexsort((ids_s, d_s))[:k]
                        ids_s, d_s = ids_s[order], d_s[order]
                nb_ids[s], nb_d[s] = ids_s[None, :], d_s[None, :]
            kept_rows = np.flatnonzero(kept[:i])

            def label_of(j: int, kept_rows: np.ndarray = kept_rows) -> str | None:
                if j < base:
                    return self.state.labels[j]
                return batch[int(kept_rows[j - base])].label

            v = self._judge_rows([item], nb_ids, nb_d, label_of, base)[0]
            verdicts[i] = v
            kept[i] = v.decision != "rejected"

        out = [v for v in verdicts if v is not None]
        assert len(out) == n
        if commit and kept.any():
            rows_kept = np.flatnonzero(kept)
            st.add(
                [ids[i] for i in rows_kept.tolist()],
                {s: q[s][rows_kept] for s in spaces},
                [batch[i].label for i in rows_kept.tolist()],
            )
        return out

    def _index_label(self, j: int) -> str | None:
        return self.state.labels[j]

    def _judge_rows(
        self,
        items: Sequence[Embedded],
        nb_ids: dict[str, np.ndarray],
        nb_d: dict[str, np.ndarray],
        label_of: Callable[[int], str | None],
        base: int,
    ) -> list[Verdict]:
        """Verdicts for ``items`` from their sorted neighbour ids and distances, (m, c) per space.

        The numbers come from whole-array operations; what is left per item is the rounding to
        Python floats and the policy's comparisons.
        """
        gains: dict[str, list[float]] = {}
        nearest: dict[str, list[float] | None] = {}
        for s, d in nb_d.items():
            if d.shape[1]:
                gains[s] = [round(x, ROUND) for x in d.mean(axis=1).tolist()]
                nearest[s] = [round(x, ROUND) for x in d[:, 0].tolist()]
            else:
                gains[s] = [NO_NEIGHBOUR_GAIN] * len(items)
                nearest[s] = None
        spaces = list(nb_d)
        out = []
        for r, item in enumerate(items):
            g_s: dict[str, float | None] = {s: gains[s][r] for s in spaces}
            nn_s: dict[str, float | None] = {}
            for s in spaces:
                col = nearest[s]
                nn_s[s] = None if col is None else col[r]
            out.append(self._judge(item, g_s, nn_s, nb_ids, nb_d, r, label_of, base))
        return out

    def _judge(
        self,
        item: Embedded,
        gains: dict[str, float | None],
        nn: dict[str, float | None],
        nb_ids: dict[str, np.ndarray],
        nb_d: dict[str, np.ndarray],
        row: int,
        label_of: Callable[[int], str | None],
        base: int,
    ) -> Verdict:
        t = self.t
        vals = [g for g in gains.values() if g is not None]
        if len(vals) == 1:
            mean = vals[0] / 1
        elif len(vals) == 2:
            mean = (vals[0] + vals[1]) / 2  # what np.mean gives for two values
        else:
            mean = float(np.mean(vals))
        gain = round(mean, ROUND)
        verdict = Verdict(item, "accepted", None, gain=gain, gain_by_space=gains, nn_distance=nn)

        # Duplicate floor: the nearest accepted item is closer than epsilon.
        close = [nn[s] is not None and nn[s] < t.epsilon.get(s, 0.0) for s in nn]  # type: ignore[operator]
        is_dup = all(close) if self.cfg.duplicate_mode == "all" else any(close)
        if is_dup and close:
            verdict.decision, verdict.reason = "rejected", "duplicate"
            verdict.detail = "nearest accepted item is closer than epsilon"
            return verdict

        # Label vote of the k nearest accepted neighbours (labelled data).
        warm = t.radius is not None or base >= self.clean.neighbour_warmup
        if item.label is not None and warm:
            ls = self.label_space
            near = nb_ids[ls][row]
            if t.radius is not None:
                near = near[nb_d[ls][row] <= t.radius]
            votes = _vote([label_of(j) for j in near.tolist()])
            total = sum(votes.values())
            if total:
                own_share = votes.get(item.label, 0) / total
                if self.cfg.entropy_weight:
                    verdict.gain = round(gain + self.cfg.entropy_weight * (1.0 - own_share), ROUND)
                if self.neighbour_fixer and total >= self.clean.neighbour_min:
                    top_label, top_n = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0]
                    if top_label != item.label and top_n / total >= self.clean.neighbour_confidence:
                        if item.original_label is None:
                            item.original_label = item.label
                        item.label = top_label
                        item.fix = item.fix or "neighbour_relabel"
                    elif own_share == 0.0 and self.clean.reject_unfixable_labels:
                        verdict.decision, verdict.reason = "rejected", "label_noise"
                        verdict.detail = (
                            f"no neighbour shares label {item.label!r} and no label wins "
                            f"{self.clean.neighbour_confidence:.0%} of the vote"
                        )
                        return verdict

        g = verdict.gain if verdict.gain is not None else gain
        if t.policy == "threshold":
            tau = t.tau or 0.0
            if g < tau:
                verdict.decision, verdict.reason = "rejected", "redundant"
                verdict.detail = f"gain {g:.4f} < tau {tau:.4f}"
                return verdict
        elif t.policy == "sample":
            assert t.g_scale is not None
            p = min(max(g / t.g_scale, 0.0), 1.0)
            verdict.keep_probability = round(p, ROUND)
            if coin(item.id, t.seed) >= p:
                verdict.decision, verdict.reason = "rejected", "sampled_out"
                verdict.detail = f"keep probability {p:.4f}"
                return verdict
        if item.fix is not None:
            verdict.decision, verdict.reason = "relabeled", item.fix
        return verdict


_BLAS_SINGLE = 262_144
"""OpenBLAS runs a product of m*n*k at most this on the calling thread. Larger ones wake its
worker threads, which then spin for a while and steal the cores hnswlib is about to use."""


def _screen(qs: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """``near[i, j]``: row j may be closer to row i than ``thr[i]`` (j <= i blocks only).

    A float32 product with a margin well above its rounding error (about dim * eps for unit
    rows), computed in blocks small enough for OpenBLAS to keep on this thread. ``thr`` may be
    infinite (fewer than k index neighbours): every earlier row is then a candidate.
    """
    n, dim = qs.shape
    norm2 = float(np.max(np.einsum("ij,ij->i", qs, qs)))
    tol = 8.0 * dim * float(np.finfo(np.float32).eps) * max(norm2, 1.0)
    # 1 - <qi, qj> <= thr + tol  <=>  <qi, qj> >= 1 - thr - tol (rounded down to float32)
    floor = np.nextafter((1.0 - thr - tol).astype(np.float32), np.float32(-np.inf))[:, None]
    near = np.zeros((n, n), dtype=bool)
    step = max(1, int(np.sqrt(_BLAS_SINGLE / dim)))
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        for j0 in range(0, i1, step):
            j1 = min(n, j0 + step)
            np.greater_equal(qs[i0:i1] @ qs[j0:j1].T, floor[i0:i1], out=near[i0:i1, j0:j1])
    return near


def _duplicate_id(item: Embedded) -> Verdict:
    return Verdict(
        item, "rejected", "duplicate_id", detail="an item with this id is already in the index"
    )
