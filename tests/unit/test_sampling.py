"""Gain samplers: the authors' normalisation (the set's own 99th gain percentile), Bernoulli-round
epochs, one sampling step (never q²), frequencies that match the definitions, reproducible
epochs, shards that split.

Statistical checks use fixed seeds (so they are deterministic) and tolerances of 5 binomial
standard errors around the exact probability, so a correct sampler passes with any seed
(a 5-sigma miss has probability below 1e-6 per check).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from infogrowth.files import OutputWriter
from infogrowth.sampling import (
    CuratedSample,
    CuratedSet,
    DistributedGainSampler,
    GainSampler,
    GainSamplerBase,
    StaticGainSampler,
    TwoPhaseGainSampler,
    gain_weights,
    normalise_gains,
    percentile_g_scale,
    resolve_g_scale,
)
from infogrowth.sampling.kafka import id_bucket, reader_share

LEVELS = np.array([0.0, 0.05, 0.2, 0.5, 0.8, 1.0, 1.6])
"""Gains per group (g_scale 1): q = 0, .05, .2, .5, .8, 1 and a clipped 1.6 -> 1."""
PER_LEVEL = 1500
SIGMAS = 5.0


def _gains() -> np.ndarray:
    return np.repeat(LEVELS, PER_LEVEL)


def _groups() -> list[slice]:
    return [slice(i * PER_LEVEL, (i + 1) * PER_LEVEL) for i in range(len(LEVELS))]


def _assert_frequency(hits: np.ndarray, expected: np.ndarray, trials: int, what: str) -> None:
    """Per group: mean hit rate within 5 binomial SEs of the mean expected probability."""
    for g in _groups():
        p = float(expected[g].mean())
        freq = float(hits[g].sum()) / (trials * (g.stop - g.start))
        se = math.sqrt(p * (1 - p) / (trials * (g.stop - g.start)))
        assert abs(freq - p) <= SIGMAS * se + 1e-12, f"{what}: group p={p:.4f} got {freq:.4f}"


def _epoch_hits(
    sampler: StaticGainSampler | TwoPhaseGainSampler, epochs: range
) -> tuple[np.ndarray, np.ndarray]:
    hits = np.zeros(len(sampler.q))
    expected = np.zeros(len(sampler.q))
    for e in epochs:
        sampler.set_epoch(e)
        idx = list(sampler)
        assert len(idx) == len(set(idx)), "an index twice in one epoch"
        assert len(idx) == len(sampler)
        hits[idx] += 1
        expected += sampler.inclusion_probabilities(e)
        assert np.array_equal(sampler.expected_counts(e), sampler.inclusion_probabilities(e))
    return hits, expected / len(epochs)


def _sample(i: int, gain: float | None, policy: str | None = "all") -> CuratedSample:
    return CuratedSample(id=f"s{i}", decision="accepted", gain=gain, g_scale=0.05, policy=policy)


def _spread_with_outlier(n: int = 1000) -> np.ndarray:
    """Gains spread evenly over [0.1, 0.3] and one isolated item at 1.0."""
    return np.concatenate([np.linspace(0.1, 0.3, n - 1), [1.0]])


# -- gain normalisation -------------------------------------------------------------------


def test_normalise_gains_clips_and_fills_missing() -> None:
    q = normalise_gains(np.array([0.0, 0.4, 0.8, 1.7, np.nan, -0.1]), 0.8)
    assert q.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        normalise_gains(np.array([0.1]), 0.0)


def test_resolve_g_scale_explicit_else_own_percentile() -> None:
    gains = np.array([0.2, 0.6, np.nan, 0.4])
    assert resolve_g_scale(0.5, gains) == 0.5  # explicit wins
    assert resolve_g_scale(None, gains) == pytest.approx(np.percentile([0.2, 0.6, 0.4], 99))
    assert resolve_g_scale(None, gains, 50) == pytest.approx(0.4)
    assert resolve_g_scale(None, np.array([0.0])) == 1.0  # nothing positive
    assert percentile_g_scale(np.array([0.0] * 200 + [0.3])) == 0.3  # a 0 percentile: the max
    assert percentile_g_scale(np.array([np.nan])) == 1.0
    for bad in (0.0, -1.0, 101.0):
        with pytest.raises(ValueError):
            resolve_g_scale(None, gains, bad)
    with pytest.raises(ValueError):
        resolve_g_scale(0.0, gains)


def test_one_isolated_gain_does_not_shrink_everyone() -> None:
    """The authors' scale is the set's own 99th percentile, not its maximum: an outlier at 1.0
    leaves the bulk's weights where they were (with the max they would all drop below 0.3)."""
    gains = _spread_with_outlier()
    expected_scale = float(np.percentile(gains, 99))
    assert 0.29 < expected_scale < 0.3
    w = gain_weights(gains)
    assert w.g_scale == pytest.approx(expected_scale) and not w.explicit
    assert w.q[-1] == 1.0 and w.q[-2] == 1.0  # the top of the bulk reaches 1, as does the outlier
    assert w.q[:-1].mean() > 0.65  # vs about 0.2 with the maximum as scale
    data = CuratedSet([_sample(i, float(g)) for i, g in enumerate(gains)])
    assert data.g_scale == pytest.approx(expected_scale)  # not the recorded 0.05, not the max
    assert data.recorded_g_scale == 0.05
    for sampler in (
        StaticGainSampler(data),
        GainSampler(data),
        TwoPhaseGainSampler(data),
        StaticGainSampler(gains),
        GainSampler(list(gains)),
        TwoPhaseGainSampler(gains),
    ):
        assert sampler.g_scale == pytest.approx(expected_scale)
        assert np.allclose(sampler.q, w.q)
    # Any dataset with a gains array gets the same normalisation.
    other = torch.utils.data.TensorDataset(torch.zeros(len(gains)))
    other.gains = gains  # type: ignore[attr-defined]
    assert np.allclose(GainSampler(other).q, w.q)  # type: ignore[arg-type]
    # The percentile is a parameter, on the set and on every sampler.
    p90 = float(np.percentile(gains, 90))
    assert CuratedSet(data.samples, g_percentile=90).g_scale == pytest.approx(p90)
    assert GainSampler(data, g_percentile=90).g_scale == pytest.approx(p90)
    assert StaticGainSampler(gains, g_percentile=90).g_scale == pytest.approx(p90)


