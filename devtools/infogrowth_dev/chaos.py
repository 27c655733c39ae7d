"""``infogrowth chaos``: fault injection against the real process on a real broker.

Each scenario curates the same synthetic stream (clustered precomputed embeddings with injected
duplicates, label flips and optionally poison) twice: once undisturbed (the reference) and once
while faults are injected into ``infogrowth run`` processes. Then it checks, read_committed:
every ingest message has exactly one output (``audit``), every decision equals the reference's,
and the changelog-derived index size equals accepted + relabeled + seed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import msgpack
import yaml

from infogrowth.config import Settings, load_settings
from infogrowth.kafka.embed import DELAY_ENV
from infogrowth_dev import chaos_state

log = logging.getLogger(__name__)
SCENARIOS = (
    "kill9",
    "churn",
    "broker-bounce",
    "snapshot-damage",
    "poison",
    "slow",
    "cluster-leader",
    "cluster-coordinator",
    "fenced",
    "recreate",
    "reseed",
    "slow-churn",
    "oversized",
)
CHAOS_MAX_MESSAGE_BYTES = 65536
SLOW_EMBED_S = 0.3
"""slow-churn: seconds every embed batch sleeps (the testing aid, a slow encoder)."""
CLUSTER_VICTIMS = {"cluster-leader": "leader", "cluster-coordinator": "coordinator"}
"""Scenarios on their own 3-node cluster (replication 3, min.insync.replicas 2)."""


@dataclass
class ChaosResult:
    scenario: str
    faults: int
    samples: int
    lost: int
    duplicated: int
    mismatched: int
    index_ok: bool
    embedded_mismatched: int
    """Ingest positions embedded a different number of times than in the reference run."""
    recovery_median_s: float | None
    recovery_max_s: float | None
    elapsed_s: float
    notes: list[str] = field(default_factory=list)
    faults_mid_stream: int | None = None
    """Cluster scenarios: kills that landed while the embed stage still had ingest to commit."""
    failed_checks: list[str] = field(default_factory=list)
    """Scenario-specific promises that did not hold (an exit code, a refusal, a discard)."""

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.mismatched == 0
            and self.index_ok
            and self.embedded_mismatched == 0
            and not self.failed_checks
        )


# -- data ------------------------------------------------------------------------------------


def poison_messages(n: int, rng: random.Random, dim: int) -> list[bytes]:
    """Every kind of bad input the schema rejects, plus random bytes, cycled to ``n`` items."""
    from PIL import Image

    def png_bomb() -> bytes:
        import io
        import struct
        import zlib

        img = io.BytesIO()
        Image.new("L", (8, 8)).save(img, format="PNG")
        data = bytearray(img.getvalue())
        # Rewrite the IHDR size to 60000 x 60000 (3.6 gigapixels) and fix its CRC.
        data[16:24] = struct.pack(">II", 60000, 60000)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
        return bytes(data)

    def emb(v: float) -> list[float]:
        return [v] * dim

    makers: list[Callable[[int], bytes]] = [
        lambda i: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))),
        lambda i: msgpack.packb([1, 2, 3]),
        lambda i: msgpack.packb({"text": "no id"}),
        lambda i: msgpack.packb({"id": f"p{i}", "text": 12345}),
        lambda i: msgpack.packb({"id": f"p{i}", "v": 7, "text": "future version"}),
        lambda i: msgpack.packb(
            {"id": f"p{i}", "embedding": {"image": emb(float("nan")), "text": emb(1.0)}}
        ),
        lambda i: msgpack.packb({"id": f"p{i}", "embedding": {"image": [1.0] * 3, "text": [1.0]}}),
        lambda i: msgpack.packb({"id": f"p{i}", "embedding": {"image": emb(0.0), "text": emb(0)}}),
        lambda i: msgpack.packb({"id": f"p{i}", "text": "x", "extra": True}),
        lambda i: msgpack.packb({"id": f"p{i}", "image": b"\xff\xd8garbage", "text": "x"}),
        lambda i: msgpack.packb({"id": f"p{i}", "image": png_bomb(), "text": "x"}),
        lambda i: msgpack.packb({"id": f"p{i}", "text": "x" * 70_000}),  # over the message limit
        lambda i: b"",
        lambda i: b"\xa3\xff\xfe\xfd",  # msgpack str with invalid UTF-8
    ]
    return [makers[i % len(makers)](i) for i in range(n)]


def build_stream(n: int, poison_rate: float, seed: int) -> tuple[list[bytes], list[bytes]]:
    """(ingest messages, seed messages) as msgpack bytes, poison interleaved deterministically."""
    from infogrowth_dev.synthetic import clustered

    data = clustered(n, dim=32, dup_rate=0.1, flip_rate=0.05, seed=seed)
    seed_rows = clustered(200, dim=32, seed=seed + 1, prefix="seed").samples
    rng = random.Random(seed)
    good = [msgpack.packb({"v": 1, **r}) for r in data.samples]
    n_poison = round(n * poison_rate)
    bad = poison_messages(n_poison, rng, 32)
    stream = good + bad
    random.Random(seed + 2).shuffle(stream)
    return stream, [msgpack.packb({"v": 1, **r}) for r in seed_rows]


def oversized_messages(n: int, limit: int, seed: int) -> list[bytes]:
    """``n`` incompressible messages just under the topic limit ``limit``: the broker takes them
    into ingest, but a rejection carrying their bytes would not fit the rejected topic."""
    rng = random.Random(seed)
    return [rng.randbytes(limit - 600) for _ in range(n)]


# -- plumbing --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    path: Path, bootstrap: str, state: Path, rid: str, instance: str, **extra: Any
) -> Path:
    """A chaos-sized run: small transactions, frequent snapshots, short timeouts."""
    from infogrowth_dev.kafka.sandbox import write_sandbox_config

    overrides: dict[str, Any] = {
        "kafka.topics.embedded_partitions": 2,
        "kafka.topics.output_partitions": 2,
        "kafka.commit_interval_ms": 200,
        "kafka.commit_max_messages": 50,
        "kafka.session_timeout_ms": 6000,
        "kafka.max_poll_interval_ms": 10000,
        "kafka.transaction_timeout_ms": 15000,
        "kafka.drain_timeout_s": 45,
        "limits.max_message_bytes": CHAOS_MAX_MESSAGE_BYTES,
        "snapshot.interval_s": 0.5,
        "snapshot.interval_items": 150,
        "serve.port": _free_port(),
        "select.keep_fraction": 0.5,  # the budget's online scale is state: restore == replay
        **extra,
    }
    return write_sandbox_config(
        path, bootstrap, state, run_id=rid, prefix="chaos-", instance=instance, overrides=overrides
    )


def _produce_raw(settings: Settings, messages: list[bytes], topic: str) -> None:
    from confluent_kafka import Producer

    from infogrowth.kafka.clients import producer_config

    p = Producer(producer_config(settings, None))
    for m in messages:
        while True:
            try:
                p.produce(topic, value=m)
                break
            except BufferError:
                p.poll(0.1)
    if p.flush(120):
        raise RuntimeError("could not deliver the chaos stream")


def _seed_and_produce(
    settings: Settings, workdir: Path, stream: list[bytes], seed: list[bytes]
) -> None:
    from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
    from infogrowth.kafka.seed import seed as run_seed

    report = ensure_topics(
        admin_config(settings), topic_specs(settings.kafka.topics, settings.limits)
    )
    if not report.ok_all:
        raise RuntimeError(f"topics: {report.mismatches}")
    seed_file = workdir / "seed.jsonl"
    with seed_file.open("w") as fh:
        for m in seed:
            fh.write(json.dumps(msgpack.unpackb(m)) + "\n")
    run_seed(settings, seed_file)
    _produce_raw(settings, stream, settings.kafka.topics.ingest)


class Proc:
    """One ``infogrowth run`` subprocess with its config, log and readiness probe."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.env = dict(env or {})
        self.port = int(yaml.safe_load(config.read_text())["serve"]["port"])
        self.p: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self, *extra: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as fh:
            self.p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "infogrowth.cli",
                    "run",
                    "--config",
                    str(self.config),
                    *extra,
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.port}/readyz"
            return bool(urllib.request.urlopen(url, timeout=1).status == 200)
        except OSError:
            return False

    def healthy(self) -> bool | None:
        """``/healthz`` answers 200 (True) or an error status (False); None if it does not
        answer at all (starting, or gone)."""
        try:
            url = f"http://127.0.0.1:{self.port}/healthz"
            return bool(urllib.request.urlopen(url, timeout=2).status == 200)
        except urllib.error.HTTPError:
            return False
        except OSError:
            return None

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from start to ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"consumer exited early: {self.tail()}")
            if self.ready():
                return time.monotonic() - self.started_at
            time.sleep(0.1)
        raise TimeoutError(f"not ready after {timeout}s: {self.tail()}")

    def signal(self, sig: int) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout: float = 120.0) -> int:
        assert self.p is not None
        return self.p.wait(timeout)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _drain(proc: Proc, timeout: float = 300.0) -> None:
    proc.start("--exit-when-idle", "3")
    code = proc.wait(timeout)
    if code != 0:
        raise RuntimeError(f"final drain exited {code}: {proc.tail()}")


