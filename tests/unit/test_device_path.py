"""The embed stage with ``encoder.decode=device`` against the CPU (reference) path.

On a CPU the device path decodes with torchvision's libjpeg and resizes with torch: the same
code that runs with nvJPEG on CUDA, minus the decoder. Outcomes must be the same item for item
(malformed ones with the same detail and bytes) and vectors equal within float noise.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from infogrowth import devimage
from infogrowth.encode import TransformersEncoder
from infogrowth.messages import Outcome
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import Embedded, Sample
from tests.fixtures.helpers import make_settings
from tests.fixtures.models import make_jpeg, make_png, tiny_clip

COS_MIN = 0.9999  # float noise between the two paths (1 - cos of different images: ~1e-2)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("models") / "clip")


def _settings(clip_dir: Path, decode: str, **kw: Any) -> Any:
    return make_settings(
        **{
            "encoder.kind": "dual",
            "encoder.model": str(clip_dir),
            "encoder.batch_size": 3,
            "encoder.decode": decode,
            "clean.enabled": False,
            **kw,
        }
    )


def _encoder(clip_dir: Path, decode: str, **kw: Any) -> TransformersEncoder:
    s = _settings(clip_dir, decode, **kw)
    return TransformersEncoder.load(str(clip_dir), s.encoder, s.limits)


@pytest.fixture(scope="module")
def cpu_enc(clip_dir: Path) -> TransformersEncoder:
    return _encoder(clip_dir, "cpu")


@pytest.fixture(scope="module")
def dev_enc(clip_dir: Path) -> TransformersEncoder:
    return _encoder(clip_dir, "device")


def _encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _mixed() -> list[Sample]:
    """JPEGs of several sizes and what the fast decoder must leave to Pillow."""
    rotated = Image.Exif()
    rotated[0x0112] = 6
    photo = Image.open(io.BytesIO(make_jpeg(90, 60, seed=7))).convert("RGB")
    truncated = make_jpeg(80, 50, seed=8)
    blobs = {
        "jpeg-a": make_jpeg(61, 47, seed=1),
        "jpeg-wide": make_jpeg(500, 120, seed=2),
        "jpeg-b": make_jpeg(375, 500, seed=3),
        "grey": _encoded(photo.convert("L"), "JPEG"),
        "png": make_png(70, 40, seed=4),
        "rgba-png": make_png(50, 50, seed=5, mode="RGBA"),
        "webp": _encoded(photo, "WEBP"),
        "cmyk": _encoded(photo.convert("CMYK"), "JPEG"),
        "rotated": _encoded(photo, "JPEG", exif=rotated.tobytes()),
        "truncated": truncated[: len(truncated) // 2],
        "garbage": b"\xff\xd8\xff\xe0 not a jpeg at all \xff\xd9",
        "jpeg-c": make_jpeg(33, 200, seed=6),
    }
    return [Sample(id=k, text=f"caption {k}", image=v) for k, v in blobs.items()]


def _run(settings: Any, enc: Any, items: Sequence[Sample], threads: int = 2) -> list[Any]:
    stage = EmbedStage(settings, enc)
    stage.threads = threads
    try:
        return stage.process(list(items))
    finally:
        stage.close()


def _assert_same(ref: list[Any], got: list[Any]) -> None:
    assert [r.id for r in got] == [r.id for r in ref]
    for a, b in zip(ref, got, strict=True):
        assert type(a) is type(b), a.id
        if isinstance(a, Embedded):
            for space in ("image", "text"):
                cos = float(np.dot(a.vectors[space], b.vectors[space]))
                assert cos >= COS_MIN, (a.id, space, cos)
        else:
            assert isinstance(a, Outcome) and isinstance(b, Outcome)
            assert (a.decision, a.reason, a.detail, a.payload) == (
                b.decision,
                b.reason,
                b.detail,
                b.payload,
            )


def test_device_decode_is_resolved(
    cpu_enc: TransformersEncoder, dev_enc: TransformersEncoder, clip_dir: Path
) -> None:
    assert dev_enc.image_decode == "device"
    assert cpu_enc.image_decode == "cpu"
    assert _encoder(clip_dir, "auto").image_decode == (
        "device" if torch.cuda.is_available() else "cpu"
    )
    assert dev_enc.fingerprint == cpu_enc.fingerprint  # the same vectors, within float noise


@pytest.mark.parametrize("threads", [1, 3])
def test_device_path_matches_the_cpu_path(
    clip_dir: Path, cpu_enc: TransformersEncoder, dev_enc: TransformersEncoder, threads: int
) -> None:
    items = _mixed()
    ref = _run(_settings(clip_dir, "cpu"), cpu_enc, items, threads)
    got = _run(_settings(clip_dir, "device"), dev_enc, items, threads)
    _assert_same(ref, got)
    bad = {r.id for r in got if isinstance(r, Outcome)}
    assert bad == {"truncated", "garbage"}
    garbage = next(r for r in got if r.id == "garbage")
    assert garbage.detail.startswith("image: ") and garbage.payload == items[-2].image


def test_every_fast_image_that_the_decoder_refuses_falls_back_alone(
    clip_dir: Path,
    cpu_enc: TransformersEncoder,
    dev_enc: TransformersEncoder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast decoder refusing an image (nvJPEG on an odd JPEG) sends only that image to
    Pillow; the vectors do not change."""
    items = [
        Sample(id=f"j{i}", text="t", image=make_jpeg(40 + 9 * i, 30, seed=i)) for i in range(7)
    ]
    refused = {items[2].image, items[5].image}
    real = devimage.decode_jpegs
    calls: list[int] = []

    def picky(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
        calls.append(len(blobs))
        return [
            None if b in refused else t for b, t in zip(blobs, real(blobs, device), strict=True)
        ]

    monkeypatch.setattr(devimage, "decode_jpegs", picky)
    fallbacks: list[bytes] = []
    stage = EmbedStage(_settings(clip_dir, "device"), dev_enc)
    stage.threads = 1
    real_cpu = stage._decode_bytes

    def counted(data: bytes) -> Image.Image | str:
        fallbacks.append(data)
        return real_cpu(data)

    monkeypatch.setattr(stage, "_decode_bytes", counted)
    got = stage.process(list(items))
    assert sorted(fallbacks) == sorted(refused)
    assert sum(calls) == len(items)
    _assert_same(_run(_settings(clip_dir, "cpu"), cpu_enc, items), got)


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError (matched by name)."""


def test_out_of_memory_on_the_device_path_halves_the_batch(
    clip_dir: Path, cpu_enc: TransformersEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = _encoder(clip_dir, "device", **{"encoder.batch_size": 8})
    real = enc.forward_images
    sizes: list[int] = []

    def forward(batch: Any) -> np.ndarray:
        n = int(batch["pixel_values"].shape[0])
        sizes.append(n)
        if n > 2:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return real(batch)

    monkeypatch.setattr(enc, "forward_images", forward)
    items = [Sample(id=f"o{i}", text="t", image=make_jpeg(50 + i, 40, seed=i)) for i in range(7)]
    got = _run(_settings(clip_dir, "device"), enc, items, threads=1)
    assert all(isinstance(r, Embedded) for r in got)
    assert enc.batch_size <= 2
    assert max(sizes[-3:]) <= 2
    _assert_same(_run(_settings(clip_dir, "cpu"), cpu_enc, items), got)


def test_device_path_runs_batch_size_batches_through_the_prefetch_queue(
    clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = _encoder(clip_dir, "device", **{"encoder.batch_size": 3, "encoder.prefetch": 2})
    real = enc.forward_images
    sizes: list[int] = []
    monkeypatch.setattr(
        enc, "forward_images", lambda b: sizes.append(int(b["pixel_values"].shape[0])) or real(b)
    )
    items = [Sample(id=f"p{i}", text="t", image=make_jpeg(40, 30 + i, seed=i)) for i in range(10)]
    got = _run(_settings(clip_dir, "device"), enc, items)
    assert sizes == [3, 3, 3, 1]
    assert all(isinstance(r, Embedded) for r in got)


def test_recaptioning_on_the_device_path_decodes_only_the_flagged(
    clip_dir: Path, dev_enc: TransformersEncoder
) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.sizes: list[tuple[int, int]] = []

        def caption(self, images: Sequence[Image.Image]) -> list[str]:
            self.sizes += [im.size for im in images]
            return ["a recaption"] * len(images)

    items = [Sample(id=f"r{i}", text="t", image=make_jpeg(40 + i, 30, seed=i)) for i in range(4)]
    items.append(Sample(id="png", text="t", image=make_png(20, 25, seed=1)))
    rec = Recorder()
    settings = _settings(clip_dir, "device", **{"clean.enabled": True, "clean.delta": 1.0})
    stage = EmbedStage(settings, dev_enc, rec)
    assert stage.recaption
    stage.process(list(items))
    stage.close()
    # delta 1.0 flags every sample: each is decoded once, for the captioner, at its own size.
    assert rec.sizes == [(40 + i, 30) for i in range(4)] + [(20, 25)]


def test_channels_last_gives_the_same_vectors(dev_enc: TransformersEncoder) -> None:
    images = [
        devimage.pil_to_tensor(Image.new("RGB", (40 + i, 30), (i * 20, 90, 200))) for i in range(4)
    ]
    plain = dev_enc.forward_images(dev_enc.pixel_batch(images))
    dev_enc.channels_last = True
    try:
        batch = dev_enc.pixel_batch(images)
        assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)
        np.testing.assert_allclose(dev_enc.forward_images(batch), plain, atol=1e-5)
    finally:
        dev_enc.channels_last = False


def test_tokenisation_overlap_keeps_vectors_and_order(clip_dir: Path) -> None:
    texts = [("word " * (i % 9 + 1)).strip() + f" {i}" for i in range(23)]
    ahead = _encoder(clip_dir, "cpu", **{"encoder.prefetch": 2})
    serial = _encoder(clip_dir, "cpu", **{"encoder.prefetch": 0})
    assert np.array_equal(ahead.encode_texts(texts), serial.encode_texts(texts))
    assert np.array_equal(ahead.encode_texts(texts[:1]), serial.encode_texts(texts[:1]))


def test_decode_setting_fails_fast_naming_the_key(
    clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infogrowth import encode

    monkeypatch.setattr(encode, "torchvision_available", lambda: False)
    with pytest.raises(ValueError, match=r"encoder\.decode=device needs torchvision"):
        _encoder(clip_dir, "device")
    monkeypatch.undo()

    def refuse(proc: Any) -> Any:
        raise devimage.UnsupportedProcessor("resize rule {'longest_edge': 9} is not reproduced")

    monkeypatch.setattr(encode.TensorTransform, "from_processor", staticmethod(refuse))
    with pytest.raises(ValueError, match=r"encoder\.decode=device: resize rule"):
        _encoder(clip_dir, "device")
    assert _encoder(clip_dir, "cpu").image_decode == "cpu"


def test_pixel_batch_needs_the_device_path(cpu_enc: TransformersEncoder) -> None:
    with pytest.raises(ValueError, match="decode=cpu"):
        cpu_enc.pixel_batch([torch.zeros((3, 8, 8), dtype=torch.uint8)])


# ---- CUDA (skipped without a GPU) ----------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_nvjpeg_path_matches_the_cpu_path_on_cuda(
    clip_dir: Path, cpu_enc: TransformersEncoder
) -> None:
    """Across paths and devices: nvJPEG + CUDA resize + fp16 against Pillow + CPU fp32."""
    gpu = _encoder(clip_dir, "device", **{"encoder.device": "cuda"})
    assert gpu.image_decode == "device" and gpu.device.startswith("cuda")
    items = _mixed()
    ref = _run(_settings(clip_dir, "cpu"), cpu_enc, items)
    got = _run(_settings(clip_dir, "device", **{"encoder.device": "cuda"}), gpu, items)
    assert [r.id for r in got] == [r.id for r in ref]
    for a, b in zip(ref, got, strict=True):
        assert type(a) is type(b)
        if isinstance(a, Embedded):
            assert float(np.dot(a.vectors["image"], b.vectors["image"])) > 0.99  # fp16


@pytest.mark.gpu
@cuda
def test_warm_up_picks_a_batch_size_within_the_cap(clip_dir: Path) -> None:
    enc = _encoder(
        clip_dir,
        "device",
        **{"encoder.device": "cuda", "encoder.batch_size": 4, "encoder.max_batch_size": 64},
    )
    assert 4 <= enc.batch_size <= 64


def test_device_path_is_not_split_by_the_decoded_pixel_budget(
    clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoded images exist only for the batches in the prefetch queue: a call is not cut into
    parts by ``limits.max_batch_pixels`` (which bounds the CPU path's held images), only by
    ``limits.max_batch_bytes``."""
    enc = _encoder(clip_dir, "device", **{"encoder.batch_size": 3})
    real = enc.forward_images
    sizes: list[int] = []
    monkeypatch.setattr(
        enc, "forward_images", lambda b: sizes.append(int(b["pixel_values"].shape[0])) or real(b)
    )
    items = [Sample(id=f"q{i}", text="t", image=make_jpeg(60, 40, seed=i)) for i in range(7)]
    tight = {"limits.max_batch_pixels": 2 * 60 * 40}
    got = _run(_settings(clip_dir, "device", **tight), enc, items)
    assert sizes == [3, 3, 1] and all(isinstance(r, Embedded) for r in got)
    sizes.clear()
    costs = [len(it.image or b"") + len(it.text or "") for it in items]
    assert 2 * max(costs) < 3 * min(costs)  # so a budget of two items never fits three
    _run(_settings(clip_dir, "device", **{"limits.max_batch_bytes": 2 * max(costs)}), enc, items)
    assert sizes == [2, 2, 2, 1]
