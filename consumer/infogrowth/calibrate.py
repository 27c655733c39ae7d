"""Thresholds fitted on a known-clean seed set, and their resolution against the config.

Seed statistics are exact (brute force): each seed item's k nearest *other* seed items give its
leave-one-out gain and nearest-neighbour distance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infogrowth.config import Settings
from infogrowth.errors import ConfigError
from infogrowth.schema import SPACES, Embedded
from infogrowth.select import NO_NEIGHBOUR_GAIN, ROUND, Thresholds

log = logging.getLogger(__name__)

MAX_SEED_STATS = 20_000
"""Seed items used for statistics; larger seeds are thinned deterministically."""
DUPLICATE_DISTANCE = 1e-6
"""Seed items this close (in every space) to an earlier seed item are copies: left out of the
statistics, so the ε floor is never fitted to a copy's distance of zero."""
VOTE_ROUNDS = 10
CONFIDENCE_GRID = tuple(round(0.55 + 0.05 * i, 2) for i in range(10))
FLAG_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
"""Own-label vote shares tried as the flag share, most permissive first."""
MIN_CALIBRATION_FLAGS = 5
"""A setting needs at least this many flags in the calibration to count as measured."""
SHUFFLES = 3


@dataclass
class VoteCalibration:
    """The neighbour vote's settings and what they measured on the seed with synthetic flips."""

    confidence: float | None
    reject_share: float | None
    radius: float | None
    scale: float | None
    flag_share: float | None = None
    """Own-label share at or below which a label counts as wrong (relabel or reject); None:
    relabels need only the confidence."""
    relabel_precision: float | None = None
    flag_precision: float | None = None
    clean_flagged: float | None = None
    noisy_caught: float | None = None
    note: str = ""

    def as_record(self) -> dict[str, Any]:
        return {
            "confidence": self.confidence,
            "flag_share": self.flag_share,
            "reject_share": self.reject_share,
            "radius": self.radius,
            "scale": self.scale,
            "relabel_precision": self.relabel_precision,
            "flag_precision": self.flag_precision,
            "clean_flagged": self.clean_flagged,
            "noisy_caught": self.noisy_caught,
            "note": self.note,
        }


@dataclass
class SeedStats:
    count: int = 0
    duplicates: int = 0
    alignments: list[float] = field(default_factory=list)
    mismatched: list[float] = field(default_factory=list)
    """Alignments of seed images with other seed items' captions (the negatives for δ)."""
    gains: list[float] = field(default_factory=list)
    nn: dict[str, list[float]] = field(default_factory=dict)
    knn_mean: dict[str, list[float]] = field(default_factory=dict)
    kth: dict[str, list[float]] = field(default_factory=dict)
    """Distance to the ``clean.neighbour_k``-th nearest other seed item, per space."""
    neighbours: dict[str, np.ndarray] = field(default_factory=dict)
    """Row indices of each item's ``clean.neighbour_k`` nearest others, sorted, per space."""
    neighbour_d: dict[str, np.ndarray] = field(default_factory=dict)
    labels: list[str | None] = field(default_factory=list)
    vote: VoteCalibration | None = None
    copy_distances: list[float] = field(default_factory=list)
    """Image-space distances of augmented copies of seed images to their originals."""


def _dedupe(items: list[Embedded], spaces: Sequence[str]) -> tuple[list[Embedded], int]:
    """Drop items that repeat an earlier one (same id, or closer than DUPLICATE_DISTANCE in
    every space)."""
    seen: set[str] = set()
    out = [it for it in items if not (it.id in seen or seen.add(it.id))]  # type: ignore[func-returns-value]
    if len(out) < 2 or not spaces:
        return out, len(items) - len(out)
    mats = {s: np.stack([it.vectors[s] for it in out]).astype(np.float64) for s in spaces}
    n = len(out)
    dup = np.zeros(n, dtype=bool)
    for lo in range(0, n, 1024):
        hi = min(lo + 1024, n)
        close = np.ones((hi - lo, n), dtype=bool)
        for s in spaces:
            close &= (1.0 - mats[s][lo:hi] @ mats[s].T) <= DUPLICATE_DISTANCE
        close &= np.tri(hi - lo, n, lo - 1, dtype=bool)  # earlier items only
        dup[lo:hi] = close.any(axis=1)
    kept = [it for it, d in zip(out, dup.tolist(), strict=True) if not d]
    return kept, len(items) - len(kept)