def _timed_drain(proc: Proc, settings: Settings, timeout: float = 600.0) -> float:
    """Seconds from ready until both stages have committed everything, then SIGTERM."""
    from infogrowth.kafka.tools import group_drained

    k = settings.kafka
    proc.start()
    proc.wait_ready()
    t0 = time.monotonic()
    while not (
        group_drained(settings, k.embed_group, k.topics.ingest)
        and group_drained(settings, k.select_group, k.topics.embedded)
    ):
        if time.monotonic() - t0 > timeout or not proc.alive():
            raise RuntimeError(f"not drained after {timeout:.0f} s: {proc.tail()}")
        time.sleep(0.25)
    took = time.monotonic() - t0
    proc.signal(signal.SIGTERM)
    if proc.wait(90) != 0:
        raise RuntimeError(f"SIGTERM exit code was not 0: {proc.tail()}")
    return took


def _decisions(settings: Settings) -> dict[str, tuple[Any, ...]]:
    from infogrowth.kafka.reader import read_topic

    out: dict[str, tuple[Any, ...]] = {}
    for name in ("accepted", "relabeled", "rejected"):
        for m in read_topic(settings, getattr(settings.kafka.topics, name)):
            r = msgpack.unpackb(m.value(), raw=False)
            out[_position_free(r["id"])] = (r["decision"], r["reason"], r["gain"], r["label"])
    return out


