"""The structural fast checks in ``schema.py`` against the JSON Schemas they stand in for.

The schemas stay the contract: on every record here the fast check accepts exactly what the
compiled schema accepts, and parsing with the fast path gives the same Sample or the same
Malformed (id, detail, original bytes) as parsing with the generic validator alone.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from infogrowth import schema
from infogrowth.config import LimitsConfig
from infogrowth.schema import (
    Malformed,
    Sample,
    SchemaError,
    parse_json_sample,
    parse_msgpack_sample,
)

LIMITS = LimitsConfig(max_message_bytes=1 << 20, max_text_chars=100, max_embedding_dim=300)


def schema_accepts(kind: str, obj: Any) -> bool:
    try:
        schema._validator(kind)(schema._json_view(obj))
    except Exception:
        return False
    return True


def fast_accepts(kind: str, obj: Any) -> bool:
    return schema._FAST_CHECKS[kind](obj)


VEC = [0.5, -1.0, 2]
INGEST_CORPUS: list[Any] = [
    {"id": "a", "text": "t"},
    {"v": 1, "id": "a", "text": "t", "label": "x", "meta": {"k": [1, b"z"]}},
    {"v": 1.0, "id": "a", "image": b"\x89PNG", "label": 3},
    {"id": "a", "label": 3.0},
    {"id": "a", "label": 3.5},
    {"id": "a", "label": True},
    {"id": "a", "label": b"raw"},
    {"id": "a", "embedding": {"text": VEC, "image": tuple(VEC)}},
    {"id": "a", "embedding": {"text": [1.0, True]}},
    {"id": "a", "embedding": {"text": [1.0, "2"]}},
    {"id": "a", "embedding": {"text": [1.0, None]}},
    {"id": "a", "embedding": {"text": [1.0, [2.0]]}},
    {"id": "a", "embedding": {"text": [1.0, b"\x00"]}},
    {"id": "a", "embedding": {"text": [math.nan, math.inf, 1e300, 2**70]}},
    {"id": "a", "embedding": {"text": []}},
    {"id": "a", "embedding": {}},
    {"id": "a", "embedding": None},
    {"id": "a", "embedding": {"audio": [1.0]}},
    {"id": "a", "embedding": [1.0]},
    {"id": "a", "embedding": {"text": 1.0}},
    {"id": "", "text": "t"},
    {"id": "x" * 512, "text": "t"},
    {"id": "x" * 513, "text": "t"},
    {"id": b"a", "text": "t"},
    {"id": 1, "text": "t"},
    {"text": "t"},
    {"v": True, "id": "a", "text": "t"},
    {"v": 2, "id": "a", "text": "t"},
    {"v": "1", "id": "a", "text": "t"},
    {"id": "a", "text": 5},
    {"id": "a", "text": None, "image": None, "label": None, "meta": None},
    {"id": "a", "image": 7},
    {"id": "a", "meta": [1]},
    {"id": "a", "colour": 1},
    {"id": "a", "image_uri": "https://img.example/a.jpg"},
    {"id": "a", "image_uri": None, "text": "t"},
    {"id": "a", "image_uri": ""},
    {"id": "a", "image_uri": "u" * 4096},
    {"id": "a", "image_uri": "u" * 4097},
    {"id": "a", "image_uri": b"https://x"},
    {"id": "a", "image_uri": 3},
    {b"id": "a"},
    {1: "a", "id": "a"},
    [1, 2],
    "id",
    None,
]
EMB = {"v": 1, "id": "a", "vectors": {"text": b"\x00\x00\x80?"}, "cell": 0}
EMBEDDED_CORPUS: list[Any] = [
    EMB,
    {**EMB, "text": "t", "label": "l", "image": b"i", "meta": {}, "alignment": 0.5},
    {**EMB, "original_alignment": 1, "original_text": None, "fix": "relabel", "replica": True},
    {**EMB, "source": {"t": "topic", "p": 0, "o": 12.0}},
    {**EMB, "source": {"t": "topic", "p": True}},
    {**EMB, "source": {"p": 0.5}},
    {**EMB, "source": None},
    {**EMB, "source": [1]},
    {**EMB, "cell": 3.0},
    {**EMB, "cell": -1},
    {**EMB, "cell": True},
    {**EMB, "cell": 1.5},
    {**EMB, "v": 2},
    {**EMB, "id": ""},
    {**EMB, "vectors": {}},
    {**EMB, "vectors": {"audio": b""}},
    {**EMB, "vectors": {"text": 1}},
    {**EMB, "vectors": [b""]},
    {**EMB, "alignment": True},
    {**EMB, "alignment": "0.5"},
    {**EMB, "replica": 1},
    {**EMB, "epoch": 0},
    {**EMB, "epoch": 3.0},
    {**EMB, "epoch": -1},
    {**EMB, "epoch": True},
    {**EMB, "epoch": "1"},
    {**EMB, "label": 3},
    {**EMB, "image_uri": "s3://b/k.jpg"},
    {**EMB, "image_uri": None},
    {**EMB, "image_uri": b"s3://b/k.jpg"},
    {**EMB, "image_uri": 1},
    {**EMB, "extra": 1},
    {k: v for k, v in EMB.items() if k != "cell"},
    {k: v for k, v in EMB.items() if k != "vectors"},
    [EMB],
]


@pytest.mark.parametrize("obj", INGEST_CORPUS, ids=lambda o: repr(o)[:40])
def test_ingest_fast_check_matches_schema(obj: Any) -> None:
    assert fast_accepts("ingest", obj) == schema_accepts("ingest", obj)


@pytest.mark.parametrize("obj", EMBEDDED_CORPUS, ids=lambda o: repr(o)[:40])
def test_embedded_fast_check_matches_schema(obj: Any) -> None:
    assert fast_accepts("embedded", obj) == schema_accepts("embedded", obj)


def test_corpus_has_both_verdicts() -> None:
    for kind, corpus in (("ingest", INGEST_CORPUS), ("embedded", EMBEDDED_CORPUS)):
        verdicts = {schema_accepts(kind, o) for o in corpus}
        assert verdicts == {True, False}, kind


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=4)
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=10,
)
numbers = st.floats() | st.integers(-(2**64), 2**64) | st.booleans()
vectors = st.lists(numbers, max_size=6) | st.lists(st.floats(), min_size=1, max_size=6)
ingest_like = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 1.0, 2, 0, True, "1"]),
        "id": st.text(max_size=6) | st.integers(-3, 3) | st.binary(max_size=3),
        "text": st.text(max_size=8) | st.none() | st.integers(0, 3) | st.binary(max_size=3),
        "image": st.binary(max_size=8) | st.none() | st.text(max_size=3) | st.floats(),
        "label": st.integers(-(2**63), 2**63 - 1)
        | st.text(max_size=5)
        | st.booleans()
        | st.floats()
        | st.none(),
        "embedding": st.dictionaries(st.sampled_from(["text", "image", "x"]), vectors, max_size=2)
        | json_values,
        "meta": json_values,
        "extra": json_values,
    },
)
embedded_like = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 1.0, 2, True]),
        "id": st.text(max_size=4) | st.integers(0, 2),
        "vectors": st.dictionaries(
            st.sampled_from(["text", "image", "x"]), st.binary(max_size=8) | scalars, max_size=2
        )
        | json_values,
        "cell": st.integers(-2, 5) | st.floats(-2, 5) | st.booleans() | st.text(max_size=2),
        "epoch": st.integers(-2, 5) | st.floats(-2, 5) | st.booleans() | st.text(max_size=2),
        "text": scalars,
        "label": scalars,
        "image": scalars,
        "meta": json_values,
        "alignment": scalars,
        "original_alignment": scalars,
        "original_text": scalars,
        "original_label": scalars,
        "fix": scalars,
        "replica": scalars,
        "source": st.none() | st.dictionaries(st.text(max_size=3), scalars, max_size=3) | scalars,
        "extra": scalars,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ingest_like)
def test_fuzz_ingest_fast_check_matches_schema(obj: dict[str, Any]) -> None:
    assert fast_accepts("ingest", obj) == schema_accepts("ingest", obj)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(embedded_like)
def test_fuzz_embedded_fast_check_matches_schema(obj: dict[str, Any]) -> None:
    assert fast_accepts("embedded", obj) == schema_accepts("embedded", obj)


def same(a: Sample | Malformed, b: Sample | Malformed) -> bool:
    if isinstance(a, Malformed) or isinstance(b, Malformed):
        return a == b
    emb_a, emb_b = a.embedding or {}, b.embedding or {}
    if emb_a.keys() != emb_b.keys():
        return False
    if any(
        not np.array_equal(emb_a[k], emb_b[k]) or emb_a[k].dtype != emb_b[k].dtype for k in emb_a
    ):
        return False
    strip = {"embedding": None}
    return {**_fields(a), **strip} == {**_fields(b), **strip}


def _fields(s: Sample) -> dict[str, Any]:
    return {f: getattr(s, f) for f in Sample.__slots__}


def _old_parse_embedding(raw: Any, limits: LimitsConfig) -> dict[str, np.ndarray] | None:
    """The vector checks as they were before the fast path (every check its own pass)."""
    if raw is None:
        return None
    out: dict[str, np.ndarray] = {}
    for space, values in raw.items():
        if len(values) > limits.max_embedding_dim:
            raise SchemaError(
                f"embedding.{space}: dimension {len(values)} exceeds {limits.max_embedding_dim}"
            )
        arr = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise SchemaError(f"embedding.{space}: contains NaN or Inf")
        if float(np.dot(arr, arr)) == 0.0:
            raise SchemaError(f"embedding.{space}: zero vector")
        if np.any(np.abs(arr) > 3.0e38):
            raise SchemaError(f"embedding.{space}: value out of float32 range")
        f32 = arr.astype(np.float32)
        if not np.any(f32):
            raise SchemaError(f"embedding.{space}: zero vector in float32 (values underflow)")
        out[space] = f32
    return out


def reference(monkeypatch: pytest.MonkeyPatch, fn: Any, *args: Any) -> Sample | Malformed:
    """Parse with the generic validator alone and the vector checks as they were."""
    with monkeypatch.context() as m:
        m.setattr(schema, "_FAST_CHECKS", {})
        m.setattr(schema, "_parse_embedding", _old_parse_embedding)
        out: Sample | Malformed = fn(*args)
    return out


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ingest_like)
def test_fuzz_fast_path_gives_the_same_records(
    monkeypatch: pytest.MonkeyPatch, obj: dict[str, Any]
) -> None:
    try:
        payload = msgpack.packb(obj, use_bin_type=True)
    except OverflowError:  # integers beyond 64 bits have no msgpack form
        assume(False)
    got = parse_msgpack_sample(payload, LIMITS, {"t": "x"})
    want = reference(monkeypatch, parse_msgpack_sample, payload, LIMITS, {"t": "x"})
    assert same(got, want), (got, want)
    if isinstance(got, Malformed):
        assert got.payload == payload and got.detail


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=200))
def test_fuzz_bytes_same_records(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    for fn, args in (
        (parse_msgpack_sample, (data, LIMITS)),
        (parse_json_sample, (data, LIMITS, None)),
    ):
        got = fn(*args)  # type: ignore[operator]
        assert same(got, reference(monkeypatch, fn, *args))


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.floats(width=64) | st.sampled_from([1e-46, -1e-50, 3.1e38, 1e-320]),
        min_size=1,
        max_size=8,
    )
)
def test_fuzz_vector_checks_unchanged(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    payload = msgpack.packb({"id": "a", "embedding": {"text": values}})
    got = parse_msgpack_sample(payload, LIMITS)
    assert same(got, reference(monkeypatch, parse_msgpack_sample, payload, LIMITS))


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ingest_like)
def test_fuzz_fast_path_gives_the_same_records_from_jsonl(
    monkeypatch: pytest.MonkeyPatch, obj: dict[str, Any]
) -> None:
    try:
        line = json.dumps(obj).encode()
    except TypeError:  # bytes have no JSON form (JSONL images are paths or base64 text)
        assume(False)
    got = parse_json_sample(line, LIMITS, None)
    want = reference(monkeypatch, parse_json_sample, line, LIMITS, None)
    assert same(got, want), (got, want)


def _rules(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _rules(v) for k, v in o.items() if k not in ("description", "title")}
    if isinstance(o, list):
        return [_rules(v) for v in o]
    return o


@pytest.mark.parametrize(
    ("kind", "digest"), [("ingest", "3912a8a5fef11542"), ("embedded", "4c58d141e6105c24")]
)
def test_fast_checks_were_written_for_these_schemas(kind: str, digest: str) -> None:
    """A change to a schema's rules must come with the same change to its fast check
    (``schema._ingest_ok`` / ``_embedded_ok``) and to the corpus above; then update the digest."""
    import hashlib

    text = json.dumps(_rules(schema.load_schema(kind)), sort_keys=True).encode()
    assert hashlib.sha256(text).hexdigest()[:16] == digest, (
        f"schemas/{kind} rules changed: mirror the change in schema.py's fast check for {kind!r}"
    )


@pytest.mark.parametrize(
    "values",
    [
        [1e-45, 1e-45],  # underflows float32 entirely
        [1e-41, 0.0],  # a float32 subnormal survives
        [1e-40] * 300,  # squared norm just around the fast path's lower bound
        [3e38, 1.0],
        [3.0000001e38],
        [1e38] * 300,  # squared norm beyond the fast path's upper bound, values in range
        [1e154, 1e154],  # the squared norm overflows float64
        [1e-160, 1.0],
        [0.0, 0.0],
        [math.nan, 1.0],
        [-math.inf],
        [2**70, 1],  # an integer beyond float32's exact range, in range
    ],
)
def test_vectors_at_the_fast_paths_bounds_give_the_old_verdicts(values: list[Any]) -> None:
    raw = {"image": values}
    try:
        want: Any = _old_parse_embedding(raw, LIMITS)
    except SchemaError as exc:
        want = str(exc)
    try:
        got: Any = schema._parse_embedding(raw, LIMITS)
    except SchemaError as exc:
        got = str(exc)
    if isinstance(want, str):
        assert got == want
    else:
        assert got["image"].dtype == np.float32
        assert np.array_equal(got["image"], want["image"])


def test_unit_vectors_are_the_norm_division_bit_for_bit() -> None:
    from infogrowth.pipeline import _unit

    rng = np.random.default_rng(3)
    for scale in (1e-30, 1e-3, 1.0, 1e3, 1e30):
        v = (rng.normal(size=(50, 64)) * scale).astype(np.float32)
        for row in v:
            x = row.astype(np.float64)
            want = (x / float(np.linalg.norm(x))).astype(np.float32)
            assert np.array_equal(_unit(row), want)
