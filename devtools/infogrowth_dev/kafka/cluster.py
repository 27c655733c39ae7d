"""A real multi-node Apache Kafka 4.x cluster (KRaft) from the same Maven jars as the dev broker.

Every node is a :class:`~infogrowth_dev.kafka.broker.LocalBroker` with combined broker + controller
roles and one static controller quorum of all nodes: three JVMs rather than six (separate
controllers), which is what a 2-core machine without Docker can carry. Three voters keep a quorum
with one node down, so any single node may be killed (SIGKILL) and started again while clients
keep working. Every topic, the internal ``__consumer_offsets`` and ``__transaction_state``
included, is replicated ``replication`` times with ``min.insync.replicas`` = ``min_isr``.

Helpers name the node to attack: :meth:`LocalCluster.leader` (a partition's leader) and
:meth:`LocalCluster.transaction_coordinator` (the leader of the ``__transaction_state``
partition a transactional id hashes to, which is how the broker picks its coordinator).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from infogrowth_dev.kafka.broker import (
    DEFAULT_KAFKA_VERSION,
    BrokerError,
    LocalBroker,
    _free_port,
    _port_open,
    _random_cluster_id,
    wait_for_broker,
)

__all__ = ["LocalCluster", "coordinator_partition", "java_string_hash"]

_LOG = logging.getLogger(__name__)
TRANSACTION_STATE = "__transaction_state"
CONSUMER_OFFSETS = "__consumer_offsets"
INTERNAL_PARTITIONS = 4
"""Partitions of ``__transaction_state`` and ``__consumer_offsets`` (the broker default is 50)."""


def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode()`` (UTF-16 code units, 32-bit signed overflow)."""
    data = text.encode("utf-16-be")
    h = 0
    for i in range(0, len(data), 2):
        h = (31 * h + int.from_bytes(data[i : i + 2], "big")) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def coordinator_partition(key: str, partitions: int) -> int:
    """The partition of ``__transaction_state`` (transactional id) or ``__consumer_offsets``
    (group id) whose leader coordinates ``key``: Kafka's ``Utils.abs(key.hashCode) % n``."""
    h = java_string_hash(key)
    return (0 if h == -(1 << 31) else abs(h)) % partitions