def _embedded(settings: Settings) -> Counter[str]:
    """How often each ingest position was embedded (committed), replica records aside."""
    from infogrowth.kafka.reader import read_topic
    from infogrowth.messages import source_key

    seen: Counter[str] = Counter()
    for m in read_topic(settings, settings.kafka.topics.embedded):
        rec = msgpack.unpackb(m.value(), raw=False)
        if isinstance(rec, dict) and not rec.get("replica"):
            seen[_position_free(source_key(rec.get("source")))] += 1
    return seen


def _position_free(sid: str) -> str:
    """Id-less input is named ``@topic:partition:offset``; compare runs by partition and offset."""
    return "@" + sid.split(":", 1)[1] if sid.startswith("@") and ":" in sid else sid


def _changelog_size(settings: Settings) -> int:
    """Distinct items in the changelog (ids; a replica shares its id, state records are not
    items)."""
    from infogrowth.kafka.reader import read_topic
    from infogrowth.kafka.select import STATE_KEY

    keys = {m.key() for m in read_topic(settings, settings.kafka.topics.changelog)}
    return len(keys - {STATE_KEY})


@contextmanager
def _broker(bootstrap: str | None) -> Iterator[tuple[str, Any]]:
    if bootstrap:
        yield bootstrap, None
        return
    from infogrowth_dev.kafka.broker import LocalBroker

    with LocalBroker() as b:
        b.start()
        yield b.bootstrap_servers, b


@contextmanager
def _cluster(cluster: Any) -> Iterator[tuple[str, Any]]:
    """The given :class:`~infogrowth_dev.kafka.cluster.LocalCluster`, or a fresh 3-node one."""
    if cluster is not None:
        yield cluster.bootstrap_servers, cluster
        return
    from infogrowth_dev.kafka.cluster import LocalCluster

    with LocalCluster(3) as c:
        yield c.bootstrap_servers, c


# -- scenarios -------------------------------------------------------------------------------


