"""Decisions at package defaults: the keep budget, the online ε, the seed-checked label vote,
δ from shuffled pairs, and the explanations every non-accept carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infogrowth import snapshot
from infogrowth.calibrate import calibrate_delta, resolve_thresholds, seed_stats
from infogrowth.errors import ConfigError
from infogrowth.messages import Outcome
from infogrowth.online import (
    EPS_BINS,
    EpsilonEstimate,
    OnlineState,
    mixture_epsilon,
    relative_distance,
)
from infogrowth.pipeline import Curator
from infogrowth.schema import Embedded
from tests.fixtures.data import clustered
from tests.fixtures.helpers import curate_rows, make_settings, to_samples

run = curate_rows


def key(o: Outcome) -> tuple[Any, ...]:
    return (
        o.id,
        o.decision,
        o.reason,
        o.gain,
        o.label,
        o.keep_probability,
        o.keep_scale,
        o.duplicate_of,
        tuple(sorted((o.vote or {}).items())),
    )


def copy_at(v: np.ndarray, distance: float, rng: np.random.Generator) -> list[float]:
    """A unit vector at cosine distance ``distance`` from unit vector ``v``, in a random
    direction."""
    w = rng.normal(size=len(v))
    w -= (w @ v) * v
    w /= np.linalg.norm(w)
    ang = np.arccos(1 - distance)
    return (np.cos(ang) * v + np.sin(ang) * w).tolist()  # type: ignore[no-any-return]


def near_copies(n: int, seed: int, distance: float = 0.002) -> list[dict[str, Any]]:
    """Originals with a near-copy each (cosine distance about ``distance``), interleaved."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        v = rng.normal(size=48)
        v /= np.linalg.norm(v)
        rows.append({"id": f"o{i}", "embedding": {"text": v.tolist()}})
        if i % 4 == 3:
            rows.append({"id": f"c{i}", "embedding": {"text": copy_at(v, distance, rng)}})
    return rows


# -- defaults -----------------------------------------------------------------------------------


def test_default_policy_keeps_everything_that_passes() -> None:
    seed = clustered(100, seed=14, prefix="seed").samples
    data = clustered(600, seed=15)
    out, cur = run(data.samples, 64, seed)
    assert cur.thresholds is not None and cur.thresholds.policy == "all"
    assert not any(o.reason in ("sampled_out", "redundant") for o in out)


def test_config_rejects_vote_min_above_vote_k() -> None:
    with pytest.raises(ConfigError, match=r"clean\.neighbour_min"):
        make_settings(**{"clean.neighbour_min": 12, "clean.neighbour_k": 10})
    with pytest.raises(ConfigError, match=r"select\.keep_fraction"):
        make_settings(**{"select.policy": "sample"})


# -- keep budget ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seeded", [True, False])
def test_keep_fraction_is_met(seeded: bool) -> None:
    seed = clustered(150, seed=20, prefix="seed").samples if seeded else None
    data = clustered(3000, seed=21)
    out, cur = run(data.samples, 128, seed, **{"select.keep_fraction": 0.3, "clean.fixer": "none"})
    reached = [o for o in out if o.keep_probability is not None]
    kept = [o for o in reached if o.decision != "rejected"]
    assert abs(len(kept) / len(reached) - 0.3) <= 0.02
    online = cur.report_online()
    assert online["seen"] == len(reached) and online["kept"] == len(kept)
    dropped = [o for o in out if o.reason == "sampled_out"]
    assert dropped and all(o.keep_scale and "scale" in (o.detail or "") for o in dropped)


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_keep_fraction_batched_equals_sequential(batch: int) -> None:
    data = clustered(500, dup_rate=0.1, seed=22)
    seed = clustered(60, seed=23, prefix="seed").samples
    cfg = {"select.keep_fraction": 0.4}
    reference = [key(o) for o in run(data.samples, 1, seed, **cfg)[0]]
    assert [key(o) for o in run(data.samples, batch, seed, **cfg)[0]] == reference


# -- online ε -----------------------------------------------------------------------------


def test_online_epsilon_spends_the_stated_false_flag_rate() -> None:
    """Overlapping modes: ε flags about ``false_flags`` of the originals (not more) and
    catches the copies up to there; a larger rate catches more copies."""
    rng = np.random.default_rng(0)
    originals = 10 ** rng.normal(-1.0, 0.3, size=4000)
    copies = 10 ** rng.normal(-2.5, 0.4, size=600)
    flagged = {}
    for rate in (0.01, 0.05):
        est = OnlineState()
        for d in rng.permutation(np.concatenate([originals, copies])):
            est.observe_nn("text", float(d), 100, rate)
        eps = est.epsilon("text", 0.02, 100)
        flagged[rate] = (float(np.mean(originals < eps)), float(np.mean(copies < eps)))
        assert 0.3 * rate <= flagged[rate][0] <= 1.3 * rate
    assert flagged[0.05][1] > flagged[0.01][1] > 0.9


