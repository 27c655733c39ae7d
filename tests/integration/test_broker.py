"""The local Kafka 4.x broker is real: transactions, restarts and detached mode end to end."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from infogrowth_dev.kafka.broker import (
    DEFAULT_KAFKA_VERSION,
    BrokerError,
    LocalBroker,
    bootstrap_for_tests,
    detached_status,
    resolve_kafka_classpath,
    start_detached,
    stop_detached,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

COMMITTED_1 = [f"committed-1-{i}" for i in range(5)]
ABORTED = [f"aborted-{i}" for i in range(3)]
COMMITTED_2 = [f"committed-2-{i}" for i in range(2)]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _create_topic(bootstrap: str, partitions: int = 2) -> str:
    topic = f"broker-test-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions)])
    futures[topic].result(timeout=30)
    return topic


def _produce_transactions(bootstrap: str, topic: str, txn_id: str) -> None:
    """Commit COMMITTED_1, abort ABORTED (after it reached the log), commit COMMITTED_2."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id})
    producer.init_transactions(30)
    for values, commit in ((COMMITTED_1, True), (ABORTED, False), (COMMITTED_2, True)):
        producer.begin_transaction()
        for value in values:
            producer.produce(topic, value=value.encode(), key=value.encode())
        assert producer.flush(30) == 0
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)


def _consume(bootstrap: str, topic: str, isolation: str, expected: int) -> list[str]:
    """Read ``topic`` from the start until ``expected`` records and end-of-partition are seen."""
    partitions = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    n = len(partitions.topics[topic].partitions)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"broker-test-{uuid.uuid4().hex[:8]}",
            "isolation.level": isolation,
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(n)])
    values: list[str] = []
    at_eof: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        # Markers are written just after commit returns, so keep reading until the count is
        # reached, then until every partition reports EOF again (to catch extra records).
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                at_eof.add(int(msg.partition() or 0))
                if len(values) >= expected and len(at_eof) == n:
                    break
                continue
            at_eof.discard(int(msg.partition() or 0))
            values.append((msg.value() or b"").decode())
    finally:
        consumer.close()
    return values


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as running:
        yield running
    assert not running.is_running
    assert not running.work_dir.exists()


def test_classpath_is_cached() -> None:
    resolve_kafka_classpath()  # resolves with Maven on a cold cache
    start = time.monotonic()
    jars = resolve_kafka_classpath()
    assert time.monotonic() - start < 1.0  # warm: marker file only, no Maven
    names = {jar.name for jar in jars}
    assert f"kafka_2.13-{DEFAULT_KAFKA_VERSION}.jar" in names
    assert any(name.startswith("log4j-slf4j-impl-") for name in names)
    assert all(jar.is_file() for jar in jars)


def test_read_committed_sees_only_committed_records(broker: LocalBroker) -> None:
    topic = _create_topic(broker.bootstrap_servers)
    _produce_transactions(broker.bootstrap_servers, topic, f"txn-{topic}")
    committed = COMMITTED_1 + COMMITTED_2
    seen = _consume(broker.bootstrap_servers, topic, "read_committed", len(committed))
    assert sorted(seen) == sorted(committed)
    # The aborted records did reach the log: read_uncommitted returns them as well.
    everything = committed + ABORTED
    raw = _consume(broker.bootstrap_servers, topic, "read_uncommitted", len(everything))
    assert sorted(raw) == sorted(everything)


def test_broker_logs_to_file_not_stdout(broker: LocalBroker) -> None:
    assert "Kafka Server started" in broker.log_path.read_text()
    stdout = (broker.logs_dir / "stdout.log").read_text()
    assert "INFO" not in stdout
    assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"


def test_env_bootstrap_is_used_and_checked(
    broker: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers)
    bootstrap, cleanup = bootstrap_for_tests(timeout_s=30)
    assert bootstrap == broker.bootstrap_servers
    cleanup()
    assert broker.is_running
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{port}")
    with pytest.raises(BrokerError):
        bootstrap_for_tests(timeout_s=2)


def test_bad_config_fails_with_log_tail(tmp_path: Path) -> None:
    bad = LocalBroker(tmp_path / "bad", extra_config={"num.partitions": "not-a-number"})
    with pytest.raises(BrokerError, match=r"num\.partitions"):
        bad.start(timeout_s=60)
    assert not bad.is_running


def test_stop_kill_and_restart_keep_committed_records(tmp_path: Path) -> None:
    with LocalBroker(tmp_path / "kafka") as b:
        bootstrap, port = b.bootstrap_servers, b.port
        topic = _create_topic(bootstrap)
        _produce_transactions(bootstrap, topic, f"txn-{topic}")
        committed = COMMITTED_1 + COMMITTED_2

        b.stop()
        assert not b.is_running
        assert not _port_open(port)
        b.start()
        assert (b.bootstrap_servers, b.port) == (bootstrap, port)
        assert sorted(_consume(bootstrap, topic, "read_committed", len(committed))) == sorted(
            committed
        )

        b.restart(downtime_s=1.0, graceful=False)  # SIGKILL: a crash, not a clean shutdown
        assert b.bootstrap_servers == bootstrap
        assert sorted(_consume(bootstrap, topic, "read_committed", len(committed))) == sorted(
            committed
        )
        # The same transactional id works again after the crash and sees its earlier commits.
        _produce_transactions(bootstrap, topic, f"txn-{topic}")
        assert len(_consume(bootstrap, topic, "read_committed", 2 * len(committed))) == 2 * len(
            committed
        )
    assert not b.is_running
    assert (tmp_path / "kafka" / "data" / "meta.properties").is_file()


def test_freeze_and_thaw(broker: LocalBroker) -> None:
    broker.freeze()
    assert broker.frozen
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    with pytest.raises(Exception):  # noqa: B017 - any client error: the broker does not answer
        admin.list_topics(timeout=1.5)
    broker.thaw()
    assert not broker.frozen
    assert broker.bootstrap_servers.endswith(str(broker.port))
    assert admin.list_topics(timeout=15).brokers


def test_detached_start_status_stop(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    assert detached_status(state_dir) is None
    try:
        bootstrap = start_detached(state_dir)
        status = detached_status(state_dir)
        assert status is not None
        pid = int(status["pid"])
        assert status["bootstrap"] == bootstrap
        assert status["reachable"] is True
        assert os.getsid(pid) == pid  # own session: survives the calling process
        assert start_detached(state_dir) == bootstrap  # idempotent
        assert int((detached_status(state_dir) or {})["pid"]) == pid
        topic = _create_topic(bootstrap, partitions=1)

        assert stop_detached(state_dir) is True
        assert detached_status(state_dir) is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert stop_detached(state_dir) is False

        # A second start reuses the data and the port (free again now).
        assert start_detached(state_dir) == bootstrap
        md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=15)
        assert topic in md.topics
    finally:
        stop_detached(state_dir, purge=True)
    assert detached_status(state_dir) is None
    assert not (state_dir / "kafka").exists()
