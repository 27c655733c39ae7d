"""Smoke tests of the bench harness at tiny sizes: it runs, reports and writes JSON.

No timing is asserted here; the figures themselves live in docs/benchmarks.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from infogrowth.index import PartitionState, SpaceIndex, read_vectors
from infogrowth.schema import Embedded
from infogrowth.select import Selector, Thresholds
from infogrowth_dev.bench import command, embedbench, memory, restore, scale, sel, synth
from tests.fixtures.helpers import make_settings


def test_synthetic_vectors_are_unit_with_near_duplicates() -> None:
    v = synth.make(200, 300, dim=16, dup_rate=0.2, seed=1)
    assert v.prefill["image"].shape == (200, 16) and v.stream["text"].shape == (300, 16)
    for s in ("image", "text"):
        norms = np.linalg.norm(v.stream[s], axis=1)
        assert np.allclose(norms, 1.0, atol=1e-5)
    rows = np.flatnonzero(v.dup)
    assert 0.1 < v.dup.mean() < 0.3
    allv = np.concatenate([v.prefill["image"], v.stream["image"]])
    d = 1.0 - np.einsum("ij,ij->i", allv[200 + rows], allv[v.dup_source[rows]])
    assert float(d.max()) < 1e-3


def test_select_bench_reports_ratio_and_is_deterministic(tmp_path: Path) -> None:
    res = sel.bench(
        n=400, stream=300, batch=64, threads=[1, 2], repeats=2, dim=16, workdir=tmp_path
    )
    assert set(res["threads"]) == {"1", "2"}
    assert res["deterministic_across_runs"]
    assert res["ratio_vs_raw"] > 0
    assert sum(res["decisions"].values()) == 300
    assert sel.tables(res)[0].rows


def test_select_bench_sweep(tmp_path: Path) -> None:
    res = sel.bench(
        n=300, stream=128, threads=[2], repeats=1, dim=8, sizes=[150, 300], workdir=tmp_path
    )
    assert [r["n"] for r in res["sweep"]] == [150, 300]


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        command,
        [
            "--stage",
            "select",
            "--n",
            "300",
            "--stream",
            "128",
            "--repeats",
            "1",
            "--dim",
            "8",
            "--threads",
            "1",
            "--json",
            str(out),
            "--no-cache",
            "--workdir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1 and "sha" in data["commit"]
    assert data["stages"]["select"]["ratio_vs_raw"] > 0
    assert data["tables"][0]["rows"]


def test_scale_counts_splits_leaks_and_replication() -> None:
    res = scale.bench(
        n=600,
        n_seed=200,
        dim=8,
        partitions=(1, 2),
        distances=(0.05,),
        repeats=1,
        batch=64,
        margin=0.2,
        sweep=(0.0, 0.2),
    )
    assert res["copies"][0]["max_abs_error"] < 1e-6
    one, two, two_rep = res["rows"]
    assert one["partitions"] == 1 and "leak_share" in two
    assert (two["margin"], two_rep["margin"]) == (0.0, 0.2)
    assert 0 <= two["duplicates_leaked"] <= two["duplicates_rejected_by_one"]
    # replication only adds index items and only removes splits
    assert two["index_growth"] == 0.0 < two_rep["index_growth"]
    assert two_rep["split_share"] <= two["split_share"]
    assert two_rep["knn_differs_share"] <= two["knn_differs_share"]
    assert two["gain_inflation"] > 0 and len(res["sweep"]) == 2
    assert [t.markdown() for t in scale.tables(res)]


def test_restore_bench(tmp_path: Path) -> None:
    res = restore.bench(sizes=[500], dim=8, repeats=1, tail=300, workdir=tmp_path)
    row = res["sizes"][0]
    assert row["snapshot_bytes"] > 0 and row["replay_items_per_s"]["median"] > 0
    assert row["fork_stall_s"]["runs"] == 1 and row["fork_write_s"]["median"] > 0
    assert row["fork_published_s"]["median"] >= row["fork_stall_s"]["median"]
    assert restore.tables(res)[0].rows[0][3] != "-"


def test_memory_bench_runs_in_a_child(tmp_path: Path) -> None:
    res = memory.bench(n=2000, dim=8, chunk=500, workdir=tmp_path)
    assert res["hnsw_bytes"] > 0 and res["mirror_bytes"] >= 2000 * 8 * 4 * 2
    assert memory.tables(res)[0].rows


def test_embed_bench_on_the_tiny_model(tmp_path: Path) -> None:
    """Floor, the stage per decode path and its share of the floor, side by side."""
    res = embedbench.bench(n=6, threads=[1, 2], repeats=1, workdir=tmp_path, batch=4)
    assert set(res["ratio_vs_forward"]) == {"decode cpu", "decode device"}
    assert all(r["median"] > 0 for r in res["ratio_vs_forward"].values())
    rates = res["samples_per_s"]
    assert rates["bare forward (floor)"]["median"] > 0
    assert rates["embed stage, decode device"]["median"] > 0
    assert any(k.startswith("decode ×2") for k in rates)
    rows = [r[0] for r in embedbench.tables(res)[0].rows]
    assert "ratio stage / floor, decode device" in rows
    only_cpu = embedbench.bench(
        n=4, threads=[1], repeats=1, workdir=tmp_path, batch=4, decodes=["cpu"]
    )
    assert set(only_cpu["ratio_vs_forward"]) == {"decode cpu"}


def test_b16_bench_model_has_the_vit_b16_shape() -> None:
    """The GPU check's stand-in costs what ViT-B/16 costs: same layers, width and patches."""
    import transformers

    from infogrowth_dev.bench import models

    vision = transformers.CLIPVisionConfig(**models.B16_VISION)
    assert (vision.num_hidden_layers, vision.hidden_size, vision.patch_size) == (12, 768, 16)
    assert (vision.intermediate_size, vision.num_attention_heads, vision.image_size) == (
        3072,
        12,
        224,
    )
    with torch.device("meta"):
        params = sum(p.numel() for p in transformers.CLIPVisionModel(vision).parameters())
    assert 85e6 < params < 87e6  # ViT-B/16: 86M