def _kill9(procs: list[Proc], rng: random.Random, faults: int, rec: list[float]) -> int:
    proc = procs[0]
    done = 0
    for _ in range(faults):
        proc.start()
        rec.append(proc.wait_ready())
        time.sleep(rng.uniform(0.0, 1.5))  # mid-batch, mid-commit, mid-snapshot...
        proc.signal(signal.SIGKILL)
        proc.wait(30)
        done += 1
        if rng.random() < 0.3:  # also kill during restore, before ready
            proc.start()
            time.sleep(rng.uniform(0.2, 1.0))
            proc.signal(signal.SIGKILL)
            proc.wait(30)
            done += 1
    return done


def _churn(procs: list[Proc], rng: random.Random, faults: int, rec: list[float]) -> int:
    a, b = procs
    a.start()
    rec.append(a.wait_ready())
    done = 0
    for i in range(faults):
        if i % 2 == 0:  # a second instance joins, then leaves: two rebalances
            b.start()
            rec.append(b.wait_ready())
            time.sleep(rng.uniform(1.0, 3.0))
            b.signal(signal.SIGTERM)
            if b.wait(60) != 0:
                raise RuntimeError(f"SIGTERM exit code was not 0: {b.tail()}")
        else:  # SIGTERM / restart of the first
            time.sleep(rng.uniform(0.5, 2.0))
            a.signal(signal.SIGTERM)
            if a.wait(60) != 0:
                raise RuntimeError(f"SIGTERM exit code was not 0: {a.tail()}")
            a.start()
            rec.append(a.wait_ready())
        done += 1
    a.signal(signal.SIGTERM)
    a.wait(60)
    return done


def _bounce(
    procs: list[Proc], rng: random.Random, faults: int, rec: list[float], broker: Any
) -> int:
    if broker is None:
        raise RuntimeError("broker-bounce needs the chaos run to own its broker")
    proc = procs[0]
    proc.start()
    proc.wait_ready()
    for _ in range(faults):
        time.sleep(rng.uniform(0.5, 2.0))
        broker.stop()
        down = rng.uniform(10.0, 20.0)
        time.sleep(down)
        t0 = time.monotonic()
        broker.start()
        if not proc.alive():
            raise RuntimeError(f"consumer died while the broker was down: {proc.tail()}")
        rec.append(time.monotonic() - t0)
    time.sleep(3)
    if not proc.alive():
        raise RuntimeError(f"consumer did not survive the bounce: {proc.tail()}")
    proc.signal(signal.SIGTERM)
    if proc.wait(90) != 0:
        raise RuntimeError(f"exit after bounce was not clean: {proc.tail()}")
    return faults


def _damage(
    procs: list[Proc], rng: random.Random, faults: int, rec: list[float], state: Path
) -> int:
    proc = procs[0]
    kinds = ("truncate", "corrupt", "delete", "manifest")
    for i in range(faults):
        proc.start()
        rec.append(proc.wait_ready())
        time.sleep(rng.uniform(0.5, 2.0))
        proc.signal(signal.SIGTERM)
        proc.wait(60)
        kind = kinds[i % len(kinds)]
        for part in state.glob("*"):
            cur = part / "CURRENT"
            if not cur.is_file():
                continue
            snap = part / cur.read_text().strip()
            if not snap.is_dir():  # already deleted by an earlier round, no newer one written
                continue
            target = snap / "space-image.bin"
            if kind == "truncate" and target.exists():
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            elif kind == "corrupt" and target.exists():
                data = bytearray(target.read_bytes())
                data[rng.randrange(len(data))] ^= 0xFF
                target.write_bytes(bytes(data))
            elif kind == "delete":
                shutil.rmtree(snap, ignore_errors=True)
            elif kind == "manifest":
                (snap / "manifest.json").write_text("{")
    return faults


def _slow(procs: list[Proc], rng: random.Random, faults: int, rec: list[float]) -> int:
    """Freeze one instance (SIGSTOP) past max.poll.interval.ms while a second takes over; on
    SIGCONT it is a zombie whose transaction must be fenced, not committed."""
    a, b = procs
    a.start()
    rec.append(a.wait_ready())
    b.start()
    rec.append(b.wait_ready())
    for _ in range(faults):
        time.sleep(rng.uniform(0.3, 1.5))
        a.signal(signal.SIGSTOP)
        time.sleep(rng.uniform(12.0, 16.0))  # > max.poll.interval.ms (10 s) and the session
        a.signal(signal.SIGCONT)
        time.sleep(rng.uniform(2.0, 4.0))
    for p in (a, b):
        p.signal(signal.SIGTERM)
        p.wait(90)
    return faults