class LocalCluster:
    """``size`` real Kafka nodes on loopback ports, each with its own data directory.

    Used as a context manager it starts every node on enter and stops them (removing a temporary
    work dir) on exit. :meth:`kill` and :meth:`start_node` crash and bring back one node with
    its data, on the same ports.
    """

    def __init__(
        self,
        size: int = 3,
        work_dir: Path | str | None = None,
        *,
        replication: int | None = None,
        min_isr: int | None = None,
        version: str = DEFAULT_KAFKA_VERSION,
        extra_config: dict[str, str | int] | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.replication = replication if replication is not None else min(3, size)
        self.min_isr = min_isr if min_isr is not None else max(1, self.replication - 1)
        if not 1 <= self.min_isr <= self.replication <= size:
            raise ValueError(
                f"need 1 <= min_isr ({self.min_isr}) <= replication ({self.replication}) "
                f"<= size ({size})"
            )
        self._owns_work_dir = work_dir is None
        self.work_dir = Path(
            tempfile.mkdtemp(prefix="infogrowth-cluster-") if work_dir is None else work_dir
        ).resolve()
        ports: list[int] = []
        while len(ports) < 2 * size:
            port = _free_port()
            if port not in ports:
                ports.append(port)
        voters = ",".join(f"{i + 1}@127.0.0.1:{ports[2 * i + 1]}" for i in range(size))
        rf, isr = str(self.replication), str(self.min_isr)
        config: dict[str, str | int] = {
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": INTERNAL_PARTITIONS,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": INTERNAL_PARTITIONS,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            **(extra_config or {}),
        }
        cluster_id = _random_cluster_id()
        self.nodes = [
            LocalBroker(
                self.work_dir / f"node{i + 1}",
                version=version,
                port=ports[2 * i],
                controller_port=ports[2 * i + 1],
                extra_config=config,
                cache_dir=cache_dir,
                node_id=i + 1,
                quorum_voters=voters,
                cluster_id=cluster_id,
            )
            for i in range(size)
        ]
        self.startup_s: float | None = None

    @property
    def bootstrap_servers(self) -> str:
        """Every node's PLAINTEXT listener, comma-separated."""
        return ",".join(n.bootstrap_servers for n in self.nodes)

    def node(self, node_id: int) -> LocalBroker:
        """The node with ``node.id`` ``node_id`` (1-based)."""
        if not 1 <= node_id <= len(self.nodes):
            raise KeyError(f"no node {node_id} in a cluster of {len(self.nodes)}")
        return self.nodes[node_id - 1]

    def running(self) -> list[int]:
        """Node ids whose JVM runs."""
        return [n.node_id for n in self.nodes if n.is_running]

    # -- lifecycle

    def start(self, timeout_s: float = 240.0) -> LocalCluster:
        """Start every stopped node and wait until all serve and transactions work."""
        t0 = time.monotonic()
        for n in self.nodes:
            n.launch()
        try:
            self._wait_nodes([n.node_id for n in self.nodes], t0 + timeout_s)
            wait_for_broker(
                self.bootstrap_servers,
                max(1.0, t0 + timeout_s - time.monotonic()),
                transactions=True,
                alive=lambda: all(n.is_running for n in self.nodes),
            )
        except BrokerError as exc:
            tails = "\n".join(f"=== node {n.node_id}\n{n.log_tail(15)}" for n in self.nodes)
            self.stop()
            raise BrokerError(f"cluster did not come up: {exc}\n{tails}") from exc
        self.startup_s = time.monotonic() - t0
        return self

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (no clean shutdown)."""
        self.node(node_id).kill()

    def start_node(self, node_id: int, timeout_s: float = 180.0, *, in_sync: bool = True) -> float:
        """Start one stopped node again; wait until it is registered and, with ``in_sync``,
        until every replica of every partition is back in its ISR. Seconds it took."""
        t0 = time.monotonic()
        self.node(node_id).launch()
        self._wait_nodes([node_id], t0 + timeout_s)
        if in_sync:
            self.wait_in_sync(max(1.0, t0 + timeout_s - time.monotonic()))
        return time.monotonic() - t0

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every node gracefully, all at once (stopped one by one, the last nodes would
        lose their controller quorum and hang in controlled shutdown); SIGKILL what is still
        running after ``timeout_s``."""
        threads = [threading.Thread(target=n.stop, args=(timeout_s,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def close(self) -> None:
        """Stop every node and remove the work dir if it was a temporary one (then the nodes
        are killed: their data goes anyway)."""
        if self._owns_work_dir:
            for n in self.nodes:
                n.kill()
        else:
            self.stop()
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wait_nodes(self, node_ids: list[int], deadline: float) -> None:
        """Until the nodes' ports open and the cluster's metadata lists them as brokers."""
        from confluent_kafka import KafkaException

        pending = set(node_ids)
        while pending:
            for i in list(pending):
                node = self.node(i)
                if not node.is_running:
                    raise BrokerError(f"node {i} exited during startup:\n{node.log_tail(20)}")
                if _port_open(node.port):
                    try:
                        md = self._admin().list_topics(timeout=2)
                    except KafkaException:
                        continue
                    if i in md.brokers:
                        pending.discard(i)
            if pending and time.monotonic() > deadline:
                raise BrokerError(f"nodes {sorted(pending)} not registered in time")
            if pending:
                time.sleep(0.2)

    # -- who to attack

    def _admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        live = [n.bootstrap_servers for n in self.nodes if n.is_running]
        conf: dict[str, Any] = {
            "bootstrap.servers": ",".join(live) or self.bootstrap_servers,
            "logger": _LOG,  # connection refused by a killed node: not for stderr
        }
        return AdminClient(conf)

    def _metadata(self, topic: str | None = None) -> Any:
        return self._admin().list_topics(topic, timeout=10)

    def leader(self, topic: str, partition: int) -> int:
        """Node id of the partition's leader (-1 while it has none)."""
        return int(self._metadata(topic).topics[topic].partitions[partition].leader)

    def transaction_coordinator(self, transactional_id: str) -> int:
        """Node id of the transaction coordinator for ``transactional_id``."""
        n = len(self._metadata(TRANSACTION_STATE).topics[TRANSACTION_STATE].partitions)
        return self.leader(TRANSACTION_STATE, coordinator_partition(transactional_id, n))

    def group_coordinator(self, group_id: str) -> int:
        """Node id of the group coordinator for ``group_id``."""
        n = len(self._metadata(CONSUMER_OFFSETS).topics[CONSUMER_OFFSETS].partitions)
        return self.leader(CONSUMER_OFFSETS, coordinator_partition(group_id, n))

    def out_of_sync(self) -> list[str]:
        """``topic[partition]`` of every partition without a leader or with a replica out of
        its ISR."""
        bad: list[str] = []
        for name, tm in self._metadata().topics.items():
            for p, pm in tm.partitions.items():
                if pm.leader < 0 or set(pm.isrs) != set(pm.replicas):
                    bad.append(f"{name}[{p}]")
        return sorted(bad)

    def wait_in_sync(self, timeout_s: float = 120.0) -> None:
        """Until :meth:`out_of_sync` is empty; :class:`BrokerError` naming the laggards."""
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + timeout_s
        bad: list[str] = ["(no metadata yet)"]
        while time.monotonic() < deadline:
            try:
                bad = self.out_of_sync()
            except KafkaException as exc:
                bad = [f"(metadata: {exc})"]
            if not bad:
                return
            time.sleep(0.3)
        raise BrokerError(f"partitions out of sync after {timeout_s:.0f} s: {bad[:10]}")
