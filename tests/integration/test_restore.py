"""Restores outside the rebalance callback, calibration epochs and changelog gaps (issue 13
items 6 and 7), on the real broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from infogrowth.kafka import restore as restore_mod
from infogrowth.kafka.clients import consumer_config, producer_config
from infogrowth.kafka.control import read_calibration
from infogrowth.kafka.reader import PartitionReader
from infogrowth.kafka.run import Runtime, build, start
from infogrowth.kafka.seed import seed
from infogrowth.kafka.tools import audit, produce
from infogrowth.messages import changelog_record, embedded_from_record
from infogrowth.schema import pack, unpack
from tests.fixtures.data import clustered, write_jsonl
from tests.integration.conftest import settings_from, write_config
from tests.integration.test_eos import _prepare, _stop, _wait
from tests.integration.test_pipeline import curate_decisions, kafka_decisions

pytestmark = pytest.mark.integration


def _drained(rt: Runtime) -> bool:
    return rt.ready() and rt.idle_for() > 2.0 and rt.drained()


def _run_until_drained(rt: Runtime, timeout: float = 240.0) -> None:
    _wait(lambda: _drained(rt), timeout, "drain", rt)


def _embedded_count(settings: Any) -> int:
    return sum(1 for _ in PartitionReader(settings, settings.kafka.topics.embedded, 0))


def _open_zombie_transaction(settings: Any, k: int) -> tuple[Producer, list[str]]:
    """A select member that takes partition 0, writes the changelog records of ``k`` embedded
    records and sends their offsets in a transaction, then leaves the group without committing
    (a zombie whose commit is still in flight)."""
    topics = settings.kafka.topics
    cal = read_calibration(settings)
    assert cal is not None
    zc = Consumer(consumer_config(settings, settings.kafka.select_group))
    zc.subscribe([topics.embedded])
    msgs: list[Any] = []
    deadline = time.monotonic() + 60
    while len(msgs) < k:
        assert time.monotonic() < deadline, "the zombie got no embedded records"
        msgs += [m for m in zc.consume(k, 0.5) if m.error() is None]
    msgs = msgs[:k]
    zp = Producer(producer_config(settings, "zombie-select"))
    zp.init_transactions(30)
    zp.begin_transaction()
    ids = []
    for m in msgs:
        e = embedded_from_record(unpack("embedded", m.value(), max_bytes=1 << 30), cal.dims)
        value = pack("changelog", changelog_record(e, epoch=cal.epoch))
        zp.produce(topics.changelog, value=value, key=e.id.encode(), partition=0)
        ids.append(e.id)
    end = TopicPartition(topics.embedded, 0, msgs[-1].offset() + 1)
    zp.send_offsets_to_transaction([end], zc.consumer_group_metadata(), 30)
    zp.flush(30)
    zc.close()  # leaves the group; the transaction stays open
    return zp, ids


def test_zombie_commit_between_assignment_and_restore_reaches_the_new_owner(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The old owner's transaction commits after the new owner is assigned the partition: its
    changelog records must be in the new owner's state, since the new owner starts after the
    input offsets that transaction committed. Restoring before the committed offsets are
    fetched (inside the assign callback) misses them."""
    n, k = 200, 20
    settings, _inp, _seed = _prepare(tmp_path, kafka_bootstrap, n=n)
    embed = build(settings, "embed")
    start(embed)
    try:
        _run_until_drained(embed)
    finally:
        _stop(embed)
    zombie, ids = _open_zombie_transaction(settings, k)
    rt = build(settings, "select")
    assert rt.select is not None
    sel = rt.select
    original = sel.on_assign
    fired: list[threading.Timer] = []

    def on_assign(parts: list[TopicPartition]) -> None:
        original(parts)
        if parts and not fired:  # the zombie commits a moment after the assignment
            fired.append(threading.Timer(1.0, lambda: zombie.commit_transaction(30)))
            fired[0].start()

    sel.on_assign = on_assign  # type: ignore[method-assign]
    restored: list[set[str]] = []  # what the state held when its restore ended, before deciding
    finish = sel._finish_restore

    def on_restored(r: Any, state: Any) -> None:
        restored.append(set(state.ids) if state is not None else set())
        finish(r, state)

    sel._finish_restore = on_restored  # type: ignore[method-assign]
    start(rt)
    try:
        _run_until_drained(rt)
        assert fired, "partition 0 was never assigned"
        assert restored, "partition 0 was never restored"
        assert [i for i in ids if i not in restored[0]] == [], "zombie's items missing"
        assert [i for i in ids if i not in sel.states[0]] == []
        assert sel.committed_outputs == _embedded_count(settings) - k
    finally:
        _stop(rt)
        for t in fired:
            t.join()
    assert not rt.errors, rt.errors