def test_index_file_vectors_match_hnswlib(tmp_path: Path) -> None:
    cfg = make_settings(**{"index.exact_below": 0}).index
    idx = SpaceIndex(8, cfg)
    v = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    idx.add(v, np.arange(50), threads=2)  # labels land in any internal order
    path = str(tmp_path / "i.bin")
    idx.save(path)
    got = read_vectors(path, 8)
    assert got is not None and np.array_equal(got, v)
    loaded = SpaceIndex.load(path, 8, cfg)
    assert np.array_equal(loaded.get(np.arange(50)), v)


def _stream(rng: np.random.Generator, n: int, dim: int, labels: bool) -> list[Embedded]:
    centres = rng.normal(size=(5, dim))
    out: list[Embedded] = []
    for i in range(n):
        c = int(rng.integers(5))
        if out and rng.random() < 0.3:  # near and exact copies, often within the same batch
            src = out[int(rng.integers(max(0, len(out) - 10), len(out)))]
            vecs = {
                s: v + rng.normal(scale=float(rng.choice([0, 1e-5])), size=dim)
                for s, v in src.vectors.items()
            }
        else:
            vecs = {s: centres[c] + rng.normal(scale=0.4, size=dim) for s in ("image", "text")}
        vecs = {s: (v / np.linalg.norm(v)).astype(np.float32) for s, v in vecs.items()}
        sid = f"x{i}" if rng.random() > 0.03 or not out else out[int(rng.integers(len(out)))].id
        label = (f"c{c}" if rng.random() > 0.2 else "c0") if labels else None
        out.append(Embedded(id=sid, vectors=vecs, label=label))
    return out


@pytest.mark.parametrize(
    ("exact_below", "policy", "labels", "k"),
    [
        (0, "sample", False, 4),
        (20000, "all", True, 4),
        (0, "threshold", True, 8),
        (50, "all", False, 1),
    ],
)
def test_vectorised_select_matches_one_at_a_time(
    exact_below: int, policy: str, labels: bool, k: int
) -> None:
    """The array-at-a-time decide (screen, bulk, ordered rest) equals deciding item by item,
    with in-batch copies, repeated ids, labels, HNSW and exact search, and background inserts."""
    settings = make_settings(
        **{"index.exact_below": exact_below, "select.k": k, "index.threads": 2}
    )
    th = Thresholds(
        policy=policy,
        k=k,
        epsilon={"image": 0.02, "text": 0.02},  # type: ignore[arg-type]
        g_scale=0.4,
        tau=0.15,
        radius=0.6,
        keep_fraction=0.5 if policy == "sample" else None,
        vote_k=6,
        confidence=0.6,
        reject_share=0.1,
        vote_scale=0.05,
    )

    def run(batch: int) -> list[tuple[object, ...]]:
        items = _stream(np.random.default_rng(3), 300, 12, labels)
        st = PartitionState.empty(("image", "text"), {"image": 12, "text": 12}, settings.index)
        sel = Selector(st, th, settings.select, settings.clean, neighbour_fixer=True)
        got = []
        for lo in range(0, len(items), batch):
            for v in sel.decide(items[lo : lo + batch]):
                got.append(
                    (
                        v.item.id,
                        v.decision,
                        v.reason,
                        v.gain,
                        v.label,
                        tuple(sorted(v.nn_distance.items())),
                        v.keep_probability,
                    )
                )
        return got

    reference = run(1)
    assert run(100) == reference
    assert run(37) == reference


def test_pipelined_image_encoding_matches_encode_images(tmp_path: Path) -> None:
    from infogrowth.encode import TransformersEncoder
    from infogrowth.pipeline import EmbedStage
    from infogrowth_dev.bench import models

    path = str(models.tiny_clip(tmp_path / "clip", image_size=32, patch=8))
    settings = make_settings(**{"encoder.model": path, "encoder.batch_size": 5})
    enc = TransformersEncoder.load(path, settings.encoder, settings.limits)
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(models.jpeg(60 + i, 40, i))).convert("RGB") for i in range(13)]
    stage = EmbedStage(settings, enc)
    stage.threads = 3
    assert np.array_equal(stage._encode_images(images), enc.encode_images(images))
    stage.close()


def test_parse_bench_reports_fast_and_generic_rates() -> None:
    from infogrowth_dev.bench import parse

    res = parse.bench(n=40, dim=8, repeats=1)
    for key in ("ingest", "embedded"):
        assert res[f"{key}_per_s"]["median"] > 0
        assert res[f"{key}_generic_per_s"]["median"] > 0
    assert res["embed_stage_per_s"]["median"] > 0
    (table,) = parse.tables(res)
    assert len(table.rows) == 3
