"""Chaos on a 3-node cluster: kill -9 a partition leader or a transaction coordinator while
``infogrowth run`` is mid-transaction, restart the node, repeat.

The stream is fed in chunks, one per fault, so every kill lands while the embed stage still has
ingest to commit (counted as ``mid-stream kills`` in the notes): without that the pipeline would
drain the whole stream before the first kill. The consumer process is never restarted; it must
ride out each failover; like Kubernetes, the scenario restarts it when it exits or when its
``/healthz`` (the chart's liveness probe) says it is hung, and counts those restarts. The figure
per fault is the time from the kill until both stages (embed and select groups) have committed
again: the failover stall.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from infogrowth.config import Settings
from infogrowth.kafka.clients import consumer_config

if TYPE_CHECKING:
    from infogrowth_dev.chaos import Proc
    from infogrowth_dev.kafka.cluster import LocalCluster

_LOG = logging.getLogger(__name__)
VICTIMS = ("leader", "coordinator")
STAGES = ("embed", "select")
STALL_S = 240.0
"""How long both stages may take to commit again after a kill (restarts included)."""
DOWN_S = (5.0, 9.0)
"""How long a killed node stays down: past ``broker.session.timeout.ms`` (4 s), so the
controller fences it and leadership / coordination really move to a survivor."""


@dataclass
class KillLog:
    """What the fault loop did, for the scenario's notes."""

    kills: list[str] = field(default_factory=list)
    mid_stream: int = 0
    stalls: list[float] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)
    supervised: list[str] = field(default_factory=list)
    """Why the consumer process was restarted (it exited, or liveness failed)."""

    def notes(self) -> list[str]:
        out = [f"mid-stream kills: {self.mid_stream}/{len(self.kills)}"]
        out.append(
            f"consumer restarts: {len(self.supervised)}"
            + (f" ({'; '.join(self.supervised)})" if self.supervised else "")
        )
        if self.restarts:
            median = statistics.median(self.restarts)
            out.append(f"node restart → all replicas in sync: median {median:.1f} s")
        out.append("kills: " + ", ".join(self.kills))
        return out


