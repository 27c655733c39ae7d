"""Gain, duplicate floor, label vote and keep policies.

For a batch, the index is queried once (multi-threaded) and each item's neighbour set is the
index's k nearest merged with the items kept earlier in the same batch, so a batch decides exactly
as the same items would one at a time. All distances that feed a decision are recomputed in
float64 from the stored float32 vectors, so they do not depend on how the batch was cut.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
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
        q = {s: np.stack([it.vectors[s] for it in batch]).astype(np.float32) for s in spaces}
        # Index neighbours, distances recomputed exactly from the stored vectors.
        idx_ids: dict[str, np.ndarray] = {}
        idx_d: dict[str, np.ndarray] = {}
        for s in spaces:
            labels, _ = st.indexes[s].knn(q[s], k)
            kk = labels.shape[1]
            if kk:
                flat = labels.reshape(-1)
                stored = st.indexes[s].get(flat)
                d = pair_distances(np.repeat(q[s], kk, axis=0), stored).reshape(n, kk)
            else:
                d = np.empty((n, 0), dtype=np.float64)
            idx_ids[s], idx_d[s] = labels, d

        base = st.count
        kept_rows: list[int] = []
        kept_ids: list[str] = []
        kept_labels: list[str | None] = []
        seen_ids: set[str] = set()
        verdicts: list[Verdict] = []
        for i, item in enumerate(batch):
            if item.id in st or item.id in seen_ids:
                verdicts.append(
                    Verdict(
                        item,
                        "rejected",
                        "duplicate_id",
                        detail="an item with this id is already in the index",
                    )
                )
                continue
            nb_ids: dict[str, np.ndarray] = {}
            nb_d: dict[str, np.ndarray] = {}
            for s in spaces:
                ids = idx_ids[s][i]
                ds = idx_d[s][i]
                if kept_rows:
                    intra = pair_distances(q[s][i], q[s][kept_rows])
                    ids = np.concatenate([ids, np.arange(base, base + len(kept_rows))])
                    ds = np.concatenate([ds, intra])
                order = np.lexsort((ids, ds))[:k]
                nb_ids[s], nb_d[s] = ids[order], ds[order]
            v = self._judge(item, nb_ids, nb_d, kept_labels, base)
            verdicts.append(v)
            if v.decision != "rejected":
                kept_rows.append(i)
                kept_ids.append(item.id)
                kept_labels.append(item.label)
                seen_ids.add(item.id)
        if commit and kept_rows:
            st.add(kept_ids, {s: q[s][kept_rows] for s in spaces}, kept_labels)
        return verdicts

    def _neighbour_labels(
        self, ids: np.ndarray, kept_labels: list[str | None], base: int
    ) -> list[str | None]:
        out: list[str | None] = []
        for j in ids.tolist():
            out.append(self.state.labels[j] if j < base else kept_labels[j - base])
        return out

    def _judge(
        self,
        item: Embedded,
        nb_ids: dict[str, np.ndarray],
        nb_d: dict[str, np.ndarray],
        kept_labels: list[str | None],
        base: int,
    ) -> Verdict:
        t = self.t
        gains: dict[str, float | None] = {}
        nn: dict[str, float | None] = {}
        for s, d in nb_d.items():
            if len(d):
                gains[s] = round(float(d.mean()), ROUND)
                nn[s] = round(float(d[0]), ROUND)
            else:
                gains[s] = NO_NEIGHBOUR_GAIN
                nn[s] = None
        gain = round(float(np.mean([g for g in gains.values() if g is not None])), ROUND)
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
            near = nb_ids[ls] if t.radius is None else nb_ids[ls][nb_d[ls] <= t.radius]
            nb_labels = self._neighbour_labels(near, kept_labels, base)
            votes = _vote(nb_labels)
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
