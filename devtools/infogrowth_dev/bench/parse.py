"""Parse + validate throughput of the wire records, against msgpack decoding alone.

The ingest messages are what ``infogrowth produce`` writes for precomputed embeddings (msgpack
maps, 2 x ``dim`` float lists); the embedded records are what the embed stage writes for the
select stage (float32 vectors as bytes). Each path is timed with the structural fast checks and
with the generic JSON-Schema validator they stand in for (the fallback every record the fast
check does not accept still takes), side by side in the same run. A third row times the embed
stage's whole ``process()`` on the ingest messages without a broker (parse, normalise, route,
build and hand over the embedded record): on a small machine running ``run --role all`` that
CPU comes off the select stage's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from infogrowth import schema
from infogrowth.config import LimitsConfig
from infogrowth_dev.bench.common import Stat, Table, fmt, progress


def messages(n: int, dim: int, seed: int = 7) -> tuple[list[bytes], list[bytes]]:
    """``n`` ingest messages and the ``n`` embedded records the embed stage makes of them."""
    from infogrowth.messages import embedded_record, sample_record

    rng = np.random.default_rng(seed)
    ingest, embedded = [], []
    for i in range(n):
        vecs = {s: rng.standard_normal(dim).astype(np.float32) for s in schema.SPACES}
        sample = schema.Sample(id=f"s{i:07d}", label=str(i % 10), embedding=vecs)
        ingest.append(msgpack.packb(sample_record(sample), use_bin_type=True))
        unit = {s: v / np.linalg.norm(v) for s, v in vecs.items()}
        e = schema.Embedded(id=sample.id, vectors=unit, label=sample.label, cell=i % 4)
        e.source = {"t": "ingest", "p": 0, "o": i}
        embedded.append(schema.pack("embedded", embedded_record(e, include_image=True)))
    return ingest, embedded


@contextmanager
def generic_validator() -> Iterator[None]:
    """Validate with the compiled JSON Schema alone (the path before the fast checks)."""
    saved = schema._FAST_CHECKS
    schema._FAST_CHECKS = {}
    try:
        yield
    finally:
        schema._FAST_CHECKS = saved


def _rate(n: int, fn: Callable[[], Any], repeats: int) -> Stat:
    st = Stat()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        st.add(n / max(time.perf_counter() - t0, 1e-12))
    return st


@dataclass
class _Consumed:
    """What the embed stage reads off a consumed message."""

    _value: bytes
    _offset: int

    def value(self) -> bytes:
        return self._value

    def key(self) -> None:
        return None

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "ingest"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class _Discard:
    """A producer that drops what it is given (the transaction is not what is timed)."""

    def __init__(self) -> None:
        self.count = 0

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.count += 1


def embed_stage_rate(ingest: list[bytes], dim: int, repeats: int) -> Stat:
    """Samples/s through the embed stage's ``process()`` in transactions of 500, unseeded
    (thresholds from the defaults), no broker."""
    from infogrowth.calibrate import resolve_thresholds
    from infogrowth.config import load_settings
    from infogrowth.kafka.embed import EmbedProcessor
    from infogrowth.kafka.loop import Output
    from infogrowth.pipeline import EmbedStage

    settings = load_settings(None)
    dims = {s: dim for s in schema.SPACES}
    thresholds = resolve_thresholds(settings, schema.SPACES, None)
    stage = EmbedStage(settings, None, spaces=schema.SPACES, dims=dims, thresholds=thresholds)
    proc = EmbedProcessor(settings, stage, thresholds, None, 1)
    msgs: list[Any] = [_Consumed(v, i) for i, v in enumerate(ingest)]
    sink = _Discard()

    def run() -> None:
        for i in range(0, len(msgs), 500):
            proc.process(msgs[i : i + 500], Output(sink))  # type: ignore[arg-type]

    before = sink.count
    rate = _rate(len(msgs), run, repeats)
    if sink.count - before != len(msgs) * repeats:
        raise AssertionError("the embed stage did not hand over one record per sample")
    return rate


def bench(n: int = 20_000, dim: int = 256, repeats: int = 3) -> dict[str, Any]:
    from infogrowth.messages import embedded_from_record

    progress(f"parse: encoding {n:,} ingest messages and embedded records (2×{dim}-d)")
    ingest, embedded = messages(n, dim)
    limits = LimitsConfig()
    dims = {s: dim for s in schema.SPACES}

    def decode_only() -> None:
        for m in ingest:
            msgpack.unpackb(m, raw=False, strict_map_key=True)

    def parse_ingest(msgs: list[bytes]) -> None:
        for m in msgs:
            r = schema.parse_msgpack_sample(m, limits)
            if not isinstance(r, schema.Sample):
                raise AssertionError(f"benchmark record rejected: {r}")

    def parse_embedded() -> None:
        for m in embedded:
            embedded_from_record(schema.unpack("embedded", m, max_bytes=1 << 30), dims)

    res: dict[str, Any] = {"params": {"n": n, "dim": dim, "spaces": 2, "repeats": repeats}}
    res["msgpack_decode_per_s"] = _rate(n, decode_only, repeats).as_dict(0)
    res["ingest_per_s"] = _rate(n, lambda: parse_ingest(ingest), repeats).as_dict(0)
    res["embedded_per_s"] = _rate(n, parse_embedded, repeats).as_dict(0)
    res["embed_stage_per_s"] = embed_stage_rate(ingest, dim, repeats).as_dict(0)
    with generic_validator():
        few = ingest[: max(1, n // 5)]  # the generic pass is far slower: time a fifth
        res["ingest_generic_per_s"] = _rate(len(few), lambda: parse_ingest(few), repeats).as_dict(0)
        res["embedded_generic_per_s"] = _rate(n, parse_embedded, repeats).as_dict(0)
    progress(
        f"parse: ingest {res['ingest_per_s']['median']:,.0f}/s "
        f"(generic validator {res['ingest_generic_per_s']['median']:,.0f}/s), "
        f"embedded {res['embedded_per_s']['median']:,.0f}/s, "
        f"embed stage (no broker) {res['embed_stage_per_s']['median']:,.0f}/s"
    )
    return res


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    t = Table(
        f"parse: decode + validate, {p['n']:,} records, 2×{p['dim']}-d vectors",
        ["record", "fast checks (records/s)", "JSON-Schema validator (records/s)", "speed-up"],
        note=(
            f"median [min–max] of {p['repeats']} runs, one thread; target ≥ 20,000/s for ingest. "
            f"msgpack decoding alone (the floor): {fmt(res['msgpack_decode_per_s'])}/s"
        ),
    )
    for name, key in (
        ("ingest (float lists → Sample)", "ingest"),
        ("embedded (bytes → Embedded)", "embedded"),
    ):
        fast, slow = res[f"{key}_per_s"], res[f"{key}_generic_per_s"]
        t.add(name, fmt(fast), fmt(slow), f"{fast['median'] / slow['median']:.1f}×")
    if "embed_stage_per_s" in res:
        stage = res["embed_stage_per_s"]
        per = 1e6 / stage["median"] if stage["median"] else float("nan")
        t.add(
            f"embed stage, no broker (ingest → embedded record; {per:.0f} µs each)",
            fmt(stage),
            "–",
            "–",
        )
    return [t]