def seed_stats(
    seed: Sequence[Embedded], spaces: Sequence[str], k: int, vote_k: int | None = None
) -> SeedStats:
    """Leave-one-out gains, nearest-neighbour distances, neighbour lists and pair alignments of
    the (deduplicated) seed items."""
    items = list(seed)
    if len(items) > MAX_SEED_STATS:
        step = len(items) / MAX_SEED_STATS
        items = [items[int(i * step)] for i in range(MAX_SEED_STATS)]
    items, dups = _dedupe(items, spaces)
    stats = SeedStats(count=len(seed), duplicates=dups)
    if dups:
        log.info("seed: %d duplicate items left out of the calibration", dups)
    stats.alignments = [it.alignment for it in items if it.alignment is not None]
    stats.labels = [it.label for it in items]
    if "image" in spaces and "text" in spaces:
        stats.mismatched = _mismatched(items)
    n = len(items)
    if n < 2:
        return stats
    vk = max(vote_k or 0, 1)
    per_space_gain = []
    for s in spaces:
        m = np.stack([it.vectors[s] for it in items]).astype(np.float64)
        kk = min(k, n - 1)
        kv = min(vk, n - 1)
        kmax = max(kk, kv)
        gains = np.empty(n)
        nn = np.empty(n)
        nb = np.empty((n, kmax), dtype=np.int64)
        nb_d = np.empty((n, kmax))
        for lo in range(0, n, 1024):
            d = 1.0 - m[lo : lo + 1024] @ m.T
            rows = np.arange(lo, min(lo + 1024, n))
            d[rows - lo, rows] = np.inf
            idx = np.argpartition(d, kmax - 1, axis=1)[:, :kmax]
            part = np.take_along_axis(d, idx, axis=1)
            order = np.lexsort((idx, part), axis=1)
            idx = np.take_along_axis(idx, order, axis=1)
            part = np.take_along_axis(part, order, axis=1)
            gains[lo : lo + len(rows)] = part[:, :kk].mean(axis=1)
            nn[lo : lo + len(rows)] = part[:, 0]
            nb[lo : lo + len(rows)] = idx
            nb_d[lo : lo + len(rows)] = part
        per_space_gain.append(gains)
        stats.nn[s] = nn.tolist()
        stats.knn_mean[s] = gains.tolist()
        stats.kth[s] = nb_d[:, kv - 1].tolist()
        stats.neighbours[s] = nb[:, :kv]
        stats.neighbour_d[s] = nb_d[:, :kv]
    stats.gains = np.mean(per_space_gain, axis=0).tolist()
    return stats


def _mismatched(items: Sequence[Embedded]) -> list[float]:
    """cos(image_i, text_j) for j a fixed derangement of i (several shuffles)."""
    both = [it for it in items if "image" in it.vectors and "text" in it.vectors]
    n = len(both)
    if n < 2:
        return []
    img = np.stack([it.vectors["image"] for it in both]).astype(np.float64)
    txt = np.stack([it.vectors["text"] for it in both]).astype(np.float64)
    rng = np.random.default_rng(0)
    out: list[float] = []
    for _ in range(SHUFFLES):
        perm = rng.permutation(n)
        partner = np.empty(n, dtype=np.int64)
        partner[perm] = np.roll(perm, 1)  # a derangement: nobody keeps their own caption
        out.extend(np.einsum("ij,ij->i", img, txt[partner]).tolist())
    return out


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), ROUND)


