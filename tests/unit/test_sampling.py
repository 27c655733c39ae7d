"""Gain samplers: inclusion frequencies match their definitions, epochs reproduce, shards split.

Statistical checks use fixed seeds (so they are deterministic) and tolerances of 5 binomial
standard errors around the exact inclusion probability, so a correct sampler passes with any seed
(a 5-sigma miss has probability below 1e-6 per check).
"""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
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
    normalise_gains,
    resolve_g_scale,
)
from infogrowth.sampling.kafka import id_bucket, reader_share
from infogrowth.sampling.samplers import pps_probabilities, systematic_sample

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


def _epoch_hits(sampler: GainSamplerBase, epochs: range) -> tuple[np.ndarray, np.ndarray]:
    hits = np.zeros(len(sampler.q))
    expected = np.zeros(len(sampler.q))
    for e in epochs:
        sampler.set_epoch(e)
        idx = list(sampler)
        assert len(idx) == len(set(idx)), "an index twice in one epoch"
        assert len(idx) == len(sampler)
        hits[idx] += 1
        expected += sampler.inclusion_probabilities(e)
    return hits, expected / len(epochs)


# -- gain normalisation -------------------------------------------------------------------


def test_normalise_gains_clips_and_fills_missing() -> None:
    q = normalise_gains(np.array([0.0, 0.4, 0.8, 1.7, np.nan, -0.1]), 0.8)
    assert q.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        normalise_gains(np.array([0.1]), 0.0)


def test_resolve_g_scale_order() -> None:
    gains = np.array([0.2, 0.6, np.nan])
    assert resolve_g_scale(0.5, [0.9], gains) == 0.5
    assert resolve_g_scale(None, [0.9, 0.7, 0.9, None], gains) == 0.9
    assert resolve_g_scale(None, [None], gains) == 0.6
    assert resolve_g_scale(None, [], np.array([0.0])) == 1.0


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
    assert s.normalised_gain() == pytest.approx(0.5)
    j = CuratedSample.from_record({**rec, "image": base64.b64encode(rec["image"]).decode()})
    assert j.image == rec["image"] and j.position is None


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


def test_static_uses_the_sets_g_scale() -> None:
    samples = [
        CuratedSample(id=f"s{i}", decision="accepted", gain=g, g_scale=0.5)
        for i, g in enumerate([0.0, 0.25, 0.5, 1.0])
    ]
    data = CuratedSet(samples)
    s = StaticGainSampler(data)
    assert s.g_scale == 0.5 and s.q.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert StaticGainSampler(data, g_scale=2.0).q.tolist() == [0.0, 0.125, 0.25, 0.5]


# -- dynamic ------------------------------------------------------------------------------


def test_pps_probabilities_proportional_capped_and_exact_size() -> None:
    q = np.array([1.0, 1.0, 0.6, 0.3, 0.1, 0.0])
    pi = pps_probabilities(q, 3)
    assert pi.sum() == pytest.approx(3.0)
    assert pi.max() <= 1.0 and pi[-1] == 0.0
    assert pi[0] == pi[1] == 1.0
    assert pi[2] / q[2] == pytest.approx(pi[3] / q[3]) == pytest.approx(pi[4] / q[4])
    capped = pps_probabilities(np.array([0.9, 0.05, 0.05]), 2)
    assert capped.tolist() == pytest.approx([1.0, 0.5, 0.5])
    with pytest.raises(ValueError):
        pps_probabilities(np.array([0.5, 0.0]), 2)
    rng = np.random.default_rng(0)
    for _ in range(50):
        got = systematic_sample(pi, 3, rng)
        assert len(got) == 3 and 5 not in got and {0, 1} <= set(got.tolist())


def test_dynamic_inclusion_matches_definition() -> None:
    s = GainSampler(_gains(), g_scale=1.0, seed=5)
    assert (
        s.num_samples == s.budget == math.floor(float(s.q.sum()) + 0.5)
        and s.refill_probability == 0.0
    )
    hits, expected = _epoch_hits(s, range(30))
    _assert_frequency(hits, expected, 30, "dynamic")
    assert np.allclose(expected, s.pi) and s.pi.sum() == pytest.approx(s.num_samples)
    # proportional to the normalised gain (no item capped here)
    ratio = s.pi[s.q > 0] / s.q[s.q > 0]
    assert np.allclose(ratio, ratio[0])


def test_dynamic_refills_uniformly_to_the_epoch_length() -> None:
    n = len(_gains())
    s = GainSampler(_gains(), g_scale=1.0, seed=6, num_samples=int(0.8 * n))
    k, length = s.by_gain, s.num_samples
    assert k == s.budget < length
    hits, expected = _epoch_hits(s, range(30))
    assert np.allclose(expected, s.pi + (1 - s.pi) * (length - k) / (n - k))
    _assert_frequency(hits, expected, 30, "dynamic with refill")
    assert hits[_groups()[0]].sum() > 0  # zero-gain items only come in through the refill
    shorter = GainSampler(_gains(), g_scale=1.0, seed=6, num_samples=1000)
    assert len(shorter) == 1000 and shorter.refill_probability == 0.0
    with pytest.raises(ValueError):
        GainSampler(_gains(), num_samples=n + 1)


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
    for epoch in (0, 1):
        full = SAMPLERS[name](9)
        full.set_epoch(epoch)
        epoch_set = list(full)
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
        assert len(flat) == len(set(flat)) and sorted(flat) == sorted(epoch_set)
        assert max(map(len, shards["uneven"])) - min(map(len, shards["uneven"])) <= 1
        pad = shards["pad"]
        assert len({len(s) for s in pad}) == 1
        assert len(pad[0]) == math.ceil(len(epoch_set) / replicas)
        assert set().union(*map(set, pad)) == set(epoch_set)
        drop = [i for s in shards["drop"] for i in s]
        assert len({len(s) for s in shards["drop"]}) == 1
        assert len(drop) == len(set(drop)) == len(epoch_set) // replicas * replicas


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


def _record(i: int, decision: str, gain: float) -> dict[str, object]:
    return {
        "v": 1,
        "id": f"r{i}",
        "decision": decision,
        "reason": None if decision == "accepted" else "neighbour_relabel",
        "gain": gain,
        "thresholds": {"policy": "sample", "k": 4, "g_scale": 0.5},
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
    assert len(data) == 27 and data.g_scale == 0.5
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
