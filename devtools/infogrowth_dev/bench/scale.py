"""Select partitions (cells): throughput, and the neighbours that cells cut apart.

Near-copies are injected at an exact cosine distance from their original in every space (0.02,
0.05 and 0.1 by default: the original plus an orthogonal perturbation). Cells are the seed's
k-means centroids in the routing space (image and text concatenated, as ``infogrowth seed`` fits
them), one cell per partition, and each partition's select state is seeded with its cell's share
of the seed. For 1 / 2 / 4 / 8 partitions the bench reports

* split: the share of copies whose original was routed to another partition (and, with boundary
  replication, was not replicated into the copy's partition either); for comparison, the same
  share when the cells route on the image space alone;
* duplicates leaked: copies the one-partition run rejects as ``duplicate`` and the partitioned
  run does not;
* gain inflation: mean stream gain with P partitions / mean gain with one partition, and the
  share of stream items whose 4-NN set (in any space, among everything the one-partition run
  kept) is not all in the item's partition;
* cost: index items (replicas included) and throughput, one core doing every partition in turn
  (total work) and one core per partition (the slowest partition bounds the run).

Boundary replication (``kafka.cells_replication_margin``) inserts a kept item into every other
cell within the relative margin of its nearest one as well. The stream is decided in global
batches: each partition decides its share of a batch, then the replicas of what it kept are
added to their cells before the next batch, as replica records on Kafka arrive a little later.
The policy is ``all`` (ε from the seed): every non-duplicate is kept, so the runs differ only by
what the cells hide.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infogrowth.calibrate import resolve_thresholds, seed_stats
from infogrowth.cells import Cells, kmeans
from infogrowth.config import Settings, load_settings
from infogrowth.index import PartitionState
from infogrowth.schema import Embedded
from infogrowth.select import Selector, Thresholds
from infogrowth_dev.bench import synth
from infogrowth_dev.bench.common import Stat, Table, fmt, progress

DISTANCES = (0.02, 0.05, 0.1)
PARTITIONS = (1, 2, 4, 8)
SWEEP = (0.0, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15)
K_NN = 4


@dataclass
class Run:
    """One simulated run: per stream item, its decision and gain; the partitions' sizes."""

    gain: np.ndarray
    dup_rejected: np.ndarray
    kept: np.ndarray
    seconds: list[float]
    members: list[set[str]]
    index_items: int
    primary_items: int
    replica_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _simulate(
    vec: synth.Vectors,
    spaces: tuple[str, ...],
    cells: Cells,
    th: Thresholds,
    settings: Settings,
    margin: float,
    batch: int,
) -> Run:
    p = cells.n_cells
    dims = {s: vec.dim for s in spaces}
    n_seed = len(vec.prefill[spaces[0]])
    n = len(vec.stream[spaces[0]])
    seed_cell = cells.route_many(vec.prefill)
    cell = cells.route_many(vec.stream)
    seed_reps = cells.replicas(vec.prefill, margin) if p > 1 else [[] for _ in range(n_seed)]
    stream_reps = cells.replicas(vec.stream, margin) if p > 1 else [[] for _ in range(n)]
    states = [PartitionState.empty(spaces, dims, settings.index) for _ in range(p)]
    members: list[set[str]] = [set() for _ in range(p)]
    for c in range(p):
        home = sorted(
            set(np.flatnonzero(seed_cell == c).tolist())
            | {i for i in range(n_seed) if c in seed_reps[i]}
        )
        if home:
            ids = [f"seed{i}" for i in home]
            states[c].add(ids, {s: vec.prefill[s][home] for s in spaces}, [None] * len(home))
            members[c].update(ids)
    primary = n_seed
    sels = [
        Selector(st, th, settings.select, settings.clean, neighbour_fixer=False) for st in states
    ]
    items = [Embedded(id=f"s{i}", vectors={s: vec.stream[s][i] for s in spaces}) for i in range(n)]
    gain = np.full(n, np.nan)
    dup_rej = np.zeros(n, dtype=bool)
    kept = np.zeros(n, dtype=bool)
    seconds = [0.0] * p
    replica_seconds = 0.0
    for lo in range(0, n, batch):
        rows = np.arange(lo, min(n, lo + batch))
        for c in range(p):
            mine = rows[cell[rows] == c]
            if not len(mine):
                continue
            t0 = time.perf_counter()
            verdicts = sels[c].decide([items[i] for i in mine.tolist()])
            seconds[c] += time.perf_counter() - t0
            for i, v in zip(mine.tolist(), verdicts, strict=True):
                kept[i] = v.decision != "rejected"
                dup_rej[i] = v.reason == "duplicate"
                if v.gain is not None:
                    gain[i] = v.gain
                if kept[i]:
                    members[c].add(items[i].id)
        primary += int(kept[rows].sum())
        by_target: dict[int, list[int]] = {}
        for i in rows[kept[rows]].tolist():
            for t in stream_reps[i]:
                by_target.setdefault(t, []).append(i)
        for t, rr in sorted(by_target.items()):
            t0 = time.perf_counter()
            ids = [items[i].id for i in rr]
            states[t].add(ids, {s: vec.stream[s][rr] for s in spaces}, [None] * len(rr))
            dt = time.perf_counter() - t0
            seconds[t] += dt
            replica_seconds += dt
            members[t].update(ids)
    for st in states:
        st.wait()
    return Run(
        gain=gain,
        dup_rejected=dup_rej,
        kept=kept,
        seconds=seconds,
        members=members,
        index_items=sum(st.count for st in states),
        primary_items=primary,
        replica_seconds=replica_seconds,
        extra={"states": states, "cell": cell},
    )


