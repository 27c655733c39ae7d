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
from infogrowth.snapremote import RemoteStore, staging_path
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
    manifest = '{"count": 1, "files": {"space-image.bin": "-"}}'
    (files / "manifest.json").write_text(manifest)
    (files / "space-image.bin").write_bytes(bytes(range(256)) * 64)
    with moto_s3({"state": {}}) as endpoint:
        settings = make_settings(storage={"options": {"s3": s3_options(endpoint)}})
        store = RemoteStore("s3://state/infogrowth", settings.storage)
        name = f"snap-{1:012d}-{1:012d}"
        assert store.upload(files, "embedded-0", name, keep=2) == 16_384 + len(manifest)
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

    def slow_fetch(self: RemoteStore, *args: Any) -> int:
        time.sleep(1.5)
        return fetch(self, *args)

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

    def spy(self: RemoteStore, folder: str, name: str, *args: Any) -> int:
        fetched.append(f"{folder}/{name}")
        return fetch(self, folder, name, *args)

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

    def slow(self: RemoteStore, *args: Any) -> int:
        real = self.fs.get_file

        def one(src: str, dst: str, **kw: Any) -> None:
            started.set()
            files.append(dst)
            time.sleep(0.3)
            real(src, dst, **kw)

        self.fs.get_file = one
        try:
            return get_file(self, *args)
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
    staged = staging_path(tmp_path / "snap-000000000001-000000000001")
    staged_before = tmp_path / ".upload-snap-000000000001-000000000001.1.deadbeef"
    for d in (ours, theirs, staged, staged_before):
        d.mkdir()
    done = tmp_path / "done"
    done.mkdir()
    snapshot.adopt(tmp_path, done, "snap-000000000002-000000000002")
    assert ours.exists() and not theirs.exists()
    assert staged.exists() and not staged_before.exists(), "a crashed run's upload staging"
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


def test_a_fetch_cancelled_during_its_last_file_leaves_nothing(tmp_path: Path) -> None:
    """A revoke or a close may come while the last file downloads: the fetch then ends with
    nothing on the volume, instead of a full copy nobody will use."""
    import json
    import threading

    remote = _uploaded(tmp_path, 20)
    store = RemoteStore(f"file://{remote}", None)
    (name,) = store.snapshots(FOLDER)
    last = list(json.loads((remote / FOLDER / name / "manifest.json").read_text())["files"])[-1]
    cancel = threading.Event()
    real = store.fs.get_file

    def one(src: str, dst: str, **kw: Any) -> None:
        real(src, dst, **kw)
        if Path(dst).name == last:
            cancel.set()

    store.fs.get_file = one
    with pytest.raises(InterruptedError):
        store.fetch(FOLDER, name, tmp_path / "got", cancel)
    assert not (tmp_path / "got").exists()


def test_a_result_given_up_on_is_discarded_once_it_ends() -> None:
    """What a fetch wrote is removed only after it stopped writing, whether the restore gave
    up while it ran (cancelled, timed out) or just after it ended."""
    import threading
    import time

    from infogrowth.kafka.restore import in_thread

    def waiting_for(done: list[int]) -> bool:
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        return bool(done)

    gate, discarded = threading.Event(), []
    steps = in_thread(lambda: gate.wait(10), 30, discard=lambda: discarded.append(1))
    next(steps)
    steps.close()  # a cancelled restore
    assert discarded == [], "not removed under a fetch still writing"
    gate.set()
    assert waiting_for(discarded) and discarded == [1]

    gate, discarded = threading.Event(), []
    steps = in_thread(lambda: gate.wait(10), 0.05, discard=lambda: discarded.append(1))
    with pytest.raises(TimeoutError):
        while True:
            next(steps)
    assert discarded == []
    gate.set()
    assert waiting_for(discarded) and discarded == [1]

    gate, discarded = threading.Event(), []
    steps = in_thread(lambda: gate.wait(10), 30, discard=lambda: discarded.append(1))
    next(steps)
    gate.set()
    time.sleep(0.2)  # it ended; the restore closes before its next step
    steps.close()
    assert discarded == [1]


