"""Gain, duplicate floor, label vote and keep policies.

For a batch, the index is queried once (multi-threaded) and each item's neighbour set is the
index's k nearest merged with the items kept earlier in the same batch, so a batch decides exactly
as the same items would one at a time while search is exact (up to ``index.exact_below`` items).
Above it the index's part is HNSW's answer over the graph before the batch, where items decided
one at a time would query a graph grown by each: the same up to HNSW recall. All distances that
feed a decision are recomputed in float64 from the stored float32 vectors, so they do not depend
on how the batch was cut.

The batch is decided with array operations, not item by item: one B x B similarity product per
space finds, for every item, the earlier batch items that could enter its k nearest (closer than
its k-th index neighbour, with a float32 error margin). Items with no such candidate, nearly all
of them once the index is large, are decided together from their index neighbours; only the rest
walk in order, seeing which earlier candidates were kept. The candidates' distances are recomputed
exactly, pair by pair, like every other decision distance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from infogrowth.config import CleanConfig, SelectConfig
from infogrowth.errors import ConfigError
from infogrowth.index import PartitionState
from infogrowth.online import OnlineState, reference_distance, relative_distance
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
    """Fixed sampling scale, or the starting scale under ``keep_fraction``."""
    tau: float | None = None
    seed: int = 0
    radius: float | None = None
    keep_fraction: float | None = None
    epsilon_online: bool = False
    """ε per space comes from the partition's online estimate (relative); ``epsilon`` then holds
    the seed's distance floor for the warm-up, where the seed has one."""
    vote_k: int = 10
    confidence: float | None = None
    """Vote share a new label needs (None: no relabelling)."""
    reject_share: float | None = None
    """``label_noise`` at or below this own-label share (None: no such rejection)."""
    flag_share: float | None = None
    """A label counts as wrong (relabelled or rejected) only at or below this own-label share;
    None: a relabel needs only ``confidence``."""
    vote_scale: float | None = None
    """Voter weight ``1 / (d + vote_scale)``; equal weights when None."""
    alignment_quartiles: tuple[float, float, float] | None = None
    """The seed's matched-pair alignment quartiles: the reference for the drift warning."""


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
    duplicate_of: str | None = None
    """The nearest kept item behind a ``duplicate`` or ``redundant``."""
    vote: dict[str, float] | None = None
    """Weighted label shares of the voting neighbours (labelled items that were voted on)."""
    keep_scale: float | None = None
    """The ``sample`` policy's scale when this item was decided."""
    relabel: str | None = None
    """The label the neighbour vote gives the item (None: its own label stands); the input
    item is never changed."""

    @property
    def label(self) -> str | None:
        """The item's label after the vote."""
        return self.item.label if self.relabel is None else self.relabel

    @property
    def fix(self) -> str | None:
        """The fix applied to the item, in the embed stage or by this vote."""
        return self.item.fix or (None if self.relabel is None else "neighbour_relabel")

    def result(self) -> Embedded:
        """The item as kept: a relabelled copy when the vote relabels it, else the item."""
        e = self.item
        if self.relabel is None:
            return e
        original = e.label if e.original_label is None else e.original_label
        return replace(e, label=self.relabel, original_label=original, fix=self.fix)


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


def vote_shares(
    labels: Sequence[str | None], d: Sequence[float], scale: float | None
) -> dict[str, float]:
    """Weighted shares of the voters' labels (weight ``1 / (d + scale)``; None abstains)."""
    acc: dict[str, float] = {}
    for lbl, dist in zip(labels, d, strict=True):
        if lbl is not None:
            acc[lbl] = acc.get(lbl, 0.0) + (1.0 / (dist + scale) if scale is not None else 1.0)
    total = sum(acc.values())
    return {k: v / total for k, v in acc.items()} if total > 0 else {}


