"""``CuratedStream`` on a real broker: each curated record once per epoch across DataLoader
workers and ranks, aborted and open transactions invisible, group offsets and pinned ends."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from torch.utils.data import DataLoader, get_worker_info

from infogrowth.config import Settings
from infogrowth.kafka.admin import TopicSpec, admin_config, ensure_topics
from infogrowth.kafka.clients import producer_config
from infogrowth.sampling import CuratedSample, CuratedSet, CuratedStream
from infogrowth.sampling.kafka import id_bucket
from infogrowth.schema import pack
from tests.integration.conftest import settings_from, write_config

pytestmark = pytest.mark.integration


def output_record(sid: str, decision: str, i: int) -> dict[str, Any]:
    """A valid output record as the select stage writes it."""
    return {
        "v": 1,
        "id": sid,
        "decision": decision,
        "reason": "neighbour_relabel" if decision == "relabeled" else None,
        "gain": round((i % 20) / 25, 3),
        "alignment": 0.5,
        "thresholds": {"policy": "sample", "k": 4, "g_scale": 0.8, "seed": 0},
        "text": f"sample {sid}",
        "label": f"c{i % 4}",
        "original_label": "c9" if decision == "relabeled" else None,
        "image": None,
        "meta": {"i": i},
        "source": {"topic": "ingest", "partition": 0, "offset": i},
    }


class Txn:
    """A transactional producer writing output records keyed by id, as the pipeline does."""

    def __init__(self, settings: Settings) -> None:
        tid = f"{settings.kafka.transactional_id_prefix}-test-{uuid.uuid4().hex[:6]}"
        self.p = Producer(producer_config(settings, tid))
        self.p.init_transactions(30)

    def send(self, topic: str, decision: str, ids: list[str], end: str | None) -> None:
        """Produce ``ids`` in one transaction and ``end`` it: commit, abort, or leave open."""
        self.p.begin_transaction()
        for i, sid in enumerate(ids):
            self.p.produce(topic, pack("output", output_record(sid, decision, i)), sid.encode())
        self.p.flush(30)  # in the log before the transaction ends
        if end == "commit":
            self.p.commit_transaction(30)
        elif end == "abort":
            self.p.abort_transaction(30)


@dataclass
class Topics:
    settings: Settings
    committed: dict[str, str]
    """id -> topic of every committed record."""
    aborted: set[str]


def make_topics(tmp: Path, bootstrap: str, accepted: int, relabeled: int) -> Settings:
    settings = settings_from(write_config(tmp / "c.yaml", bootstrap, tmp / "state"))
    t = settings.kafka.topics
    specs = [TopicSpec(t.accepted, accepted, 1), TopicSpec(t.relabeled, relabeled, 1)]
    report = ensure_topics(admin_config(settings), specs)
    assert report.ok_all, report.mismatches
    return settings


@pytest.fixture(scope="module")
def topics(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Topics:
    """accepted with 3 partitions, relabeled with 1: committed, aborted, committed again."""
    settings = make_topics(tmp_path_factory.mktemp("stream"), kafka_bootstrap, 3, 1)
    t = settings.kafka.topics
    txn = Txn(settings)
    first = [f"a{i:03d}" for i in range(90)]
    relabeled = [f"r{i:03d}" for i in range(30)]
    txn.send(t.accepted, "accepted", first[:60], "commit")
    txn.send(t.relabeled, "relabeled", relabeled, "commit")
    aborted = [f"x{i:03d}" for i in range(20)]
    txn.send(t.accepted, "accepted", aborted[:15], "abort")
    txn.send(t.relabeled, "relabeled", aborted[15:], "abort")
    txn.send(t.accepted, "accepted", first[60:], "commit")
    committed = {sid: t.accepted for sid in first} | {sid: t.relabeled for sid in relabeled}
    return Topics(settings, committed, set(aborted))


def tag_worker(s: CuratedSample) -> tuple[int, CuratedSample]:
    info = get_worker_info()
    return (info.id if info is not None else -1), s


def epoch(stream: CuratedStream[Any], workers: int = 2) -> Iterator[tuple[int, CuratedSample]]:
    # forkserver: forking a process that holds live librdkafka threads can deadlock the workers
    loader = DataLoader(
        stream, batch_size=None, num_workers=workers, multiprocessing_context="forkserver"
    )
    for worker, sample in loader:
        yield int(worker), sample


def test_two_workers_each_sample_once_per_epoch_aborted_never(topics: Topics) -> None:
    settings = topics.settings
    t = settings.kafka.topics
    # An open transaction while the epochs run: the epoch ends at the last stable offset.
    open_txn = Txn(settings)
    open_ids = [f"o{i:03d}" for i in range(10)]
    open_txn.send(t.accepted, "accepted", open_ids, None)
    try:
        stream = CuratedStream(settings, transform=tag_worker, timeout_s=30)
        for _ in range(2):  # a fresh pair of workers each epoch, same records
            got = list(epoch(stream))
            counts = Counter(s.id for _, s in got)
            assert set(counts) == set(topics.committed), set(counts) ^ set(topics.committed)
            assert max(counts.values()) == 1
            assert not set(counts) & (topics.aborted | set(open_ids))
            by_worker: dict[int, set[tuple[str, int]]] = {}
            for w, s in got:
                assert s.position is not None and s.position[0] == topics.committed[s.id]
                by_worker.setdefault(w, set()).add(s.position[:2])
            # sorted partitions round robin: (acc,0),(acc,2) -> worker 0; (acc,1),(rel,0) -> 1
            assert by_worker == {
                0: {(t.accepted, 0), (t.accepted, 2)},
                1: {(t.accepted, 1), (t.relabeled, 0)},
            }
        relabeled = [s for _, s in got if s.decision == "relabeled"]
        assert len(relabeled) == 30
        assert all(s.relabeled and s.original_label == "c9" for s in relabeled)
        assert all(s.gain is not None and s.g_scale == 0.8 for _, s in got)
    finally:
        open_txn.p.abort_transaction(30)


def test_ranks_times_workers_beyond_partitions_split_by_id(topics: Topics) -> None:
    settings = topics.settings
    accepted = {sid for sid, topic in topics.committed.items() if topic.endswith("accepted")}
    seen: Counter[str] = Counter()
    for rank in range(2):  # 2 ranks x 2 workers = 4 readers > 3 partitions: split by id hash
        stream = CuratedStream(
            settings,
            topics=[settings.kafka.topics.accepted],
            rank=rank,
            world_size=2,
            transform=tag_worker,
            timeout_s=30,
        )
        for worker, s in epoch(stream):
            assert id_bucket(s.id, 4) == rank * 2 + worker
            seen[s.id] += 1
    assert set(seen) == accepted and max(seen.values()) == 1

    data = CuratedSet.from_stream(CuratedStream(settings, timeout_s=30))
    assert sorted(data.ids) == sorted(topics.committed)
    # The stream sampled these online (policy sample): the trainer does not sample them again.
    assert data.recorded_g_scale == 0.8 and data.stream_sampled
    assert bool((data.normalised_gains == 1.0).all())
    positions = [s.position for s in data.samples]
    assert positions == sorted(positions, key=lambda p: (p[0] != settings.kafka.topics.accepted, p))


def test_group_offsets_resume_and_pin_freezes_the_end(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = make_topics(tmp_path, kafka_bootstrap, 1, 1)
    t = settings.kafka.topics
    txn = Txn(settings)
    txn.send(t.accepted, "accepted", [f"a{i}" for i in range(8)], "commit")
    group = f"trainer-{uuid.uuid4().hex[:6]}"
    follow = CuratedStream(settings, start="committed", group=group, commit=True, timeout_s=30)
    pinned = CuratedStream(settings, timeout_s=30)
    ends = pinned.pin()
    assert ends[(t.accepted, 0)] > 0 and ends[(t.relabeled, 0)] == 0

    assert sorted(s.id for s in follow.samples()) == [f"a{i}" for i in range(8)]
    txn.send(t.accepted, "accepted", ["b0", "b1"], "commit")
    txn.send(t.relabeled, "relabeled", ["b2"], "abort")
    txn.send(t.relabeled, "relabeled", ["b3"], "commit")
    assert sorted(s.id for s in follow.samples()) == ["b0", "b1", "b3"]  # only the new ones
    assert list(follow.samples()) == []  # nothing newer

    assert len(list(pinned.samples())) == 8  # pinned before b0..b3 arrived
    assert len(list(CuratedStream(settings, timeout_s=30).samples())) == 11
    start = {(t.accepted, 0): ends[(t.accepted, 0)]}
    explicit = CuratedStream(settings, start=start, timeout_s=30)
    assert sorted(s.id for s in explicit.samples()) == ["b0", "b1", "b3"]
    with pytest.raises(LookupError, match="no-such-topic"):
        list(CuratedStream(settings, topics=[f"no-such-topic-{group}"], timeout_s=10).samples())
