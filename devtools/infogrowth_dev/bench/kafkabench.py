"""``infogrowth run --role all`` through a real local broker vs ``infogrowth curate``.

Same data (precomputed 2 x ``dim`` embeddings with injected near-duplicates: the stages have no
model to hide behind), same seed and same config. Each side's rate is the steady-state rate from
its first to its last output (setup, calibration and state restore excluded on both sides: the
Kafka side's input, packed beforehand, is produced once both stages are up and idle); the
end-to-end rates including setup are reported too. The broker runs on the same machine, so its
CPU time is part of the Kafka side's cost.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from infogrowth.config import Settings, load_settings
from infogrowth_dev.bench import synth
from infogrowth_dev.bench.common import Stat, Table, fmt, progress

IDLE_SETTLE_S = 2.0


def write_data(
    directory: Path, n: int, n_seed: int, dim: int, dup_rate: float
) -> tuple[Path, Path]:
    vec = synth.make(n_seed, n, dim=dim, dup_rate=dup_rate, seed=7)

    def dump(path: Path, vs: dict[str, np.ndarray], prefix: str) -> Path:
        with path.open("w", encoding="utf-8") as fh:
            m = len(next(iter(vs.values())))
            rounded = {s: np.round(v.astype(np.float64), 6) for s, v in vs.items()}
            for i in range(m):
                emb = {s: rounded[s][i].tolist() for s in vs}
                fh.write(json.dumps({"id": f"{prefix}{i:07d}", "embedding": emb}) + "\n")
        return path

    return (
        dump(directory / "in.jsonl", vec.stream, "s"),
        dump(directory / "seed.jsonl", vec.prefill, "seed"),
    )


def write_config(path: Path, bootstrap: str, state: Path, **extra: Any) -> Path:
    rid = uuid.uuid4().hex[:8]
    names = ("ingest", "embedded", "changelog", "control", "accepted", "relabeled", "rejected")
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": {name: f"bench{rid}.{name}" for name in names},
            "embed_group": f"bench{rid}-embed",
            "select_group": f"bench{rid}-select",
            "transactional_id_prefix": f"bench{rid}",
            "instance_id": "bench0",
        },
        "snapshot": {"directory": str(state)},
        "serve": {"host": "127.0.0.1", "port": 0},
        "log_level": "WARNING",
    }
    for key, value in extra.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_curate(settings: Settings, inp: Path, seed: Path, out: Path, n: int) -> dict[str, float]:
    from infogrowth.curate import curate

    marks: list[tuple[float, int]] = []
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        marks.append((time.perf_counter(), done))

    t0 = time.perf_counter()
    curate(settings, [inp], out, seed=seed, progress=tick)
    total = time.perf_counter() - t0
    (t1, c1), (t2, c2) = marks[0], marks[-1]
    return {"steady": (c2 - c1) / max(t2 - t1, 1e-9), "end_to_end": n / total}


def run_core(settings: Settings, inp: Path, seed: Path) -> float:
    """Samples/s of the shared pipeline core alone: parsed samples in, outcomes out, in memory."""
    from infogrowth.files import read_inputs
    from infogrowth.pipeline import Curator

    seed_items = list(read_inputs([seed], settings.limits))
    items = list(read_inputs([inp], settings.limits))
    cur = Curator(settings, None)
    cur.seed(seed_items)
    bs = settings.select.batch_size
    t0 = time.perf_counter()
    for lo in range(0, len(items), bs):
        cur.process(items[lo : lo + bs])
    if cur.state is not None:
        cur.state.wait()
    return len(items) / (time.perf_counter() - t0)


def run_kafka(settings: Settings, inp: Path, seed_file: Path, n: int) -> dict[str, float]:
    """Both stages in one process (``run --role all``), started and idle before the input
    arrives: the input, packed beforehand, is produced once every stage holds its partitions
    and has restored its state (librdkafka's own threads send it; the Python side of 10,000
    ``produce`` calls of ~4.7 kB takes ~0.1 s), so the rate counts neither the stages'
    start-up nor the encoding of the input, as ``curate``'s counts no seeding."""
    from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
    from infogrowth.kafka.run import build, start
    from infogrowth.kafka.seed import seed
    from infogrowth.kafka.tools import produce

    report = ensure_topics(
        admin_config(settings), topic_specs(settings.kafka.topics, settings.limits)
    )
    if not report.ok_all:
        raise RuntimeError(f"topics: {report.mismatches}")
    seed(settings, seed_file)
    values = _ingest_values(settings, inp)
    assert len(values) == n
    t0 = time.perf_counter()
    rt = build(settings, "all")
    start(rt)
    first: tuple[float, int] | None = None
    last: tuple[float, int] = (t0, 0)
    try:
        _wait_idle(rt, time.monotonic() + 300)
        produce(settings, [], raw=values)  # unkeyed: the bench's ingest has one partition
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            if rt.errors:
                raise rt.errors[0]
            c = rt.committed_outputs()
            now = time.perf_counter()
            if c and first is None:
                first = (now, c)
            if c != last[1]:
                last = (now, c)
            if c >= n:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"only {last[1]} of {n} outputs")
    finally:
        rt.stop.set()
        for t in rt.threads:
            t.join(120)
        del rt
        gc.collect()
    assert first is not None
    (t1, c1), (t2, c2) = first, last
    # End to end: build, start, group joins, restore, then the input (the settle wait left out).
    return {"steady": (c2 - c1) / max(t2 - t1, 1e-9), "end_to_end": n / (t2 - t0 - IDLE_SETTLE_S)}


