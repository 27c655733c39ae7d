"""Topic layout on a real broker: create, re-check, mismatches, races; plus the pure helpers."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from infogrowth.config import LimitsConfig, TopicsConfig, load_settings
from infogrowth.kafka.admin import (
    TopicError,
    TopicReport,
    TopicSpec,
    admin_config,
    ensure_topics,
    topic_specs,
)
from infogrowth.kafka.clients import record_limit
from infogrowth_dev.kafka.broker import broker_for_tests

ROLES = ("ingest", "embedded", "changelog", "control", "accepted", "relabeled", "rejected")
SIZE = {"max.message.bytes": str(record_limit(LimitsConfig()))}


def _topics(**layout: int) -> TopicsConfig:
    """A TopicsConfig with fresh, unique names (so tests share one broker)."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return TopicsConfig(**{role: f"{prefix}.{role}" for role in ROLES}, **layout)


def _layout(bootstrap: str, names: list[str]) -> dict[str, tuple[int, int, str]]:
    """name -> (partitions, replication factor, cleanup.policy) as the broker reports it."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(timeout=10)
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names])
    policy = {res.name: fut.result(10)["cleanup.policy"].value for res, fut in futures.items()}
    out = {}
    for n in names:
        parts = md.topics[n].partitions
        out[n] = (len(parts), len(parts[0].replicas), policy[n])
    return out


def _precreate(bootstrap: str, name: str, partitions: int, config: dict[str, str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, partitions, 1, config=config)])
    futures[name].result(30)
    deadline = time.monotonic() + 30
    while name not in admin.list_topics(timeout=10).topics:  # metadata catches up a bit later
        assert time.monotonic() < deadline, f"{name} never showed up in metadata"
        time.sleep(0.05)


# ---------------------------------------------------------------------- pure helpers


def test_topic_specs_layout() -> None:
    t = _topics(ingest_partitions=2, embedded_partitions=3, output_partitions=4)
    specs = {s.name: s for s in topic_specs(t)}
    assert len(specs) == 7
    assert (specs[t.ingest].partitions, specs[t.ingest].keyed) == (2, False)
    assert (specs[t.embedded].partitions, specs[t.embedded].keyed) == (3, True)
    assert specs[t.changelog].partitions == 3 and specs[t.changelog].keyed
    assert specs[t.changelog].config == {"cleanup.policy": "compact", **SIZE}
    assert specs[t.control].partitions == 1
    assert specs[t.control].config == {"cleanup.policy": "compact", **SIZE}
    for role in ("accepted", "relabeled", "rejected"):
        spec = specs[getattr(t, role)]
        assert spec.partitions == 4 and spec.config == {"cleanup.policy": "delete", **SIZE}
    assert all(s.replication == 1 for s in specs.values())


def test_topic_specs_max_message_bytes_follow_limits() -> None:
    """Every topic accepts the largest record the limits allow (not the ~1 MiB broker default)."""
    limits = LimitsConfig(max_message_bytes=16 * 1024 * 1024)
    specs = topic_specs(_topics(), limits)
    want = str(16 * 1024 * 1024 + 65536)
    assert all(s.config["max.message.bytes"] == want for s in specs)
    small = topic_specs(_topics(), LimitsConfig(max_message_bytes=1000))
    assert all(int(s.config["max.message.bytes"]) >= 1048576 for s in small)


def test_topic_specs_shared_output_topic_and_conflicts() -> None:
    t = TopicsConfig(accepted="out", relabeled="out", rejected="out", output_partitions=2)
    names = [s.name for s in topic_specs(t)]
    assert names.count("out") == 1 and len(names) == 5
    with pytest.raises(ValueError, match="two roles"):
        topic_specs(TopicsConfig(changelog="same", embedded="same"))


def test_admin_config_passthrough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFOGROWTH_KAFKA__BOOTSTRAP_SERVERS", "b1:9093,b2:9093")
    monkeypatch.setenv(
        "INFOGROWTH_KAFKA__CLIENT",
        '{"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.password": "pw",'
        ' "bootstrap.servers": "ignored:1", "socket.timeout.ms": 5000}',
    )
    conf = admin_config(load_settings())
    assert conf == {
        "bootstrap.servers": "b1:9093,b2:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.password": "pw",
        "socket.timeout.ms": 5000,
    }


def test_ensure_topics_unreachable_broker_raises() -> None:
    specs = topic_specs(_topics())
    with pytest.raises(TopicError, match="cannot list topics"):
        ensure_topics({"bootstrap.servers": "127.0.0.1:1"}, specs, timeout_s=2.0)


def test_duplicate_specs_refused() -> None:
    spec = TopicSpec("x", 1, 1)
    with pytest.raises(ValueError, match="duplicate"):
        ensure_topics({"bootstrap.servers": "127.0.0.1:1"}, [spec, spec])


def test_report_ok_all() -> None:
    assert TopicReport(created=["a"], ok=["b"]).ok_all
    assert not TopicReport(missing=["a"]).ok_all
    assert not TopicReport(mismatches=["a: bad"]).ok_all


# ---------------------------------------------------------------------- real broker


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[str]:
    with broker_for_tests() as servers:
        yield servers


@pytest.fixture
def conf(bootstrap: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_creates_all_then_reports_ok(bootstrap: str, conf: dict[str, Any]) -> None:
    t = _topics(ingest_partitions=2, embedded_partitions=3, output_partitions=2)
    specs = topic_specs(t)
    names = [s.name for s in specs]

    first = ensure_topics(conf, specs)
    assert sorted(first.created) == sorted(names)
    assert first.ok == [] and first.mismatches == [] and first.ok_all

    layout = _layout(bootstrap, names)
    assert layout[t.ingest] == (2, 1, "delete")
    assert layout[t.embedded] == (3, 1, "delete")
    assert layout[t.changelog] == (3, 1, "compact")
    assert layout[t.control] == (1, 1, "compact")
    for role in ("accepted", "relabeled", "rejected"):
        assert layout[getattr(t, role)] == (2, 1, "delete")

    second = ensure_topics(conf, specs)
    assert second.created == [] and second.grown == [] and second.mismatches == []
    assert sorted(second.ok) == sorted(names) and second.ok_all


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_create_false_reports_missing(bootstrap: str, conf: dict[str, Any]) -> None:
    t = _topics()
    _precreate(bootstrap, t.ingest, 1, SIZE)
    report = ensure_topics(conf, topic_specs(t), create=False)
    assert report.created == []
    assert report.ok == [t.ingest]
    assert sorted(report.missing) == sorted(getattr(t, r) for r in ROLES if r != "ingest")
    assert not report.ok_all
    md = AdminClient(conf).list_topics(timeout=10)
    assert t.embedded not in md.topics  # nothing was created


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_wrong_layout_is_reported_never_ignored(bootstrap: str, conf: dict[str, Any]) -> None:
    t = _topics(ingest_partitions=3, embedded_partitions=2, output_partitions=1)
    _precreate(bootstrap, t.embedded, 1, SIZE)  # too few partitions on a keyed topic
    _precreate(bootstrap, t.changelog, 2, {"cleanup.policy": "delete", **SIZE})  # not compacted
    _precreate(bootstrap, t.control, 1, {"cleanup.policy": "compact,delete", **SIZE})
    _precreate(bootstrap, t.accepted, 3, SIZE)  # more partitions than configured
    _precreate(bootstrap, t.ingest, 1, SIZE)  # too few on a non-keyed topic
    specs = topic_specs(t)

    report = ensure_topics(conf, specs)
    assert sorted(report.created) == sorted([t.relabeled, t.rejected])
    assert report.ok == []
    assert not report.ok_all
    text = "\n".join(report.mismatches)
    assert f"{t.embedded}: 1 partitions, expected 2" in text
    assert f"{t.changelog}: cleanup.policy='delete', expected 'compact'" in text
    assert f"{t.control}: cleanup.policy='compact,delete', expected 'compact'" in text
    assert f"{t.accepted}: 3 partitions, expected 1 (Kafka cannot remove" in text
    assert f"{t.ingest}: 1 partitions, expected 3 (pass grow=True" in text
    assert len(report.mismatches) == 5

    # grow=True adds partitions to the ingest topic only; the keyed embedded topic is refused.
    grown = ensure_topics(conf, specs, grow=True)
    assert grown.grown == [t.ingest] and t.ingest in grown.ok
    refused = [m for m in grown.mismatches if m.startswith(f"{t.embedded}:")]
    assert len(refused) == 1 and "keyed topic" in refused[0]
    assert len(grown.mismatches) == 4
    layout = _layout(bootstrap, [t.ingest, t.embedded, t.changelog])
    assert layout[t.ingest][0] == 3
    assert layout[t.embedded][0] == 1  # untouched
    assert layout[t.changelog][2] == "delete"  # untouched


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_max_message_bytes_created_and_checked(bootstrap: str, conf: dict[str, Any]) -> None:
    """Created topics carry max.message.bytes from limits; one left at the broker default
    (which refuses records the limits allow: an abort loop) is a reported mismatch."""
    t = _topics()
    limits = LimitsConfig(max_message_bytes=4 * 1024 * 1024)
    want = str(record_limit(limits))
    _precreate(bootstrap, t.rejected, 1, {"cleanup.policy": "delete"})  # broker default size
    report = ensure_topics(conf, topic_specs(t, limits))
    assert report.mismatches == [f"{t.rejected}: max.message.bytes='1048588', expected {want!r}"], (
        report.mismatches
    )
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t.accepted)])
    (fut,) = futures.values()
    assert fut.result(10)["max.message.bytes"].value == want


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_replication_mismatch_reported(conf: dict[str, Any]) -> None:
    t = _topics()
    ensure_topics(conf, topic_specs(t))
    wanted = [TopicSpec(t.ingest, 1, 3, {"cleanup.policy": "delete"})]
    report = ensure_topics(conf, wanted)
    assert report.mismatches == [
        f"{t.ingest}: replication factor 1, expected 3 "
        "(not changed: reassign partitions or recreate the topic)"
    ]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_impossible_create_raises(conf: dict[str, Any]) -> None:
    spec = TopicSpec(f"t{uuid.uuid4().hex[:8]}.rf3", 1, 3)  # one broker cannot hold 3 replicas
    with pytest.raises(TopicError, match="cannot create topics"):
        ensure_topics(conf, [spec], timeout_s=15)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_concurrent_ensure_creates_each_topic_once(conf: dict[str, Any]) -> None:
    specs = topic_specs(_topics(embedded_partitions=2))
    names = sorted(s.name for s in specs)
    reports: list[TopicReport] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            barrier.wait()
            reports.append(ensure_topics(conf, specs))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(reports) == 4
    assert all(r.ok_all for r in reports), [r.mismatches for r in reports]
    created = [n for r in reports for n in r.created]
    assert sorted(created) == names  # each topic created by exactly one caller
    for r in reports:
        assert sorted(r.created + r.ok) == names
