"""Resident memory per indexed item vs hnswlib's own for the same items.

Each measurement runs in a fresh interpreter so that nothing else's memory counts. One builds a
:class:`~infogrowth.index.PartitionState` of N items (2 spaces) in chunks through its public
``add``, the way a partition grows; the other builds bare hnswlib indexes with the same
parameters, items and capacity doubling (hnswlib's own). Both report the resident set before and
after and the peak (VmHWM), next to hnswlib's saved index size and the vector mirror.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from infogrowth_dev.bench.common import Table, progress

_CHILD = r"""
import json, os, sys, tempfile, gc
import numpy as np

def reset_peak():
    # VmHWM would otherwise hold the input generation's peak: "5" resets it (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

def status():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out

from infogrowth_dev.bench import synth
from infogrowth.config import load_settings
from infogrowth.index import PartitionState
n, dim, chunk, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = load_settings(None).index
vec = synth.make(0, n, dim=dim, dup_rate=0.0, seed=5)
threads = os.cpu_count() or 1
if mode == "raw":
    import hnswlib
    gc.collect()
    reset_peak()
    before = status()
    raw = {}
    for s in ("image", "text"):
        raw[s] = hnswlib.Index(space="ip", dim=dim)
        raw[s].init_index(max_elements=cfg.initial_capacity, M=cfg.m,
                          ef_construction=cfg.ef_construction, random_seed=cfg.random_seed)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        for s, idx in raw.items():
            cap = idx.get_max_elements()
            while cap < hi:
                cap = int(cap * cfg.growth) + 1
            if cap > idx.get_max_elements():
                idx.resize_index(cap)
            idx.add_items(vec.stream[s][lo:hi], np.arange(lo, hi), num_threads=threads)
    gc.collect()
    print(json.dumps({"before": before, "after": status()}))
    sys.exit(0)
gc.collect()
reset_peak()
before = status()
st = PartitionState.empty(("image", "text"), {"image": dim, "text": dim}, cfg)
for lo in range(0, n, chunk):
    hi = min(n, lo + chunk)
    ids = [f"id{i:09d}" for i in range(lo, hi)]
    st.add(ids, {s: vec.stream[s][lo:hi] for s in st.spaces}, [None] * (hi - lo))
st.wait()
gc.collect()
after = status()
tmp = tempfile.mkdtemp()
hnsw = 0
for s in st.spaces:
    p = os.path.join(tmp, s + ".bin")
    st.indexes[s].save(p)
    hnsw += os.path.getsize(p)
    os.remove(p)
mirror = sum(st.indexes[s].count * st.indexes[s].dim * 4 for s in st.spaces)
mirror_alloc = sum(st.indexes[s].mirror_bytes for s in st.spaces)
print(json.dumps({"before": before, "after": after, "hnsw_bytes": hnsw, "mirror_bytes": mirror,
                  "mirror_allocated_bytes": mirror_alloc,
                  "vectors_bytes": int(vec.stream["image"].nbytes * 2)}))
"""


def bench(
    n: int = 100_000, dim: int = 256, chunk: int = 20_000, workdir: Path | None = None
) -> dict[str, Any]:
    progress(f"memory: building {n:,} items in a fresh process")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(_CHILD)
        r, raw = (_child(script, n, dim, chunk, mode) for mode in ("state", "raw"))
    # The input vectors are generated before the first reading: growth is the index alone.
    grown = r["after"]["VmRSS"] - r["before"]["VmRSS"]
    peak = r["after"]["VmHWM"] - r["before"]["VmRSS"]
    raw_grown = raw["after"]["VmRSS"] - raw["before"]["VmRSS"]
    raw_peak = raw["after"]["VmHWM"] - raw["before"]["VmRSS"]
    per = 1_000_000 / n
    return {
        "params": {"n": n, "dim": dim, "spaces": 2, "chunk": chunk},
        "rss_growth_bytes": grown,
        "peak_growth_bytes": peak,
        "input_vectors_bytes": r["vectors_bytes"],
        "hnsw_bytes": r["hnsw_bytes"],
        "mirror_bytes": r["mirror_bytes"],
        "mirror_allocated_bytes": r["mirror_allocated_bytes"],
        "per_million": {
            "rss_gib": round(grown * per / 2**30, 2),
            "peak_rss_gib": round(peak * per / 2**30, 2),
            "hnsw_gib": round(r["hnsw_bytes"] * per / 2**30, 2),
            "mirror_gib": round(r["mirror_bytes"] * per / 2**30, 2),
        },
        "raw_rss_growth_bytes": raw_grown,
        "raw_peak_growth_bytes": raw_peak,
        "ratio_rss_vs_hnsw": round(grown / r["hnsw_bytes"], 3),
        "ratio_peak_vs_hnsw": round(peak / r["hnsw_bytes"], 3),
        "ratio_rss_vs_raw_rss": round(grown / raw_grown, 3),
        "ratio_peak_vs_raw_peak": round(peak / raw_peak, 3),
    }


def _child(script: Path, n: int, dim: int, chunk: int, mode: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(script), str(n), str(dim), str(chunk), mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ},
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    pm = res["per_million"]
    t = Table(
        f"memory: a partition of {p['n']:,} items, 2×{p['dim']}-d, scaled to 1M items",
        ["measure", "GiB per 1M items", "vs raw hnswlib"],
        note=(
            "RSS growth of a fresh process while the state grows in chunks (capacity doubling, "
            "as a partition grows); peak = VmHWM, which includes the copies made while the "
            "hnswlib index and the mirror grow"
        ),
    )
    t.add("raw hnswlib index (saved size)", f"{pm['hnsw_gib']:.2f}", "1.00")
    t.add(
        "float32 vector mirror (rows in use)",
        f"{pm['mirror_gib']:.2f}",
        f"{res['mirror_bytes'] / res['hnsw_bytes']:.2f}",
    )
    t.add("RSS growth", f"{pm['rss_gib']:.2f}", f"{res['ratio_rss_vs_hnsw']:.2f}")
    t.add("peak RSS growth", f"{pm['peak_rss_gib']:.2f}", f"{res['ratio_peak_vs_hnsw']:.2f}")
    scale = 1_000_000 / p["n"] / 2**30
    u = Table(
        "memory: the partition state vs bare hnswlib indexes (same items, parameters, growth)",
        ["measure", "state GiB / 1M", "hnswlib GiB / 1M", "state / hnswlib"],
        note="hnswlib's own = a fresh process holding only the two hnswlib indexes",
    )
    u.add(
        "RSS growth",
        f"{res['rss_growth_bytes'] * scale:.2f}",
        f"{res['raw_rss_growth_bytes'] * scale:.2f}",
        f"{res['ratio_rss_vs_raw_rss']:.2f}",
    )
    u.add(
        "peak RSS growth",
        f"{res['peak_growth_bytes'] * scale:.2f}",
        f"{res['raw_peak_growth_bytes'] * scale:.2f}",
        f"{res['ratio_peak_vs_raw_peak']:.2f}",
    )
    return [t, u]
