"""Exactly-once under faults the lifecycle tests do not reach (issue 13), on the real broker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
from infogrowth.kafka.clients import producer_config
from infogrowth.kafka.loop import FatalStageError
from infogrowth.kafka.run import Runtime, build, start
from infogrowth.kafka.seed import seed
from infogrowth.kafka.tools import audit, produce
from tests.fixtures.data import clustered, write_jsonl
from tests.integration.conftest import settings_from, write_config
from tests.integration.test_pipeline import curate_decisions, kafka_decisions

pytestmark = pytest.mark.integration
N = 1200


def _prepare(tmp: Path, bootstrap: str, n: int = N, **cfg: Any) -> tuple[Any, Path, Path]:
    conf = write_config(tmp / "c.yaml", bootstrap, tmp / "state", **cfg)
    settings = settings_from(conf)
    assert ensure_topics(admin_config(settings), topic_specs(settings.kafka.topics)).ok_all
    inp = write_jsonl(tmp / "in.jsonl", clustered(n, dup_rate=0.1, flip_rate=0.05, seed=70).samples)
    seed_file = write_jsonl(tmp / "seed.jsonl", clustered(100, seed=71, prefix="seed").samples)
    seed(settings, seed_file)
    assert produce(settings, [inp]) == n
    return settings, inp, seed_file


def _wait(cond: Any, timeout: float, what: str, rt: Runtime | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if rt is not None and rt.errors:
            raise rt.errors[0]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _stop(rt: Runtime) -> None:
    rt.stop.set()
    for t in rt.threads:
        t.join(60)
        assert not t.is_alive(), f"{t.name} did not stop"


def _drain(settings: Any, timeout: float = 240.0) -> Runtime:
    """A fresh process's run until every input is committed (what --exit-when-idle does)."""
    rt = build(settings, "all")
    start(rt)
    try:
        _wait(lambda: rt.ready() and rt.idle_for() > 2.0 and rt.drained(), timeout, "drain", rt)
    finally:
        _stop(rt)
    assert not rt.errors, rt.errors
    return rt


def _check(settings: Any, inp: Path, seed_file: Path, tmp: Path, n: int = N) -> None:
    result = audit(settings)
    assert result.ok, result.as_dict()
    assert result.ingest == n
    reference = curate_decisions(settings, inp, seed_file, tmp / "curate")
    got = kafka_decisions(settings)
    assert {k: (v, got.get(k)) for k, v in reference.items() if got.get(k) != v} == {}


def test_fenced_select_mid_stream_drops_uncommitted_state(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A fatal producer error (fenced) mid-batch: the failed batch's items must not reach a
    snapshot, or the restarted stage meets their ids again and rejects them as duplicate_id."""
    settings, inp, seed_file = _prepare(tmp_path, kafka_bootstrap)
    rt = build(settings, "all")
    assert rt.select is not None
    select_loop = next(lp for lp in rt.loops if lp.processor is rt.select)
    start(rt)
    try:
        _wait(
            lambda: rt.select is not None and rt.select.committed_outputs >= 64, 120, "select", rt
        )
        # A second producer with the same transactional id (a zombie's successor) fences it.
        fencer = Producer(producer_config(settings, select_loop.transactional_id))
        fencer.init_transactions(30)
        _wait(lambda: bool(rt.errors), 60, "the fenced select stage to fail")
    finally:
        _stop(rt)
    assert any(isinstance(e, FatalStageError) for e in rt.errors), rt.errors
    assert list((tmp_path / "state").glob("*/CURRENT")), "the committed state is snapshotted"
    _drain(settings)
    _check(settings, inp, seed_file, tmp_path)
