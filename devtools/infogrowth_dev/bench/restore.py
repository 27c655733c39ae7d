"""Snapshot write and load, changelog replay rate, and the stall a snapshot causes.

A state of N items (2 spaces, or 1 with ``--spaces 1`` where two do not fit in memory) is built
once with multi-threaded inserts on every core (timed only as a rate: it is what a fast rebuild
without the changelog's decoding costs), then: ``snapshot.save``
(hnswlib files, ids, manifest, fsync, sha256) and ``snapshot.load`` (verify + load) are timed, and
a changelog tail of packed records is replayed onto the loaded state the way the select stage
restores (unpack, decode vectors, add in chunks of 4096). The same state is also snapshotted the
way the select stage does by default, from a forked child (:mod:`infogrowth.snapfork`): the
stall is the time ``start`` holds the caller, the write time the child's, and the snapshot is
published when the parent reaps it. In-process, the stall equals the write time. Then the
snapshot goes through a shared store on a local folder (``snapshot.remote``, ``file://``): its
upload, and fetch + verify + load as a partition's new owner does it.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from infogrowth.config import load_settings
from infogrowth.index import PartitionState, SpaceIndex
from infogrowth_dev.bench import synth
from infogrowth_dev.bench.common import Stat, Table, fmt, progress


def bench(
    sizes: list[int] | None = None,
    dim: int = 256,
    repeats: int = 3,
    tail: int = 8192,
    workdir: Path | None = None,
    spaces_n: int = 2,
) -> dict[str, Any]:
    from infogrowth import snapshot
    from infogrowth.messages import changelog_record, embedded_from_record
    from infogrowth.schema import Embedded, pack, unpack

    settings = load_settings(None)
    cfg = settings.index
    rows = []
    for n in sizes or [100_000]:
        progress(f"restore: building a state of {n:,} items")
        vec = synth.make(n, tail, dim=dim, dup_rate=0.0, seed=3, spaces=synth.SPACES[:spaces_n])
        spaces = tuple(vec.prefill)
        indexes = {}
        t0 = time.perf_counter()
        for s in spaces:
            idx = SpaceIndex(dim, cfg, capacity=n)
            idx.add(vec.prefill[s], np.arange(n, dtype=np.int64), threads=os.cpu_count() or 1)
            indexes[s] = idx
        build_s = time.perf_counter() - t0
        vec.prefill.clear()  # the indexes hold their own copies; the tail needs only the stream
        ids = [f"p{i}" for i in range(n)]
        state = PartitionState(
            spaces,
            {s: dim for s in spaces},
            cfg,
            indexes,
            ids,
            [None] * n,
            {sid: i for i, sid in enumerate(ids)},
            changelog_offset=n - 1,
        )
        records = [
            pack(
                "changelog",
                changelog_record(
                    Embedded(id=f"t{i}", vectors={s: vec.stream[s][i] for s in spaces})
                ),
                check=False,
            )
            for i in range(tail)
        ]
        save_s, load_s, replay = Stat(), Stat(), Stat()
        fork_stall, fork_write, fork_total = Stat(), Stat(), Stat()
        upload_s, fetch_s = Stat(), Stat()
        size_bytes = 0
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            d = Path(tmp) / "snap"
            for _ in range(repeats):
                gc.collect()
                t0 = time.perf_counter()
                info = snapshot.save(state, d, "bench", keep=1)
                save_s.add(time.perf_counter() - t0)
                size_bytes = info.bytes
                _drop_cache(d)
                t0 = time.perf_counter()
                loaded = snapshot.load(
                    d, cfg, fingerprint="bench", spaces=spaces, dims={s: dim for s in spaces}
                )
                load_s.add(time.perf_counter() - t0)
                gc.collect()
                t0 = time.perf_counter()
                for lo in range(0, tail, 4096):
                    buf = [
                        embedded_from_record(unpack("changelog", r, max_bytes=1 << 30), loaded.dims)
                        for r in records[lo : lo + 4096]
                    ]
                    fresh = [e for e in buf if e.id not in loaded]
                    loaded.add(
                        [e.id for e in fresh],
                        {s: np.stack([e.vectors[s] for e in fresh]) for s in spaces},
                        [e.label for e in fresh],
                    )
                replay.add(tail / (time.perf_counter() - t0))
                del loaded
                gc.collect()
                _shared(info.path, Path(tmp), spaces, dim, upload_s, fetch_s)
                shutil.rmtree(d, ignore_errors=True)
                gc.collect()
                _forked(state, Path(tmp) / "fork", fork_stall, fork_write, fork_total)
        row = {
            "n": n,
            "snapshot_bytes": size_bytes,
            "save_s": save_s.as_dict(3),
            "load_s": load_s.as_dict(3),
            "replay_items_per_s": replay.as_dict(1),
            "stall_s": save_s.as_dict(3),
            "fork_stall_s": fork_stall.as_dict(4),
            "fork_write_s": fork_write.as_dict(3),
            "fork_published_s": fork_total.as_dict(3),
            "shared_upload_s": upload_s.as_dict(3),
            "shared_fetch_load_s": fetch_s.as_dict(3),
            "full_replay_estimate_s": round(n / replay.median, 1) if replay.values else None,
            "build_items_per_s": round(n / build_s, 1),
        }
        progress(
            f"restore: {n:,}: save {save_s.median:.2f}s, load {load_s.median:.2f}s, "
            f"replay {replay.median:,.0f} items/s; forked: stall {fork_stall.median * 1e3:.1f} ms, "
            f"write {fork_write.median:.2f}s"
        )
        rows.append(row)
        del state, indexes
        gc.collect()
    return {
        "params": {
            "dim": dim,
            "spaces": spaces_n,
            "tail": tail,
            "repeats": repeats,
            "m": cfg.m,
            "ef_construction": cfg.ef_construction,
            "threads": os.cpu_count(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        },
        "sizes": rows,
    }


def _shared(
    snap: Path, tmp: Path, spaces: tuple[str, ...], dim: int, upload: Stat, fetch: Stat
) -> None:
    """The snapshot through a shared store (``snapshot.remote``) on a local ``file://`` folder:
    the upload from its staged hard links, then fetch + verify + load as a new owner restores.
    A folder on the same disk: this is the protocol's own cost, not a network's."""
    from infogrowth import snapshot
    from infogrowth.snapremote import RemoteStore, stage

    cfg = load_settings(None).index
    store = RemoteStore(f"file://{tmp / 'shared'}", None)
    staged = stage(snap)
    t0 = time.perf_counter()
    store.upload(staged, "part-0", snap.name, keep=1)
    upload.add(time.perf_counter() - t0)
    shutil.rmtree(staged)
    _drop_cache(tmp / "shared")
    into = tmp / "fetched"
    t0 = time.perf_counter()
    store.fetch("part-0", snap.name, into)
    loaded = snapshot.load_dir(
        into, cfg, fingerprint="bench", spaces=spaces, dims={s: dim for s in spaces}
    )
    fetch.add(time.perf_counter() - t0)
    del loaded
    shutil.rmtree(into, ignore_errors=True)
    shutil.rmtree(tmp / "shared", ignore_errors=True)
    gc.collect()


def _forked(state: PartitionState, d: Path, stall: Stat, write: Stat, total: Stat) -> None:
    """One snapshot written by a forked child, timed as the select stage sees it."""
    from infogrowth.snapfork import SnapshotWriter

    w = SnapshotWriter(fork=True)
    if not w.forking:
        return
    t0 = time.perf_counter()
    stall.add(w.start(0, state, d, "bench", keep=1))
    w.wait(0, 3600)
    [r] = w.poll()
    if r.info is None:
        raise RuntimeError(f"forked snapshot failed: {r.error}")
    total.add(time.perf_counter() - t0)
    write.add(r.write_s)
    shutil.rmtree(d, ignore_errors=True)


def _drop_cache(path: Path) -> None:
    """Ask the kernel to forget the snapshot's pages, so the load reads from disk (best effort)."""
    for f in path.rglob("*"):
        if f.is_file():
            try:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                pass


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    t = Table(
        f"restore: snapshot and changelog replay, {p['spaces']}×{p['dim']}-d, M={p['m']}, "
        f"ef_c={p['ef_construction']}",
        [
            "items",
            "snapshot size",
            "in-process write = stall (s)",
            "forked: stall (ms)",
            "forked: write (s)",
            "load + verify (s)",
            "shared: upload (s)",
            "shared: fetch + load (s)",
            "replay (items/s)",
            "full replay (est. s)",
            f"build, {p['threads']} threads (items/s)",
        ],
        note=(
            f"replay of a {p['tail']:,}-record changelog tail onto the loaded state; "
            f"median [min–max] of {p['repeats']} runs; "
            f"GLIBC_TUNABLES={p.get('glibc_tunables') or 'unset'}"
        ),
    )
    for r in res["sizes"]:
        t.add(
            f"{r['n']:,}",
            f"{r['snapshot_bytes'] / 2**20:,.0f} MiB",
            fmt(r["save_s"], 2),
            _ms(r.get("fork_stall_s")),
            fmt(r.get("fork_write_s"), 2),
            fmt(r["load_s"], 2),
            fmt(r.get("shared_upload_s"), 2),
            fmt(r.get("shared_fetch_load_s"), 2),
            fmt(r["replay_items_per_s"]),
            f"{r['full_replay_estimate_s']:,.0f}" if r["full_replay_estimate_s"] else "-",
            f"{r['build_items_per_s']:,.0f}" if r.get("build_items_per_s") else "-",
        )
    return [t]


def _ms(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "-"
    return fmt({k: v * 1e3 if isinstance(v, float) else v for k, v in stat.items()}, 1)
