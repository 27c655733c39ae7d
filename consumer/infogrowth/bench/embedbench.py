"""Embed stage from encoded bytes vs the bare model forward on pre-made tensors.

Samples are ~500 x 375 JPEGs with a caption each (the shape of LAION / CC3M data). The parts
around the forward pass are measured on their own too: JPEG decode (one thread and all cores),
resize + normalise (the image processor), tokenisation. With no GPU the model is a tiny random
CLIP with a real 224-pixel image processor, so the forward is cheap and the table shows what the
CPU side can feed; ``--model`` style runs with a real model on a GPU are what the 0.85 target is
about.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from infogrowth.bench.common import Stat, Table, fmt, gpu_name, progress
from infogrowth.config import load_settings


def bench(
    n: int = 512,
    threads: list[int] | None = None,
    repeats: int = 3,
    workdir: Path | None = None,
    model: str | None = None,
    batch: int = 64,
) -> dict[str, Any]:
    from infogrowth.bench import models
    from infogrowth.encode import TransformersEncoder
    from infogrowth.imaging import decode_image
    from infogrowth.pipeline import EmbedStage
    from infogrowth.schema import Sample

    threads = threads or [1, os.cpu_count() or 1]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if model is None:
            model = str(models.tiny_clip(Path(tmp) / "clip"))
            model_desc = "tiny random CLIP (2 layers, hidden 32, 224 px, patch 32)"
        else:
            model_desc = model
        settings = load_settings(
            None, **{"encoder.model": model, "encoder.kind": "dual", "encoder.batch_size": batch}
        )
        enc = TransformersEncoder.load(model, settings.encoder, settings.limits)
        progress(f"embed: {n} JPEGs 500x375 on {enc.device} ({enc.dtype}), model {model_desc}")
        rng = np.random.default_rng(0)
        blobs = [models.jpeg(500, 375, i) for i in range(n)]
        texts = [models.caption(rng) for _ in range(n)]
        lim = settings.limits

        def decode_all(t: int) -> list[Any]:
            def one(b: bytes) -> Any:
                return decode_image(
                    b, max_bytes=lim.max_image_bytes, max_pixels=lim.max_image_pixels
                )

            if t <= 1:
                return [one(b) for b in blobs]
            with ThreadPoolExecutor(t) as pool:
                return list(pool.map(one, blobs))

        images = decode_all(1)
        pix = [enc.preprocess_images(images[i : i + batch]) for i in range(0, n, batch)]
        toks = [enc.tokenize_texts(texts[i : i + batch]) for i in range(0, n, batch)]
        samples = [
            Sample(id=f"s{i}", text=texts[i], image=blobs[i], source={"bench": i}) for i in range(n)
        ]
        stage = EmbedStage(settings, enc)
        stage.delta = None

        def forward() -> None:
            for p in pix:
                enc.forward_images(p)
            for t in toks:
                enc.forward_texts(t)

        def preprocess() -> None:
            for i in range(0, n, batch):
                enc.preprocess_images(images[i : i + batch])

        def tokenize() -> None:
            for i in range(0, n, batch):
                enc.tokenize_texts(texts[i : i + batch])

        def stage_run() -> None:
            for i in range(0, n, 256):
                stage.process(samples[i : i + 256], clean=False)

        cores = stage.threads

        def stage_serial() -> None:
            stage.threads = 1  # decode, resize and forward one after another (as before)
            try:
                stage_run()
            finally:
                stage.threads = cores

        forward()  # warm-up
        stage_run()
        stats: dict[str, Stat] = {}
        names = [f"decode ×{t}" for t in threads]
        serial_name = "embed stage, 1 thread"
        stage_name = f"embed stage, {cores} threads"
        for name in [*names, "resize+normalise", "tokenise", "forward", serial_name, stage_name]:
            stats[name] = Stat()
        stats["ratio"] = Stat()
        for _ in range(repeats):
            for t, name in zip(threads, names, strict=True):
                stats[name].add(_rate(n, lambda t=t: decode_all(t)))
            stats["resize+normalise"].add(_rate(n, preprocess))
            stats["tokenise"].add(_rate(n, tokenize))
            f = _rate(n, forward)
            stats[serial_name].add(_rate(n, stage_serial))
            e = _rate(n, stage_run)
            stats["forward"].add(f)
            stats[stage_name].add(e)
            stats["ratio"].add(e / f)
            progress(f"embed: forward {f:,.0f}/s, stage {e:,.0f}/s, ratio {e / f:.3f}")
    return {
        "params": {
            "n": n,
            "image": "JPEG 500x375 q90",
            "image_bytes_mean": int(np.mean([len(b) for b in blobs])),
            "model": model_desc,
            "device": enc.device,
            "dtype": enc.dtype,
            "gpu": gpu_name(),
            "batch": batch,
            "threads": threads,
            "repeats": repeats,
        },
        "samples_per_s": {k: v.as_dict(1) for k, v in stats.items() if k != "ratio"},
        "ratio_vs_forward": stats["ratio"].as_dict(3),
        "gpu_pending": gpu_name() is None,
    }


def _rate(n: int, fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    t = Table(
        f"embed: {p['n']} samples ({p['image']}, ~{p['image_bytes_mean'] // 1000} KB, + caption), "
        f"{p['model']} on {p['device']}",
        ["part", "samples/s"],
        note=(
            "embed stage = decode + resize + tokenise + forward + alignment, from bytes; "
            f"median [min–max] of {p['repeats']} runs"
            + (
                "; no GPU here: the GPU target (≥ 0.85) is pending a GPU run"
                if res["gpu_pending"]
                else ""
            )
        ),
    )
    for k, v in res["samples_per_s"].items():
        t.add(k, fmt(v))
    t.add("ratio stage / forward", fmt(res["ratio_vs_forward"], 3))
    return [t]
