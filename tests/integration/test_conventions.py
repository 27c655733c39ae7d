"""Kafka conventions on a real broker: headers on every produced record, the trace context
carried from ingest to outputs, the dead-letter topic (and `audit` with it), and clients that
are closed before the broker goes away."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
from confluent_kafka import Producer

from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
from infogrowth.kafka.clients import producer_config
from infogrowth.kafka.headers import header
from infogrowth.kafka.reader import read_topic
from infogrowth.kafka.run import build
from infogrowth.kafka.seed import seed
from infogrowth.kafka.tools import produce
from infogrowth.schema import pack
from tests.integration.conftest import settings_from, write_config
from tests.integration.test_pipeline import POISON, _data, _drain_and_audit, run_until_drained

pytestmark = pytest.mark.integration

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SCHEMAS = {
    "embedded": b"embedded-sample",
    "changelog": b"changelog-entry",
    "accepted": b"output-record",
    "relabeled": b"output-record",
    "rejected": b"output-record",
    "control": b"calibration",
}


def _send(settings: Any, records: list[tuple[bytes, list[tuple[str, bytes]]]]) -> None:
    p = Producer(producer_config(settings, None))
    for value, hs in records:
        p.produce(settings.kafka.topics.ingest, value=value, headers=hs)
    assert p.flush(30) == 0


def _prepared(tmp: Path, bootstrap: str, n: int, **extra: Any) -> tuple[Any, Path]:
    inp, seed_file = _data(tmp, n=n)
    cfg = write_config(tmp / "c.yaml", bootstrap, tmp / "state", **extra)
    settings = settings_from(cfg)
    report = ensure_topics(
        admin_config(settings), topic_specs(settings.kafka.topics, settings.limits)
    )
    assert report.ok_all, report.mismatches
    seed(settings, seed_file)
    return settings, inp


def test_headers_traceparent_and_dead_letter_on_a_real_broker(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dead = f"dlq-{uuid.uuid4().hex[:10]}"  # unique: a reused broker keeps earlier runs' topics
    settings, inp = _prepared(
        tmp_path,
        kafka_bootstrap,
        60,
        **{"kafka.topics.dead_letter": dead, "limits.max_message_bytes": 65536},
    )
    assert dead in {s.name for s in topic_specs(settings.kafka.topics, settings.limits)}
    n = produce(settings, [inp], raw=POISON)
    vec = [float(i % 7) - 3.0 for i in range(32)]
    traced_ok = pack("ingest", {"v": 1, "id": "traced", "embedding": {"image": vec, "text": vec}})
    bad = b"\xc1 traced but broken"
    _send(
        settings,
        [
            (traced_ok, [("traceparent", TRACE.encode())]),
            (bad, [("traceparent", TRACE.encode()), ("app", b"x")]),
        ],
    )
    n += 2

    _rt, result = _drain_and_audit(settings, n)
    assert result.ingest == n
    # Malformed input has exactly one output: its dead-letter record, none on rejected.
    assert result.outputs["dead_letter"] == len(POISON) + 1
    assert result.reasons["dead_letter/malformed"] == len(POISON) + 1
    assert "rejected/malformed" not in result.reasons

    t = settings.kafka.topics
    seen: dict[str, int] = {}
    traced: list[tuple[str, Any]] = []
    for role, schema in SCHEMAS.items():
        for m in read_topic(settings, getattr(t, role)):
            hs = m.headers()
            seen[role] = seen.get(role, 0) + 1
            assert header(hs, "content-type") == b"application/x-msgpack", role
            assert header(hs, "infogrowth.schema") == schema, role
            assert header(hs, "infogrowth.schema.version") == b"1", role
            if role in ("accepted", "relabeled", "rejected"):
                rec = msgpack.unpackb(m.value(), raw=False)
                assert header(hs, "decision") == rec["decision"].encode()
                reason = header(hs, "reason")
                assert reason == (rec["reason"].encode() if rec["reason"] else None)
            if header(hs, "traceparent") is not None:
                traced.append((role, header(hs, "traceparent")))
    assert set(seen) >= {"embedded", "changelog", "accepted", "rejected", "control"}, seen
    # The traced sample's embedded record and its output carry the ingest trace, nothing else.
    assert sorted(r for r, _ in traced) == sorted(["embedded", result.decisions["traced"][0]])
    assert all(v == TRACE.encode() for _, v in traced)

    # `produce` labels the samples it encodes; lines it could not parse go as they are.
    ingest = list(read_topic(settings, t.ingest))
    labelled = [m for m in ingest if header(m.headers(), "infogrowth.schema") == b"ingest-sample"]
    assert len(labelled) == 60 and len(ingest) == n
    assert all(header(m.headers(), "infogrowth.schema.version") == b"1" for m in labelled)
    assert not any(header(m.headers(), "content-type") for m in ingest if m.value() in POISON)

    dlq = list(read_topic(settings, dead))
    assert len(dlq) == len(POISON) + 1
    by_value = {m.value() or b"": m for m in dlq}
    assert set(by_value) == {*POISON, bad}  # the original bytes, as they came
    m = by_value[bad]
    hs = m.headers()
    assert header(hs, "traceparent") == TRACE.encode() and header(hs, "app") == b"x"
    assert header(hs, "infogrowth.error.reason") == b"malformed"
    assert b"undecodable msgpack" in (header(hs, "infogrowth.error.detail") or b"")
    assert header(hs, "infogrowth.error.topic") == t.ingest.encode()
    assert header(hs, "infogrowth.error.partition") == b"0"
    offset = int(header(hs, "infogrowth.error.offset") or b"-1")
    (orig,) = [x for x in read_topic(settings, t.ingest) if x.offset() == offset]
    assert orig.value() == bad


def test_clients_are_closed_before_the_broker_stops(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """What `make demo` showed after its passing audit: librdkafka connection errors, because
    the stages' clients were still open when the broker stopped. librdkafka logs to stderr."""
    from infogrowth_dev.kafka.broker import LocalBroker

    with LocalBroker() as broker:  # started on enter, stopped and removed on exit
        settings, inp = _prepared(tmp_path, broker.bootstrap_servers, 30)
        n = produce(settings, [inp])
        rt = build(settings, "all")
        run_until_drained(rt, n, timeout_s=120)
        assert not rt.errors and rt.committed_outputs() == n
        capfd.readouterr()
        broker.stop()
        time.sleep(5)  # librdkafka reconnects within ~1 s of losing a broker
        err = capfd.readouterr().err
        assert rt.loops  # the runtime (and its loops) is still referenced here
    lines = [ln for ln in err.splitlines() if "rdkafka" in ln or "Connect to" in ln]
    assert not lines, "\n".join(lines[:10])


