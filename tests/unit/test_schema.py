"""Schemas, the msgpack codec and bad input: every malformed message becomes a rejection."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infogrowth.config import LimitsConfig
from infogrowth.pipeline import Curator
from infogrowth.schema import (
    Malformed,
    Sample,
    SchemaError,
    load_schema,
    pack,
    parse_json_sample,
    parse_msgpack_sample,
    unpack,
    validate,
)
from tests.fixtures.helpers import make_settings

LIMITS = LimitsConfig(max_message_bytes=4096, max_text_chars=100, max_embedding_dim=16)
GOOD = {"id": "a", "text": "hello", "embedding": {"text": [1.0, 2.0]}}


def test_schemas_are_valid_json_schema() -> None:
    import jsonschema

    for kind in ("ingest", "output", "embedded", "changelog", "calibration"):
        jsonschema.Draft7Validator.check_schema(load_schema(kind))


def test_schema_files_have_no_duplicate_keys() -> None:
    """json.load keeps the last of two equal keys silently; a schema must say each once."""
    from pathlib import Path

    def once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        assert not dup, f"duplicate keys {dup}"
        return dict(pairs)

    files = sorted((Path(__file__).resolve().parents[2] / "schemas").glob("*.json"))
    assert len(files) >= 5
    for f in files:
        json.loads(f.read_text(), object_pairs_hook=once)


def test_good_sample_parses() -> None:
    s = parse_msgpack_sample(msgpack.packb(GOOD), LIMITS)
    assert isinstance(s, Sample) and s.id == "a" and s.embedding is not None
    assert s.embedding["text"].dtype.name == "float32"


def test_integer_label_becomes_text() -> None:
    s = parse_msgpack_sample(msgpack.packb({**GOOD, "label": 3}), LIMITS)
    assert isinstance(s, Sample) and s.label == "3"


BAD: list[tuple[str, Any, str]] = [
    ("missing id", {"text": "x"}, "id"),
    ("empty id", {"id": "", "text": "x"}, "id"),
    ("wrong type", {"id": "a", "text": 5}, "text"),
    ("unknown field", {"id": "a", "text": "x", "colour": 1}, "must not contain"),
    ("unknown version", {"v": 2, "id": "a", "text": "x"}, "version 2"),
    ("nothing to embed", {"id": "a"}, "no text, image, image_uri or embedding"),
    ("nan", {"id": "a", "embedding": {"text": [1.0, math.nan]}}, "NaN"),
    ("inf", {"id": "a", "embedding": {"text": [math.inf, 1.0]}}, "NaN or Inf"),
    ("zero", {"id": "a", "embedding": {"text": [0.0, 0.0]}}, "zero"),
    ("too many dims", {"id": "a", "embedding": {"text": [1.0] * 17}}, "dimension"),
    ("unknown space", {"id": "a", "embedding": {"audio": [1.0]}}, "must not contain"),
    ("long text", {"id": "a", "text": "x" * 101}, "exceeds"),
    ("bool label", {"id": "a", "text": "x", "label": True}, "label"),
    ("not a map", [1, 2, 3], "object"),
]


@pytest.mark.parametrize(("name", "obj", "needle"), BAD, ids=[b[0] for b in BAD])
def test_malformed_msgpack(name: str, obj: Any, needle: str) -> None:
    payload = msgpack.packb(obj)
    m = parse_msgpack_sample(payload, LIMITS)
    assert isinstance(m, Malformed), name
    assert needle.lower() in m.detail.lower()
    assert m.payload == payload


def test_malformed_bytes() -> None:
    for payload in (b"\xc1", b"\x92\x01", b"", b"\xff" * 10):
        assert isinstance(parse_msgpack_sample(payload, LIMITS), Malformed)
    big = msgpack.packb({"id": "a", "text": "x" * 5000})
    m = parse_msgpack_sample(big, LIMITS)
    assert isinstance(m, Malformed) and "exceeds" in m.detail


def test_malformed_json() -> None:
    for line in (b"{", b"[]", b"null", b'{"id": "a", "embedding": {"text": [NaN]}}', b"\xff\xfe"):
        assert isinstance(parse_json_sample(line, LIMITS, None), Malformed), line


def test_codec_roundtrip_and_validation() -> None:
    rec = {"v": 1, "id": "x", "vectors": {"text": b"\x00\x00\x80?"}}
    assert unpack("changelog", pack("changelog", rec), max_bytes=1000) == rec
    with pytest.raises(SchemaError):
        validate("changelog", {"v": 1, "id": "x"})
    with pytest.raises(ValueError, match="exceeds"):
        unpack("changelog", pack("changelog", rec), max_bytes=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_never_crash(data: bytes) -> None:
    r = parse_msgpack_sample(data, LIMITS)
    assert isinstance(r, Sample | Malformed)
    r2 = parse_json_sample(data, LIMITS, None)
    assert isinstance(r2, Sample | Malformed)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
sample_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=10) | st.integers(-5, 5),
        "text": st.text(max_size=20) | st.integers(-5, 5),
        "label": st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5) | st.booleans(),
        "embedding": st.dictionaries(
            st.sampled_from(["text", "image", "x"]), st.lists(st.floats(), max_size=20), max_size=2
        )
        | json_values,
        "meta": json_values,
        "v": st.integers(0, 3),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(sample_like, min_size=1, max_size=6))
def test_fuzz_structured_inputs_one_outcome_each(objs: list[dict[str, Any]]) -> None:
    cfg = make_settings(**{"select.policy": "all"})
    cur = Curator(cfg, None)
    items = [
        parse_msgpack_sample(msgpack.packb(o), cfg.limits, {"t": "fuzz", "o": i})
        for i, o in enumerate(objs)
    ]
    out = cur.process(items)
    assert len(out) == len(items)
    for it, o in zip(items, out, strict=True):
        if isinstance(it, Malformed):
            assert (o.decision, o.reason) == ("rejected", "malformed")
            assert o.payload is not None
        json.dumps(o.id)


def test_spaces_of_different_dimension_have_no_alignment() -> None:
    """Found by the fuzzer: precomputed image and text vectors of different sizes (two unrelated
    encoders) are indexed, but no cosine is taken between them."""
    cfg = make_settings(**{"select.policy": "all"})
    cur = Curator(cfg, None)
    obj = {"id": "a", "embedding": {"image": [1.0, 0.5], "text": [2.0]}}
    (out,) = cur.process([parse_msgpack_sample(msgpack.packb(obj), cfg.limits)])
    assert out.decision == "accepted" and out.alignment is None


@pytest.mark.parametrize(
    ("meta", "why"),
    [
        ({"blob": "x" * 70_000}, "larger than 65536 bytes"),
        ({"k": list(range(5_000))}, "larger than 65536 bytes"),  # many small values
        ({f"k{i}": {} for i in range(9_000)}, "larger than 65536 bytes"),  # many containers
        ({"d": json.loads("[" * 8 + "]" * 8)}, "deeper than 8 levels"),
    ],
)
def test_meta_over_size_or_depth_is_malformed(meta: Any, why: str) -> None:
    """A small message can unpack into a large tree that every stage then carries (a 1 MB
    message held 72 MB): meta beyond limits.max_meta_bytes / max_meta_depth is malformed."""
    raw = msgpack.packb({"id": "m", "text": "t", "meta": meta}, use_bin_type=True)
    res = parse_msgpack_sample(raw, LimitsConfig(max_message_bytes=1 << 20))
    assert isinstance(res, Malformed) and res.id == "m", res
    assert why in res.detail


def test_meta_within_limits_parses() -> None:
    meta = {"url": "http://x/y.jpg", "tags": ["a", "b"], "size": {"w": 64, "h": 48}}
    for m in (meta, {"deep": json.loads("[" * 7 + "]" * 7)}):
        raw = msgpack.packb({"id": "m", "text": "t", "meta": m}, use_bin_type=True)
        res = parse_msgpack_sample(raw, LimitsConfig())
        assert not isinstance(res, Malformed), res


def test_embedding_integer_beyond_float64_is_malformed_not_an_exception() -> None:
    cfg = make_settings()
    line = b'{"id": "huge", "embedding": {"text": [1, ' + b"9" * 400 + b"]}}"
    got = parse_json_sample(line, cfg.limits, None)
    assert isinstance(got, Malformed) and got.id == "huge" and "float32 range" in got.detail