Lookup = Callable[[int], tuple[str, str | None, bool]]
"""Index position -> (id, label, votes)."""


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
                raise ConfigError(f"select.label_space={cfg.label_space} is not an index space")
            self.label_space = cfg.label_space
        t = thresholds
        self.relabels = neighbour_fixer and t.confidence is not None
        self.votes = self.relabels or t.reject_share is not None or cfg.entropy_weight > 0

    def _width(self, space: str, labelled: bool) -> int:
        width = self.t.k
        if labelled and self.votes and space == self.label_space:
            width = max(width, self.t.vote_k)
        if self.t.epsilon_online:
            width = max(width, self.cfg.epsilon_ref_k)
        return width

    def decide(self, batch: Sequence[Embedded], *, commit: bool = True) -> list[Verdict]:
        """Decide each item in order; with ``commit`` the kept items (and the online state) are
        added to the state."""
        st = self.state
        spaces = st.spaces
        n = len(batch)
        if n == 0:
            return []
        online = st.online if commit else st.online.copy()
        labelled = any(it.label is not None for it in batch)
        width = {s: self._width(s, labelled) for s in spaces}
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
            labels, _ = st.indexes[s].knn(q[s], width[s])
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

        # Earlier batch items that could enter an item's nearest, per space: a float32 screen
        # with a margin above its rounding error, then exact float64 distances for the pairs.
        cand: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        flagged = repeat & live
        if int(live.sum()) > 1:
            lower = np.tri(n, n, -1, dtype=bool) & live[None, :] & live[:, None]
            for s in spaces:
                qs = q[s]
                d_idx = idx_d[s]
                w = width[s]
                thr = d_idx[:, w - 1] if d_idx.shape[1] == w else np.full(n, np.inf)
                near = _screen(qs, thr) & lower
                ii, jj = np.nonzero(near)
                if len(ii):
                    exact = pair_distances(qs[ii], qs[jj])
                    starts = np.searchsorted(ii, np.arange(n + 1))
                    cand[s] = (ii, jj, exact, starts)
                    flagged |= np.bincount(ii, minlength=n) > 0

        # Gains and nearest distances of the items whose neighbours are their index neighbours
        # whatever the batch keeps, as whole-array operations.
        k = self.t.k
        bulk_gain: dict[str, list[float] | None] = {}
        bulk_nn: dict[str, list[float] | None] = {}
        for s in spaces:
            d = idx_d[s]
            if d.shape[1]:
                means = _row_means(d, k)
                bulk_gain[s] = [round(x, ROUND) for x in means.tolist()]
                bulk_nn[s] = [round(x, ROUND) for x in d[:, 0].tolist()]
            else:
                bulk_gain[s] = bulk_nn[s] = None

        verdicts: list[Verdict] = []
        kept = np.zeros(n, dtype=bool)
        for i in range(n):
            item = batch[i]
            if not live[i] or (repeat[i] and any(kept[j] and ids[j] == item.id for j in range(i))):
                verdicts.append(_duplicate_id(item))
                continue
            rank = np.cumsum(kept[:i])
            kept_rows = np.flatnonzero(kept[:i])

            def lookup(j: int, kept_rows: np.ndarray = kept_rows) -> tuple[str, str | None, bool]:
                if j < base:
                    return st.ids[j], st.labels[j], self.clean.relabeled_vote or not st.fixed[j]
                v = verdicts[int(kept_rows[j - base])]
                return v.item.id, v.label, self.clean.relabeled_vote or v.fix is None

            nb_ids: dict[str, np.ndarray] = {}
            nb_d: dict[str, np.ndarray] = {}
            gains: dict[str, float | None] = {}
            nn: dict[str, float | None] = {}
            for s in spaces:
                ids_s, d_s = idx_ids[s][i], idx_d[s][i]
                merged = False
                if flagged[i] and s in cand:
                    ii, jj, exact, starts = cand[s]
                    lo, hi = int(starts[i]), int(starts[i + 1])
                    js = jj[lo:hi]
                    ok = kept[js]
                    if ok.any():
                        js = js[ok]
                        ids_s = np.concatenate([ids_s, base + rank[js] - 1])
                        d_s = np.concatenate([d_s, exact[lo:hi][ok]])
                        order = np.lexsort((ids_s, d_s))[: width[s]]
                        ids_s, d_s = ids_s[order], d_s[order]
                        merged = True
                nb_ids[s], nb_d[s] = ids_s, d_s
                if not merged and bulk_gain[s] is not None:
                    gains[s] = bulk_gain[s][i]  # type: ignore[index]
                    nn[s] = bulk_nn[s][i]  # type: ignore[index]
                elif len(d_s):
                    gains[s] = round(float(_row_means(d_s[None, :], k)[0]), ROUND)
                    nn[s] = round(float(d_s[0]), ROUND)
                else:
                    gains[s], nn[s] = NO_NEIGHBOUR_GAIN, None
            count = base + (int(rank[-1]) if i else 0)  # what one-at-a-time would hold now
            v = self._judge(item, gains, nn, nb_ids, nb_d, lookup, count, online)
            verdicts.append(v)
            kept[i] = v.decision != "rejected"

        if commit and kept.any():
            rows_kept = np.flatnonzero(kept)
            st.add(
                [ids[i] for i in rows_kept.tolist()],
                {s: q[s][rows_kept] for s in spaces},
                [verdicts[i].label for i in rows_kept.tolist()],
                [verdicts[i].fix is not None for i in rows_kept.tolist()],
            )
        return verdicts

    def _floor(self, space: str, online: OnlineState) -> tuple[float, bool]:
        """ε for ``space`` and whether it is a ratio (nearest / reference neighbour's distance)
        rather than a distance: online once warm, and in a warm-up without a seed's floor."""
        t = self.t
        if not t.epsilon_online:
            return t.epsilon.get(space, 0.0), False
        if space in t.epsilon and not online.warm(space, self.cfg.epsilon_warmup):
            return t.epsilon[space], False  # the seed's distance floor serves the warm-up
        return online.epsilon(space, self.cfg.epsilon_warmup_ratio, self.cfg.epsilon_warmup), True

    def _judge(
        self,
        item: Embedded,
        gains: dict[str, float | None],
        nn: dict[str, float | None],
        nb_ids: dict[str, np.ndarray],
        nb_d: dict[str, np.ndarray],
        lookup: Lookup,
        count: int,
        online: OnlineState,
    ) -> Verdict:
        """One item's verdict; ``count``: the items indexed before it (the batch's kept ones
        included), as deciding it alone would see."""
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

        # Duplicate floor: the nearest accepted item is closer than epsilon (decided with the
        # floor as it stood before this item; the online estimate then sees this arrival). The
        # online floor is relative (nearest distance / the ref_k-th nearest) once warm, and in
        # the warm-up where no seed measured a distance floor.
        floors = {s: self._floor(s, online) for s in nn}
        eps = {s: e for s, (e, _) in floors.items()}
        tested: dict[str, float | None] = dict(nn)
        ref: dict[str, float] = {}  # spaces tested relatively: the reference distance
        if t.epsilon_online:
            cfg = self.cfg
            for s in nn:
                rel = relative_distance(nb_d[s], cfg.epsilon_ref_k)
                if rel is None:
                    continue
                rel = round(rel, ROUND)
                if floors[s][1]:
                    tested[s] = rel
                    ref[s] = reference_distance(nb_d[s], cfg.epsilon_ref_k)
                online.observe_nn(s, rel, cfg.epsilon_warmup, cfg.epsilon_false_flags)
        close = [tested[s] is not None and tested[s] < eps[s] for s in nn]  # type: ignore[operator]
        is_dup = all(close) if self.cfg.duplicate_mode == "all" else any(close)
        if is_dup and close:
            verdict.decision, verdict.reason = "rejected", "duplicate"
            # the spaces that tested close (all of them, or any one under duplicate_mode any)
            near_in = [s for s, c in zip(nn, close, strict=True) if c]
            by = self.label_space if self.label_space in near_in else near_in[0]
            verdict.duplicate_of = self._nearest_id(nb_ids, lookup, by)
            rk = self.cfg.epsilon_ref_k
            near = ", ".join(
                f"{s} {nn[s]:.3g} < {eps[s]:.3g} x {ref[s]:.3g} (neighbour {rk})"
                if s in ref
                else f"{s} {nn[s]:.3g} < {eps[s]:.3g}"
                for s in near_in
            )
            verdict.detail = f"nearest accepted item is closer than epsilon ({near})"
            return verdict

        # Weighted label vote of the nearest accepted neighbours within the radius.
        warm = t.radius is not None or count >= self.clean.neighbour_warmup
        if item.label is not None and self.votes and warm:
            ls = self.label_space
            near_ids = nb_ids[ls][: t.vote_k]
            near_d = nb_d[ls][: t.vote_k]
            if t.radius is not None:
                inside = near_d <= t.radius
                near_ids, near_d = near_ids[inside], near_d[inside]
            voters = [lookup(j) for j in near_ids.tolist()]
            labels = [lbl if votes else None for _, lbl, votes in voters]
            shares = vote_shares(labels, near_d.tolist(), t.vote_scale)
            n_votes = sum(lbl is not None for lbl in labels)
            if shares:
                verdict.vote = {lbl: round(x, 4) for lbl, x in sorted(shares.items())}
                own_share = shares.get(item.label, 0.0)
                if self.cfg.entropy_weight:
                    verdict.gain = round(gain + self.cfg.entropy_weight * (1.0 - own_share), ROUND)
                if n_votes >= self.clean.neighbour_min:
                    top_label, top_share = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))[0]
                    conf = t.confidence
                    # being outvoted is not enough: the label must hold at most the flag share
                    wrong = t.flag_share is None or own_share <= t.flag_share
                    if (
                        wrong
                        and self.relabels
                        and conf is not None
                        and top_label != item.label
                        and top_share >= conf
                    ):
                        verdict.relabel = top_label
                    elif wrong and t.reject_share is not None and own_share <= t.reject_share:
                        verdict.decision, verdict.reason = "rejected", "label_noise"
                        verdict.detail = (
                            f"label {item.label!r} holds {own_share:.0%} of the vote "
                            f"(<= {t.reject_share:.0%}) and no label reaches the confidence"
                        )
                        return verdict

        g = verdict.gain if verdict.gain is not None else gain
        if t.policy == "threshold":
            tau = t.tau or 0.0
            if g < tau:
                verdict.decision, verdict.reason = "rejected", "redundant"
                verdict.duplicate_of = self._nearest_id(nb_ids, lookup)
                verdict.detail = f"gain {g:.4f} < tau {tau:.4f}"
                online.keep_step(False, None)
                return verdict
            online.keep_step(True, None)
        elif t.policy == "sample":
            scale = online.scale if t.keep_fraction is not None else t.g_scale
            if scale is None:  # a budget's first item: the seed's scale, else its own gain's
                seeded = t.g_scale if t.g_scale is not None and t.g_scale > 0 else None
                scale = seeded or max(g, 1e-6) / (t.keep_fraction or 1.0)
                online.scale = scale
            p = min(max(g / scale, 0.0), 1.0)
            verdict.keep_probability = round(p, ROUND)
            verdict.keep_scale = round(scale, ROUND)
            keep = coin(item.id, t.seed) < p
            online.keep_step(keep, t.keep_fraction)
            if not keep:
                verdict.decision, verdict.reason = "rejected", "sampled_out"
                verdict.detail = f"keep probability {p:.4f} = gain {g:.4f} / scale {scale:.4f}"
                return verdict
        else:
            online.keep_step(True, None)
        if verdict.fix is not None:
            verdict.decision, verdict.reason = "relabeled", verdict.fix
        return verdict

    def _nearest_id(
        self, nb_ids: dict[str, np.ndarray], lookup: Lookup, space: str | None = None
    ) -> str | None:
        row = nb_ids.get(space or self.label_space)
        if row is None or not len(row):
            return None
        return lookup(int(row[0]))[0]


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


def _row_means(d: np.ndarray, k: int) -> np.ndarray:
    """Mean of the first ``k`` columns, one summation order for every path (bulk or merged)."""
    means: np.ndarray = np.ascontiguousarray(d[:, :k]).mean(axis=1)
    return means


def _duplicate_id(item: Embedded) -> Verdict:
    return Verdict(
        item,
        "rejected",
        "duplicate_id",
        detail="an item with this id is already in the index",
        duplicate_of=item.id,
    )