def test_explicit_g_scale_wins_everywhere() -> None:
    gains = _spread_with_outlier()
    data = CuratedSet([_sample(i, float(g)) for i, g in enumerate(gains)])
    assert CuratedSet(data.samples, g_scale=2.0).g_scale == 2.0
    assert np.allclose(CuratedSet(data.samples, g_scale=2.0).normalised_gains, gains / 2)
    for cls in (StaticGainSampler, GainSampler, TwoPhaseGainSampler):
        assert cls(data, g_scale=2.0).g_scale == 2.0
        assert np.allclose(cls(data, g_scale=2.0).q, gains / 2)
        assert cls(gains, g_scale=2.0).g_scale == 2.0
    # A scale given to the set is used by its samplers; one given to the sampler wins over it.
    given = CuratedSet(data.samples, g_scale=0.5)
    assert GainSampler(given).g_scale == 0.5 and GainSampler(given, g_scale=0.25).g_scale == 0.25


def test_curated_sample_from_msgpack_and_json_records() -> None:
    rec = {
        "v": 1,
        "id": "a",
        "decision": "relabeled",
        "reason": "neighbour_relabel",
        "gain": 0.3,
        "alignment": 0.9,
        "thresholds": {"policy": "sample", "k": 4, "g_scale": 0.6},
        "text": "t",
        "label": "new",
        "original_label": "old",
        "image": b"\x89PNG\r\n\x1a\nxx",
        "source": {"topic": "in", "partition": 0, "offset": 7},
    }
    s = CuratedSample.from_record(msgpack.unpackb(msgpack.packb(rec), raw=False), ("t", 1, 5))
    assert s.relabeled and s.label == "new" and s.original_label == "old"
    assert s.image == rec["image"] and s.g_scale == 0.6 and s.position == ("t", 1, 5)
    assert s.policy == "sample" and s.sampled_online
    assert s.normalised_gain() == pytest.approx(0.5)  # the stream's view: its recorded scale
    assert not CuratedSample.from_record({**rec, "thresholds": {"policy": "all"}}).sampled_online
    j = CuratedSample.from_record({**rec, "image": base64.b64encode(rec["image"]).decode()})
    assert j.image == rec["image"] and j.position is None
    ref = CuratedSample.from_record({**rec, "image": None, "image_uri": "s3://b/a.jpg"})
    assert ref.image is None and ref.image_uri == "s3://b/a.jpg"