def calibrate_delta(
    matched: Sequence[float], mismatched: Sequence[float], false_flags: float
) -> float:
    """δ that flags at most ``false_flags`` of matched pairs and as many mismatched ones as that
    allows; within the range of equal detection, its middle."""
    a = np.sort(np.asarray(matched, dtype=np.float64))
    allowed = int(np.floor(false_flags * len(a)))
    t_max = float(a[min(allowed, len(a) - 1)])
    neg = np.asarray(mismatched, dtype=np.float64)
    below = neg[neg < t_max]
    t_low = float(below.max()) if len(below) else float(a[0])
    t_low = min(t_low, t_max)
    return round((t_low + t_max) / 2, ROUND)


def weighted_shares(
    labels: np.ndarray, d: np.ndarray, valid: np.ndarray, scale: float | None, n_labels: int
) -> np.ndarray:
    """(n, n_labels) vote shares: voter weight ``1 / (d + scale)`` (equal without a scale)."""
    w = np.where(valid, 1.0 / (d + scale) if scale is not None else 1.0, 0.0)
    out = np.zeros((len(labels), n_labels))
    rows = np.repeat(np.arange(len(labels)), labels.shape[1])
    np.add.at(out, (rows, np.where(valid, labels, 0).reshape(-1)), w.reshape(-1))
    tot = out.sum(axis=1, keepdims=True)
    shares: np.ndarray = np.divide(out, tot, out=np.zeros_like(out), where=tot > 0)
    return shares


@dataclass
class FlipTrial:
    """The seed with synthetic label flips, voted on leave-one-out: ``rounds`` holds per round
    (flipped mask, noisy labels, vote shares (n, classes), top class)."""

    truth: np.ndarray
    radius: float | None
    scale: float
    enough: np.ndarray
    rounds: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def flip_trial(settings: Settings, stats: SeedStats, space: str) -> FlipTrial | None:
    """``VOTE_ROUNDS`` rounds of ``clean.calibration_noise`` flips on the seed, each voted with
    the stream's rule (radius, weights, ``neighbour_min``); None without labelled classes."""
    c = settings.clean
    labelled = [lbl for lbl in stats.labels if lbl is not None]
    if space not in stats.neighbours or len(labelled) < 2 or len(labelled) < len(stats.labels):
        return None
    names = sorted(set(labelled))
    if len(names) < 2:
        return None
    code = {name: i for i, name in enumerate(names)}
    y = np.asarray([code[lbl] for lbl in labelled], dtype=np.int64)
    nb = stats.neighbours[space]
    nb_d = stats.neighbour_d[space]
    radius = c.neighbour_radius
    if radius is None:
        radius = _pct(stats.kth[space], c.neighbour_radius_percentile)
    scale = max(float(np.median(np.asarray(stats.nn[space]))), 1e-6)
    valid = nb_d <= (radius if radius is not None else np.inf)
    enough = valid.sum(axis=1) >= c.neighbour_min
    n, n_lab = len(y), len(names)
    rounds = []
    for r in range(VOTE_ROUNDS):
        rng = np.random.default_rng(np.random.SeedSequence([2405, r]))
        flip = rng.random(n) < c.calibration_noise
        noisy = y.copy()
        noisy[flip] = (y[flip] + rng.integers(1, n_lab, size=int(flip.sum()))) % n_lab
        shares = weighted_shares(noisy[nb], nb_d, valid, scale, n_lab)
        rounds.append((flip, noisy, shares, np.argmax(shares, axis=1)))
    return FlipTrial(y, radius, scale, enough, rounds)