def test_lag_in_seconds_follows_the_oldest_waiting_message(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Input that waited before the stages started is reported with its age, per stage and
    topic; once drained, both lag gauges read 0."""
    settings, inp = _prepared(tmp_path, kafka_bootstrap, 30)
    produced_at = time.time()
    n = produce(settings, [inp])
    time.sleep(2.0)
    rt = build(settings, "all")
    calls: list[tuple[str, str, int, float | None]] = []
    record = rt.metrics.set_oldest_unprocessed

    def spy(stage: str, topic: str, partition: int | str, ts: float | None) -> None:
        calls.append((stage, topic, int(partition), ts))
        record(stage, topic, partition, ts)

    rt.metrics.set_oldest_unprocessed = spy
    started = time.time()
    run_until_drained(rt, n)
    t = settings.kafka.topics
    ingest = [ts for stage, topic, _, ts in calls if (stage, topic) == ("embed", t.ingest)]
    assert ingest and ingest[0] is not None
    assert produced_at - 1.0 <= ingest[0] <= started - 1.5  # waited at least the 2 s sleep
    assert ingest[-1] is None  # caught up
    selected = [ts for stage, topic, _, ts in calls if (stage, topic) == ("select", t.embedded)]
    assert selected and selected[-1] is None
    # The embed stage holds no partition state, so its series outlive the shutdown (the select
    # stage drops its partitions' series when it releases them).
    text = rt.metrics.exposition().decode()
    labels = f'partition="0",stage="embed",topic="{t.ingest}"'
    assert f"infogrowth_consumer_lag_seconds{{{labels}}} 0.0" in text, text
    assert f"infogrowth_consumer_lag{{{labels}}} 0.0" in text
