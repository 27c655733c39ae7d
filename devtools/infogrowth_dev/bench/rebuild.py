"""Restore of one partition, with and without a snapshot, through the select stage's own code.

Per size N (2 spaces): a changelog of N + tail packed records is made once. Then, side by side in
one run:

* **full replay** (no snapshot): the N records replayed from nothing by
  :meth:`PartitionRestore.replay` with the defaults (batches of ``restore.batch_items``, one
  insert thread per index, the live graph byte for byte);
* **fast rebuild**: the same with ``restore.fast_rebuild`` (multi-threaded inserts,
  ``restore.threads`` shared by the spaces);
* **with snapshot**: the full replay's state saved with ``snapshot.save``, dropped from the page
  cache, then ``snapshot.load`` (verify + load) and the tail replayed onto it.

Only the Kafka read is left out (records come from memory): what is timed is decode + index.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from infogrowth.config import Settings, load_settings
from infogrowth.index import PartitionState
from infogrowth_dev.bench import synth
from infogrowth_dev.bench.common import Table, progress


def _records(
    n: int, tail: int, dim: int, spaces_n: int = 2
) -> tuple[list[tuple[bytes, int]], tuple[str, ...]]:
    from infogrowth.messages import changelog_record
    from infogrowth.schema import Embedded, pack

    vec = synth.make(n, tail, dim=dim, dup_rate=0.0, seed=5, spaces=synth.SPACES[:spaces_n])
    spaces = tuple(vec.prefill)
    out: list[tuple[bytes, int]] = []
    for part, prefix in ((vec.prefill, "p"), (vec.stream, "t")):
        rows = len(part[spaces[0]])
        for i in range(rows):
            e = Embedded(id=f"{prefix}{i}", vectors={s: part[s][i] for s in spaces})
            out.append((pack("changelog", changelog_record(e), check=False), len(out)))
    return out, spaces


def _replay(
    settings: Settings,
    spaces: tuple[str, ...],
    dim: int,
    records: list[tuple[bytes, int]],
    state: PartitionState | None,
) -> tuple[PartitionState, float, bool]:
    """Replay ``records`` onto ``state``; the state, seconds, whether it was a fast rebuild."""
    from infogrowth.kafka.restore import Layout, PartitionRestore, run_to_end_of

    layout = Layout("bench", spaces=spaces, dims={s: dim for s in spaces})
    r = PartitionRestore(settings, 0, Path("."), layout)
    before = state.count if state is not None else 0
    gc.collect()
    t0 = time.perf_counter()
    out = run_to_end_of(r.replay(state, records))
    seconds = time.perf_counter() - t0
    assert out is not None and out.count == before + len(records)
    return out, seconds, r.fast


MODES = ("snapshot", "full", "fast")
"""The restores the table can time: with a snapshot, full replay, fast rebuild."""


def bench(
    sizes: list[int] | None = None,
    dim: int = 256,
    tail: int = 8192,
    workdir: Path | None = None,
    spaces_n: int = 2,
    modes: Collection[str] = MODES,
) -> dict[str, Any]:
    """Time the restores in ``modes`` at each size (the others are None in the row; the
    snapshot is taken of the full replay's state, or of the fast rebuild's without one)."""
    from infogrowth import snapshot
    from infogrowth_dev.bench.restore import _drop_cache

    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ValueError(f"rebuild modes {sorted(unknown) or '(none)'}: choose from {MODES}")
    exact = load_settings(None)
    fast = load_settings(None, **{"restore.fast_rebuild": True})
    rows = []
    for n in sizes or [100_000]:
        progress(f"rebuild: {n:,}-item changelog (+{tail:,} tail)")
        records, spaces = _records(n, tail, dim, spaces_n)
        head, rest = records[:n], records[n:]
        row: dict[str, Any] = {"n": n}
        state: PartitionState | None = None
        if "fast" in modes:
            progress(f"rebuild: {n:,}: fast rebuild")
            state, fast_s, was_fast = _replay(fast, spaces, dim, head, None)
            assert was_fast
            row |= {
                "fast_rebuild_s": round(fast_s, 1),
                "fast_rebuild_items_per_s": round(n / fast_s, 1),
            }
        if "full" in modes:
            del state
            progress(f"rebuild: {n:,}: full replay (default)")
            state, full_s, _ = _replay(exact, spaces, dim, head, None)
            row |= {
                "full_replay_s": round(full_s, 1),
                "full_replay_items_per_s": round(n / full_s, 1),
            }
        if "snapshot" in modes:
            assert state is not None
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                d = Path(tmp) / "snap"
                info = snapshot.save(state, d, "bench", keep=1)
                del state
                gc.collect()
                _drop_cache(d)
                progress(f"rebuild: {n:,}: snapshot load + {tail:,}-record tail")
                t0 = time.perf_counter()
                loaded = snapshot.load(
                    d,
                    exact.index,
                    fingerprint="bench",
                    spaces=spaces,
                    dims={s: dim for s in spaces},
                )
                load_s = time.perf_counter() - t0
                _, tail_s, _ = _replay(exact, spaces, dim, rest, loaded)
                del loaded
            row |= {
                "snapshot_bytes": info.bytes,
                "snapshot_load_s": round(load_s, 2),
                "tail_s": round(tail_s, 2),
                "tail_items_per_s": round(tail / tail_s, 1),
                "with_snapshot_s": round(load_s + tail_s, 2),
            }
        else:
            del state
        rows.append(row)
        progress(
            f"rebuild: {n:,}: "
            + "; ".join(f"{k} {v:,}" for k, v in row.items() if k.endswith(("_per_s", "ot_s")))
        )
        del records, head, rest
        gc.collect()
    from infogrowth.kafka.restore import fast_threads

    return {
        "params": {
            "dim": dim,
            "spaces": spaces_n,
            "tail": tail,
            "modes": [m for m in MODES if m in modes],
            "batch_items": exact.restore.batch_items,
            "fast_threads_per_index": fast_threads(fast, spaces_n),
            "cores": os.cpu_count(),
            "m": exact.index.m,
            "ef_construction": exact.index.ef_construction,
        },
        "sizes": rows,
    }


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    t = Table(
        f"restore at scale: with and without a snapshot, {p['spaces']}×{p['dim']}-d, M={p['m']}, "
        f"ef_c={p['ef_construction']}",
        [
            "items",
            "with snapshot: load + tail (s)",
            "tail (items/s)",
            "full replay (s)",
            "full replay (items/s)",
            "fast rebuild (s)",
            "fast rebuild (items/s)",
        ],
        note=(
            f"tail = {p['tail']:,} records after the snapshot; replays in batches of "
            f"{p['batch_items']:,}; fast rebuild with {p['fast_threads_per_index']} insert "
            f"threads per index on {p['cores']} cores; one run each"
        ),
    )

    def fig(r: dict[str, Any], key: str, fmt: str = ",.0f") -> str:
        return "—" if r.get(key) is None else format(r[key], fmt)

    for r in res["sizes"]:
        with_snap = "—"
        if r.get("with_snapshot_s") is not None:
            with_snap = (
                f"{r['snapshot_load_s']:.1f} + {r['tail_s']:.1f} = {r['with_snapshot_s']:.1f}"
            )
        t.add(
            f"{r['n']:,}",
            with_snap,
            fig(r, "tail_items_per_s"),
            fig(r, "full_replay_s"),
            fig(r, "full_replay_items_per_s"),
            fig(r, "fast_rebuild_s"),
            fig(r, "fast_rebuild_items_per_s"),
        )
    return [t]
