"""Exactly-once under faults the lifecycle tests do not reach (issue 13), on the real broker."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

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


LATE = 50


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
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fatal producer error (fenced) mid-batch: the failed batch's items must not reach a
    snapshot, or the restarted stage meets their ids again and rejects them as duplicate_id."""
    settings, inp, seed_file = _prepare(tmp_path, kafka_bootstrap)
    late = write_jsonl(tmp_path / "late.jsonl", clustered(LATE, seed=72, prefix="late").samples)
    both = tmp_path / "both.jsonl"
    both.write_text(inp.read_text() + late.read_text())
    rt = build(settings, "all")
    assert rt.select is not None
    select_loop = next(lp for lp in rt.loops if lp.processor is rt.select)
    start(rt)
    try:
        snaps = tmp_path / "state"
        _wait(lambda: list(snaps.glob("*/CURRENT")), 120, "a first snapshot", rt)
        # A second producer with the same transactional id (a zombie's successor) fences it.
        fencer = Producer(producer_config(settings, select_loop.transactional_id))
        fencer.init_transactions(30)
        # more input, so the stage runs another transaction even if it had drained the first
        assert produce(settings, [late]) == LATE
        _wait(lambda: bool(rt.errors), 120, "the fenced select stage to fail")
        fencer.close()
    finally:
        _stop(rt)
    assert any(isinstance(e, FatalStageError) for e in rt.errors), rt.errors
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="infogrowth.kafka.restore"):
        _drain(settings)
    assert "snapshot with" in caplog.text, "the restart restores from the committed snapshot"
    _check(settings, both, seed_file, tmp_path, n=N + LATE)


class _StraddlingConsumer:
    """A consumer whose first two-partition ``consume()`` straddles a rebalance, as librdkafka's
    can: it holds the messages it fetched, runs ``during`` (which polls through an incremental
    revoke), then returns the held messages together with what the polls fetched."""

    def __init__(self, inner: Any, during: Any) -> None:
        self.inner = inner
        self.during = during
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        msgs = list(self.inner.consume(num_messages, timeout))
        if self.fired or not msgs:
            return msgs
        deadline = time.monotonic() + 30
        while len({m.partition() for m in msgs if m.error() is None}) < 2:  # hold both
            assert time.monotonic() < deadline, "no messages of the second partition"
            msgs += self.inner.consume(num_messages, 0.2)
        self.fired = True
        return msgs + self.during(self.inner, [m for m in msgs if m.error() is None])