def _ingest_values(settings: Settings, inp: Path) -> list[bytes]:
    """Every ingest message's value, as ``infogrowth produce`` encodes it."""
    from infogrowth.files import settings_inputs
    from infogrowth.messages import sample_record
    from infogrowth.schema import Malformed, pack

    return [
        item.payload
        if isinstance(item, Malformed)
        else pack("ingest", sample_record(item), check=False)
        for item in settings_inputs(settings, [inp])
    ]


def _wait_idle(rt: Any, deadline: float) -> None:
    """Until every stage loop holds partitions, none is restoring, and a moment more: a resumed
    partition's first fetch takes up to a second (measured 0.5–1.0 s on the local broker)."""
    while time.monotonic() < deadline:
        if rt.errors:
            raise rt.errors[0]
        loops = rt.loops
        if loops and all(
            lp.assigned_once.is_set() and lp.assigned and not lp.restoring for lp in loops
        ):
            time.sleep(IDLE_SETTLE_S)
            return
        time.sleep(0.05)
    raise TimeoutError("the stages did not take their partitions")


def bench(
    n: int = 10_000,
    n_seed: int = 1_000,
    dim: int = 256,
    repeats: int = 3,
    dup_rate: float = 0.1,
    workdir: Path | None = None,
    bootstrap: str | None = None,
) -> dict[str, Any]:
    from infogrowth_dev.kafka.broker import broker_for_tests

    with tempfile.TemporaryDirectory(dir=workdir) as tmp_s:
        tmp = Path(tmp_s)
        progress(f"kafka: writing {n:,} + {n_seed:,} samples ({dim}-d embeddings)")
        inp, seed_file = write_data(tmp, n, n_seed, dim, dup_rate)
        cur_steady, cur_e2e, k_steady, k_e2e, ratio, ratio_e2e = (Stat() for _ in range(6))
        core, ratio_core = Stat(), Stat()
        ctx = _given(bootstrap) if bootstrap else broker_for_tests()
        with ctx as boot:
            for r in range(repeats):
                state = tmp / f"state{r}"
                cfg = write_config(tmp / f"c{r}.yaml", boot, state)
                settings = load_settings(cfg)
                out = tmp / f"curate{r}"
                c = run_curate(settings, inp, seed_file, out, n)
                shutil.rmtree(out, ignore_errors=True)
                k = run_kafka(settings, inp, seed_file, n)
                shutil.rmtree(state, ignore_errors=True)
                c_core = run_core(settings, inp, seed_file)
                core.add(c_core)
                ratio_core.add(k["steady"] / c_core)
                cur_steady.add(c["steady"])
                cur_e2e.add(c["end_to_end"])
                k_steady.add(k["steady"])
                k_e2e.add(k["end_to_end"])
                ratio.add(k["steady"] / c["steady"])
                ratio_e2e.add(k["end_to_end"] / c["end_to_end"])
                progress(
                    f"kafka: run {r + 1}/{repeats}: curate {c['steady']:,.0f}/s, "
                    f"kafka {k['steady']:,.0f}/s, ratio {k['steady'] / c['steady']:.3f}; "
                    f"core in memory {c_core:,.0f}/s"
                )
            gc.collect()
    defaults = Settings()
    return {
        "params": {
            "n": n,
            "seed": n_seed,
            "dim": dim,
            "spaces": 2,
            "dup_rate": dup_rate,
            "repeats": repeats,
            "commit_max_messages": defaults.kafka.commit_max_messages,
            "commit_interval_ms": defaults.kafka.commit_interval_ms,
            "select_batch_size": defaults.select.batch_size,
        },
        "curate_samples_per_s": cur_steady.as_dict(1),
        "kafka_samples_per_s": k_steady.as_dict(1),
        "ratio_vs_curate": ratio.as_dict(3),
        "curate_end_to_end_samples_per_s": cur_e2e.as_dict(1),
        "kafka_end_to_end_samples_per_s": k_e2e.as_dict(1),
        "ratio_end_to_end": ratio_e2e.as_dict(3),
        "core_samples_per_s": core.as_dict(1),
        "ratio_vs_core": ratio_core.as_dict(3),
    }


class _given:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def __enter__(self) -> str:
        return self.bootstrap

    def __exit__(self, *exc: object) -> None:
        return None


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    t = Table(
        f"kafka: run --role all (local broker) vs curate, {p['n']:,} samples, seed {p['seed']:,}, "
        f"2×{p['dim']}-d precomputed embeddings",
        ["measure", "curate (samples/s)", "run --role all (samples/s)", "ratio (target ≥ 0.90)"],
        note=f"median [min–max] of {p['repeats']} runs; steady = first to last output",
    )
    t.add(
        "steady state",
        fmt(res["curate_samples_per_s"]),
        fmt(res["kafka_samples_per_s"]),
        fmt(res["ratio_vs_curate"], 3),
    )
    t.add(
        "vs the core in memory (parsed samples, no I/O)",
        fmt(res["core_samples_per_s"]) + " (core)",
        fmt(res["kafka_samples_per_s"]),
        fmt(res["ratio_vs_core"], 3),
    )
    t.add(
        "end to end (with setup)",
        fmt(res["curate_end_to_end_samples_per_s"]),
        fmt(res["kafka_end_to_end_samples_per_s"]),
        fmt(res["ratio_end_to_end"], 3),
    )
    return [t]
