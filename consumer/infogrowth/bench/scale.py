"""Select partitions (cells) 1, 2, 4: throughput, and the near-duplicates that cells let through.

Every sample is routed to a cell by the seed's k-means centroids, as ``infogrowth seed`` and the
embed stage do, and each cell is decided by its own select partition seeded with its share of the
seed. Throughput is given two ways: one core doing every partition in turn (total work) and the
partitions on separate cores or replicas (the slowest partition bounds the run). The price of
cells is the share of injected near-duplicates that the partitioned run accepts although the
single-partition run rejects them: their original sits across a cell border.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from infogrowth.bench import synth
from infogrowth.bench.common import Stat, Table, fmt, progress
from infogrowth.calibrate import resolve_thresholds, seed_stats
from infogrowth.cells import kmeans
from infogrowth.config import load_settings
from infogrowth.index import PartitionState
from infogrowth.schema import Embedded
from infogrowth.select import Selector


def bench(
    n: int = 20_000,
    n_seed: int = 2_000,
    dim: int = 256,
    partitions: tuple[int, ...] = (1, 2, 4),
    repeats: int = 3,
    batch: int = 256,
    dup_rate: float = 0.1,
) -> dict[str, Any]:
    progress(f"scale: {n:,} samples, seed {n_seed:,}, partitions {partitions}")
    vec = synth.make(n_seed, n, dim=dim, dup_rate=dup_rate, seed=11)
    spaces = tuple(vec.stream)
    settings = load_settings(None, **{"index.threads": 1})
    seed_items = [
        Embedded(id=f"seed{i}", vectors={s: vec.prefill[s][i] for s in spaces})
        for i in range(n_seed)
    ]
    th = resolve_thresholds(settings, spaces, seed_stats(seed_items, spaces, settings.select.k))
    items = [Embedded(id=f"s{i}", vectors={s: vec.stream[s][i] for s in spaces}) for i in range(n)]
    route_space = "image"
    decisions: dict[int, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    for p in partitions:
        cells = kmeans(route_space, vec.prefill[route_space], p)
        seed_cell = np.array([cells.route(v) % p for v in vec.prefill[route_space]])
        cell = np.array([cells.route(v) % p for v in vec.stream[route_space]])
        total, slowest = Stat(), Stat()
        for _ in range(repeats):
            per_part = []
            kept = np.zeros(n, dtype=bool)
            dup_rej = np.zeros(n, dtype=bool)
            for c in range(p):
                st = PartitionState.empty(spaces, {s: dim for s in spaces}, settings.index)
                srows = np.flatnonzero(seed_cell == c)
                if len(srows):
                    st.add(
                        [f"seed{i}" for i in srows.tolist()],
                        {s: vec.prefill[s][srows] for s in spaces},
                        [None] * len(srows),
                    )
                sel = Selector(st, th, settings.select, settings.clean, neighbour_fixer=False)
                mine = np.flatnonzero(cell == c)
                t0 = time.perf_counter()
                for lo in range(0, len(mine), batch):
                    part = mine[lo : lo + batch]
                    for i, v in zip(
                        part.tolist(), sel.decide([items[i] for i in part]), strict=True
                    ):
                        kept[i] = v.decision != "rejected"
                        dup_rej[i] = v.reason == "duplicate"
                per_part.append(time.perf_counter() - t0)
            total.add(n / sum(per_part))
            slowest.add(n / max(per_part))
            decisions[p] = dup_rej
            shares = np.bincount(cell, minlength=p) / n
        row: dict[str, Any] = {
            "partitions": p,
            "one_core_samples_per_s": total.as_dict(1),
            "parallel_samples_per_s": slowest.as_dict(1),
            "largest_cell_share": round(float(shares.max()), 3),
            "accepted_share": round(float(kept.mean()), 4),
        }
        if p != partitions[0] and partitions[0] == 1:
            ref = decisions[1]
            injected = vec.dup
            leaked = injected & ref & ~decisions[p]
            row["duplicates_leaked"] = int(leaked.sum())
            row["duplicates_injected"] = int(injected.sum())
            row["duplicates_rejected_by_one"] = int((injected & ref).sum())
            row["leak_share"] = round(float(leaked.sum() / max(1, (injected & ref).sum())), 4)
        progress(
            f"scale: {p} partitions: {total.median:,.0f}/s on one core, "
            f"{slowest.median:,.0f}/s in parallel"
        )
        rows.append(row)
    return {
        "params": {
            "n": n,
            "seed": n_seed,
            "dim": dim,
            "dup_rate": dup_rate,
            "batch": batch,
            "repeats": repeats,
            "exact_below": settings.index.exact_below,
            "policy": th.policy,
        },
        "partitions": rows,
    }


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    t = Table(
        f"scale: select partitions (k-means cells), {p['n']:,} samples, seed {p['seed']:,}, "
        f"2×{p['dim']}-d, {p['dup_rate']:.0%} injected near-duplicates",
        [
            "partitions",
            "one core (samples/s)",
            "one core per partition (samples/s)",
            "largest cell",
            "duplicates leaked (vs 1 partition)",
        ],
        note=(
            "leaked = injected near-duplicates the 1-partition run rejects as duplicate and the "
            f"partitioned run accepts; median [min–max] of {p['repeats']} runs"
        ),
    )
    for r in res["partitions"]:
        leak = (
            f"{r['duplicates_leaked']} of {r['duplicates_rejected_by_one']} ({r['leak_share']:.1%})"
            if "leak_share" in r
            else "-"
        )
        t.add(
            r["partitions"],
            fmt(r["one_core_samples_per_s"]),
            fmt(r["parallel_samples_per_s"]),
            f"{r['largest_cell_share']:.0%}",
            leak,
        )
    return [t]