def test_online_epsilon_well_separated_modes() -> None:
    rng = np.random.default_rng(1)
    est = OnlineState()
    originals = 10 ** rng.normal(-1.0, 0.15, size=2000)
    copies = 10 ** rng.normal(-3.0, 0.3, size=400)
    for d in rng.permutation(np.concatenate([originals, copies])):
        est.observe_nn("text", float(d), 100, 0.02)
    eps = est.epsilon("text", 0.02, 100)
    assert np.mean(copies < eps) > 0.99
    assert np.mean(originals < eps) <= 0.02


def test_online_epsilon_without_copies_flags_nothing() -> None:
    rng = np.random.default_rng(2)
    originals = 10 ** rng.normal(-1.0, 0.15, size=2000)
    only = np.zeros(EPS_BINS)
    for d in originals:
        only[int((np.log10(d) + 6) / (np.log10(2) + 6) * EPS_BINS)] += 1
    assert mixture_epsilon(only, 0.02) < originals.min()
    # a few copies are not a mode: still nothing flagged among the originals
    few = only.copy()
    few[30] += 5
    assert mixture_epsilon(few, 0.02) < originals.min()


def test_online_epsilon_skewed_originals_stay_within_the_rate() -> None:
    """Relative distances of originals pile up below 1 with a long low tail that no Gaussian
    fits; the copies mode must not claim that tail, or ε spends more than the stated rate."""
    rng = np.random.default_rng(3)
    originals = 10 ** -np.abs(rng.gamma(1.5, 0.12, size=8000))
    copies = 10 ** rng.normal(-1.6, 0.4, size=900)
    est = OnlineState()
    for d in rng.permutation(np.concatenate([originals, copies])):
        est.observe_nn("image", float(min(d, 1.0)), 200, 0.02)
    eps = est.epsilon("image", 0.02, 200)
    assert np.mean(originals < eps) <= 0.02
    assert np.mean(copies < eps) >= 0.97


def test_relative_distance() -> None:
    assert relative_distance(np.asarray([0.01, 0.02, 0.03, 0.05, 0.09]), 4) == pytest.approx(0.2)
    assert relative_distance(np.asarray([0.01, 0.04]), 4) == pytest.approx(0.25)  # fewer: last
    assert relative_distance(np.asarray([3e-7, 0.1, 0.2, 0.3]), 4) == 0.0  # an exact copy
    assert relative_distance(np.asarray([0.05]), 4) == 1.0
    assert relative_distance(np.empty(0), 4) is None


def test_an_estimate_of_another_statistic_starts_afresh() -> None:
    est = OnlineState()
    for d in np.linspace(0.01, 0.9, 300):
        est.observe_nn("text", float(d), 100, 0.02)
    rec = est.as_record()
    assert OnlineState.from_record(rec).as_record() == rec
    old = {**rec["eps"]["text"]}
    del old["stat"]  # written by a version that histogrammed raw nearest distances
    assert EpsilonEstimate.from_record(old).count == 0


