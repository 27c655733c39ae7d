"""The selection invariants: one outcome per input, determinism, batched == sequential,
diminishing returns, duplicate floor, label vote, sampling policy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from infogrowth.messages import Outcome
from infogrowth.pipeline import Curator
from infogrowth.select import coin
from tests.fixtures.data import clustered
from tests.fixtures.helpers import curate_rows, make_settings, to_samples


def run(rows: list[dict[str, Any]], batch: int, seed_rows: Any = None, **cfg: Any) -> list[Outcome]:
    return curate_rows(rows, batch, seed_rows, **cfg)[0]


def key(o: Outcome) -> tuple[Any, ...]:
    return (o.id, o.decision, o.reason, o.gain, o.label, tuple(sorted(o.nn_distance.items())))


def test_one_outcome_per_input_in_order() -> None:
    data = clustered(300, dup_rate=0.1, flip_rate=0.05, seed=1)
    out = run(data.samples, 32)
    assert [o.id for o in out] == [r["id"] for r in data.samples]
    assert {o.decision for o in out} <= {"accepted", "relabeled", "rejected"}


@pytest.mark.parametrize("batch", [1, 3, 17, 64, 500])
def test_batched_equals_sequential(batch: int) -> None:
    data = clustered(400, dup_rate=0.15, flip_rate=0.1, seed=2)
    seed = clustered(60, seed=3, prefix="seed").samples
    reference = [key(o) for o in run(data.samples, 1, seed, **{"select.keep_fraction": 0.5})]
    got = [key(o) for o in run(data.samples, batch, seed, **{"select.keep_fraction": 0.5})]
    assert got == reference


def test_deterministic_across_runs() -> None:
    data = clustered(250, dup_rate=0.2, seed=4)
    seed = clustered(50, seed=5, prefix="seed").samples
    a = run(data.samples, 40, seed, **{"select.keep_fraction": 0.5})
    b = run(data.samples, 40, seed, **{"select.keep_fraction": 0.5})
    assert [key(o) for o in a] == [key(o) for o in b]
    assert {o.decision for o in a} >= {"accepted", "rejected"}


def test_diminishing_returns() -> None:
    """Adding items to the index never raises another item's gain."""
    settings = make_settings(**{"select.policy": "all", "clean.fixer": "none"})
    cur = Curator(settings, None)
    probes = to_samples(clustered(40, seed=6, prefix="p").samples, settings)
    stream = to_samples(clustered(600, seed=7).samples, settings)
    cur.process(stream[:1])
    assert cur.selector is not None
    embedded = cur.embed.process(probes)
    previous = [v.gain for v in cur.selector.decide(embedded, commit=False)]
    for lo in range(1, 600, 100):
        cur.process(stream[lo : lo + 100])
        gains = [v.gain for v in cur.selector.decide(embedded, commit=False)]
        for before, after in zip(previous, gains, strict=True):
            assert after is not None and before is not None
            assert after <= before + 1e-12
        previous = gains
    assert max(previous) < 1.0  # the probes did get neighbours


def test_exact_copy_is_duplicate_and_new_item_accepted() -> None:
    data = clustered(50, seed=8)
    rows = [*data.samples, {**data.samples[10], "id": "copy"}]
    far = {"id": "far", "embedding": {"image": [0.0] * 31 + [100.0], "text": [100.0] + [0.0] * 31}}
    out = run([*rows, far], 16, **{"select.policy": "all"})
    assert out[10].decision == "accepted"
    by_id = {o.id: o for o in out}
    assert by_id["copy"].decision == "rejected" and by_id["copy"].reason == "duplicate"
    assert by_id["copy"].nn_distance["image"] == pytest.approx(0.0, abs=1e-6)
    assert by_id["far"].decision == "accepted"


def test_duplicate_ids_rejected_deterministically() -> None:
    data = clustered(20, seed=9)
    again = {**data.samples[3], "embedding": clustered(1, seed=99).samples[0]["embedding"]}
    out = run([*data.samples, again], 8, **{"select.policy": "all"})
    assert out[-1].id == data.samples[3]["id"]
    assert (out[-1].decision, out[-1].reason) == ("rejected", "duplicate_id")


def test_label_flips_are_relabeled_by_neighbours() -> None:
    seed = clustered(200, clusters=4, seed=10, spread=0.2, prefix="seed").samples
    data = clustered(200, clusters=4, flip_rate=0.2, seed=11, spread=0.2)
    out = run(data.samples, 32, seed, **{"select.policy": "all"})
    by_id = {o.id: o for o in out}
    fixed = [sid for sid in data.flipped if by_id[sid].decision == "relabeled"]
    assert len(fixed) >= 0.9 * len(data.flipped)
    for sid in fixed:
        assert by_id[sid].label == data.flipped[sid]
        assert by_id[sid].original_label != by_id[sid].label
        assert by_id[sid].reason == "neighbour_relabel"
    clean = [o for o in out if o.id not in data.flipped]
    assert sum(o.decision == "relabeled" for o in clean) <= 0.02 * len(clean)


def test_threshold_policy_rejects_redundant() -> None:
    seed = clustered(100, seed=12, prefix="seed").samples
    data = clustered(200, seed=13)
    out = run(data.samples, 50, seed, **{"select.policy": "threshold", "select.tau_percentile": 50})
    reasons = {o.reason for o in out if o.decision == "rejected"}
    assert "redundant" in reasons
    for o in out:
        if o.reason == "redundant":
            assert o.gain is not None and o.gain < out[0].gain + 1  # gain recorded


def test_sample_policy_keeps_with_probability() -> None:
    seed = clustered(100, seed=14, prefix="seed").samples
    data = clustered(1500, seed=15)
    out = run(data.samples, 100, seed, **{"select.keep_fraction": 0.5, "clean.fixer": "none"})
    kept = [o for o in out if o.decision != "rejected"]
    considered = [o for o in out if o.keep_probability is not None]
    expected = sum(o.keep_probability or 0 for o in considered)
    assert abs(len(kept) - expected) < 4 * np.sqrt(expected) + 5
    for o in considered:
        assert (o.decision != "rejected") == (coin(o.id, 0) < (o.keep_probability or 0))


def test_coin_is_uniform_and_seeded() -> None:
    xs = np.array([coin(f"id{i}", 7) for i in range(20000)])
    assert abs(xs.mean() - 0.5) < 0.01
    assert coin("a", 1) == coin("a", 1) and coin("a", 1) != coin("a", 2)
