"""Embed stage from encoded bytes vs the bare model forward on pre-made tensors.

Samples are ~500 x 375 JPEGs with a caption each (the shape of LAION / CC3M data; a pool of
distinct images, cycled). Side by side in each run:

* **floor**: the bare forward pass of both towers on tensors made beforehand and already on the
  device (the image tower on pixel batches, the text tower on token batches);
* **stage**: ``EmbedStage.process`` from the encoded bytes and text (decode, validate, resize
  and normalise, tokenise, forward, checks), once per decode path: ``cpu`` (Pillow + the image
  processor on the CPU threads) and ``device`` (torchvision's decoder on the encoder's device,
  nvJPEG on CUDA; on a CPU, its libjpeg), and the stage's share of the floor for each;
* the CPU parts on their own, on a subset: Pillow decode (one thread and all), resize +
  normalise (the image processor), tokenisation.

Image tower: ``tiny`` (2 layers, width 32, 224 px: on a CPU the forward is nearly free, so the
table shows what the CPU side can feed) or ``b16`` (the shape of CLIP ViT-B/16 at 224 px, random
weights: what the GPU target is about), or a model path. Text tower: the packaged MiniLM.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from infogrowth.config import Settings, load_settings
from infogrowth_dev.bench.common import Stat, Table, fmt, gpu_name, progress

MODELS = {
    "tiny": "tiny random CLIP image tower (2 layers, width 32, 224 px, patch 32)",
    "b16": "random-weight CLIP ViT-B/16 image tower (12 layers, width 768, 224 px, patch 16)",
}
DISTINCT_IMAGES = 128
PARTS_SUBSET = 256
CPU_BATCH = 64


def bench(
    n: int = 512,
    threads: list[int] | None = None,
    repeats: int = 3,
    workdir: Path | None = None,
    model: str = "tiny",
    batch: int | None = None,
    decodes: list[str] | None = None,
    calls: list[int] | None = None,
) -> dict[str, Any]:
    """Floor, stage per decode path and the CPU parts; ``batch`` None: the warm-up picks it
    on CUDA, 64 on a CPU. ``calls``: samples per ``process`` call (what one Kafka batch hands
    the stage, ``kafka.commit_max_messages``); the first gives the plain rows, each further
    one its own rows (default: max(256, 4 × batch))."""
    from infogrowth_dev.bench import models

    threads = threads or [1, os.cpu_count() or 1]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path, model_desc = _model(model, Path(tmp))
        setup = _Setup(path, batch, decodes)
        progress(
            f"embed: {n} JPEGs 500x375 on {setup.device} ({setup.dtype}), {model_desc} + "
            f"{setup.text_desc}, batch {setup.batch}, decode {', '.join(setup.pairs)}"
        )
        rng = np.random.default_rng(0)
        pool = [models.jpeg(500, 375, i) for i in range(min(n, DISTINCT_IMAGES))]
        blobs = [pool[i % len(pool)] for i in range(n)]
        texts = [models.caption(rng) for _ in range(n)]
        runner = _Runner(setup, blobs, texts, calls)
        stats = runner.measure(repeats, threads)
    return {
        "params": {
            "n": n,
            "image": "JPEG 500x375 q90",
            "distinct_images": len(pool),
            "image_bytes_mean": int(np.mean([len(b) for b in pool])),
            "model": model_desc,
            "text_model": setup.text_desc,
            "device": setup.device,
            "dtype": setup.dtype,
            "gpu": gpu_name(),
            "batch": setup.batch,
            "stage_call": runner.chunk,
            "stage_calls": runner.calls,
            "decodes": list(setup.pairs),
            "threads": threads,
            "stage_threads": runner.cores,
            "repeats": repeats,
            "parts_subset": runner.subset,
        },
        "samples_per_s": {k: v.as_dict(1) for k, v in stats.items() if not k.startswith("ratio")},
        "ratio_vs_forward": {
            k[len("ratio ") :]: v.as_dict(3) for k, v in stats.items() if k.startswith("ratio ")
        },
        "gpu_pending": gpu_name() is None,
    }


def _model(model: str, tmp: Path) -> tuple[str, str]:
    from infogrowth_dev.bench import models

    if model == "tiny":
        return str(models.tiny_clip(tmp / "clip")), MODELS["tiny"]
    if model == "b16":
        return str(models.clip_b16(tmp / "clip-b16")), MODELS["b16"]
    return model, model


class _Setup:
    """The encoders: one image tower per decode path (same weights, same batch size) joined
    with the text tower, and the settings the stage runs with."""

    def __init__(self, path: str, batch: int | None, decodes: list[str] | None) -> None:
        from infogrowth.encode import TransformersEncoder, minilm_path
        from infogrowth_dev.bench.models import TowerPair

        self.settings = _settings(path, batch, "auto")
        first = TransformersEncoder.load(path, self.settings.encoder, self.settings.limits)
        self.device, self.dtype = first.device, first.dtype
        self.batch = first.batch_size  # tuned on CUDA when not given
        fixed = _settings(path, self.batch, "cpu", tune=False)
        text_path = minilm_path()
        if text_path is not None:
            t_cfg = fixed.encoder.model_copy(update={"kind": "text", "model": str(text_path)})
            text = TransformersEncoder.load(str(text_path), t_cfg, fixed.limits)
            self.text_desc = "MiniLM-L6 text tower (packaged)"
        else:
            t_cfg = fixed.encoder.model_copy(update={"kind": "text"})
            text = TransformersEncoder.load(path, t_cfg, fixed.limits)
            self.text_desc = "the CLIP's own text tower (MiniLM is not installed)"
        self.pairs: dict[str, TowerPair] = {}
        for mode in decodes or ["cpu", "device"]:
            cfg = _settings(path, self.batch, mode, tune=False)
            try:
                image = TransformersEncoder.load(path, cfg.encoder, cfg.limits)
            except ValueError as exc:  # no torchvision, or a processor it cannot reproduce
                progress(f"embed: decode={mode} skipped: {exc}")
                continue
            self.pairs[mode] = TowerPair(image, text)
        if not self.pairs:
            raise ValueError("embed bench: no decode path could be set up")
        self.stage_settings = fixed


def _settings(path: str, batch: int | None, decode: str, *, tune: bool = True) -> Settings:
    return load_settings(
        None,
        **{
            "encoder.model": path,
            "encoder.kind": "image",
            "encoder.batch_size": batch or CPU_BATCH,
            "encoder.max_batch_size": max(batch or 0, 1024),
            "encoder.tune_batch_size": tune and batch is None,
            "encoder.decode": decode,
            "clean.enabled": False,
        },
    )


class _Runner:
    """Times the floor, the stage per decode path and the CPU parts, round-robin per repeat."""

    def __init__(
        self, setup: _Setup, blobs: list[bytes], texts: list[str], calls: list[int] | None
    ) -> None:
        from infogrowth.imaging import decode_image
        from infogrowth.pipeline import EmbedStage
        from infogrowth.schema import Sample

        self.setup = setup
        self.blobs, self.texts, self.n = blobs, texts, len(blobs)
        self.batch = setup.batch
        self.calls = calls or [max(256, 4 * self.batch)]
        """Samples per ``process`` call, as a Kafka batch hands them over."""
        self.chunk = self.calls[0]
        self.samples = [
            Sample(id=f"s{i}", text=texts[i], image=blobs[i], source={"bench": i})
            for i in range(self.n)
        ]
        self.stages = {
            mode: EmbedStage(setup.stage_settings, pair) for mode, pair in setup.pairs.items()
        }
        self.cores = next(iter(self.stages.values())).threads
        lim = setup.stage_settings.limits
        self.decode_one: Callable[[bytes], Any] = lambda b: decode_image(
            b, max_bytes=lim.max_image_bytes, max_pixels=lim.max_image_pixels
        )
        self.subset = min(self.n, PARTS_SUBSET)
        self._premade()

    def _premade(self) -> None:
        """Pixel and token batches already on the device, for the floor."""
        pair = next(iter(self.setup.pairs.values()))
        images = [self.decode_one(b) for b in self.blobs[: min(self.n, DISTINCT_IMAGES)]]
        self.pixels = []
        for i in range(0, self.n, self.batch):
            chunk = [images[j % len(images)] for j in range(i, min(i + self.batch, self.n))]
            self.pixels.append(pair.image.upload(pair.image.preprocess_images(chunk)))
        order = sorted(range(self.n), key=lambda i: len(self.texts[i]))
        ordered = [self.texts[i] for i in order]
        self.tokens = [
            pair.text.upload(pair.text.tokenize_texts(ordered[i : i + self.batch]))
            for i in range(0, self.n, self.batch)
        ]
        self.images = images

    def forward(self) -> None:
        pair = next(iter(self.setup.pairs.values()))
        for p in self.pixels:
            pair.image.forward_images(p)
        for t in self.tokens:
            pair.text.forward_texts(t)

    def stage_run(self, mode: str, call: int) -> None:
        stage = self.stages[mode]
        for i in range(0, self.n, call):
            stage.process(self.samples[i : i + call], clean=False)

    def _runs(self) -> list[tuple[str, int, str]]:
        """(decode path, samples per call, row suffix) for each stage figure."""
        return [
            (mode, call, "" if j == 0 else f", {call:,} per call")
            for mode in self.stages
            for j, call in enumerate(self.calls)
        ]

    def measure(self, repeats: int, threads: list[int]) -> dict[str, Stat]:
        pair = next(iter(self.setup.pairs.values()))
        sub = self.subset
        names = {t: f"decode ×{t} (Pillow, {sub} images)" for t in threads}
        stats: dict[str, Stat] = {"bare forward (floor)": Stat()}
        for mode, _, suffix in self._runs():
            stats[f"embed stage, decode {mode}{suffix}"] = Stat()
        device_parts = self._device_parts()
        for name in [*names.values(), "resize+normalise (processor, 1 thread)", "tokenise"]:
            stats[name] = Stat()
        for name in device_parts:
            stats[name] = Stat()
        for mode, _, suffix in self._runs():
            stats[f"ratio decode {mode}{suffix}"] = Stat()
        self.forward()  # warm-up: kernels, allocator, thread pools
        for mode in self.stages:
            self.stage_run(mode, self.chunk)
        for _ in range(repeats):
            f = _rate(self.n, self.forward)
            stats["bare forward (floor)"].add(f)
            line = [f"floor {f:,.0f}/s"]
            for mode, call, suffix in self._runs():
                e = _rate(self.n, functools.partial(self.stage_run, mode, call))
                stats[f"embed stage, decode {mode}{suffix}"].add(e)
                stats[f"ratio decode {mode}{suffix}"].add(e / f)
                line.append(f"decode {mode}{suffix} {e:,.0f}/s ({e / f:.3f})")
            progress("embed: " + ", ".join(line))
            for t, name in names.items():
                stats[name].add(_rate(sub, functools.partial(self._decode_all, t)))
            stats["resize+normalise (processor, 1 thread)"].add(
                _rate(sub, lambda: pair.image.preprocess_images(self.images[:sub]))
            )
            stats["tokenise"].add(_rate(sub, lambda: pair.text.tokenize_texts(self.texts[:sub])))
            for name, fn in device_parts.items():
                stats[name].add(_rate(sub, fn))
        for stage in self.stages.values():
            stage.close()
        return stats

    def _device_parts(self) -> dict[str, Callable[[], Any]]:
        """The device path's own parts, each alone and waited for: the JPEG decode in batches
        (nvJPEG on CUDA) and the resize + normalise of decoded batches. When the stage runs
        below both, the two are not overlapping with the forward pass."""
        pair = self.setup.pairs.get("device")
        if pair is None:
            return {}
        import torch

        from infogrowth.devimage import decode_jpegs

        enc: Any = pair.image
        dev = enc.torch_device
        blobs, bs = self.blobs[: self.subset], self.batch
        chunks = [blobs[i : i + bs] for i in range(0, len(blobs), bs)]
        decoded = [[t for t in decode_jpegs(c, dev) if t is not None] for c in chunks]

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def decode() -> None:
            for c in chunks:
                decode_jpegs(c, dev)
            sync()

        def resize() -> None:
            for d in decoded:
                enc.pixel_batch(d)
            sync()

        def image_forward() -> None:
            for p in self.pixels[: len(chunks)]:
                pair.image.forward_images(p)

        where = "nvJPEG" if dev.type == "cuda" else "torchvision, CPU"
        return {
            "image tower forward alone (the floor's image half)": image_forward,
            f"decode on device alone ({where}, batches of {bs})": decode,
            "resize+normalise on device alone": resize,
        }

    def _decode_all(self, t: int) -> list[Any]:
        blobs = self.blobs[: self.subset]
        if t <= 1:
            return [self.decode_one(b) for b in blobs]
        with ThreadPoolExecutor(t) as pool:
            return list(pool.map(self.decode_one, blobs))


def _rate(n: int, fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def tables(res: dict[str, Any]) -> list[Table]:
    p = res["params"]
    t = Table(
        f"embed: {p['n']} samples ({p['image']}, ~{p['image_bytes_mean'] // 1000} KB, + caption), "
        f"{p['model']} + {p['text_model']}, on {p['gpu'] or p['device']} ({p['dtype']}), "
        f"batch {p['batch']}",
        ["part", "samples/s"],
        note=(
            "floor = bare forward of both towers on pre-made device tensors; embed stage = "
            "decode + resize + tokenise + forward from bytes, "
            f"{p['stage_call']:,} samples per call unless a row says otherwise, "
            f"{p['stage_threads']} CPU threads; "
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
    for mode, v in res["ratio_vs_forward"].items():
        t.add(f"ratio stage / floor, {mode}", fmt(v, 3))
    return [t]