@dataclass
class _Run:
    """One scenario's fault phase: what it works on, and what it reports."""

    name: str
    procs: list[Proc]
    rng: random.Random
    faults: int
    broker: Any
    """The scenario's own broker or cluster, when it has one."""
    bootstrap: str
    settings: Settings
    work: Path
    stream: list[bytes]
    baseline: list[bytes]
    """The stream without the oversized messages (the same stream in other scenarios)."""
    seed_msgs: list[bytes] = field(default_factory=list)
    held: list[list[bytes]] = field(default_factory=list)
    configs: list[Path] = field(default_factory=list)
    state: Path = Path()
    done: int = 0
    rec: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mid_stream: int | None = None


def _inject(r: _Run) -> None:
    """Run the scenario's faults against ``r.procs`` (the final drain is the caller's)."""
    procs, rng, n, rec = r.procs, r.rng, r.faults, r.rec
    if r.name == "kill9":
        r.done = _kill9(procs, rng, n, rec)
    elif r.name in ("churn", "slow-churn"):
        r.done = _churn(procs, rng, n, rec)
    elif r.name == "broker-bounce":
        r.done = _bounce(procs, rng, n, rec, r.broker)
    elif r.name == "snapshot-damage":
        r.done = _damage(procs, rng, n, rec, r.state)
    elif r.name == "slow":
        r.done = _slow(procs, rng, n, rec)
    elif r.name in CLUSTER_VICTIMS:
        from infogrowth_dev.chaos_cluster import cluster_kills

        victim = CLUSTER_VICTIMS[r.name]
        r.done, kills = cluster_kills(
            procs[0], rng, n, rec, r.broker, r.settings, r.stream, victim, _produce_raw
        )
        r.notes += kills.notes()
        r.mid_stream = kills.mid_stream
    elif r.name == "fenced":

        def feed(i: int) -> None:
            _produce_raw(r.settings, r.held[i], r.settings.kafka.topics.ingest)

        r.done, r.failed = chaos_state.fenced(procs, rng, n, rec, r.settings, feed)
    elif r.name == "recreate":

        def rebuild() -> None:
            _seed_and_produce(r.settings, r.work, r.stream, r.seed_msgs)

        r.done, r.failed = chaos_state.recreate(procs, rng, n, rec, r.settings, rebuild)
    elif r.name == "reseed":
        seed_file = r.work / "seed.jsonl"
        r.done, r.failed = chaos_state.reseed(procs, rng, n, rec, r.configs[0], seed_file)
    elif r.name == "oversized":
        _oversized(r)


def _oversized(r: _Run) -> None:
    """Drain the stream with its oversized messages, timed, then the same stream without them
    on topics of its own: the other messages' throughput must not suffer (no abort loop)."""
    r.done = len(r.stream) - len(r.baseline)
    with_big = _timed_drain(r.procs[0], r.settings)
    base_cfg = write_config(
        r.work / "base.yaml", r.bootstrap, r.work / "base-state", uuid.uuid4().hex[:6], "b"
    )
    base_settings = load_settings(base_cfg)
    _seed_and_produce(base_settings, r.work, r.baseline, r.seed_msgs)
    without = _timed_drain(Proc(base_cfg, r.work / "base.log"), base_settings)
    n = len(r.baseline)
    r.notes.append(
        f"throughput of the other {n} messages: {n / with_big:.0f}/s with {r.done} "
        f"oversized ({with_big:.1f} s) vs {n / without:.0f}/s without ({without:.1f} s)"
    )
    if with_big > 2 * without:
        r.failed.append(f"the oversized messages halved throughput: {r.notes[-1]}")