def vote_flags(
    trial: FlipTrial,
    noisy: np.ndarray,
    shares: np.ndarray,
    top: np.ndarray,
    *,
    confidence: float | None,
    flag_share: float | None,
    reject_share: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(relabel, reject) masks of one flip-trial round under the stream's rule (Selector).

    A label counts as wrong when its own share is at most ``flag_share`` (any share without
    one); a wrong label is relabelled when another label reaches ``confidence``, else rejected
    as ``label_noise`` when its share is at most ``reject_share``."""
    n = len(noisy)
    own = shares[np.arange(n), noisy]
    wrong = trial.enough.copy()
    if flag_share is not None:
        wrong &= own <= flag_share
    relabel = np.zeros(n, dtype=bool)
    if confidence is not None:
        relabel = wrong & (top != noisy) & (shares[np.arange(n), top] >= confidence)
    rejected = np.zeros(n, dtype=bool)
    if reject_share is not None:
        rejected = wrong & ~relabel & (own <= reject_share)
    return relabel, rejected


def calibrate_vote(settings: Settings, stats: SeedStats, space: str) -> VoteCalibration | None:
    """Pick the vote's flag share and confidence on the seed with synthetic label flips.

    Every round flips ``clean.calibration_noise`` of the seed labels to another class (voters
    carry flipped labels too: the pessimistic case), votes leave-one-out with the stream's rule,
    and counts right and wrong flags and relabels. First *which labels are wrong*: the largest
    own-label share at or below which flagged labels are wrong at least ``target_precision`` of
    the time while at most ``max_clean_flagged`` of clean items are flagged. Then *what to do
    with them*: the least strict confidence whose relabels are right at least
    ``target_precision`` of the time; the rest are rejected as ``label_noise`` (with
    ``reject_unfixable_labels``). Where no share meets the targets, relabels need only the
    confidence (the clean-item budget then applies to them). Explicit settings win.
    """
    c = settings.clean
    trial = flip_trial(settings, stats, space)
    if trial is None:
        return None
    y, rounds = trial.truth, trial.rounds

    def measure(
        conf: float | None, share: float | None, reject: float | None
    ) -> tuple[int, int, int, int, int, int, int]:
        rel = rel_ok = flags = flags_ok = clean_flag = clean_n = noisy_n = 0
        for flip, noisy, shares, top in rounds:
            relabel, rejected = vote_flags(
                trial, noisy, shares, top, confidence=conf, flag_share=share, reject_share=reject
            )
            flagged = relabel | rejected
            rel += int(relabel.sum())
            rel_ok += int((relabel & (top == y)).sum())
            flags += int(flagged.sum())
            flags_ok += int((flagged & flip).sum())
            clean_flag += int((flagged & ~flip).sum())
            clean_n += int((~flip).sum())
            noisy_n += int(flip.sum())
        return rel, rel_ok, flags, flags_ok, clean_flag, clean_n, noisy_n

    def meets(prec_num: int, prec_den: int, clean_flag: int, clean_n: int) -> bool:
        if prec_den < MIN_CALIBRATION_FLAGS:
            return False
        return (
            prec_num / prec_den >= c.target_precision
            and clean_flag <= c.max_clean_flagged * clean_n
        )

    def flags_meet(conf: float | None, gate: float, cand: float) -> bool:
        _, _, flags, flags_ok, clean_flag, clean_n, _ = measure(conf, gate, cand)
        return meets(flags_ok, flags, clean_flag, clean_n)

    def relabels_meet(cand: float) -> bool:
        rel, rel_ok, _, _, clean_flag, clean_n, _ = measure(cand, share, None)
        return meets(rel_ok, rel, clean_flag, clean_n)

    notes = []
    share = c.flag_share
    if share is None:
        share = next((s for s in sorted(FLAG_GRID, reverse=True) if flags_meet(None, s, s)), None)
        if share is None:
            off = "label_noise rejection is off and " if c.reject_share is None else ""
            notes.append(
                f"no own-label share flags seed flips with precision >= {c.target_precision:.0%}"
                f" while flagging <= {c.max_clean_flagged:.0%} of clean items: {off}relabels "
                "need only the confidence"
            )
    conf = c.neighbour_confidence if c.fixer in ("auto", "neighbours") else None
    if conf is None and c.fixer in ("auto", "neighbours"):
        conf = next((x for x in CONFIDENCE_GRID if relabels_meet(x)), None)
        if conf is None:
            notes.append(
                f"no vote confidence relabels seed flips with precision >= {c.target_precision:.0%}"
                f" while touching <= {c.max_clean_flagged:.0%} of clean items: relabelling is off"
            )
    reject = c.reject_share
    if reject is None and c.reject_unfixable_labels and share is not None:
        if c.flag_share is None:
            reject = share  # calibrated above: its flags met the targets
        else:  # an explicit flag share (1.0: the majority rule) bounds the search
            grid = sorted((r for r in FLAG_GRID if r <= share), reverse=True)
            reject = next((r for r in grid if flags_meet(conf, share, r)), None)
            if reject is None:
                notes.append("no reject share meets the targets: label_noise rejection is off")
    if not c.reject_unfixable_labels:
        reject = None
    if reject is not None and share is not None and reject > share:
        notes.append(
            f"clean.reject_share {reject:g} is above the flag share {share:g}: a label above "
            "the flag share is not wrong, so label_noise rejects at the flag share"
        )
    rel, rel_ok, flags, flags_ok, clean_flag, clean_n, noisy_n = measure(conf, share, reject)
    return VoteCalibration(
        confidence=conf,
        flag_share=share,
        reject_share=reject,
        radius=trial.radius,
        scale=round(trial.scale, ROUND),
        relabel_precision=round(rel_ok / rel, 4) if rel else None,
        flag_precision=round(flags_ok / flags, 4) if flags else None,
        clean_flagged=round(clean_flag / clean_n, 4) if clean_n else None,
        noisy_caught=round(flags_ok / noisy_n, 4) if noisy_n else None,
        note="; ".join(notes),
    )


def initial_scale(gains: Sequence[float], fraction: float) -> float | None:
    """The scale at which ``mean(clip(g / scale, 0, 1)) = fraction`` over ``gains``."""
    g = np.asarray([x for x in gains if x > 0], dtype=np.float64)
    if len(g) == 0:
        return None
    lo, hi = 1e-12, float(g.max()) / max(fraction, 1e-9) * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if np.minimum(g / mid, 1.0).mean() > fraction:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, ROUND)


def label_space(settings: Settings, spaces: Sequence[str]) -> str:
    ls = settings.select.label_space
    if ls != "auto" and ls in spaces:
        return ls
    return "image" if "image" in spaces else spaces[0]


def resolve_thresholds(
    settings: Settings, spaces: Sequence[str], stats: SeedStats | None
) -> Thresholds:
    """Config values win; the seed calibrates what the config leaves open."""
    sel = settings.select
    cl = settings.clean
    delta = cl.delta
    if delta is None and stats is not None and stats.alignments and cl.enabled:
        if cl.delta_percentile is not None or not stats.mismatched:
            delta = _pct(stats.alignments, cl.delta_percentile or 100 * cl.delta_false_flags)
        else:
            delta = calibrate_delta(stats.alignments, stats.mismatched, cl.delta_false_flags)

    eps: dict[str, float] = {}
    # auto: a seed that measured known copies (augmented images) fixes ε; otherwise the stream's
    # own distances do, the seed's value serving only through the warm-up.
    measured = stats is not None and bool(stats.copy_distances) and bool(stats.nn.get("image"))
    online = sel.epsilon is None and (
        sel.epsilon_mode == "online" or (sel.epsilon_mode == "auto" and not measured)
    )
    for s in SPACES:  # every space, so records do not depend on which ones a run has
        if sel.epsilon is not None:
            eps[s] = sel.epsilon
        elif s == "image" and stats is not None and stats.copy_distances and stats.nn.get(s):
            eps[s] = _epsilon_from_copies(stats.copy_distances, stats.nn[s], sel.epsilon_percentile)
        elif stats is not None and stats.nn.get(s):
            p = _pct(stats.nn[s], sel.epsilon_percentile)
            raw = round((p or 0.0) * sel.epsilon_fraction, ROUND)
            if raw <= 0:
                log.warning(
                    "ε for %s calibrated to %s (seed items at distance 0): the floor is off", s, raw
                )
            eps[s] = max(0.0, raw)
        elif not online:
            eps[s] = sel.epsilon_default
        # online without a seed value: no entry, the warm-up is relative
        # (select.epsilon_warmup_ratio), a raw distance would depend on the embedding's scale

    policy = sel.policy
    if policy == "auto":
        policy = "sample" if (sel.keep_fraction is not None or sel.g_scale is not None) else "all"
    g_scale = sel.g_scale
    if policy == "sample" and g_scale is None and sel.keep_fraction is None:
        raise ConfigError("select.policy=sample needs select.keep_fraction or select.g_scale")
    if policy == "sample" and g_scale is None and stats is not None and stats.gains:
        assert sel.keep_fraction is not None
        g_scale = initial_scale(stats.gains, sel.keep_fraction)
    tau = sel.tau
    if tau is None and stats is not None and stats.gains and policy == "threshold":
        tau = _pct(stats.gains, sel.tau_percentile)
    if policy == "threshold" and tau is None:
        tau = 0.0

    vote: VoteCalibration | None = None
    if stats is not None and cl.fixer in ("auto", "neighbours", "none"):
        vote = calibrate_vote(settings, stats, label_space(settings, spaces))
        stats.vote = vote
        if vote is not None and vote.note:
            log.warning("label vote: %s", vote.note)
    if vote is None:
        # No seed to check the vote against: only explicitly configured rules run.
        reject = cl.reject_share
        if reject is None and cl.flag_share is not None and cl.flag_share < 1.0:
            reject = cl.flag_share
        elif reject is None and cl.neighbour_confidence is not None:
            reject = 0.0
        vote = VoteCalibration(
            confidence=cl.neighbour_confidence,
            flag_share=cl.flag_share,
            reject_share=reject,
            radius=cl.neighbour_radius,
            scale=None,
        )
    return Thresholds(
        policy=policy,
        k=sel.k,
        epsilon=eps,
        epsilon_online=online,
        delta=delta if cl.enabled else None,
        g_scale=g_scale,
        keep_fraction=sel.keep_fraction if policy == "sample" else None,
        tau=tau,
        seed=sel.seed,
        radius=vote.radius,
        vote_k=cl.neighbour_k,
        confidence=vote.confidence if cl.fixer in ("auto", "neighbours") else None,
        flag_share=vote.flag_share,
        reject_share=vote.reject_share if cl.reject_unfixable_labels else None,
        vote_scale=vote.scale,
        alignment_quartiles=_quartiles(stats.alignments) if stats is not None else None,
    )


def _epsilon_from_copies(copies: Sequence[float], nn: Sequence[float], pct: float) -> float:
    """ε between known copies and originals: above the 99th percentile of augmented-copy
    distances (copies caught) and below the ``pct`` percentile of the seed's nearest-neighbour
    distances (originals spared), at the geometric middle of that gap. When the two overlap the
    originals win (ε at their percentile) and the conflict is logged."""
    hi = float(np.percentile(np.asarray(copies, dtype=np.float64), 99))
    lo = float(np.percentile(np.asarray(nn, dtype=np.float64), pct))
    if lo <= 0:
        return max(0.0, round(hi, ROUND))
    if hi >= lo:
        log.warning(
            "image ε: augmented copies reach %.4g, beyond the seed originals' %.3g-th percentile "
            "nearest-neighbour distance %.4g; ε = %.4g spares the originals and lets some copies "
            "through",
            hi,
            pct,
            lo,
            lo,
        )
        return float(math.floor(lo * 10.0**ROUND) / 10.0**ROUND)  # rounding up could catch it
    return round(float(np.sqrt(max(hi, 1e-12) * lo)), ROUND)


def _quartiles(values: Sequence[float]) -> tuple[float, float, float] | None:
    if len(values) < 20:
        return None
    q = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return (round(float(q[0]), ROUND), round(float(q[1]), ROUND), round(float(q[2]), ROUND))


__all__ = [
    "NO_NEIGHBOUR_GAIN",
    "FlipTrial",
    "SeedStats",
    "flip_trial",
    "resolve_thresholds",
    "seed_stats",
]


@dataclass
class Calibration:
    """What ``infogrowth seed`` publishes and every replica reads: thresholds fixed at seed time,
    the embedding layout and the cell routing."""

    thresholds: Thresholds
    spaces: tuple[str, ...]
    dims: dict[str, int]
    seed_count: int = 0
    fingerprint: str | None = None
    cells: dict[str, Any] | None = None
    epoch: int = 0
    """Bumped by every ``seed --reset``; embedded and changelog records and snapshots carry the
    epoch they were made under (0: no calibration, or one published before epochs existed)."""