def dense_and_sparse(n: int, seed: int) -> list[dict[str, Any]]:
    """Half the originals in tight clusters (nearest neighbour ~0.002-0.004 away), half spread
    out, and a copy of every fourth spread-out original at distance 0.003: as close to it as
    the dense originals are to each other."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 48))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if i % 2:
            v = centres[rng.integers(len(centres))] + rng.normal(0, 0.009, size=48)
            v /= np.linalg.norm(v)
            rows.append({"id": f"o{i}", "embedding": {"text": v.tolist()}})
            continue
        v = rng.normal(size=48)
        v /= np.linalg.norm(v)
        rows.append({"id": f"o{i}", "embedding": {"text": v.tolist()}})
        if i % 8 == 6:
            rows.append({"id": f"c{i}", "embedding": {"text": copy_at(v, 0.003, rng)}})
    return rows


def test_online_floor_is_relative_to_local_density() -> None:
    """Copies of spread-out items at the distance dense originals keep from each other: a raw
    distance cannot tell them apart, the nearest-to-reference ratio does. A seed of vectors
    (no copies measured: ε still online) gives the index its dense regions from the start."""
    rows = dense_and_sparse(2800, seed=6)
    seed = [{**r, "id": "seed-" + r["id"]} for r in rows[:400] if r["id"].startswith("o")]
    out, cur = run(rows[400:], 64, seed)
    assert cur.thresholds is not None and cur.thresholds.epsilon_online
    late = out[len(out) // 5 :]  # after the warm-up (the seed's distance floor)
    copies = [o for o in late if o.id.startswith("c")]
    assert sum(o.reason == "duplicate" for o in copies) >= 0.97 * len(copies)
    dense = [o for o in out if o.id.startswith("o") and int(o.id[1:]) % 2]
    assert sum(o.reason == "duplicate" for o in dense) <= 0.02 * len(dense)
    dup = next(o for o in copies if o.reason == "duplicate")
    assert dup.duplicate_of == "o" + dup.id[1:] and "neighbour 4" in (dup.detail or "")


def test_the_warm_up_does_not_take_originals_of_a_dense_embedding() -> None:
    """No seed and a dense embedding (nearest neighbours ~0.01 apart, below the 0.02 a raw
    distance default would use): the warm-up's relative floor keeps the originals."""
    rng = np.random.default_rng(8)
    base = rng.normal(size=48)
    base /= np.linalg.norm(base)
    rows = []
    for i in range(300):
        v = base + rng.normal(0, 0.015, size=48)
        rows.append({"id": f"o{i}", "embedding": {"text": (v / np.linalg.norm(v)).tolist()}})
    out, _ = run(rows, 32)
    assert out[0].nn_distance["text"] is None and out[50].nn_distance["text"] < 0.02  # type: ignore[index, operator]
    assert sum(o.reason == "duplicate" for o in out) <= 0.02 * len(out)


