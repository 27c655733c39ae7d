"""``infogrowth export`` of topics the real pipeline curated: equal to ``infogrowth curate`` on the
same input, idempotent, WebDataset shards; and the README's training example runs against them."""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from infogrowth.cli import main
from infogrowth.config import Settings
from infogrowth.curate import curate
from infogrowth.export import export
from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
from infogrowth.kafka.run import build
from infogrowth.kafka.seed import seed
from infogrowth.kafka.tools import produce
from infogrowth.sampling import CuratedSet
from tests.fixtures.data import clustered, read_jsonl, write_jsonl
from tests.integration.conftest import settings_from, write_config
from tests.integration.test_pipeline import run_until_drained

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def with_text(
    rows: list[dict[str, Any]], flipped: dict[str, str], seed: int
) -> list[dict[str, Any]]:
    """Give each sample a caption drawn from its true cluster's words (labels may be flipped)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        true = flipped.get(r["id"], r["label"])
        words = [f"{true}w{int(rng.integers(6))}" for _ in range(5)] + [f"n{rng.integers(40)}"]
        out.append({**r, "text": " ".join(words)})
    return out


@dataclass
class Curated:
    settings: Settings
    config: Path
    inputs: Path
    seed_file: Path


@pytest.fixture(scope="module")
def curated(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Curated:
    """The real pipeline (`run --role all`) over 240 samples, drained."""
    tmp = tmp_path_factory.mktemp("export")
    data = clustered(240, dup_rate=0.1, flip_rate=0.1, seed=60)
    inputs = write_jsonl(tmp / "in.jsonl", with_text(data.samples, data.flipped, 1))
    seeds = clustered(100, seed=61, prefix="seed")
    seed_file = write_jsonl(tmp / "seed.jsonl", with_text(seeds.samples, {}, 2))
    cfg = write_config(
        tmp / "c.yaml", kafka_bootstrap, tmp / "state", **{"kafka.topics.output_partitions": 2}
    )
    settings = settings_from(cfg)
    assert ensure_topics(admin_config(settings), topic_specs(settings.kafka.topics)).ok_all
    seed(settings, seed_file)
    n = produce(settings, [inputs])
    run_until_drained(build(settings, "all"), n)
    return Curated(settings, cfg, inputs, seed_file)


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {r["id"]: r for r in rows}
    assert len(out) == len(rows), "duplicate ids"
    return out


def test_export_equals_curate_and_is_idempotent(curated: Curated, tmp_path: Path) -> None:
    out = tmp_path / "export"
    res = CliRunner().invoke(
        main, ["export", "--out", str(out), "--config", str(curated.config), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    first = (out / "manifest.jsonl").read_bytes()
    exported = by_id(read_jsonl(out / "manifest.jsonl"))

    ref = tmp_path / "curate"
    curate(curated.settings, [curated.inputs], ref, seed=curated.seed_file)
    reference = by_id(read_jsonl(ref / "accepted.jsonl") + read_jsonl(ref / "relabeled.jsonl"))
    assert set(exported) == set(reference)
    assert {r["decision"] for r in exported.values()} == {"accepted", "relabeled"}
    for sid, rec in reference.items():
        got = exported[sid]
        assert got["source"]["topic"] == curated.settings.kafka.topics.ingest
        assert rec["source"]["file"] == curated.inputs.name
        assert (got["epoch"], rec["epoch"]) == (1, None)  # provenance, like the source
        provenance = ("source", "epoch")
        assert {k: v for k, v in got.items() if k not in provenance} == {
            k: v for k, v in rec.items() if k not in provenance
        }, sid

    info = json.loads((out / "export.json").read_text())
    assert info["records"] == len(exported) and info["format"] == "jsonl"
    assert sum(info["decisions"].values()) == len(exported)
    assert info["g_scale"] == next(iter(reference.values()))["thresholds"]["g_scale"]

    # Re-running rewrites, never appends: byte-identical on unchanged topics.
    again = export(curated.settings, out)
    assert again.records == len(exported)
    assert (out / "manifest.jsonl").read_bytes() == first
    assert not list(out.glob(".export-*"))


def test_webdataset_export_round_trips(curated: Curated, tmp_path: Path) -> None:
    jsonl = tmp_path / "jsonl"
    export(curated.settings, jsonl)
    wds = tmp_path / "wds"
    export(curated.settings, wds, fmt="webdataset", shard_size=7)
    res = export(curated.settings, wds, fmt="webdataset", shard_size=50)  # fewer, larger shards
    info = json.loads((wds / "export.json").read_text())
    assert info["shards"] == res.shards == sorted(p.name for p in wds.glob("shard-*.tar"))
    assert len(res.shards) == -(-res.records // 50)
    names: list[str] = []
    for shard in res.shards:
        with tarfile.open(wds / shard) as tar:
            names += tar.getnames()
    keys = sorted({n.split(".")[0] for n in names})
    assert len(keys) == res.records and all(f"{k}.json" in names for k in keys)
    assert all(f"{k}.txt" in names for k in keys)

    a, b = CuratedSet.from_export(jsonl), CuratedSet.from_export(wds)
    assert a.ids == b.ids and np.array_equal(a.gains, b.gains) and a.g_scale == b.g_scale
    assert [s.label for s in a.samples] == [s.label for s in b.samples]


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Train on the curated stream", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "one python example under 'Train on the curated stream'"
    return blocks[0]


def test_readme_training_example_runs(curated: Curated, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 25
    k = curated.settings.kafka
    monkeypatch.setenv("INFOGROWTH_KAFKA__BOOTSTRAP_SERVERS", k.bootstrap_servers)
    monkeypatch.setenv("INFOGROWTH_KAFKA__TOPICS__ACCEPTED", k.topics.accepted)
    monkeypatch.setenv("INFOGROWTH_KAFKA__TOPICS__RELABELED", k.topics.relabeled)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert [line.split()[1] for line in lines] == ["0:", "1:", "2:", "3:"]
    assert len({line.split()[2] for line in lines}) == 1  # every epoch holds N draws


def test_parquet_export_loads_with_datasets_locally_and_from_s3(
    curated: Curated, tmp_path: Path
) -> None:
    import datasets
    import s3fs

    from infogrowth.config import StorageConfig
    from tests.fixtures.servers import moto_s3, s3_options

    manifest = by_id(read_jsonl(_export_dir(curated, tmp_path / "jsonl") / "manifest.jsonl"))
    out = tmp_path / "pq"
    res = CliRunner().invoke(
        main,
        ["export", "--out", str(out), "--format", "parquet", "--config", str(curated.config)],
    )
    assert res.exit_code == 0, res.output
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "parquet"
    assert info["tables"] == sorted(p.name for p in out.glob("*.parquet"))
    assert set(info["tables"]) <= {"accepted.parquet", "relabeled.parquet"}
    files = [str(out / t) for t in info["tables"]]
    ds = datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert sorted(ds["id"]) == sorted(manifest)
    for row in ds:
        assert row["gain"] == manifest[row["id"]]["gain"]
        assert row["decision"] == manifest[row["id"]]["decision"]
    pointers = read_jsonl(out / "manifest.jsonl")
    first = pointers[0]["export"]
    table = datasets.load_dataset(
        "parquet",
        data_files=str(out / first["table"]),
        split="train",
        cache_dir=str(tmp_path / "hf1"),
    )
    assert table[first["row"]]["id"] == pointers[0]["id"]

    with moto_s3({"exports": {}}) as endpoint:
        storage = StorageConfig(options={"s3": s3_options(endpoint)})
        settings = curated.settings.model_copy(update={"storage": storage})
        remote = export(settings, "s3://exports/run1/", fmt="parquet")
        fs = s3fs.S3FileSystem(**s3_options(endpoint))
        listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls("exports/run1/"))
        assert listed == sorted(["export.json", "manifest.jsonl", *remote.tables])
        got = fs.cat_file(f"exports/run1/{remote.tables[0]}")
        assert got == (out / remote.tables[0]).read_bytes()


def _export_dir(curated: Curated, out: Path) -> Path:
    export(curated.settings, out)
    return out
