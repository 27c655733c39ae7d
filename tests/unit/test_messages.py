"""One home per message shape: every schema kind round-trips through its record functions, and
the verdict's relabel leaves the input item as it was."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from infogrowth.calibrate import Calibration
from infogrowth.config import LimitsConfig
from infogrowth.errors import DataError
from infogrowth.messages import (
    KINDS,
    Outcome,
    calibration_from_record,
    calibration_record,
    changelog_record,
    embedded_from_record,
    embedded_record,
    output_record,
    replica_record,
    sample_record,
    thresholds_from_record,
    thresholds_record,
    too_large,
)
from infogrowth.sampling.records import CuratedSample
from infogrowth.schema import SCHEMA_FILES, Embedded, Sample, pack, sample_from_obj, unpack
from infogrowth.select import Thresholds, Verdict

BIG = 1 << 30
T = Thresholds(
    policy="sample",
    k=4,
    epsilon={"image": 0.05, "text": 0.04},
    delta=0.2,
    g_scale=0.3,
    seed=17,
    keep_fraction=0.5,
    confidence=0.6,
    flag_share=0.05,
    reject_share=0.05,
    alignment_quartiles=(0.1, 0.2, 0.3),
)


def _item() -> Embedded:
    rng = np.random.default_rng(0)
    vecs = {s: rng.standard_normal(8).astype(np.float32) for s in ("image", "text")}
    return Embedded(
        id="e1",
        vectors=vecs,
        text="a cat",
        label="cat",
        image=b"img",
        image_uri="s3://b/e1",
        meta={"k": 1},
        alignment=0.31,
        original_alignment=0.1,
        original_text="a dog",
        fix="recaptioned",
        cell=3,
        source={"topic": "ingest", "partition": 0, "offset": 5},
    )


def _same(a: Embedded, b: Embedded) -> None:
    assert a.vectors.keys() == b.vectors.keys()
    for s in a.vectors:
        np.testing.assert_array_equal(a.vectors[s], b.vectors[s])
    assert replace(a, vectors={}) == replace(b, vectors={})


def test_every_schema_kind_has_one_home() -> None:
    assert set(KINDS) == set(SCHEMA_FILES)


def test_ingest_round_trip() -> None:
    s = Sample(id="s", text="t", image=b"i", label="l", image_uri="u", meta={"a": [1]})
    s = replace(s, embedding={"text": np.array([1.0, 2.0], np.float32)})
    rec = unpack("ingest", pack("ingest", sample_record(s)), max_bytes=BIG)
    back = sample_from_obj(rec, b"", LimitsConfig())
    assert isinstance(back, Sample)
    assert replace(back, embedding=None) == replace(s, embedding=None)
    assert back.embedding is not None and s.embedding is not None
    np.testing.assert_array_equal(back.embedding["text"], s.embedding["text"])


def test_embedded_round_trip() -> None:
    e = _item()
    rec = unpack("embedded", pack("embedded", embedded_record(e, True, epoch=2)), max_bytes=BIG)
    assert rec["epoch"] == 2
    _same(embedded_from_record(rec, {"image": 8, "text": 8}), e)


def test_embedded_record_leaves_the_image_out_unless_outputs_carry_it() -> None:
    assert embedded_record(_item(), False)["image"] is None


def test_replica_round_trip_carries_what_an_index_needs() -> None:
    e = _item()
    rec = unpack("embedded", pack("embedded", replica_record(e, 7, epoch=1)), max_bytes=BIG)
    back = embedded_from_record(rec, None)
    assert (back.id, back.label, back.fix, back.cell, rec["replica"]) == (
        "e1",
        "cat",
        "recaptioned",
        7,
        True,
    )
    np.testing.assert_array_equal(back.vectors["image"], e.vectors["image"])


def test_changelog_round_trip() -> None:
    e = _item()
    rec = unpack("changelog", pack("changelog", changelog_record(e, seed=True)), max_bytes=BIG)
    assert rec["seed"] is True and rec["fixed"] is True
    back = embedded_from_record(rec, {"image": 8, "text": 8})
    assert (back.id, back.label) == (e.id, e.label)
    np.testing.assert_array_equal(back.vectors["text"], e.vectors["text"])


@pytest.mark.parametrize(
    ("dims", "match"),
    [({"image": 8}, "expected"), ({"image": 4, "text": 8}, "dimension")],
)
def test_embedded_from_record_raises_a_data_error(dims: dict[str, int], match: str) -> None:
    with pytest.raises(DataError, match=match):
        embedded_from_record(embedded_record(_item(), False), dims)


def test_nan_vectors_are_a_data_error() -> None:
    e = _item()
    e.vectors["image"][0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        embedded_from_record(embedded_record(e, False), None)


def test_thresholds_written_before_the_flag_share_keep_the_old_rule() -> None:
    rec = thresholds_record(T)
    del rec["flag_share"]
    assert thresholds_from_record(rec).flag_share is None  # a relabel needs only the confidence


def test_calibration_round_trip() -> None:
    cal = Calibration(T, ("image", "text"), {"image": 8, "text": 8}, 12, "fp", None, 3)
    rec = unpack("calibration", pack("calibration", calibration_record(cal)), max_bytes=BIG)
    assert calibration_from_record(rec) == cal


def test_thresholds_are_encoded_once_with_one_seed_key() -> None:
    cal = Calibration(T, ("text",), {"text": 8})
    rec = calibration_record(cal)
    assert {k: rec[k] for k in thresholds_record(T)} == thresholds_record(T)
    assert rec["seed"] == 17 and "sample_seed" not in rec


def test_a_calibration_written_with_the_old_seed_key_still_loads() -> None:
    """Control topics deployed before the keys were unified hold ``sample_seed``."""
    old = calibration_record(Calibration(T, ("text",), {"text": 8}, epoch=1))
    old["sample_seed"] = old.pop("seed")
    rec = unpack("calibration", pack("calibration", old), max_bytes=BIG)
    assert calibration_from_record(rec).thresholds.seed == 17


def test_output_record_is_read_back_by_the_trainer() -> None:
    v = Verdict(_item(), "relabeled", "recaptioned", gain=0.4, keep_probability=0.8)
    v.gain_by_space, v.duplicate_of = {"image": 0.4, "text": 0.4}, None
    rec = output_record(Outcome.from_verdict(v), T, include_image=True)
    rec = unpack("output", pack("output", rec), max_bytes=BIG)
    back = CuratedSample.from_record(rec)
    assert (back.id, back.decision, back.reason, back.gain, back.text, back.label) == (
        "e1",
        "relabeled",
        "recaptioned",
        0.4,
        "a cat",
        "cat",
    )
    assert rec["thresholds"] == thresholds_record(T)


def test_a_relabel_is_carried_by_the_verdict_not_written_into_the_input() -> None:
    e = replace(_item(), fix=None, original_label=None)
    v = Verdict(e, "relabeled", "neighbour_relabel", relabel="dog")
    o = Outcome.from_verdict(v)
    assert (e.label, e.original_label, e.fix) == ("cat", None, None)
    assert (o.label, o.original_label, v.fix) == ("dog", "cat", "neighbour_relabel")
    assert changelog_record(v.result())["label"] == "dog"
    assert changelog_record(v.result())["fixed"] is True


def test_a_second_fix_keeps_the_first_original_label() -> None:
    e = replace(_item(), label="zero", original_label="first", fix="zero_shot_relabel")
    v = Verdict(e, "relabeled", "zero_shot_relabel", relabel="vote")
    assert (v.result().original_label, v.fix) == ("first", "zero_shot_relabel")


def test_an_outcome_wraps_its_item_and_verdict() -> None:
    v = Verdict(_item(), "accepted", None, gain=0.5, vote={"cat": 1.0}, keep_scale=0.2)
    o = Outcome.from_verdict(v)
    assert o.item is v.item and o.verdict is v
    assert (o.gain, o.vote, o.keep_scale, o.alignment, o.source) == (
        0.5,
        {"cat": 1.0},
        0.2,
        0.31,
        v.item.source,
    )


def test_too_large_keeps_only_bounded_fields() -> None:
    o = Outcome.from_verdict(Verdict(_item(), "accepted", None, gain=0.5))
    t = too_large(o, "output record", 10, 5)
    assert (t.decision, t.reason, t.label, t.alignment, t.image_uri, t.source) == (
        "rejected",
        "too_large",
        "cat",
        0.31,
        "s3://b/e1",
        o.source,
    )
    assert (t.image, t.text, t.meta, t.payload, t.gain) == (None, None, None, None, None)
    assert t.detail is not None and "was accepted" in t.detail