def _split_share(cells: Cells, vec: synth.Vectors, margin: float) -> tuple[float, float]:
    """Share of copies whose original is neither in their cell nor replicated into it, and the
    mean number of replicas per item (seed and stream)."""
    rows = np.flatnonzero(vec.dup)
    if not len(rows) or cells.n_cells <= 1:
        return 0.0, 0.0
    n_seed = len(next(iter(vec.prefill.values())))
    allv = {s: np.concatenate([vec.prefill[s], vec.stream[s]]) for s in cells.spaces}
    home = cells.route_many(allv)
    reps = cells.replicas(allv, margin)
    src = vec.dup_source[rows]
    copy_cell = home[n_seed + rows]
    split = [
        int(cc != home[o] and cc not in reps[o])
        for cc, o in zip(copy_cell.tolist(), src.tolist(), strict=True)
    ]
    return float(np.mean(split)), float(np.mean([len(r) for r in reps]))


def _knn_differs(ref: PartitionState, vec: synth.Vectors, run: Run) -> float:
    """Share of stream items with part of their global 4-NN (any space) outside their partition.

    Global = everything the one-partition run kept (seed included), at the end of the stream.
    """
    spaces = ref.spaces
    n = len(vec.stream[spaces[0]])
    cell = run.extra["cell"]
    differs = np.zeros(n, dtype=bool)
    for s in spaces:
        labels, _ = ref.indexes[s].knn(vec.stream[s], K_NN + 1)
        for i in range(n):
            sid = f"s{i}"
            nb = [ref.ids[j] for j in labels[i].tolist() if ref.ids[j] != sid][:K_NN]
            own = run.members[int(cell[i])]
            if any(x not in own for x in nb):
                differs[i] = True
    return float(differs.mean())