def test_unseeded_stream_catches_near_copies() -> None:
    rows = near_copies(1600, seed=1)
    out, cur = run(rows, 64)
    assert cur.thresholds is not None and cur.thresholds.epsilon_online
    copies = [o for o in out if o.id.startswith("c")]
    late = copies[len(copies) // 4 :]  # after the warm-up
    assert sum(o.reason == "duplicate" for o in late) >= 0.98 * len(late)
    originals = [o for o in out if o.id.startswith("o")]
    assert sum(o.reason == "duplicate" for o in originals) <= 0.01 * len(originals)
    dup = next(o for o in late if o.reason == "duplicate")
    assert dup.duplicate_of == "o" + dup.id[1:]
    assert cur.report_online()["epsilon"]["text"] > 0


def test_seed_without_measured_copies_warms_up_then_follows_the_stream() -> None:
    """A seed of precomputed vectors cannot measure copies: its ε only serves the warm-up."""
    settings = make_settings()
    stats = seed_stats(_embedded(near_copies(300, seed=5)), ("text",), 4, 10)
    t = resolve_thresholds(settings, ("text",), stats)
    assert t.epsilon_online and t.epsilon["text"] > 0
    online = OnlineState()
    selector_eps = t.epsilon["text"]
    assert online.epsilon("text", selector_eps, settings.select.epsilon_warmup) == selector_eps
    stats.copy_distances = [1e-4] * 50  # augmented image copies measured: the seed fixes ε
    stats.nn["image"] = list(stats.nn["text"])
    assert not resolve_thresholds(settings, ("text",), stats).epsilon_online
    fixed = make_settings(**{"select.epsilon_mode": "seed"})
    assert not resolve_thresholds(fixed, ("text",), stats).epsilon_online


@pytest.mark.parametrize("batch", [1, 13, 200])
def test_online_epsilon_batched_equals_sequential(batch: int) -> None:
    rows = near_copies(500, seed=2)
    reference = [key(o) for o in run(rows, 1)[0]]
    assert [key(o) for o in run(rows, batch)[0]] == reference


def test_online_state_restore_equals_replay(tmp_path: Path) -> None:
    """Snapshot mid-stream, restore, continue == the uninterrupted run (keep scale and ε)."""
    rows = near_copies(900, seed=3)
    cfg = {"select.keep_fraction": 0.5}
    full, _ = run(rows, 50, **cfg)
    settings = make_settings(**{"select.batch_size": 50, **cfg})
    items = to_samples(rows, settings)
    first = Curator(settings, None)
    head: list[Outcome] = []
    for lo in range(0, 600, 50):
        head.extend(first.process(items[lo : lo + 50]))
    assert first.state is not None
    first.state.wait()
    snapshot.save(first.state, tmp_path, "fp")
    second = Curator(settings, None)
    second.process(items[:0])
    second.embed.spaces, second.embed.dims = first.embed.spaces, first.embed.dims
    second._setup(None)
    assert second.selector is not None and second.embed.spaces and second.embed.dims
    restored = snapshot.load(
        tmp_path,
        settings.index,
        fingerprint="fp",
        spaces=second.embed.spaces,
        dims=second.embed.dims,
    )
    assert restored.online.as_record() == first.state.online.as_record()
    second.state = restored
    second.selector.state = restored
    tail: list[Outcome] = []
    for lo in range(600, len(items), 50):
        tail.extend(second.process(items[lo : lo + 50]))
    assert [key(o) for o in head + tail] == [key(o) for o in full]


# -- seed calibration ---------------------------------------------------------------------------


def _embedded(rows: list[dict[str, Any]]) -> list[Embedded]:
    settings = make_settings()
    cur = Curator(settings, None)
    return [e for e in cur.embed.process(to_samples(rows, settings)) if isinstance(e, Embedded)]


def test_vote_calibrated_on_separable_classes() -> None:
    seed = clustered(400, clusters=4, seed=30, spread=0.2, prefix="seed").samples
    settings = make_settings()
    stats = seed_stats(_embedded(seed), ("image", "text"), 4, settings.clean.neighbour_k)
    t = resolve_thresholds(settings, ("image", "text"), stats)
    assert t.confidence is not None and t.reject_share is not None
    assert stats.vote is not None
    assert (stats.vote.relabel_precision or 0) >= 0.95
    assert stats.vote.clean_flagged is not None and stats.vote.clean_flagged <= 0.02


def test_vote_switched_off_when_labels_do_not_follow_the_embedding() -> None:
    rows = clustered(400, clusters=4, seed=31, spread=0.2, prefix="seed").samples
    rng = np.random.default_rng(0)
    for r in rows:  # labels unrelated to position: no vote can be trusted
        r["label"] = f"c{int(rng.integers(4))}"
    settings = make_settings()
    stats = seed_stats(_embedded(rows), ("image", "text"), 4, settings.clean.neighbour_k)
    t = resolve_thresholds(settings, ("image", "text"), stats)
    assert t.confidence is None
    assert stats.vote is not None and "relabelling is off" in stats.vote.note


def test_label_flips_relabelled_with_precision_at_defaults() -> None:
    seed = clustered(300, clusters=4, seed=10, spread=0.2, prefix="seed").samples
    data = clustered(600, clusters=4, flip_rate=0.2, seed=11, spread=0.2)
    out, _ = run(data.samples, 32, seed)
    by_id = {o.id: o for o in out}
    relabeled = [o for o in out if o.decision == "relabeled"]
    right = [o for o in relabeled if o.id in data.flipped and o.label == data.flipped[o.id]]
    assert len(right) >= 0.95 * len(relabeled)
    assert len(right) >= 0.8 * len(data.flipped)
    assert all(o.vote and o.vote.get(o.label or "", 0) >= 0.5 for o in relabeled)
    clean = [o for o in out if o.id not in data.flipped]
    flagged = [o for o in clean if o.decision == "relabeled" or o.reason == "label_noise"]
    assert len(flagged) <= 0.02 * len(clean)
    assert by_id[relabeled[0].id].original_label is not None


def overlapping_classes(
    n: int, seed: int, flip_rate: float, prefix: str
) -> tuple[list[dict[str, Any]], set[str]]:
    """Four classes; c0 and c1 overlap (like shirts and t-shirts), so clean items near their
    border have neighbourhoods where the other label is the majority."""
    crng = np.random.default_rng(77)
    dim = 16
    centres = crng.normal(size=(4, dim))
    centres[1] = centres[0] + 0.5 * crng.normal(size=dim) / np.sqrt(dim)
    rng = np.random.default_rng(seed)
    rows, flipped = [], set()
    for i in range(n):
        c = int(rng.integers(4))
        v = centres[c] + rng.normal(scale=0.3, size=dim)
        label = c
        if rng.random() < flip_rate:
            label = (c + 1 + int(rng.integers(3))) % 4
            flipped.add(f"{prefix}{i}")
        rows.append(
            {"id": f"{prefix}{i}", "embedding": {"image": v.tolist()}, "label": f"c{label}"}
        )
    return rows, flipped


def test_a_label_is_wrong_only_when_the_vote_barely_holds_it() -> None:
    """A clean item at the border of two overlapping classes is outvoted but not unsupported:
    the calibrated flag share keeps it; a majority alone (the earlier rule) relabelled 5% of
    clean items at 81% flag precision here."""
    seed, _ = overlapping_classes(400, 1, 0.0, "seed")
    rows, flipped = overlapping_classes(3000, 2, 0.2, "s")
    out, cur = run(rows, 100, seed)
    flagged = {o.id for o in out if o.decision == "relabeled" or o.reason == "label_noise"}
    clean = len(rows) - len(flipped)
    assert len(flagged - flipped) <= 0.02 * clean
    assert len(flagged & flipped) >= 0.9 * len(flagged)
    assert len(flagged & flipped) >= 0.8 * len(flipped)
    t = cur.selector.t if cur.selector is not None else None
    assert t is not None and t.flag_share is not None and t.confidence is not None
    for o in out:
        if o.decision == "relabeled":
            assert o.vote is not None and o.vote.get(o.original_label or "", 0.0) <= t.flag_share


def test_flag_share_one_is_the_majority_rule() -> None:
    """``clean.flag_share: 1`` (being outvoted is enough) keeps a calibrated reject share below
    1, so a label holding most of its vote is never rejected."""
    seed, _ = overlapping_classes(400, 1, 0.0, "seed")
    rows, flipped = overlapping_classes(1500, 2, 0.2, "s")
    out, cur = run(rows, 100, seed, **{"clean.flag_share": 1.0})
    t = cur.selector.t if cur.selector is not None else None
    assert t is not None and t.flag_share == 1.0
    assert t.reject_share is None or t.reject_share < 1.0
    rejected = [o for o in out if o.reason == "label_noise"]
    assert all(o.vote and o.vote.get(o.label or "", 0.0) <= 0.3 for o in rejected)
    assert len([o for o in rejected if o.id not in flipped]) <= 0.02 * (len(rows) - len(flipped))


def test_vote_rules_without_a_seed_follow_the_config() -> None:
    def resolved(**cfg: Any) -> tuple[float | None, float | None]:
        t = resolve_thresholds(make_settings(**cfg), ("image",), None)
        return t.flag_share, t.reject_share

    assert resolved() == (None, None)
    assert resolved(**{"clean.flag_share": 0.1}) == (0.1, 0.1)
    assert resolved(**{"clean.flag_share": 1.0}) == (1.0, None)
    assert resolved(**{"clean.neighbour_confidence": 0.8}) == (None, 0.0)
    assert resolved(**{"clean.flag_share": 0.2, "clean.reject_share": 0.1}) == (0.2, 0.1)
    with pytest.raises(ConfigError, match=r"clean\.reject_share"):
        make_settings(**{"clean.flag_share": 0.1, "clean.reject_share": 0.2})


def test_delta_from_shuffled_pairs() -> None:
    rng = np.random.default_rng(0)
    matched = rng.normal(0.3, 0.03, size=1000)
    shuffled = rng.normal(0.05, 0.03, size=3000)
    delta = calibrate_delta(matched.tolist(), shuffled.tolist(), 0.01)
    assert np.mean(matched < delta) <= 0.01
    assert np.mean(shuffled < delta) >= 0.99
    # overlapping distributions: the false-flag bound still holds
    delta = calibrate_delta(matched.tolist(), rng.normal(0.25, 0.03, 3000).tolist(), 0.01)
    assert np.mean(matched < delta) <= 0.01


def test_seed_duplicates_do_not_zero_epsilon() -> None:
    seed = clustered(200, seed=40, prefix="seed").samples
    seed += [{**r, "id": r["id"] + "-dup"} for r in seed[:30]]
    settings = make_settings()
    stats = seed_stats(_embedded(seed), ("image", "text"), 4)
    assert stats.duplicates == 30
    t = resolve_thresholds(settings, ("image", "text"), stats)
    assert t.epsilon["image"] > 0 and t.epsilon["text"] > 0


def test_alignment_drift_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings()
    cur = Curator(settings, None)
    cur.embed.alignment_reference = (0.5, 0.6, 0.7)  # a seed whose pairs aligned well
    rows = clustered(600, seed=50).samples  # independent towers: alignments near 0
    with caplog.at_level("WARNING"):
        cur.embed.process(to_samples(rows, settings))
    assert cur.embed.alignment_drift is True
    assert "depart from the seed" in caplog.text
    same = Curator(settings, None)
    same.embed.alignment_reference = (-0.2, 0.0, 0.2)
    same.embed.process(to_samples(rows, settings))
    assert same.embed.alignment_drift is False