def test_embed_batch_straddling_a_revoke_is_not_committed(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages fetched before an incremental revoke, returned after it: the old owner must not
    embed and commit them while the new owner does the same (duplicate embedded records and a
    second rejected/duplicate_id output per id)."""
    from confluent_kafka import Consumer, TopicPartition

    from infogrowth.kafka import loop as loop_mod
    from infogrowth.kafka.clients import consumer_config

    parts = {
        "kafka.topics.ingest_partitions": 2,
        "kafka.topics.embedded_partitions": 1,
        "kafka.commit_max_messages": 100,
    }
    settings, _inp, _seed = _prepare(tmp_path, kafka_bootstrap, n=N, **parts)
    rid = settings.kafka.topics.ingest.split(".")[0][1:]
    conf_b = write_config(
        tmp_path / "b.yaml",
        kafka_bootstrap,
        tmp_path / "state-b",
        run_id=rid,
        **{"kafka.instance_id": "b", **parts},
    )
    rt_a = build(settings, "embed")
    rt_b = build(settings_from(conf_b), "all")
    loop_a = rt_a.loops[0]
    ingest, group = settings.kafka.topics.ingest, settings.kafka.embed_group
    probe = Consumer(consumer_config(settings, group))

    def committed(p: int) -> int:
        (tp,) = probe.committed([TopicPartition(ingest, p)], timeout=30)
        return int(tp.offset)

    def during(inner: Any, held: list[Any]) -> list[Any]:
        first = {m.partition(): m.offset() for m in reversed(held)}
        start(rt_b)  # a second member joins: one of A's partitions is revoked incrementally
        extra: list[Any] = []
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "no revoke, or the new owner never committed"
            extra += [m for m in inner.consume(50, 0.2) if m.error() is None]
            revoked = [p for p in first if (ingest, p) not in loop_a.assigned]
            if revoked and all(committed(p) > first[p] for p in revoked):
                return extra  # the new owner has processed part of the held range

    real = loop_mod.Consumer
    wrapped: list[Any] = []

    def factory(conf: dict[str, Any]) -> Any:  # A's embed consumer is created first
        c = real(conf)
        if conf.get("group.id") != group or wrapped:
            return c
        wrapped.append(_StraddlingConsumer(c, during))
        return wrapped[0]

    monkeypatch.setattr(loop_mod, "Consumer", factory)
    start(rt_a)
    try:
        _wait(lambda: rt_b.threads and rt_b.ready(), 90, "the second member", rt_a)
        _wait(
            lambda: rt_b.idle_for() > 3.0 and rt_a.idle_for() > 3.0 and rt_b.drained(),
            240,
            "drain",
            rt_b,
        )
    finally:
        probe.close()
        _stop(rt_a)
        _stop(rt_b)
    assert not rt_a.errors and not rt_b.errors, rt_a.errors + rt_b.errors
    assert wrapped and wrapped[0].fired, "the straddling batch was never made"
    result = audit(settings)
    assert result.embedded_duplicated == [], result.as_dict()
    assert result.ok, result.as_dict()
    assert result.ingest == N


def _recreate_topics(settings: Any) -> None:
    from confluent_kafka.admin import AdminClient

    specs = topic_specs(settings.kafka.topics)
    admin = AdminClient(admin_config(settings))
    for fut in admin.delete_topics(sorted({s.name for s in specs}), operation_timeout=30).values():
        fut.result(60)
    deadline = time.monotonic() + 60
    while True:  # deletion completes asynchronously: create again until it goes through
        try:
            if ensure_topics(admin_config(settings), specs).ok_all:
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "topics could not be recreated"
        time.sleep(1.0)


def test_recreated_topics_discard_the_kept_snapshot(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Topics recreated (same names), snapshots kept on the volume: the old snapshot names the
    old changelog topic id and must be discarded, not loaded against the new log."""
    n = 600
    settings, inp, seed_file = _prepare(tmp_path, kafka_bootstrap, n=n)
    _drain(settings)
    assert list((tmp_path / "state").glob("*/CURRENT")), "the first run leaves a snapshot"
    _recreate_topics(settings)
    seed(settings, seed_file)  # the same seed: only the topic id tells the logs apart
    assert produce(settings, [inp]) == n
    _drain(settings)
    _check(settings, inp, seed_file, tmp_path, n=n)


class _FailingProducer:
    """A real transactional producer whose ``fail_at``-th commit fails as after a broker bounce
    longer than the transaction timeout: the commit is refused as abortable (records timed
    out), then the abort fails fatally with INVALID_TXN_STATE (the coordinator aborted the
    transaction itself); purging it then raises too."""

    def __init__(self, inner: Any, fail_at: int) -> None:
        self.inner = inner
        self.commits = 0
        self.fail_at = fail_at
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commit_transaction(self, timeout: float) -> None:
        self.commits += 1
        if self.commits == self.fail_at:
            self.failed = True
            err = KafkaError(
                KafkaError._TIMED_OUT, "4 message(s) timed out", txn_requires_abort=True
            )
            raise KafkaException(err)
        self.inner.commit_transaction(timeout)

    def abort_transaction(self, timeout: float) -> None:
        if self.failed:
            err = KafkaError(KafkaError.INVALID_TXN_STATE, "Failed to end transaction", fatal=True)
            raise KafkaException(err)
        self.inner.abort_transaction(timeout)

    def purge(self, *args: Any, **kwargs: Any) -> None:
        """Purges, then complains as a producer in a fatal state may: the stage goes on."""
        self.inner.purge(*args, **kwargs)
        if self.failed:
            raise KafkaException(KafkaError(KafkaError._FATAL, "purge after fatal", fatal=True))


def test_a_producer_failing_fatally_is_replaced_and_nothing_is_lost(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CI failure of broker-bounce: a commit timed out while the broker was away, then the
    abort failed fatally. The stage replaces its producer (same transactional id, which aborts
    the open transaction), rewinds, rolls its state back and carries on; every input has
    exactly one output and the decisions are curate's."""
    from infogrowth.kafka import loop as loop_mod

    settings, inp, seed_file = _prepare(
        tmp_path, kafka_bootstrap, **{"kafka.commit_max_messages": 100}
    )
    real = loop_mod.Producer
    made: list[_FailingProducer] = []

    def factory(conf: dict[str, Any]) -> Any:
        p = real(conf)
        if "-select-" in str(conf.get("transactional.id")) and not made:
            made.append(_FailingProducer(p, fail_at=3))
            return made[0]
        return p

    monkeypatch.setattr(loop_mod, "Producer", factory)
    rt = _drain(settings)
    select_loop = next(lp for lp in rt.loops if lp.processor is rt.select)
    assert made and made[0].failed, "the injected failure never ran"
    assert len(select_loop.producer_resets) == 1
    made.clear()  # the replaced producer: let it go before the broker does
    _check(settings, inp, seed_file, tmp_path)


class _Echo:
    """A stateless processor: one output per input, a slow one (a model's work)."""

    name = "echo"
    stateful = False

    def __init__(self, out_topic: str, rejected_topic: str) -> None:
        self.out_topic, self.rejected_topic = out_topic, rejected_topic
        self.rejected: list[int] = []

    def on_assign(self, partitions: Any) -> None: ...
    def on_revoke(self, partitions: Any) -> None: ...
    def on_lost(self, partitions: Any) -> None: ...
    def on_abort(self, partitions: Any) -> None: ...
    def on_commit(self, out: Any) -> None: ...
    def close(self) -> None: ...
    def maintain(self) -> list[int]:
        return []

    def begin_restore(self, partition: int) -> None: ...
    def restore_step(self, budget_s: float) -> list[int]:
        return []

    def process(self, messages: list[Any], out: Any) -> None:
        for m in messages:
            out.produce(self.out_topic, m.value())
            time.sleep(0.002)

    def reject(self, message: Any, reason: str, detail: str, out: Any) -> None:
        self.rejected.append(message.offset())
        out.produce(self.rejected_topic, reason.encode())


def test_a_record_refused_first_in_its_batch_is_bisected_not_fatal(kafka_bootstrap: str) -> None:
    """The broker refuses the batch's first record while the stage is still producing the
    rest: the transaction turns must-abort and the next produce() raises an error librdkafka
    flags neither abortable nor fatal. The loop must abort and bisect to the culprit, not end
    the stage (that would crash-loop on the same batch)."""
    import os
    import threading
    import uuid

    from confluent_kafka.admin import AdminClient, NewTopic

    from infogrowth.config import load_settings
    from infogrowth.kafka.loop import TransactionalLoop

    run = uuid.uuid4().hex[:8]
    inp, outp, rej = f"refused-in-{run}", f"refused-out-{run}", f"refused-rej-{run}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    small = {"max.message.bytes": "5000"}
    topics = [NewTopic(inp, 1, 1), NewTopic(outp, 1, 1, config=small), NewTopic(rej, 1, 1)]
    for f in admin.create_topics(topics).values():
        f.result(30)
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    p.produce(inp, os.urandom(8000))  # refused by the output topic, and first
    for i in range(200):
        p.produce(inp, f"ok-{i}".encode())
    assert p.flush(30) == 0

    settings = load_settings(None, **{"kafka.bootstrap_servers": kafka_bootstrap})
    proc = _Echo(outp, rej)
    loop = TransactionalLoop(
        settings, proc, group=f"refused-{run}", topics=[inp], transactional_id=f"refused-{run}"
    )
    stop = threading.Event()
    died: list[BaseException] = []

    def target() -> None:
        try:
            loop.run(stop)
        except BaseException as exc:
            died.append(exc)

    t = threading.Thread(target=target)
    t.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and t.is_alive() and not proc.rejected:
        time.sleep(0.2)
    stop.set()
    t.join(60)
    assert not died, f"the stage ended instead of aborting the batch: {died[0]!r}"
    assert proc.rejected == [0] and loop.culprits == 1