def test_a_foreign_shared_snapshot_is_refused_from_its_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot of another calibration (after a seed --reset) is refused before its data is
    downloaded: only the manifest is fetched."""
    remote = _uploaded(tmp_path, 20)
    fetched: list[str] = []
    fetch = RemoteStore.fetch

    def spy(self: RemoteStore, *args: Any) -> int:
        real = self.fs.get_file

        def one(src: str, dst: str, **kw: Any) -> None:
            fetched.append(Path(src).name)
            real(src, dst, **kw)

        self.fs.get_file = one
        try:
            return fetch(self, *args)
        finally:
            del self.fs.get_file

    monkeypatch.setattr(RemoteStore, "fetch", spy)
    new = _proc(tmp_path / "new", epoch=2, **{"snapshot.remote": f"file://{remote}"})
    new.metrics = Metrics(runtime=False)
    with caplog.at_level(logging.WARNING):
        _restore(new)
    assert fetched == ["manifest.json"]
    assert "calibration" in caplog.text and "not used" in caplog.text
    assert not list(new.snapshot_dir(0).glob(".tmp-remote-*"))


def test_an_unknown_topic_id_is_not_asked_for_at_every_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Describe denied or the broker slow: the lookup is retried after a while, not from every
    pass of the loop, and the snapshots meanwhile are not queued for upload."""
    from infogrowth.kafka import select as select_mod

    calls: list[str] = []
    monkeypatch.setattr(select_mod, "topic_id", lambda settings, topic: calls.append(topic))
    _grow(10, "a")
    proc = _shared(tmp_path, "p", tmp_path / "remote", **{"snapshot.upload_interval_s": 1e-6})
    proc._changelog_id_known = False
    _restore(proc)
    for _ in range(20):
        proc.save_snapshot(0)
        proc.maintain()
    assert len(calls) == 1 and not proc._to_upload
    assert not (tmp_path / "remote").exists()


def test_the_revokes_after_close_neither_snapshot_nor_upload(tmp_path: Path) -> None:
    """The consumer leaving the group revokes every partition after :meth:`close`, which took
    the snapshots and waited for the uploads (within the drain deadline): nothing starts again."""
    remote = tmp_path / "remote"
    _grow(20, "a")
    proc = _shared(tmp_path, "p", remote)
    _restore(proc)
    proc.dirty[0] = 1
    proc.close()
    store = RemoteStore(f"file://{remote}", None)
    shared = store.snapshots(FOLDER)
    local = snapshot.current_name(proc.snapshot_dir(0))
    assert shared and local == shared[0]
    proc.dirty[0] = 1  # as after a snapshot abandoned at the deadline
    proc.on_revoke([TopicPartition(EMBEDDED, 0)])
    assert snapshot.current_name(proc.snapshot_dir(0)) == local
    assert store.snapshots(FOLDER) == shared
    assert proc.uploads._thread is None and 0 not in proc.states


def test_an_upload_that_hangs_is_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import threading
    import time

    gate = threading.Event()
    upload = RemoteStore.upload

    def gated(self: RemoteStore, *args: Any) -> int:
        assert gate.wait(30)
        return upload(self, *args)

    monkeypatch.setattr(RemoteStore, "upload", gated)
    _grow(10, "a")
    proc = _shared(tmp_path, "p", tmp_path / "remote", **{"snapshot.remote_timeout_s": 0.05})
    _restore(proc)
    with caplog.at_level(logging.WARNING):
        proc.save_snapshot(0)
        time.sleep(0.2)
        for _ in range(3):
            proc.reap_uploads()
    gate.set()
    assert proc.uploads.wait(30)
    assert caplog.text.count("later uploads wait behind it") == 1
