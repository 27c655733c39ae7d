"""Select stage vs the raw hnswlib floor, on a prefilled index.

The floor makes the same hnswlib calls as the stage, with the same threads and batches: per batch
one ``knn_query`` per space (``threads`` threads) and one ``add_items`` per space of exactly the
items the stage kept, each index filled by one thread, the spaces side by side when ``threads > 1``
(what :class:`~infogrowth.index.PartitionState` does). The difference is everything the stage adds
on top: exact float64 distances, the intra-batch merge, the policy and the verdict objects.

The prefilled index is built once (multi-threaded: the prefill is not measured), saved, and kept
in the bench cache for later invocations; every measured run loads it afresh, so all runs start
from the same graph. The stage's background inserts are waited for inside its timed section.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from infogrowth.calibrate import resolve_thresholds, seed_stats
from infogrowth.config import IndexConfig, Settings, load_settings
from infogrowth.index import PartitionState, SpaceIndex
from infogrowth.messages import Outcome
from infogrowth.schema import Embedded
from infogrowth.select import Selector, Thresholds
from infogrowth_dev.bench import synth
from infogrowth_dev.bench.common import Stat, Table, fmt, progress


@dataclass
class Prefilled:
    """A saved prefilled state: one hnswlib file per space plus its ids."""

    directory: Path
    n: int
    spaces: tuple[str, ...]
    dim: int

    def path(self, space: str) -> str:
        return str(self.directory / f"prefill-{space}.bin")

    def load_state(self, cfg: IndexConfig, capacity: int) -> PartitionState:
        indexes = {}
        for s in self.spaces:
            idx = SpaceIndex.load(self.path(s), self.dim, cfg)
            idx.reserve(capacity)
            indexes[s] = idx
        ids = [f"p{i}" for i in range(self.n)]
        return PartitionState(
            spaces=self.spaces,
            dims={s: self.dim for s in self.spaces},
            cfg=cfg,
            indexes=indexes,
            ids=ids,
            labels=[None] * self.n,
            id_pos={sid: i for i, sid in enumerate(ids)},
        )

    def load_raw(self, cfg: IndexConfig, capacity: int) -> dict[str, hnswlib.Index]:
        out = {}
        for s in self.spaces:
            idx = hnswlib.Index(space="ip", dim=self.dim)
            idx.load_index(self.path(s), max_elements=capacity)
            idx.set_ef(cfg.ef)
            out[s] = idx
        return out


def settings_for(threads: int, **extra: Any) -> Settings:
    return load_settings(None, **{"index.threads": threads, **extra})


def prefill(
    vec: synth.Vectors, directory: Path, cfg: IndexConfig, threads: int | None = None
) -> Prefilled:
    """Build the prefilled indexes with every core and save them."""
    n = len(next(iter(vec.prefill.values())))
    spaces = tuple(vec.prefill)
    t = threads or os.cpu_count() or 1
    for s in spaces:
        idx = SpaceIndex(vec.dim, cfg, capacity=max(n, 1))
        if n:
            idx.add(vec.prefill[s], np.arange(n, dtype=np.int64), threads=t)
        idx.save(str(directory / f"prefill-{s}.bin"))
        del idx
        gc.collect()
    return Prefilled(directory, n, spaces, vec.dim)


def cached_prefill(
    vec: synth.Vectors, key: str, cache: Path | None, scratch: Path, cfg: IndexConfig
) -> tuple[Prefilled, float | None]:
    """The prefill from ``cache`` when an identical one was built before, else built (and kept).

    Returns the prefill and its build seconds (``None`` when it came from the cache).
    """
    n = len(next(iter(vec.prefill.values())))
    spaces = tuple(vec.prefill)
    if cache is not None:
        d = cache / key
        if all((d / f"prefill-{s}.bin").is_file() for s in spaces) and (d / "done").is_file():
            return Prefilled(d, n, spaces, vec.dim), None
    target = scratch
    if cache is not None:
        target = cache / f".{key}.{os.getpid()}"
        target.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pre = prefill(vec, target, cfg)
    built = time.perf_counter() - t0
    if cache is not None:
        (target / "done").write_text("ok\n")
        final = cache / key
        if final.exists():
            import shutil

            shutil.rmtree(final, ignore_errors=True)
        os.replace(target, final)
        pre = Prefilled(final, n, spaces, vec.dim)
    return pre, built


def prefill_key(n: int, dim: int, dup_rate: float, cfg: IndexConfig) -> str:
    import hashlib

    blob = repr(
        (
            "v2",
            n,
            dim,
            dup_rate,
            cfg.m,
            cfg.ef_construction,
            cfg.random_seed,
            getattr(hnswlib, "__version__", "?"),
            np.__version__,
        )
    )
    return f"select-{n}-{dim}-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache() -> Path:
    root = os.environ.get("INFOGROWTH_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "infogrowth") / "bench"


def calibrate(vec: synth.Vectors, settings: Settings, n_seed: int = 2000) -> Thresholds:
    """Thresholds from a seed sample of the prefill, as ``infogrowth seed`` would fit them."""
    spaces = tuple(vec.prefill)
    n = len(vec.prefill[spaces[0]])
    src = vec.prefill if n >= n_seed else vec.stream
    m = min(n_seed, len(src[spaces[0]]))
    rows = np.linspace(0, len(src[spaces[0]]) - 1, m).astype(np.int64)
    seed = [Embedded(id=f"seed{i}", vectors={s: src[s][i] for s in spaces}) for i in rows]
    stats = seed_stats(seed, spaces, settings.select.k)
    return resolve_thresholds(settings, spaces, stats)


def stream_items(vec: synth.Vectors, prefix: str = "q") -> list[Embedded]:
    spaces = tuple(vec.stream)
    m = len(vec.stream[spaces[0]])
    return [
        Embedded(id=f"{prefix}{i}", vectors={s: vec.stream[s][i] for s in spaces}) for i in range(m)
    ]


def run_pair(
    pre: Prefilled,
    items: list[Embedded],
    stream: dict[str, np.ndarray],
    thresholds: Thresholds,
    threads: int,
    batch: int,
) -> tuple[float, float, list[np.ndarray], dict[str, int]]:
    """Seconds of the select stage (decide + outcomes) and of the raw floor over ``items``.

    Both start from the same prefilled graph (two copies in memory) and are timed batch by batch,
    one right after the other, so both see the same machine load. Returns the two sums, the kept
    rows per batch and the decision counts.
    """
    settings = settings_for(threads)
    m = len(items)
    state = pre.load_state(settings.index, pre.n + m + 1)
    sel = Selector(state, thresholds, settings.select, settings.clean, neighbour_fixer=False)
    raw = pre.load_raw(settings.index, pre.n + m + 1)
    spaces = list(raw)
    pool = ThreadPoolExecutor(max_workers=len(spaces)) if threads > 1 and len(spaces) > 1 else None
    k = thresholds.k
    kept: list[np.ndarray] = []
    counts: dict[str, int] = {}
    base = pre.n
    s_sec = r_sec = 0.0

    def stage(lo: int) -> np.ndarray:
        nonlocal s_sec
        t0 = time.perf_counter()
        outcomes = [Outcome.from_verdict(v) for v in sel.decide(items[lo : lo + batch])]
        state.wait()  # the stage's background inserts count as its time, not the floor's
        s_sec += time.perf_counter() - t0
        for o in outcomes:
            key = f"{o.decision}/{o.reason}" if o.reason else o.decision
            counts[key] = counts.get(key, 0) + 1
        return np.fromiter((o.decision != "rejected" for o in outcomes), bool, len(outcomes))

    def floor(lo: int, keep: np.ndarray) -> None:
        nonlocal r_sec, base
        t0 = time.perf_counter()
        if base:
            for s in spaces:
                raw[s].knn_query(stream[s][lo : lo + batch], k=min(k, base), num_threads=threads)
        rows = lo + np.flatnonzero(keep)
        if len(rows):
            labels = np.arange(base, base + len(rows))
            vecs = {s: np.ascontiguousarray(stream[s][rows]) for s in spaces}
            if pool is not None:
                futs = [pool.submit(raw[s].add_items, vecs[s], labels, 1) for s in spaces]
                for f in futs:
                    f.result()
            else:
                for s in spaces:
                    raw[s].add_items(vecs[s], labels, num_threads=1)
            base += len(rows)
        r_sec += time.perf_counter() - t0

    gc.collect()
    try:
        for lo in range(0, m, batch):
            keep = stage(lo)
            floor(lo, keep)
            kept.append(keep)
    finally:
        if pool is not None:
            pool.shutdown()
    return s_sec, r_sec, kept, counts


def bench(
    n: int = 100_000,
    stream: int = 4096,
    batch: int = 256,
    threads: list[int] | None = None,
    repeats: int = 3,
    dim: int = 256,
    dup_rate: float = 0.1,
    workdir: Path | None = None,
    sizes: list[int] | None = None,
    cache: Path | None = None,
) -> dict[str, Any]:
    """Samples/s of the select stage and of the raw floor, side by side, per thread count.

    ``sizes`` adds a sweep over index sizes (all threads = the largest of ``threads``) for the
    throughput-vs-size plot; the largest prefill is built once and cut for the smaller ones.
    """
    threads = threads or [1, 2]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        progress(f"select: generating {n:,} + {stream:,} vectors ({dim}-d, 2 spaces)")
        vec = synth.make(n, stream, dim=dim, dup_rate=dup_rate)
        base_settings = settings_for(max(threads))
        th = calibrate(vec, base_settings)
        items = stream_items(vec)
        key = prefill_key(n, dim, dup_rate, base_settings.index)
        pre, prefill_s = cached_prefill(vec, key, cache, Path(tmp), base_settings.index)
        progress(
            f"select: prefill of {n:,} "
            + ("from the cache" if prefill_s is None else f"built in {prefill_s:.0f}s")
        )
        per_threads: dict[str, Any] = {}
        reference: list[np.ndarray] | None = None
        deterministic = True
        counts: dict[str, int] = {}
        for t in threads:
            sel_rate, raw_rate, ratio = Stat(), Stat(), Stat()
            for r in range(repeats):
                s_sec, r_sec, kept, counts = run_pair(pre, items, vec.stream, th, t, batch)
                if reference is None:
                    reference = kept
                elif not all(np.array_equal(a, b) for a, b in zip(reference, kept, strict=True)):
                    deterministic = False
                sel_rate.add(stream / s_sec)
                raw_rate.add(stream / r_sec)
                ratio.add(r_sec / s_sec)
                progress(
                    f"select: threads={t} run {r + 1}/{repeats}: stage {stream / s_sec:,.0f}/s, "
                    f"raw {stream / r_sec:,.0f}/s, ratio {r_sec / s_sec:.3f}"
                )
            per_threads[str(t)] = {
                "select_samples_per_s": sel_rate.as_dict(1),
                "raw_samples_per_s": raw_rate.as_dict(1),
                "ratio_vs_raw": ratio.as_dict(3),
            }
        kept_share = float(np.mean(np.concatenate(reference))) if reference else 0.0
        sweep = []
        # Round-robin over the sizes, so a burst of load on the machine hits every size alike.
        cuts = {
            size: _cut(pre, size, vec, Path(tmp), base_settings.index, cache, key)
            for size in sorted(sizes or [])
            if size <= n
        }
        t = max(threads)
        rates = {size: (Stat(), Stat(), Stat()) for size in cuts}
        for _ in range(max(1, repeats)):
            for size, cut in cuts.items():
                s_sec, r_sec, _k, _c = run_pair(cut, items, vec.stream, th, t, batch)
                sel_rate, raw_rate, ratio = rates[size]
                sel_rate.add(stream / s_sec)
                raw_rate.add(stream / r_sec)
                ratio.add(r_sec / s_sec)
        for size, (sel_rate, raw_rate, ratio) in rates.items():
            progress(
                f"select: size {size:,}: stage {sel_rate.median:,.0f}/s, "
                f"raw {raw_rate.median:,.0f}/s"
            )
            sweep.append(
                {
                    "n": size,
                    "threads": t,
                    "select_samples_per_s": sel_rate.as_dict(1),
                    "raw_samples_per_s": raw_rate.as_dict(1),
                    "ratio_vs_raw": ratio.as_dict(3),
                }
            )
    best = per_threads[str(max(threads))]
    return {
        "params": {
            "n": n,
            "stream": stream,
            "batch": batch,
            "dim": dim,
            "spaces": 2,
            "dup_rate": dup_rate,
            "m": base_settings.index.m,
            "ef_construction": base_settings.index.ef_construction,
            "ef": base_settings.index.ef,
            "k": th.k,
            "policy": th.policy,
            "exact_below": base_settings.index.exact_below,
            "repeats": repeats,
            "threads": threads,
        },
        "prefill_s": None if prefill_s is None else round(prefill_s, 1),
        "prefill_cached": prefill_s is None,
        "kept_share": round(kept_share, 3),
        "decisions": counts,
        "deterministic_across_runs": deterministic,
        "threads": per_threads,
        "ratio_vs_raw": best["ratio_vs_raw"]["median"],
        "sweep": sweep,
    }


def _cut(
    pre: Prefilled,
    size: int,
    vec: synth.Vectors,
    directory: Path,
    cfg: IndexConfig,
    cache: Path | None = None,
    key: str = "",
) -> Prefilled:
    """A prefill of the first ``size`` rows (built afresh: hnswlib cannot truncate)."""
    if size == pre.n:
        return pre
    sub = synth.Vectors(
        prefill={s: v[:size] for s, v in vec.prefill.items()},
        stream=vec.stream,
        dup=vec.dup,
        dup_source=vec.dup_source,
        cluster=vec.cluster,
    )
    d = directory / f"cut-{size}"
    d.mkdir(exist_ok=True)
    return cached_prefill(sub, f"{key}-cut{size}", cache, d, cfg)[0]


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    t = Table(
        f"select: {p['n']:,} prefilled, {p['stream']:,} measured, batch {p['batch']}, "
        f"{p['spaces']}×{p['dim']}-d, M={p['m']} ef_c={p['ef_construction']} ef={p['ef']} "
        f"k={p['k']}, policy {p['policy']}",
        ["threads", "select (samples/s)", "raw hnswlib (samples/s)", "ratio (target ≥ 0.85)"],
        note=f"kept share {res['kept_share']:.1%}; median [min–max] of {p['repeats']} runs",
    )
    for th, r in res["threads"].items():
        t.add(
            th,
            fmt(r["select_samples_per_s"]),
            fmt(r["raw_samples_per_s"]),
            fmt(r["ratio_vs_raw"], 3),
        )
    out = [t]
    if res.get("sweep"):
        s = Table(
            "select vs raw hnswlib by index size",
            ["index size", "threads", "select (samples/s)", "raw (samples/s)", "ratio"],
        )
        for r in res["sweep"]:
            s.add(
                f"{r['n']:,}",
                r["threads"],
                fmt(r["select_samples_per_s"]),
                fmt(r["raw_samples_per_s"]),
                fmt(r["ratio_vs_raw"], 3),
            )
        out.append(s)
    return out