def run_scenario(
    name: str,
    *,
    samples: int = 5000,
    faults: int | None = None,
    bootstrap: str | None = None,
    seed: int = 1,
    workdir: Path | None = None,
    cluster: Any = None,
) -> ChaosResult:
    """Run one scenario end to end and return its figures. The cluster scenarios run on
    ``cluster`` (a running :class:`~infogrowth_dev.kafka.cluster.LocalCluster`) or their own."""
    from infogrowth.kafka.tools import audit

    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    t_start = time.monotonic()
    rng = random.Random(seed)
    work = workdir or Path(tempfile.mkdtemp(prefix=f"chaos-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    poison = 0.10 if name == "poison" else 0.02
    stream, seed_msgs = build_stream(samples, poison, seed)
    baseline = stream
    if name == "oversized":  # 5% of the stream, at positions fixed by the seed
        from infogrowth.config import LimitsConfig
        from infogrowth.kafka.clients import record_limit

        limit = record_limit(LimitsConfig(max_message_bytes=CHAOS_MAX_MESSAGE_BYTES))
        big = oversized_messages(round(samples * 0.05), limit, seed)
        stream = stream + big
        random.Random(seed + 3).shuffle(stream)
    default_faults = {
        "kill9": 20,
        "churn": 6,
        "broker-bounce": 1,
        "snapshot-damage": 4,
        "poison": 0,
        "slow": 1,
        "cluster-leader": 10,
        "cluster-coordinator": 10,
        "fenced": 6,
        "recreate": 2,
        "reseed": 3,
        "slow-churn": 6,
        "oversized": 0,
    }
    n_faults = default_faults[name] if faults is None else faults
    victim = CLUSTER_VICTIMS.get(name)
    extra: dict[str, Any] = {"kafka.topics.replication_factor": 3} if victim else {}
    notes: list[str] = []
    where = _cluster(cluster) if victim else _broker(None if name == "broker-bounce" else bootstrap)
    with where as (bs, broker):
        # Reference: the same stream, undisturbed, on its own topics.
        ref_id = uuid.uuid4().hex[:6]
        ref_cfg = write_config(work / "ref.yaml", bs, work / "ref-state", ref_id, "ref", **extra)
        ref_settings = load_settings(ref_cfg)
        _seed_and_produce(ref_settings, work, stream, seed_msgs)
        ref = Proc(ref_cfg, work / "ref.log")
        _drain(ref)
        reference = _decisions(ref_settings)
        ref_embedded = _embedded(ref_settings)

        rid = uuid.uuid4().hex[:6]
        cfgs = [
            write_config(work / f"c{i}.yaml", bs, work / f"state{i}", rid, f"i{i}", **extra)
            for i in range(2)
        ]
        settings = load_settings(cfgs[0])
        # The cluster scenarios feed the stream chunk by chunk, between their faults; fenced
        # holds back its last messages, 20 per fault, to feed one piece after each fence.
        first = [] if victim else stream
        held: list[list[bytes]] = []
        if name == "fenced":
            cut = len(stream) - 20 * n_faults
            first = stream[:cut]
            held = [stream[cut + 20 * i : cut + 20 * (i + 1)] for i in range(n_faults)]
        _seed_and_produce(settings, work, first, seed_msgs)
        env = {DELAY_ENV: str(SLOW_EMBED_S)} if name == "slow-churn" else {}
        procs = [Proc(c, work / f"run{i}.log", env) for i, c in enumerate(cfgs)]
        run = _Run(name, procs, rng, n_faults, broker, bs, settings, work, stream, baseline)
        run.seed_msgs, run.held, run.configs, run.state = seed_msgs, held, cfgs, work / "state0"
        try:
            _inject(run)
        except BaseException:
            for proc in procs:  # a failed scenario leaves no process behind
                proc.signal(signal.SIGKILL)
            raise
        done, rec, failed, mid_stream = run.done, run.rec, run.failed, run.mid_stream
        notes += run.notes
        _drain(procs[0])  # finish whatever is left
        result = audit(settings)
        failed += _after_checks(name, procs[0], result, len(stream) - len(baseline))
        got = _decisions(settings)
        mismatched = sum(1 for k, v in reference.items() if got.get(k) != v)
        kept = result.outputs.get("accepted", 0) + result.outputs.get("relabeled", 0)
        index_size = _changelog_size(settings)
        got_embedded = _embedded(settings)
        embedded_off = sorted(
            k
            for k in ref_embedded.keys() | got_embedded.keys()
            if ref_embedded[k] != got_embedded[k]
        )
        if embedded_off:
            notes.append(f"embedded positions off vs reference: {embedded_off[:5]}")
        seed_count = 200
        if index_size != kept + seed_count:
            notes.append(f"changelog holds {index_size}, expected {kept} + {seed_count} seed")
    return ChaosResult(
        scenario=name,
        faults=done,
        samples=len(stream),
        lost=len(result.missing),
        duplicated=len(result.duplicated) + len(result.unexpected),
        mismatched=mismatched,
        index_ok=index_size == kept + seed_count,
        embedded_mismatched=len(embedded_off),
        recovery_median_s=round(statistics.median(rec), 2) if rec else None,
        recovery_max_s=round(max(rec), 2) if rec else None,
        elapsed_s=round(time.monotonic() - t_start, 1),
        notes=notes,
        faults_mid_stream=mid_stream,
        failed_checks=failed,
    )


def _after_checks(name: str, proc: Proc, result: Any, oversized: int) -> list[str]:
    """What a scenario promises beyond the audit, checked once it is drained."""
    from infogrowth_dev.chaos_state import stale_discards

    failed: list[str] = []
    log_text = proc.log_path.read_text(errors="replace")
    if name == "recreate" and stale_discards(proc) < 2:
        failed.append("no restart logged a stale snapshot discarded (topics recreated)")
    if name == "oversized":
        too_large = result.reasons.get("rejected/too_large", 0)
        if too_large != oversized:
            failed.append(f"{too_large} rejected/too_large for {oversized} oversized messages")
        if "aborting transaction" in log_text or "bisecting" in log_text:
            failed.append("oversized messages aborted transactions (an abort loop)")
    return failed


def result_table(results: list[ChaosResult]) -> str:
    head = (
        "| scenario | faults | samples | lost | duplicated | mismatched vs reference | "
        "embedded ≠ reference | index = kept + seed | recovery median / max (s) | "
        "run time (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|\n"
    )
    rows = []
    for r in results:
        rec = (
            f"{r.recovery_median_s} / {r.recovery_max_s}"
            if r.recovery_median_s is not None
            else "-"
        )
        rows.append(
            f"| {r.scenario} | {r.faults} | {r.samples} | {r.lost} | {r.duplicated} | "
            f"{r.mismatched} | {r.embedded_mismatched} | {'yes' if r.index_ok else 'NO'} | "
            f"{rec} | {r.elapsed_s} |"
        )
    return head + "\n".join(rows) + "\n"


@click.command("chaos")
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice([*SCENARIOS, "all"]),
    default=("all",),
    show_default=True,
)
@click.option("--samples", default=5000, show_default=True)
@click.option("--faults", type=int, default=None, help="Override the scenario's fault count.")
@click.option("--seed", default=1, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
def command(
    scenarios: tuple[str, ...], samples: int, faults: int | None, seed: int, json_out: Path | None
) -> None:
    """Attack `infogrowth run` with faults and verify nothing is lost, duplicated or changed."""
    from infogrowth.logs import configure

    configure("WARNING")
    names = list(SCENARIOS) if "all" in scenarios else list(scenarios)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    results = []
    with _broker(bootstrap) as (bs, _own):
        for name in names:
            click.echo(f"scenario {name} ...", err=True)
            try:
                r = run_scenario(name, samples=samples, faults=faults, bootstrap=bs, seed=seed)
            except Exception as exc:  # a crashed scenario is a failed row, not a lost table
                log.exception("scenario %s failed", name)
                r = ChaosResult(
                    name, 0, samples, -1, -1, -1, False, -1, None, None, 0.0, [repr(exc)]
                )
            click.echo(result_table([r]).splitlines()[-1], err=True)
            results.append(r)
    click.echo(result_table(results))
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    for r in results:
        for n in r.notes:
            click.echo(f"{r.scenario}: {n}", err=True)
        for n in r.failed_checks:
            click.echo(f"{r.scenario}: FAILED: {n}", err=True)
    if not all(r.ok for r in results):
        sys.exit(1)


__all__ = ["SCENARIOS", "ChaosResult", "command", "run_scenario"]