def test_rebalance_completes_while_a_slow_restore_runs_and_a_revoke_cancels_it(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member restoring a large partition still takes part in rebalances (a third member's
    join completes long before the restore would end), and stopping it mid-restore cancels the
    restore at once; the other members then finish the stream exactly once."""
    parts = {"kafka.topics.embedded_partitions": 2}
    n, late_n = 600, 100
    settings, _inp, _seed = _prepare(tmp_path, kafka_bootstrap, n=n, **parts)
    rid = settings.kafka.topics.ingest.split(".")[0][1:]

    def member(name: str) -> Runtime:
        conf = write_config(
            tmp_path / f"{name}.yaml",
            kafka_bootstrap,
            tmp_path / f"state-{name}",
            run_id=rid,
            **{"kafka.instance_id": name, **parts},
        )
        return build(settings_from(conf), "select")

    rt_a = build(settings, "all")
    start(rt_a)
    slow = threading.Event()
    real_read = restore_mod.PartitionRestore._read

    def slow_read(self: Any, value: bytes) -> Any:  # the test hook: 0.1 s per changelog record
        if slow.is_set():
            time.sleep(0.1)
        return real_read(self, value)

    monkeypatch.setattr(restore_mod.PartitionRestore, "_read", slow_read)
    rt_b = rt_c = None
    try:
        _run_until_drained(rt_a)
        slow.set()
        rt_b = member("b")
        start(rt_b)
        sel_b = rt_b.select
        assert sel_b is not None
        _wait(lambda: bool(sel_b.restores), 90, "b to start restoring a partition", rt_b)
        t0 = time.monotonic()
        rt_c = member("c")
        start(rt_c)
        _wait(lambda: rt_c.loops[0].assigned_once.is_set(), 60, "c's assignment", rt_c)
        joined = time.monotonic() - t0
        assert sel_b.restores, f"b's restore ended before c's join completed ({joined:.1f}s)"
        t1 = time.monotonic()
        rt_b.stop.set()
        for t in rt_b.threads:
            t.join(20)
            assert not t.is_alive(), "b did not stop while restoring"
        assert time.monotonic() - t1 < 15, "stopping b waited for its restore"
        assert sel_b.restore_seconds == [], "b's restore was not cancelled"
        slow.clear()
        late = write_jsonl(
            tmp_path / "late.jsonl", clustered(late_n, seed=73, prefix="late").samples
        )
        assert produce(settings, [late]) == late_n
        _run_until_drained(rt_a)
        _wait(lambda: _drained(rt_c), 120, "c to settle", rt_c)
    finally:
        for rt in (rt_a, rt_b, rt_c):
            if rt is not None:
                _stop(rt)
    errors = [*rt_a.errors, *(rt_b.errors if rt_b else []), *(rt_c.errors if rt_c else [])]
    assert not errors, errors
    result = audit(settings)
    assert result.ok, result.as_dict()
    assert result.ingest == n + late_n


def test_seed_reset_while_running_is_a_clean_epoch_change(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """seed --reset while the stages run: both notice the new epoch on the control topic, the
    select state is rebuilt from the new seed alone, and input produced afterwards is decided
    exactly as the file runner decides it with the new seed."""
    n = 300
    settings, _inp, _first = _prepare(tmp_path, kafka_bootstrap, n=n)
    rt = build(settings, "all")
    start(rt)
    sel = rt.select
    assert sel is not None
    embed = rt.loops[0].processor
    try:
        _run_until_drained(rt)
        old_ids = set(sel.states[0].ids)
        assert sel.epoch == embed.epoch == 1  # type: ignore[attr-defined]
        seed2 = write_jsonl(tmp_path / "seed2.jsonl", clustered(80, seed=81, prefix="s2").samples)
        result = seed(settings, seed2, reset=True)
        _wait(
            lambda: sel.epoch == embed.epoch == 2 and 0 in sel.states and not sel.restoring,  # type: ignore[attr-defined]
            60,
            "the epoch change",
            rt,
        )
        state = sel.states[0]
        assert state.count == result.per_partition[0], "the new epoch's state is its seed alone"
        assert not old_ids & set(state.ids)
        second = write_jsonl(
            tmp_path / "second.jsonl", clustered(n, dup_rate=0.1, seed=82, prefix="b").samples
        )
        assert produce(settings, [second]) == n
        _run_until_drained(rt)
    finally:
        _stop(rt)
    assert not rt.errors, rt.errors
    res = audit(settings)
    assert res.ok, res.as_dict()
    reference = curate_decisions(settings, second, seed2, tmp_path / "curate")
    got = kafka_decisions(settings)
    assert {k: (v, got.get(k)) for k, v in reference.items() if got.get(k) != v} == {}


def test_a_foreign_changelog_write_is_replayed_into_the_running_state(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A record another writer adds to a running partition's changelog (a seed, a zombie) shows
    as a gap at the next commit, and the partition is replayed to take it in."""
    n = 200
    settings, _inp, _seed = _prepare(tmp_path, kafka_bootstrap, n=n)
    cal = read_calibration(settings)
    assert cal is not None
    rt = build(settings, "all")
    start(rt)
    sel = rt.select
    assert sel is not None
    try:
        _run_until_drained(rt)
        state = sel.states[0]
        foreign = embedded_from_record({"id": "foreign-1", **_vectors_of(state)}, cal.dims)
        p = Producer(producer_config(settings, "foreign-writer"))
        p.init_transactions(30)
        p.begin_transaction()
        value = pack("changelog", changelog_record(foreign, epoch=cal.epoch))
        p.produce(settings.kafka.topics.changelog, value=value, key=b"foreign-1", partition=0)
        p.commit_transaction(30)
        late = write_jsonl(tmp_path / "late.jsonl", clustered(50, seed=74, prefix="late").samples)
        assert produce(settings, [late]) == 50
        _wait(lambda: 0 in sel.states and "foreign-1" in sel.states[0], 120, "the replay", rt)
        _run_until_drained(rt)
    finally:
        _stop(rt)
    assert not rt.errors, rt.errors
    assert audit(settings).ok


def test_a_zombie_transaction_open_below_the_owners_commits_never_truncates_its_state(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Another producer's transaction (a zombie's: records written, offsets not sent yet) stays
    open on every changelog partition while the stage decides new input. Its commits land after
    those records and show as a gap; a read_committed replay then ends at the zombie's first
    record, so a replay that did not wait for the zombie's transaction to end dropped the stage's
    own commits and decided the next batch without them: exact copies of items it had just kept
    were kept again."""
    n = 100
    settings, _inp, _seed = _prepare(tmp_path, kafka_bootstrap, n=n)
    cal = read_calibration(settings)
    assert cal is not None
    topics = settings.kafka.topics
    rt = build(settings, "all")
    start(rt)
    sel = rt.select
    assert sel is not None
    zp = Producer(producer_config(settings, "zombie-open"))
    try:
        _run_until_drained(rt)
        zp.init_transactions(30)
        zp.begin_transaction()
        for p in sorted(sel.states):
            z = embedded_from_record({"id": f"zombie-{p}", **_vectors_of(sel.states[p])}, cal.dims)
            value = pack("changelog", changelog_record(z, epoch=cal.epoch))
            zp.produce(topics.changelog, value=value, key=z.id.encode(), partition=p)
        zp.flush(30)
        first = clustered(40, seed=76, prefix="first").samples
        before = sel.committed_outputs
        assert produce(settings, [write_jsonl(tmp_path / "first.jsonl", first)]) == len(first)
        _wait(lambda: sel.committed_outputs > before, 120, "a first commit after the zombie", rt)
        copies = [{**r, "id": "copy-" + r["id"]} for r in first]
        assert produce(settings, [write_jsonl(tmp_path / "copies.jsonl", copies)]) == len(copies)
        time.sleep(4.0)  # the copies are decided now, or wait for the zombie to end
        zp.abort_transaction(30)
        _run_until_drained(rt)
        held = {i for st in sel.states.values() for i in st.ids}
    finally:
        _stop(rt)
    assert not rt.errors, rt.errors
    assert audit(settings).ok
    got = kafka_decisions(settings)
    kept = [r["id"] for r in first if got[r["id"]][0] in ("accepted", "relabeled")]
    assert kept, "nothing of the first input was kept"
    assert [i for i in kept if i not in held] == [], "own commits missing from the state"
    again = {
        i: got["copy-" + i][:2] for i in kept if got["copy-" + i][:2] != ("rejected", "duplicate")
    }
    assert again == {}, "copies of items kept a moment before were not duplicates"
    assert not any(i.startswith("zombie-") for i in held)


def _vectors_of(state: Any) -> dict[str, Any]:
    """A changelog-shaped ``vectors`` field: the state's first item, slightly moved."""
    from infogrowth.schema import vector_to_bytes

    out = {}
    for s in state.spaces:
        v = state.indexes[s].get(np.array([0]))[0].astype(np.float64)
        v[0] += 0.5
        out[s] = vector_to_bytes((v / np.linalg.norm(v)).astype(np.float32))
    return {"vectors": out}