# -- static -------------------------------------------------------------------------------


def test_static_inclusion_matches_clipped_gain() -> None:
    s = StaticGainSampler(_gains(), g_scale=1.0, seed=11)
    hits = np.zeros(len(s.q))
    hits[s.kept] = 1
    _assert_frequency(hits, s.q, 1, "static")
    # Static: the same kept set every epoch, reshuffled per epoch.
    orders = []
    for e in range(3):
        s.set_epoch(e)
        orders.append(list(s))
        assert sorted(orders[-1]) == s.kept.tolist()
    assert orders[0] != orders[1]
    # Across seeds every item's keep rate is its q.
    many = np.zeros(len(s.q))
    for seed in range(20):
        many[StaticGainSampler(_gains(), g_scale=1.0, seed=seed).kept] += 1
    _assert_frequency(many, s.q, 20, "static over seeds")


def test_static_uses_the_sets_own_scale_not_the_recorded_one() -> None:
    samples = [
        CuratedSample(id=f"s{i}", decision="accepted", gain=g, g_scale=0.5, policy="all")
        for i, g in enumerate([0.0, 0.25, 0.5, 1.0])
    ]
    data = CuratedSet(samples)
    s = StaticGainSampler(data)
    assert s.g_scale == pytest.approx(np.percentile([0.0, 0.25, 0.5, 1.0], 99))
    assert s.q.tolist() == pytest.approx([0.0, 0.25 / s.g_scale, 0.5 / s.g_scale, 1.0])
    assert StaticGainSampler(data, g_scale=2.0).q.tolist() == [0.0, 0.125, 0.25, 0.5]


# -- dynamic ------------------------------------------------------------------------------