def bench(
    n: int = 10_000,
    n_seed: int = 2_000,
    dim: int = 256,
    partitions: tuple[int, ...] = PARTITIONS,
    distances: tuple[float, ...] = DISTANCES,
    repeats: int = 3,
    batch: int = 256,
    dup_rate: float = 0.1,
    margin: float | None = None,
    sweep: tuple[float, ...] = SWEEP,
) -> dict[str, Any]:
    """``margin``: the replication margin measured beside none (default: the package default)."""
    settings = load_settings(None, **{"index.threads": 1})
    if margin is None:
        margin = settings.kafka.cells_replication_margin
    progress(
        f"scale: {n:,} samples, seed {n_seed:,}, copies at {distances}, partitions {partitions}, "
        f"replication margin {margin}"
    )
    timed = 0.05 if 0.05 in distances else distances[0]
    copies: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    policy = ""
    for d in distances:
        vec = synth.make(n_seed, n, dim=dim, dup_rate=dup_rate, dup_distance=d, seed=11)
        spaces = tuple(vec.stream)
        # The copies are where they should be: cosine distance d from the original, every space.
        src = vec.dup_source[vec.dup]
        got = []
        for s in spaces:
            allv = np.concatenate([vec.prefill[s], vec.stream[s]]).astype(np.float64)
            got.append(1.0 - np.einsum("ij,ij->i", vec.stream[s][vec.dup], allv[src]))
        err = np.abs(np.concatenate(got) - d)
        copies.append(
            {"distance": d, "copies": int(vec.dup.sum()), "max_abs_error": float(err.max())}
        )
        seed_items = [
            Embedded(id=f"seed{i}", vectors={s: vec.prefill[s][i] for s in spaces})
            for i in range(n_seed)
        ]
        stats = seed_stats(seed_items, spaces, settings.select.k)
        th = dataclasses.replace(resolve_thresholds(settings, spaces, stats), policy="all")
        eps = ", ".join(f"{s} {th.epsilon.get(s, 0.0):.3g}" for s in spaces)
        policy = f"all, ε {eps}"
        one: Run | None = None
        for p in partitions:
            cells = kmeans(spaces, vec.prefill, p)
            image_only = kmeans(("image",), vec.prefill, p) if "image" in spaces else cells
            split_img, _ = _split_share(image_only, vec, 0.0)
            for m in sweep if p > 1 and d == timed else ():
                share, reps = _split_share(cells, vec, m)
                sweep_rows.append(
                    {
                        "distance": d,
                        "partitions": p,
                        "margin": m,
                        "split_share": share,
                        "replicas_per_item": reps,
                    }
                )
            for m in (0.0, margin) if p > 1 and margin > 0 else (0.0,):
                reps_n = repeats if d == timed else 1
                total, slowest = Stat(), Stat()
                run: Run | None = None
                for _ in range(reps_n):
                    run = _simulate(vec, spaces, cells, th, settings, m, batch)
                    total.add(n / sum(run.seconds))
                    slowest.add(n / max(run.seconds))
                assert run is not None
                split, reps_per_item = _split_share(cells, vec, m)
                shares = np.bincount(run.extra["cell"], minlength=p) / n
                row: dict[str, Any] = {
                    "distance": d,
                    "partitions": p,
                    "margin": m,
                    "copies": int(vec.dup.sum()),
                    "split_share": round(split, 4),
                    "split_share_image_only": round(split_img, 4),
                    "replicas_per_item": round(reps_per_item, 4),
                    "largest_cell_share": round(float(shares.max()), 3),
                    "mean_gain": float(np.nanmean(run.gain)),
                    "index_items": run.index_items,
                    "primary_items": run.primary_items,
                    "index_growth": round(run.index_items / run.primary_items - 1.0, 4),
                    "kept_share": round(float(run.kept.mean()), 4),
                    "timed": d == timed,
                    "one_core_samples_per_s": total.as_dict(1),
                    "parallel_samples_per_s": slowest.as_dict(1),
                }
                if p == 1:
                    one = run
                elif one is not None:
                    ref = one.dup_rejected & vec.dup
                    leaked = ref & ~run.dup_rejected
                    row["duplicates_rejected_by_one"] = int(ref.sum())
                    row["duplicates_leaked"] = int(leaked.sum())
                    row["leak_share"] = round(float(leaked.sum() / max(1, ref.sum())), 4)
                    row["gain_inflation"] = round(row["mean_gain"] / float(np.nanmean(one.gain)), 4)
                    row["knn_differs_share"] = round(
                        _knn_differs(one.extra["states"][0], vec, run), 4
                    )
                rows.append(row)
                progress(
                    f"scale: d={d} {p} partitions margin {m}: split {split:.2%}, "
                    f"{total.median:,.0f}/s on one core, {slowest.median:,.0f}/s in parallel"
                )
    return {
        "params": {
            "n": n,
            "seed": n_seed,
            "dim": dim,
            "dup_rate": dup_rate,
            "batch": batch,
            "repeats": repeats,
            "timed_distance": timed,
            "margin": margin,
            "exact_below": settings.index.exact_below,
            "policy": policy,
        },
        "copies": copies,
        "rows": rows,
        "sweep": sweep_rows,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    m = p["margin"]
    head = (
        f"{p['n']:,} samples after a {p['seed']:,}-item seed, 2×{p['dim']}-d, "
        f"{p['dup_rate']:.0%} near-copies at the stated cosine distance, k-means cells on "
        "image+text"
    )
    out = []
    arms = [(0.0, "no replication")] + ([(m, f"boundary replication, margin {m}")] if m else [])
    for margin, title in arms:
        t = Table(
            f"scale: neighbours across cells, {title}; {head}",
            [
                "copy distance",
                "partitions",
                "copies split from original",
                *(["split, image-only cells"] if margin == 0.0 else []),
                "duplicates leaked (vs 1 partition)",
                "gain inflation",
                "4-NN set differs",
                "index items (vs kept)",
            ],
            note=(
                "split = copy routed to another partition than its original (nor replicated "
                "there); leaked = copies the 1-partition run rejects as duplicate and this run "
                "does not; gain inflation = mean stream gain / the 1-partition mean; 4-NN set "
                "differs = share of stream items with a global 4-NN (any space) outside their "
                "partition"
            ),
        )
        for r in res["rows"]:
            if r["partitions"] == 1 or r["margin"] != margin:
                continue
            leak = (
                f"{r['duplicates_leaked']} of {r['duplicates_rejected_by_one']} "
                f"({r['leak_share']:.1%})"
            )
            t.add(
                r["distance"],
                r["partitions"],
                f"{r['split_share']:.1%}",
                *([f"{r['split_share_image_only']:.1%}"] if margin == 0.0 else []),
                leak,
                f"{r['gain_inflation']:.3f}",
                f"{r['knn_differs_share']:.1%}",
                f"+{r['index_growth']:.1%}",
            )
        out.append(t)
    cost = Table(
        f"scale: cost, copies at distance {p['timed_distance']}; {head}",
        [
            "partitions",
            "replication margin",
            "one core (samples/s)",
            "one core per partition (samples/s)",
            "largest cell",
            "index items (vs kept)",
        ],
        note=f"median [min–max] of {p['repeats']} runs; policy {p['policy']}",
    )
    for r in res["rows"]:
        if r["timed"]:
            cost.add(
                r["partitions"],
                r["margin"],
                fmt(r["one_core_samples_per_s"]),
                fmt(r["parallel_samples_per_s"]),
                f"{r['largest_cell_share']:.0%}",
                f"+{r['index_growth']:.1%}",
            )
    out.append(cost)
    parts = sorted({r["partitions"] for r in res["sweep"]})
    if parts:
        sw = Table(
            f"scale: replication margin sweep, copies at distance {p['timed_distance']} "
            "(routing only)",
            [
                "margin",
                *(f"split, {q} partitions" for q in parts),
                *(f"replicas per item, {q}" for q in parts),
            ],
            note="replicas per item = mean number of extra cells an item is inserted into",
        )
        margins = sorted({r["margin"] for r in res["sweep"]})
        by = {(r["margin"], r["partitions"]): r for r in res["sweep"]}
        for mg in margins:
            sw.add(
                mg,
                *(_pct(by[(mg, q)]["split_share"]) for q in parts),
                *(f"{by[(mg, q)]['replicas_per_item']:.2f}" for q in parts),
            )
        out.append(sw)
    return out