class _Progress:
    """Committed offsets of the embed group (on the single-partition ingest topic) and of the
    select group (summed over the embedded partitions)."""

    def __init__(self, settings: Settings) -> None:
        t = settings.kafka.topics
        k = settings.kafka

        def probe(group: str) -> Consumer:
            # Never subscribes: reads the group's offsets and joins nothing. Its connection
            # errors (to the killed node) go to the log, not to stderr.
            return Consumer(consumer_config(settings, group, logger=_LOG, log_level=2))

        self.groups = {
            "embed": (probe(k.embed_group), [(t.ingest, 0)]),
            "select": (
                probe(k.select_group),
                [(t.embedded, p) for p in range(t.embedded_partitions)],
            ),
        }

    def committed(self, stage: str) -> int:
        c, parts = self.groups[stage]
        try:
            tps = c.committed([TopicPartition(t, p) for t, p in parts], timeout=5)
        except KafkaException:
            return -1
        return sum(max(tp.offset, 0) for tp in tps)

    def wait_beyond(
        self, stage: str, offset: int, timeout_s: float, tick: Any = None
    ) -> float | None:
        """Seconds until ``stage``'s committed offset exceeds ``offset`` (None on timeout);
        ``tick()`` runs between polls."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.committed(stage) > offset:
                return time.monotonic() - t0
            if tick is not None:
                tick()
            time.sleep(0.1)
        return None

    def close(self) -> None:
        for c, _ in self.groups.values():
            c.close()


def _supervise(proc: Proc, log: KillLog, after: str) -> None:
    """Kubernetes' part: restart the consumer if it exited, or if ``/healthz`` fails (the
    liveness probe; the process is SIGKILLed first)."""
    if proc.alive() and proc.healthy() is not False:
        return
    if proc.alive():
        why = f"liveness failed after {after}"
        proc.signal(signal.SIGKILL)
        proc.wait(30)
    else:
        code = None if proc.p is None else proc.p.returncode
        why = f"exited {code} after {after}"
    _LOG.warning("consumer %s: restarting", why)
    log.supervised.append(why)
    proc.start()
    proc.wait_ready(180)


def _victim(
    cluster: LocalCluster, settings: Settings, kind: str, i: int, prefix: str
) -> tuple[int, str]:
    """(node id, what it is) for the ``i``-th fault."""
    coordinators = {
        stage: cluster.transaction_coordinator(f"{prefix}-{stage}-i0")
        for stage in ("embed", "select")
    }
    if kind == "coordinator":
        stage = ("embed", "select")[i % 2]
        return coordinators[stage], f"{stage} coordinator"
    t = settings.kafka.topics
    n = settings.kafka.topics.embedded_partitions
    targets = [(topic, p) for p in range(n) for topic in (t.embedded, t.changelog, t.accepted)]
    targets += [(t.ingest, 0), (t.rejected, 0)]
    targets = targets[i % len(targets) :] + targets[: i % len(targets)]
    leaders = [
        (cluster.leader(topic, p), f"{topic.rsplit('.', 1)[-1]}[{p}] leader")
        for topic, p in targets
    ]
    # A leader that is not also a coordinator keeps the two scenarios apart, where possible.
    clean = [lv for lv in leaders if lv[0] >= 0 and lv[0] not in coordinators.values()]
    return (clean or leaders)[0]


def cluster_kills(
    proc: Proc,
    rng: random.Random,
    faults: int,
    rec: list[float],
    cluster: LocalCluster,
    settings: Settings,
    stream: list[bytes],
    kind: str,
    produce: Any,
) -> tuple[int, KillLog]:
    """Feed ``stream`` in ``faults + 1`` chunks; after each of the first ``faults`` chunks kill
    the chosen node mid-stream, keep it down a few seconds, restart it and wait until every
    replica is back in sync. Returns (kills, log); ``rec`` gets each failover stall."""
    if kind not in VICTIMS:
        raise ValueError(f"unknown victim {kind!r}")
    prefix = settings.kafka.transactional_id_prefix
    size = -(-len(stream) // (faults + 1))
    chunks = [stream[i * size : (i + 1) * size] for i in range(faults + 1)]
    progress = _Progress(settings)
    log = KillLog()
    end = 0
    try:
        proc.start()
        proc.wait_ready()
        for i in range(faults):
            start, end = end, end + len(chunks[i])
            produce(settings, chunks[i], settings.kafka.topics.ingest)
            # Kill as soon as the embed stage has committed a first part of this chunk: the
            # rest is in flight (a chunk takes seconds; the next transaction is already open).
            progress.wait_beyond("embed", start, 60)
            node, what = _victim(cluster, settings, kind, i, prefix)
            before = {stage: progress.committed(stage) for stage in ("embed", "select")}
            t_kill = time.monotonic()
            cluster.kill(node)
            busy = 0 <= before["embed"] < end
            log.mid_stream += busy
            log.kills.append(f"node {node} ({what}{'' if busy else ', idle'})")

            tick = functools.partial(_supervise, proc, log, f"killing node {node}")

            if busy:  # both stages must commit again while the node is down
                stalls = [progress.wait_beyond(s, before[s], STALL_S, tick) for s in STAGES]
                if None in stalls:
                    what = _stacks(proc)
                    raise RuntimeError(
                        f"no commit {STALL_S:.0f} s after killing node {node}; {what}: "
                        f"{proc.tail()}"
                    )
                rec.append(time.monotonic() - t_kill)  # both stages committed again
            time.sleep(max(0.0, t_kill + rng.uniform(*DOWN_S) - time.monotonic()))
            tick()
            log.restarts.append(cluster.start_node(node))
            _supervise(proc, log, f"restarting node {node}")
        produce(settings, chunks[faults], settings.kafka.topics.ingest)
        _supervise(proc, log, "the last fault")
        proc.signal(signal.SIGTERM)
        if proc.wait(90) != 0:
            raise RuntimeError(f"exit after the cluster faults was not clean: {proc.tail()}")
    finally:
        progress.close()
        for n in set(range(1, len(cluster.nodes) + 1)) - set(cluster.running()):
            cluster.start_node(n)  # leave the cluster whole for whoever uses it next
    return faults, log


def _stacks(proc: Proc) -> str:
    """Evidence from a stuck process: every native thread's stack (gdb, when installed) into
    ``stacks-<pid>.txt`` next to its log; then SIGTERM, after which its watchdog dumps the
    Python stacks into the log if the drain does not finish. Returns what happened."""
    if proc.p is None or not proc.alive():
        return f"the process had exited ({None if proc.p is None else proc.p.returncode})"
    gdb = shutil.which("gdb")
    if gdb:
        out = proc.log_path.with_name(f"stacks-{proc.p.pid}.txt")
        cmd = [gdb, "-p", str(proc.p.pid), "-batch", "-ex", "thread apply all bt"]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            out.write_text(res.stdout + res.stderr)
    proc.signal(signal.SIGTERM)
    try:
        return f"alive and stuck; after SIGTERM it exited {proc.wait(120)}"
    except subprocess.TimeoutExpired:  # still alive: the caller's cleanup kills it
        return "alive and stuck; SIGTERM did not end it within 120 s"