def _group_hits(idx: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(idx) // PER_LEVEL, minlength=len(LEVELS))


def test_dynamic_epochs_are_bernoulli_rounds_of_exactly_n() -> None:
    s = GainSampler(_gains(), g_scale=1.0, seed=5)
    n, q = len(_gains()), s.q
    assert s.num_samples == n and s.round_size == pytest.approx(q.sum())
    full_rounds = 0
    for e in range(10):
        s.set_epoch(e)
        idx = s.epoch_indices()
        assert len(idx) == len(s) == n == len(list(s))  # exactly N, every epoch
        rounds = s.epoch_rounds(e)
        assert np.array_equal(np.concatenate(rounds), idx)  # the epoch is its rounds in order
        assert len(rounds) >= 2  # sum(q) < N here, so items recur across rounds
        for r in rounds:
            assert len(r) == len(set(r.tolist()))  # an index at most once per round
        assert not np.any(q[idx] == 0)  # zero-weight items never appear
        # Every round but the (truncated) last keeps each item independently with p = q: per
        # level, its hit count is Binomial(PER_LEVEL, q).
        for r in rounds[:-1]:
            full_rounds += 1
            hits = _group_hits(r)
            for level, got in zip(LEVELS, hits, strict=True):
                p = min(level, 1.0)
                se = math.sqrt(PER_LEVEL * p * (1 - p))
                assert abs(got - PER_LEVEL * p) <= SIGMAS * se + 1e-9, (e, level, got)
        # The last round only tops up: it is no larger than a round and ends the epoch at N.
        assert 0 < len(rounds[-1]) <= np.count_nonzero(q)
    assert full_rounds >= 10


def test_dynamic_items_recur_in_proportion_to_q() -> None:
    s = GainSampler(_gains(), g_scale=1.0, seed=8)
    epochs = 40
    counts = np.zeros(len(s.q))
    for e in range(epochs):
        s.set_epoch(e)
        counts += np.bincount(s.epoch_indices(), minlength=len(s.q))
    expected = s.expected_counts()
    assert expected.sum() == pytest.approx(s.num_samples)
    assert np.allclose(expected, s.q * s.num_samples / s.q.sum())
    per_item = counts / epochs
    for g in _groups():
        mean = float(per_item[g].mean())
        # per item and epoch the count is a sum of ~N / sum(q) Bernoulli(q) draws
        q = float(s.q[g].mean())
        rounds = s.num_samples / s.q.sum()
        se = math.sqrt(rounds * q * (1 - q) / (epochs * PER_LEVEL))
        assert abs(mean - float(expected[g].mean())) <= SIGMAS * se + 0.01, (q, mean)
    # Recurrence is proportional to q: count / q is the same for every positive level.
    positive = [g for g in _groups() if s.q[g].mean() > 0]
    ratios = [per_item[g].mean() / s.q[g].mean() for g in positive]
    assert max(ratios) / min(ratios) < 1.05
    assert per_item[_groups()[0]].sum() == 0


def test_dynamic_epoch_lengths_and_limits() -> None:
    n = len(_gains())
    short = GainSampler(_gains(), g_scale=1.0, seed=6, num_samples=1000)
    assert len(short) == 1000 and len(short.epoch_rounds()) == 1  # one truncated round
    assert len(set(short.epoch_indices().tolist())) == 1000
    long = GainSampler(_gains(), g_scale=1.0, seed=6, num_samples=3 * n)
    assert len(long) == 3 * n and max(Counter(long.epoch_indices().tolist()).values()) >= 4
    assert list(GainSampler(_gains(), num_samples=0)) == []
    with pytest.raises(ValueError):
        GainSampler(_gains(), num_samples=-1)
    with pytest.raises(ValueError, match="positive weight"):
        GainSampler(np.zeros(10), g_scale=1.0)
    with pytest.raises(ValueError, match="rounds"):
        GainSampler(np.full(10, 1e-6), g_scale=1.0)
    # All weights 1 (uniform): one round holds every index, so an epoch is a permutation.
    uniform = GainSampler(np.ones(500), g_scale=1.0, seed=2)
    assert sorted(uniform.epoch_indices().tolist()) == list(range(500))


# -- two-phase ----------------------------------------------------------------------------


def test_two_phase_alternates_high_and_low_emphasis() -> None:
    s = TwoPhaseGainSampler(_gains(), g_scale=1.0, floor=0.1, seed=7)
    assert [s.phase(e) for e in range(4)] == ["high", "low", "high", "low"]
    high, exp_high = _epoch_hits(s, range(0, 24, 2))
    low, exp_low = _epoch_hits(s, range(1, 24, 2))
    assert np.allclose(exp_high, s.q)
    assert np.allclose(exp_low, np.maximum(0.1, 1 - s.q))
    _assert_frequency(high, exp_high, 12, "two-phase high")
    _assert_frequency(low, exp_low, 12, "two-phase low")
    slow = TwoPhaseGainSampler(_gains(), period=2, start="low")
    assert [slow.phase(e) for e in range(5)] == ["low", "low", "high", "high", "low"]


# -- reproducibility and sharding ---------------------------------------------------------

SAMPLERS: dict[str, Callable[[int], GainSamplerBase]] = {
    "static": lambda seed: StaticGainSampler(_gains(), g_scale=1.0, seed=seed),
    "dynamic": lambda seed: GainSampler(_gains(), g_scale=1.0, seed=seed),
    "two_phase": lambda seed: TwoPhaseGainSampler(_gains(), g_scale=1.0, seed=seed),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_epochs_are_reproducible(name: str) -> None:
    a, b, other = SAMPLERS[name](3), SAMPLERS[name](3), SAMPLERS[name](4)
    runs = []
    for s in (a, b, other):
        epochs = []
        for e in (0, 1, 2):
            s.set_epoch(e)
            epochs.append(list(s))
        runs.append(epochs)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert runs[0][0] != runs[0][1]
    a.set_epoch(0)
    assert list(a) == runs[0][0]  # going back to an epoch redraws it identically


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("replicas", [1, 2, 3, 7])
def test_distributed_shards_are_disjoint_and_cover(name: str, replicas: int) -> None:
    """Shards split the epoch's positions: as multisets (a GainSampler index may recur)."""
    for epoch in (0, 1):
        full = SAMPLERS[name](9)
        full.set_epoch(epoch)
        epoch_list = list(full)
        shards = {}
        for mode in ("uneven", "pad", "drop"):
            per_rank = []
            for rank in range(replicas):
                d = DistributedGainSampler(
                    SAMPLERS[name](9), num_replicas=replicas, rank=rank, remainder=mode
                )
                d.set_epoch(epoch)
                per_rank.append(list(d))
                assert len(d) == len(per_rank[-1])
            shards[mode] = per_rank
        flat = [i for s in shards["uneven"] for i in s]
        assert Counter(flat) == Counter(epoch_list)
        assert max(map(len, shards["uneven"])) - min(map(len, shards["uneven"])) <= 1
        pad = shards["pad"]
        assert len({len(s) for s in pad}) == 1
        assert len(pad[0]) == math.ceil(len(epoch_list) / replicas)
        padded = Counter(i for s in pad for i in s)
        assert padded >= Counter(epoch_list) and set(padded) == set(epoch_list)
        drop = [i for s in shards["drop"] for i in s]
        assert len({len(s) for s in shards["drop"]}) == 1
        cut = len(epoch_list) // replicas * replicas
        assert Counter(drop) == Counter(epoch_list[:cut])


def test_reader_share_round_robin_or_hash() -> None:
    parts = [("b", 0), ("a", 1), ("a", 0), ("b", 1), ("a", 2)]
    shares = [reader_share(parts, r, 2) for r in range(2)]
    assert shares[0] == ([("a", 0), ("a", 2), ("b", 1)], False)
    assert shares[1] == ([("a", 1), ("b", 0)], False)
    assert reader_share(parts, 5, 6) == (sorted(parts), True)
    buckets = [id_bucket(f"id{i}", 6) for i in range(6000)]
    assert set(buckets) == set(range(6)) and max(np.bincount(buckets)) < 1200
    with pytest.raises(ValueError):
        reader_share(parts, 2, 2)


# -- CuratedSet ---------------------------------------------------------------------------


def _record(i: int, decision: str, gain: float, policy: str = "all") -> dict[str, object]:
    return {
        "v": 1,
        "id": f"r{i}",
        "decision": decision,
        "reason": None if decision == "accepted" else "neighbour_relabel",
        "gain": gain,
        "thresholds": {"policy": policy, "k": 4, "g_scale": 0.5},
        "text": f"text {i}",
        "label": f"c{i % 3}",
        "original_label": None if decision == "accepted" else "c9",
        "image": b"img%d" % i,
    }


def test_curated_set_from_curate_outputs_and_dataloader(tmp_path: Path) -> None:
    with OutputWriter(tmp_path) as w:
        for i in range(40):
            decision = ("accepted", "relabeled", "rejected")[i % 3]
            w.write(_record(i, decision, gain=(i % 10) / 10))
    data = CuratedSet.from_export(tmp_path)
    assert [s.decision for s in data.samples[:2]] == ["accepted", "accepted"]
    assert {s.decision for s in data.samples} == {"accepted", "relabeled"}
    assert len(data) == 27 and not data.stream_sampled
    assert data.g_scale == pytest.approx(np.percentile(data.gains, 99))  # not the recorded 0.5
    assert data.recorded_g_scale == 0.5
    assert data.samples[0].image == b"img0"
    assert data.normalised_gains.max() == 1.0
    tensors = data.with_transform(lambda s: (torch.tensor([s.gain]), int(s.label[1:])))
    sampler = TwoPhaseGainSampler(tensors, seed=1)
    sampler.set_epoch(1)
    seen = []
    for x, y in DataLoader(tensors, batch_size=8, sampler=sampler):
        assert x.shape[1] == 1 and y.dtype == torch.int64
        seen.append(len(y))
    assert sum(seen) == len(sampler)


# -- one sampling step, never two -----------------------------------------------------------


def test_stream_sampled_online_is_not_sampled_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Records the stream kept by its gain coin (policy ``sample``) already had their one
    sampling step: by default every sampler leaves them at q = 1 (sampling again would keep
    them with about q²) and says so in the log."""
    with OutputWriter(tmp_path) as w:
        for i in range(300):
            w.write(_record(i, "accepted", gain=(i % 10) / 10, policy="sample"))
    data = CuratedSet.from_export(tmp_path)
    assert data.stream_sampled and data.sampled_online.all()
    assert np.all(data.normalised_gains == 1.0)
    n = len(data)
    with caplog.at_level(logging.WARNING, logger="infogrowth.sampling.samplers"):
        static = StaticGainSampler(data)
        dynamic = GainSampler(data)
        two = TwoPhaseGainSampler(data)
    warnings = [r for r in caplog.records if "sampled online" in r.getMessage()]
    assert len(warnings) == 3 and all("q = 1" in r.getMessage() for r in warnings)
    assert static.unweighted.all() and len(static.kept) == n  # keeps everything
    for e in range(3):
        dynamic.set_epoch(e)
        assert sorted(dynamic) == list(range(n))  # one round of everything: a plain shuffle
        assert sorted(two.epoch_indices(e).tolist()) == list(range(n))  # both phases
    # A fixed g_scale is only the normaliser (e.g. the grown set's, reading new records): the
    # online-sampled samples stay at q = 1 with it too.
    fixed = StaticGainSampler(data, g_scale=0.4, seed=1)
    assert fixed.unweighted.all() and len(fixed.kept) == n and fixed.g_scale == 0.4
    assert np.all(CuratedSet(data.samples, g_scale=0.4).normalised_gains == 1.0)
    # Only resample_online is the user asking for a second weighting: then without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="infogrowth.sampling.samplers"):
        weighted = StaticGainSampler(data, g_scale=0.9, resample_online=True, seed=1)
        also = GainSampler(CuratedSet(data.samples, g_scale=0.9, resample_online=True))
    assert not caplog.records
    assert np.allclose(weighted.q, np.clip(data.gains / 0.9, 0, 1)) and len(weighted.kept) < n
    assert not also.unweighted.any() and also.g_scale == 0.9
    assert not np.all(np.bincount(also.epoch_indices(), minlength=n) == 1)


def test_mixed_sets_weight_only_what_the_stream_did_not_sample() -> None:
    """A set that switched policy mid-stream: samples kept by ``all`` are weighted with the
    percentile of *their* gains, samples kept by ``sample`` stay at q = 1."""
    gains = _spread_with_outlier(400)
    samples = [
        _sample(i, float(g), policy="sample" if i % 4 == 0 else "all") for i, g in enumerate(gains)
    ]
    data = CuratedSet(samples)
    online = np.arange(len(gains)) % 4 == 0
    assert np.array_equal(data.sampled_online, online) and data.stream_sampled
    assert data.g_scale == pytest.approx(np.percentile(gains[~online], 99))
    q = GainSampler(data).q
    assert np.all(q[online] == 1.0)
    assert np.allclose(q[~online], np.clip(gains[~online] / data.g_scale, 0, 1))
    low = TwoPhaseGainSampler(data).inclusion_probabilities(1)
    assert np.all(low[online] == 1.0) and np.all(low[~online] < 1.0)


def test_default_path_all_then_one_sampling_step_at_training() -> None:
    """The documented default: the stream keeps everything (``all``); the trainer samples once,
    with the authors' normalisation, so an item's epoch share follows its gain."""
    gains = _spread_with_outlier(2000)
    data = CuratedSet([_sample(i, float(g), policy="all") for i, g in enumerate(gains)])
    sampler = GainSampler(data, seed=3)
    assert not data.stream_sampled and not sampler.unweighted.any()
    assert sampler.g_scale == pytest.approx(np.percentile(gains, 99))
    counts = np.bincount(sampler.epoch_indices(), minlength=len(data))
    assert counts.sum() == len(data)
    low, high = counts[:500].mean(), counts[-500:-1].mean()
    assert high > 2 * low  # high-gain items recur more; the outlier does not crowd them out


def test_import_needs_neither_kafka_nor_a_gpu() -> None:
    code = (
        "import sys\n"
        "sys.modules['confluent_kafka'] = None  # any import of it now fails\n"
        "import infogrowth.export, infogrowth.sampling as s\n"
        "assert 'torch' not in sys.modules, 'export must stay light'\n"
        "assert s.CuratedStream and s.CuratedSet and s.GainSampler\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr


def test_committing_readers_must_not_share_a_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """With more readers than partitions every reader reads every partition and keeps its id
    bucket; one committing the partition's end would mark the others' buckets as read."""
    from infogrowth.config import load_settings
    from infogrowth.errors import ConfigError
    from infogrowth.sampling import stream as stream_mod

    class _Closed:
        def close(self) -> None:
            pass

    monkeypatch.setattr(stream_mod, "open_consumer", lambda settings, group: _Closed())
    monkeypatch.setattr(stream_mod, "list_partitions", lambda c, topics, t: [("a", 0), ("b", 0)])
    stream = stream_mod.CuratedStream(load_settings(None), start="committed", commit=True)
    with pytest.raises(ConfigError, match="partition per reader"):
        next(stream.samples(0, 3))


@pytest.mark.parametrize(
    ("gain", "match"),
    [("0.7", "invalid output record"), (True, "invalid output record"), (float("nan"), "finite")],
)
def test_an_export_is_checked_as_the_stream_is(tmp_path: Path, gain: object, match: str) -> None:
    """A gain that is not a number (or not a finite one) is refused with its file and line,
    not taken as a number or as q = 1."""
    import json

    from infogrowth.errors import DataError

    good = {k: v for k, v in _record(0, "accepted", gain=0.3).items() if k != "image"}
    bad = dict(good, id="b", gain=gain)
    path = tmp_path / "accepted.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=rf"accepted\.jsonl:2: .*{match}"):
        CuratedSet.from_export(tmp_path)


def test_sampler_choices_are_checked() -> None:
    from infogrowth.errors import ConfigError

    gains = np.linspace(0.1, 0.9, 20)
    with pytest.raises(ConfigError, match="start"):
        TwoPhaseGainSampler(gains, start="High")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="remainder"):
        DistributedGainSampler(
            StaticGainSampler(gains),
            num_replicas=2,
            rank=0,
            remainder="dorp",  # type: ignore[arg-type]
        )


def test_a_set_of_several_calibration_epochs_says_so_and_can_keep_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with OutputWriter(tmp_path) as w:
        for epoch in (1, 2):
            for i in range(5):
                w.write(_record(i, "accepted", gain=0.1 * i) | {"epoch": epoch})
    with caplog.at_level(logging.WARNING, logger="infogrowth.sampling.dataset"):
        both = CuratedSet.from_export(tmp_path)
    assert both.epochs == [1, 2] and len(both) == 10
    assert (
        "calibration epochs [1, 2]" in caplog.text and "5 ids occur more than once" in caplog.text
    )
    latest = CuratedSet.from_export(tmp_path, epoch=2)
    assert len(latest) == 5 and latest.epochs == [2]
    assert {s.epoch for s in latest.samples} == {2}


def test_keep_decisions_follow_the_item_not_its_position() -> None:
    """Over a set with ids each keep coin is a hash of (id, seed, purpose, epoch), as the select
    stage's: a record added in front (a new partition's first record, another file order) used
    to re-roll about a third of the other items' decisions."""
    rng = np.random.default_rng(3)
    gains = rng.uniform(0.0, 0.6, 2000)
    old = [_sample(i, float(g)) for i, g in enumerate(gains)]
    grown = [_sample(99_999, 0.3), *old]
    for make in (
        lambda d: set(StaticGainSampler(d, g_scale=0.5, seed=7).kept.tolist()),
        lambda d: set(TwoPhaseGainSampler(d, g_scale=0.5, seed=7).epoch_indices(1).tolist()),
    ):
        before = {old[i].id for i in make(CuratedSet(old))}
        after = {grown[i].id for i in make(CuratedSet(grown))} - {"s99999"}
        assert before == after
    # and the coins stay fair: the keep rate tracks q over seeds
    data = CuratedSet(old)
    hits = np.zeros(len(old))
    for seed in range(200):
        hits[StaticGainSampler(data, g_scale=0.5, seed=seed).kept] += 1
    q = np.clip(gains / 0.5, 0, 1)
    for lo in (0.0, 0.25, 0.5, 0.75):
        band = (q >= lo) & (q < lo + 0.25) if lo < 0.75 else q >= lo
        p, n = float(q[band].mean()), 200 * int(band.sum())
        freq = float(hits[band].sum()) / n
        assert abs(freq - p) <= SIGMAS * math.sqrt(p * (1 - p) / n), (lo, p, freq)
