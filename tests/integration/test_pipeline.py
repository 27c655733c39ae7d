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


def _drain_and_audit(settings: Any, n: int, timeout_s: float = 120.0) -> tuple[Runtime, Any]:
    """Run ``--role all`` until ``n`` outputs, without stage errors; the audit must pass with
    exactly one output per input."""
    rt = build(settings, "all")
    run_until_drained(rt, n, timeout_s=timeout_s)
    assert not rt.errors
    result = audit(settings)
    assert result.ok, result.as_dict()
    assert sum(result.outputs.values()) == n
    return rt, result


def curate_decisions(settings: Any, inp: Path, seed_file: Path, out: Path) -> dict[str, Any]:
    curate(settings, [inp], out, seed=seed_file)
    got = {}
    for name in ("accepted", "relabeled", "rejected"):
        for line in (out / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            got[r["id"]] = (r["decision"], r["reason"], r["gain"], r["label"])
    return got


def kafka_decisions(settings: Any) -> dict[str, Any]:
    from infogrowth.kafka.reader import read_topic

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
    report = ensure_topics(
        admin_config(settings), topic_specs(settings.kafka.topics, settings.limits)
    )
    assert report.ok_all, report.mismatches
    res = seed(settings, seed_file)
    assert res.items == 120
    n = produce(settings, [inp], raw=POISON)
    assert n == 300 + len(POISON)

    _rt, result = _drain_and_audit(settings, n)
    assert result.ingest == n
    assert result.reasons["rejected/malformed"] == len(POISON)

    reference = curate_decisions(settings, inp, seed_file, tmp_path / "curate")
    got = kafka_decisions(settings)
    mismatched = {k: (v, got.get(k)) for k, v in reference.items() if got.get(k) != v}
    assert not mismatched


def test_oversized_output_is_rejected_too_large_not_an_abort_loop(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """An ingest message just under the topic limit would give a rejected record (the original
    bytes plus decision fields) over it: the broker refuses it, the transaction aborts, the
    batch comes back, forever. It must come out once as a trimmed ``rejected/too_large``."""
    import os

    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    from infogrowth.kafka.clients import record_limit
    from infogrowth.kafka.reader import read_topic

    inp, seed_file = _data(tmp_path, n=40)
    cfg = write_config(
        tmp_path / "c.yaml",
        kafka_bootstrap,
        tmp_path / "state",
        **{"limits.max_message_bytes": 65536},
    )
    settings = settings_from(cfg)
    limit = record_limit(settings.limits)
    report = ensure_topics(
        admin_config(settings), topic_specs(settings.kafka.topics, settings.limits)
    )
    assert report.ok_all, report.mismatches
    admin = AdminClient(admin_config(settings))
    res = admin.describe_configs(
        [ConfigResource(ResourceType.TOPIC, settings.kafka.topics.rejected)]
    )
    (fut,) = res.values()
    assert fut.result(10)["max.message.bytes"].value == str(limit)
    seed(settings, seed_file)
    huge = os.urandom(limit - 600)  # incompressible; fits the ingest topic, not as an output
    n = produce(settings, [inp], raw=[huge])
    assert n == 41

    _rt, result = _drain_and_audit(settings, n, timeout_s=90)
    assert result.ingest == n
    assert result.reasons["rejected/too_large"] == 1
    (big,) = [
        msgpack.unpackb(m.value(), raw=False)
        for m in read_topic(settings, settings.kafka.topics.rejected)
        if b"too_large" in m.value()
    ]
    assert big["reason"] == "too_large" and big["payload"] is None
    assert "exceeds the" in big["detail"] and "rejected/malformed" in big["detail"]


def _undersized_rejected_topic(settings: Any, max_bytes: int) -> None:
    """Pre-create the rejected topic with a ``max.message.bytes`` the broker enforces: a
    permanent produce failure for every record above it (like a refused ACL, for good)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(admin_config(settings))
    t = settings.kafka.topics
    topic = NewTopic(
        t.rejected,
        t.output_partitions,
        1,
        config={"cleanup.policy": "delete", "max.message.bytes": str(max_bytes)},
    )
    admin.create_topics([topic])[t.rejected].result(30)
    report = ensure_topics(admin_config(settings), topic_specs(t, settings.limits))
    assert report.mismatches, "the undersized topic must be reported"


def test_batch_aborting_for_good_is_bisected_and_its_culprit_rejected(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A record the broker refuses aborts its transaction on every retry. After a few aborts at
    the same offsets the batch is bisected: the rest commits, the culprit is rejected once."""
    import os

    inp, seed_file = _data(tmp_path, n=20)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, tmp_path / "state")
    settings = settings_from(cfg)
    _undersized_rejected_topic(settings, 5000)
    seed(settings, seed_file)
    n = produce(settings, [inp], raw=[b"\xc1" + os.urandom(8000)])  # undecodable, incompressible
    assert n == 21

    rt, result = _drain_and_audit(settings, n, timeout_s=90)
    assert result.reasons["rejected/too_large"] == 1, result.reasons
    assert sum(lp.culprits for lp in rt.loops) == 1


def test_culprit_that_cannot_be_rejected_makes_the_stage_unready(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """When even the trimmed rejection is refused, the stage says so on /readyz (loud, not a
    silent abort loop behind a healthy /healthz)."""
    inp, seed_file = _data(tmp_path, n=20)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, tmp_path / "state")
    settings = settings_from(cfg)
    _undersized_rejected_topic(settings, 120)  # no rejected record fits
    seed(settings, seed_file)
    n = produce(settings, [inp], raw=[b"\xc1garbage"])

    rt = build(settings, "all")
    start(rt)
    try:
        deadline = time.monotonic() + 90
        while (time.monotonic() < deadline and rt.ready_status()[0] is not False) or (
            "stuck" not in rt.ready_status()[1]
        ):
            assert not rt.errors, rt.errors
            assert time.monotonic() < deadline, f"never unready: {rt.ready_status()}"
            time.sleep(0.2)
        ok, why = rt.ready_status()
        assert not ok and "cannot produce" in why and "not even its rejection" in why
        assert rt.healthy()[0]
    finally:
        rt.stop.set()
        for t in rt.threads:
            t.join(60)
    assert n == 21


def test_seed_refuses_to_replace_a_calibration_without_reset(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    from infogrowth.kafka.control import read_calibration
    from infogrowth.kafka.seed import CalibrationExists

    _inp, seed_file = _data(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, tmp_path / "state")
    settings = settings_from(cfg)
    specs = topic_specs(settings.kafka.topics, settings.limits)
    assert ensure_topics(admin_config(settings), specs).ok_all
    first = seed(settings, seed_file)
    with pytest.raises(CalibrationExists, match="--reset"):
        seed(settings, seed_file)
    again = seed(settings, seed_file, reset=True)
    cal = read_calibration(settings)
    assert cal is not None and cal.seed_count == again.items == first.items
