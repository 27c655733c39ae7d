"""Shared snapshots (``snapshot.remote``): a pod with no snapshot on its volume starts from the
newest shared one and replays only the changelog after it, building exactly the state a full
replay builds; a damaged shared copy is refused and the next start is taken. The changelog is
the in-memory fake of test_restore."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from infogrowth import snapshot
from infogrowth.config import ConfigError
from infogrowth.index import PartitionState
from infogrowth.messages import changelog_record
from infogrowth.metrics import Metrics
from infogrowth.snapremote import RemoteStore
from tests.fixtures.helpers import make_settings
from tests.fixtures.servers import moto_s3, s3_client, s3_options
from tests.unit.test_replication import EMBEDDED
from tests.unit.test_restore import FakeReader, _items, _log, _proc, fake_kafka

__all__ = ["fake_kafka"]  # the changelog and control-topic fakes, for every test here
FOLDER = f"changelog-id/{EMBEDDED}-0"
"""Partition 0's folder in the shared store: under the changelog topic's id (``_proc``'s)."""


def _grow(n: int, prefix: str) -> None:
    """Append ``n`` kept items to partition 0's changelog."""
    FakeReader.LOG.setdefault(0, [])
    FakeReader.LOG[0] += _log(*(changelog_record(e, epoch=1) for e in _items(n, prefix)))


def _shared(tmp: Path, name: str, remote: Path, **cfg: Any) -> Any:
    proc = _proc(tmp / name, **{"snapshot.remote": f"file://{remote}", **cfg})
    proc.metrics = Metrics(runtime=False)
    return proc


def _source(proc: Any) -> dict[str, float]:
    reg = proc.metrics.registry
    return {
        s: reg.get_sample_value("infogrowth_restores_total", {"source": s})
        for s in ("local", "remote", "changelog")
    }


def _restore(proc: Any) -> PartitionState | None:
    """Restore partition 0 in steps, as the loop restores an assigned partition (a restore in
    one go, after an aborted transaction, does not ask the shared store)."""
    proc.begin_restore(0)
    while not proc.restore_step(0.05):
        pass
    return proc.states.get(0)  # type: ignore[no-any-return]


def _upload(proc: Any) -> None:
    proc.save_snapshot(0)
    assert proc.uploads.wait(30)
    proc.reap_uploads()


def _uploaded(tmp: Path, n: int) -> Path:
    """A shared store (returned) holding the snapshot of an earlier pod that restored the
    ``n`` items now in the changelog."""
    remote = tmp / "remote"
    _grow(n, "a")
    old = _shared(tmp, "old", remote)
    _restore(old)
    _upload(old)
    return remote


def _graph(state: PartitionState, tmp: Path) -> list[bytes]:
    """The saved hnswlib indexes, their capacity field (header bytes 8..16: a loaded index has
    the saved capacity, a replayed one its own doubling) left out."""
    out = []
    for s in state.spaces:
        path = tmp / f"graph-{s}.bin"
        state.indexes[s].save(str(path))
        data = path.read_bytes()
        out.append(data[:8] + data[16:])
    return out


def test_a_new_pod_starts_from_the_shared_snapshot_and_replays_only_the_tail(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "remote"
    _grow(60, "a")
    old = _shared(tmp_path, "old-pod", remote)
    assert _restore(old) is not None and _source(old)["changelog"] == 1
    _upload(old)
    assert (
        old.metrics.registry.get_sample_value("infogrowth_snapshot_uploads_total", {"result": "ok"})
        == 1
    )
    _grow(15, "b")

    new = _shared(tmp_path, "new-pod", remote)
    state = _restore(new)
    assert state is not None and state.count == 75
    assert _source(new) == {"local": 0, "remote": 1, "changelog": 0}
    assert new.metrics.registry.get_sample_value("infogrowth_replayed_items_total") == 15
    assert snapshot.current_name(new.snapshot_dir(0)) is not None, "kept on the volume too"

    replay = _proc(tmp_path / "replay").restore(0)  # no snapshot anywhere: the whole changelog
    assert replay is not None
    assert (state.ids, state.labels, state.fixed) == (replay.ids, replay.labels, replay.fixed)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _graph(state, tmp_path / "a") == _graph(replay, tmp_path / "b"), (
        "restore from a shared snapshot == replay, byte for byte"
    )


def test_the_newer_of_the_local_and_the_shared_snapshot_is_used(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    _grow(40, "a")
    a = _shared(tmp_path, "a", remote, **{"snapshot.upload_interval_s": 1e-6})
    _restore(a)
    _upload(a)  # shared: 40
    b = _shared(tmp_path, "b", remote)
    _restore(b)
    assert _source(b)["remote"] == 1  # b's volume: 40
    _grow(10, "b")
    _restore(a)
    _upload(a)  # shared: 50
    _restore(b)
    assert _source(b)["remote"] == 2, "the shared one is newer than b's own"
    assert b.metrics.registry.get_sample_value("infogrowth_replayed_items_total") == 0
    _restore(a)
    assert _source(a) == {"local": 2, "remote": 0, "changelog": 1}, "as new as the shared one"


def test_a_damaged_shared_snapshot_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = _uploaded(tmp_path, 30)
    (shared,) = remote.glob("*/*/snap-*/space-image.bin")
    data = bytearray(shared.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shared.write_bytes(bytes(data))

    new = _shared(tmp_path, "new", remote)
    with caplog.at_level(logging.WARNING):
        state = _restore(new)
    assert state is not None and state.count == 30
    assert _source(new) == {"local": 0, "remote": 0, "changelog": 1}
    assert "checksum mismatch" in caplog.text
    assert snapshot.current_name(new.snapshot_dir(0)) is None
    assert not list(new.snapshot_dir(0).glob(".tmp-remote-*")), "the fetched copy is removed"


def test_a_revoke_uploads_the_last_snapshot_whatever_the_interval(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    _grow(20, "a")
    proc = _shared(tmp_path, "p", remote, **{"snapshot.upload_interval_s": 3600})
    _restore(proc)
    _upload(proc)
    store = RemoteStore(f"file://{remote}", None)
    first = store.snapshots(FOLDER)
    _grow(5, "b")
    _restore(proc)
    proc.save_snapshot(0)  # within the interval: stays local
    proc.maintain()  # nor does it go between batches
    assert store.snapshots(FOLDER) == first
    proc.dirty[0] = 1
    proc.on_revoke([TopicPartition(EMBEDDED, 0)])
    assert proc.uploads.wait(30)
    newest = store.snapshots(FOLDER)[0]
    assert snapshot.name_offset(newest) == 24 and newest != first[0]


def test_the_shared_store_keeps_the_newest_complete_snapshots(tmp_path: Path) -> None:
    """An upload without its manifest (cut short) is never listed; pruning keeps ``keep``
    complete snapshots and drops unfinished uploads older than them."""
    store = RemoteStore(f"file://{tmp_path / 'remote'}", None)
    files = tmp_path / "files"
    files.mkdir()
    (files / "manifest.json").write_text("{}")
    (files / "items.msgpack").write_bytes(b"x")
    for count in (10, 20, 30):
        store.upload(files, "part-0", f"snap-{count:012d}-{count:012d}", keep=2)
    part = tmp_path / "remote" / "part-0"
    (part / f"snap-{5:012d}-{5:012d}").mkdir()  # an unfinished upload, older
    (part / f"snap-{40:012d}-{40:012d}").mkdir()  # one still being written, newer
    assert store.snapshots("part-0") == [f"snap-{c:012d}-{c:012d}" for c in (30, 20)]
    store.prune("part-0", keep=2)
    assert sorted(p.name for p in part.iterdir()) == [
        f"snap-{c:012d}-{c:012d}" for c in (20, 30, 40)
    ]
    assert store.snapshots("nowhere") == []


def test_snapshots_are_shared_through_s3(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "manifest.json").write_text('{"count": 1}')
    (files / "space-image.bin").write_bytes(bytes(range(256)) * 64)
    with moto_s3({"state": {}}) as endpoint:
        settings = make_settings(storage={"options": {"s3": s3_options(endpoint)}})
        store = RemoteStore("s3://state/infogrowth", settings.storage)
        name = f"snap-{1:012d}-{1:012d}"
        assert store.upload(files, "embedded-0", name, keep=2) == 16_384 + 12
        assert store.snapshots("embedded-0") == [name]
        got = tmp_path / "got"
        store.fetch("embedded-0", name, got)
        assert {p.name: p.read_bytes() for p in got.iterdir()} == {
            p.name: p.read_bytes() for p in files.iterdir()
        }


def test_the_shared_store_must_be_a_url() -> None:
    with pytest.raises(ConfigError, match=r"snapshot\.remote"):
        make_settings(**{"snapshot.remote": "/mnt/shared"})


def test_a_slow_or_failing_shared_store_never_holds_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The listing and the fetch run on a thread: restore steps go on returning while they
    wait; a store that fails leaves a warning and the changelog replay."""
    import time

    remote = _uploaded(tmp_path, 20)
    fetch = RemoteStore.fetch

    def slow_fetch(self: RemoteStore, folder: str, name: str, into: Path, cancel: Any) -> int:
        time.sleep(1.5)
        return fetch(self, folder, name, into, cancel)

    monkeypatch.setattr(RemoteStore, "fetch", slow_fetch)
    new = _shared(tmp_path, "new", remote)
    new.begin_restore(0)
    t0 = time.monotonic()
    steps = 0
    while not new.restore_step(0.02):
        steps += 1
        assert time.monotonic() - t0 < 30
    assert steps >= 5, "the loop got its turn back while the fetch ran"
    assert _source(new)["remote"] == 1 and new.states[0].count == 20

    def broken(self: RemoteStore, folder: str) -> list[str]:
        raise OSError("store unreachable")

    monkeypatch.setattr(RemoteStore, "snapshots", broken)
    other = _shared(tmp_path, "other", remote)
    with caplog.at_level(logging.WARNING):
        state = _restore(other)
    assert state is not None and state.count == 20
    assert _source(other)["changelog"] == 1 and "store unreachable" in caplog.text


def test_a_revoke_during_an_upload_uploads_its_snapshot_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The partition's last snapshot waits for the running upload instead of being dropped."""
    import threading

    remote = tmp_path / "remote"
    gate = threading.Event()
    upload = RemoteStore.upload

    def gated(self: RemoteStore, files: Path, folder: str, name: str, keep: int) -> int:
        assert gate.wait(30)
        return upload(self, files, folder, name, keep)

    monkeypatch.setattr(RemoteStore, "upload", gated)
    _grow(20, "a")
    proc = _shared(tmp_path, "p", remote)
    _restore(proc)
    proc.save_snapshot(0)  # its upload starts, and hangs at the gate
    _grow(5, "b")
    _restore(proc)  # 25 items now; the restore kept the partition's upload running
    proc.dirty[0] = 1
    proc.on_revoke([TopicPartition(EMBEDDED, 0)])  # snapshot at 25: waits for the one at 20
    gate.set()
    assert proc.uploads.wait(30)
    names = RemoteStore(f"file://{remote}", None).snapshots(FOLDER)
    assert [snapshot.name_offset(n) for n in names] == [24, 19]
    assert not list(proc.snapshot_dir(0).glob(".upload-*")), "staging folders are removed"


def test_snapshots_of_another_changelog_topic_are_never_met(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recreated changelog topic starts its offsets again: the old topic's snapshots (higher
    offsets) live under the old topic id and neither shadow nor prune the new ones."""
    remote = _uploaded(tmp_path, 60)
    FakeReader.LOG = {}
    _grow(10, "n")
    fetched: list[str] = []
    fetch = RemoteStore.fetch

    def spy(self: RemoteStore, folder: str, name: str, into: Path, cancel: Any) -> int:
        fetched.append(f"{folder}/{name}")
        return fetch(self, folder, name, into, cancel)

    monkeypatch.setattr(RemoteStore, "fetch", spy)
    new = _shared(tmp_path, "new", remote)
    new.changelog_id = "recreated-id"
    assert (state := _restore(new)) is not None and state.count == 10
    assert fetched == [] and _source(new)["changelog"] == 1
    _upload(new)
    store = RemoteStore(f"file://{remote}", None)
    assert [snapshot.name_offset(n) for n in store.snapshots(f"recreated-id/{EMBEDDED}-0")] == [9]
    assert [snapshot.name_offset(n) for n in store.snapshots(FOLDER)] == [59]


def test_without_the_topic_id_nothing_is_shared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = tmp_path / "remote"
    _grow(10, "a")
    proc = _shared(tmp_path, "p", remote)
    proc.changelog_id = None
    with caplog.at_level(logging.WARNING):
        _restore(proc)
        _upload(proc)
    assert not remote.exists() and "not shared" in caplog.text


def test_a_cancelled_restore_stops_its_fetch_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    remote = _uploaded(tmp_path, 20)
    started, files = threading.Event(), []
    get_file = RemoteStore.fetch

    def slow(self: RemoteStore, folder: str, name: str, into: Path, cancel: Any) -> int:
        real = self.fs.get_file

        def one(src: str, dst: str) -> None:
            started.set()
            files.append(dst)
            time.sleep(0.3)
            real(src, dst)

        self.fs.get_file = one
        try:
            return get_file(self, folder, name, into, cancel)
        finally:
            del self.fs.get_file

    monkeypatch.setattr(RemoteStore, "fetch", slow)
    new = _shared(tmp_path, "new", remote)
    new.begin_restore(0)
    while not started.is_set():
        new.restore_step(0.02)
    new.on_revoke([TopicPartition(EMBEDDED, 0)])  # cancels the restore mid-fetch
    deadline = time.monotonic() + 10
    while list(new.snapshot_dir(0).glob(".tmp-remote-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(new.snapshot_dir(0).glob(".tmp-remote-*"))
    assert len(files) < 3, "the fetch stopped before the next file"


def test_pruning_leaves_this_runs_temp_folders(tmp_path: Path) -> None:
    """A forked writer or a fetch of this process may be filling its temp folder while another
    snapshot is published; a crashed run's are removed."""
    ours = tmp_path / f".tmp-remote-snap-1-1-{snapshot.RUN}-abc"
    theirs = tmp_path / ".tmp-snap-000000000001-000000000001-1.deadbeef"
    ours.mkdir()
    theirs.mkdir()
    done = tmp_path / "done"
    done.mkdir()
    snapshot.adopt(tmp_path, done, "snap-000000000002-000000000002")
    assert ours.exists() and not theirs.exists()
    assert snapshot.current_name(tmp_path) == "snap-000000000002-000000000002"


def test_a_listing_sees_what_other_pods_wrote_since(tmp_path: Path) -> None:
    """s3fs caches listings without expiry; another pod's upload must be seen."""
    with moto_s3({"state": {}}) as endpoint:
        settings = make_settings(storage={"options": {"s3": s3_options(endpoint)}})
        store = RemoteStore("s3://state/shared", settings.storage)
        s3 = s3_client(endpoint)

        def another_pod_uploads(name: str) -> None:
            for f in ("items.msgpack", "manifest.json"):
                s3.put_object(Bucket="state", Key=f"shared/p-0/{name}/{f}", Body=b"{}")

        first, second = (f"snap-{c:012d}-{c:012d}" for c in (7, 9))
        another_pod_uploads(first)
        assert store.snapshots("p-0") == [first]  # listed (and cached by s3fs)
        another_pod_uploads(second)
        assert store.snapshots("p-0") == [second, first]


def test_the_topic_id_is_one_folder_whatever_its_characters(tmp_path: Path) -> None:
    """librdkafka gives topic ids in standard base64: a '/' must not nest the folder."""
    remote = tmp_path / "remote"
    _grow(10, "a")
    proc = _shared(tmp_path, "p", remote)
    proc.changelog_id = "Zu/mw+SuETKq8lWtJCbrjg"
    _restore(proc)
    _upload(proc)
    (manifest,) = remote.glob(f"*/{EMBEDDED}-0/snap-*/manifest.json")
    assert manifest.parent.parent.parent.name == "Zu_mw-SuETKq8lWtJCbrjg"
