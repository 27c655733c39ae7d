"""`infogrowth run` on a real broker: exactly one output per input, equal to `curate`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from infogrowth.curate import curate
from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
from infogrowth.kafka.run import Runtime, build, start
from infogrowth.kafka.seed import seed
from infogrowth.kafka.tools import audit, produce
from tests.fixtures.data import clustered, write_jsonl
from tests.integration.conftest import settings_from, write_config

pytestmark = pytest.mark.integration

POISON = [
    b"\xc1garbage",  # undecodable
    msgpack.packb({"id": "v9", "v": 9, "text": "x"}),  # unknown schema version
    b"",  # empty
    msgpack.packb({"id": "big", "text": "x" * 70_000}),  # over limits.max_message_bytes
]


def _data(tmp: Path, n: int = 300) -> tuple[Path, Path]:
    data = clustered(n, dup_rate=0.1, flip_rate=0.1, seed=50)
    inp = write_jsonl(tmp / "in.jsonl", data.samples)
    seed_file = write_jsonl(tmp / "seed.jsonl", clustered(120, seed=51, prefix="seed").samples)
    return inp, seed_file


def run_until_drained(rt: Runtime, expected: int, timeout_s: float = 120.0) -> None:
    start(rt)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if rt.errors:
                raise rt.errors[0]
            done = rt.committed_outputs()
            if done >= expected and rt.idle_for() > 1.0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"only {done} of {expected} outputs after {timeout_s}s")
    finally:
        rt.stop.set()
        for t in rt.threads:
            t.join(60)


def curate_decisions(settings: Any, inp: Path, seed_file: Path, out: Path) -> dict[str, Any]:
    curate(settings, [inp], out, seed=seed_file)
    got = {}
    for name in ("accepted", "relabeled", "rejected"):
        for line in (out / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            got[r["id"]] = (r["decision"], r["reason"], r["gain"], r["label"])
    return got


def kafka_decisions(settings: Any) -> dict[str, Any]:
    from infogrowth.kafka.tools import read_topic

    got = {}
    for name in ("accepted", "relabeled", "rejected"):
        for m in read_topic(settings, getattr(settings.kafka.topics, name)):
            r = msgpack.unpackb(m.value(), raw=False)
            got[r["id"]] = (r["decision"], r["reason"], r["gain"], r["label"])
    return got


def test_run_all_exactly_once_and_equal_to_curate(kafka_bootstrap: str, tmp_path: Path) -> None:
    inp, seed_file = _data(tmp_path)
    cfg = write_config(
        tmp_path / "c.yaml",
        kafka_bootstrap,
        tmp_path / "state",
        **{"limits.max_message_bytes": 65536},
    )
    settings = settings_from(cfg)
    report = ensure_topics(admin_config(settings), topic_specs(settings.kafka.topics))
    assert report.ok_all, report.mismatches
    res = seed(settings, seed_file)
    assert res.items == 120
    n = produce(settings, [inp], raw=POISON)
    assert n == 300 + len(POISON)

    rt = build(settings, "all")
    run_until_drained(rt, n)
    assert not rt.errors

    result = audit(settings)
    assert result.ok, result.as_dict()
    assert result.ingest == n and sum(result.outputs.values()) == n
    assert result.reasons["rejected/malformed"] == len(POISON)

    reference = curate_decisions(settings, inp, seed_file, tmp_path / "curate")
    got = kafka_decisions(settings)
    mismatched = {k: (v, got.get(k)) for k, v in reference.items() if got.get(k) != v}
    assert not mismatched
