"""The tensor path's pieces (infogrowth.devimage): the transform against the image processors,
the JPEG sniff that routes images to the fast decoder, and the decoder itself."""

from __future__ import annotations

import io
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from infogrowth.devimage import (
    TensorTransform,
    UnsupportedProcessor,
    _center_crop,
    decode_jpegs,
    jpeg_size,
    pil_to_tensor,
)
from tests.fixtures.models import make_image, make_jpeg, make_png

LIMITS = {"max_bytes": 8 << 20, "max_pixels": 40_000_000}


def _pil_processor(family: str, **kwargs: Any) -> Any:
    cls = getattr(transformers, f"{family}ImageProcessorPil", None) or getattr(
        transformers, f"{family}ImageProcessor"
    )
    return cls(**kwargs)


PROCESSORS = {
    "clip": lambda: _pil_processor("CLIP"),
    "clip-288": lambda: _pil_processor(
        "CLIP", size={"shortest_edge": 288}, crop_size={"height": 256, "width": 256}
    ),
    "siglip": lambda: _pil_processor("Siglip"),
    "vit": lambda: _pil_processor("ViT"),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_transform_reproduces_the_pillow_processor(name: str) -> None:
    """Resize + crop + rescale + normalise as tensor ops give the Pillow processor's pixels to
    within two uint8 levels, almost all exactly (PIL and torch round resampling differently)."""
    proc = PROCESSORS[name]()
    t = TensorTransform.from_processor(proc)
    std = min(t.std or (1.0,))
    one_level = 1 / 255 / std + 1e-5
    images = [make_image(w, h, seed=w) for w, h in ((500, 375), (375, 500), (224, 224), (97, 61))]
    got = t.batch([pil_to_tensor(im) for im in images])
    ref = proc(images=images, return_tensors="pt")["pixel_values"].float()
    assert got.shape == ref.shape and got.dtype == torch.float32
    diff = (got - ref).abs()
    assert float(diff.max()) <= 2 * one_level
    assert float(diff.mean()) < 0.02 * one_level


def test_batch_keeps_order_across_size_groups() -> None:
    t = TensorTransform.from_processor(PROCESSORS["clip"]())
    images = [
        pil_to_tensor(make_image(w, h, seed=i))
        for i, (w, h) in enumerate([(300, 200), (64, 64), (300, 200), (120, 400), (64, 64)])
    ]
    batch = t.batch(images)
    for i, im in enumerate(images):
        assert torch.equal(batch[i], t(im))


class _Odd:
    """A processor whose settings say one thing and whose output says another."""

    do_resize = True
    size: ClassVar[dict[str, int]] = {"height": 32, "width": 32}
    resample = 2
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def __call__(self, images: list[Image.Image], return_tensors: str) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.zeros((len(images), 3, 32, 32))}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"do_pad": True}, "pads"),
        ({"size": {"longest_edge": 224}}, "resize rule"),
        ({"size": {"shortest_edge": 224, "longest_edge": 300}}, "resize rule"),
        ({"resample": 1}, "resampling"),  # LANCZOS
        ({"image_mean": (0.5, 0.5)}, "per RGB channel"),
        ({}, "differs from the processor"),  # _Odd's output is not what its settings say
    ],
)
def test_unsupported_processors_are_refused(change: dict[str, Any], match: str) -> None:
    proc = _Odd()
    for k, v in change.items():
        setattr(proc, k, v)
    with pytest.raises(UnsupportedProcessor, match=match):
        TensorTransform.from_processor(proc)


def test_center_crop_pads_small_images_like_transformers() -> None:
    from transformers.image_transforms import center_crop

    img = torch.arange(3 * 5 * 7, dtype=torch.uint8).reshape(3, 5, 7)
    for crop in ((8, 8), (4, 9), (3, 4), (6, 3)):
        ref = center_crop(img.numpy(), crop, input_data_format="channels_first")
        assert np.array_equal(_center_crop(img, crop).numpy(), ref), crop


def _jpeg_with(
    mode: str = "RGB", orientation: int | None = None, size: tuple[int, int] = (40, 30)
) -> bytes:
    img = Image.new(mode, size, (10, 200, 30, 0)[: len(mode)] if mode != "L" else 90)
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_jpeg_sniff_routes_only_plain_jpegs_to_the_fast_decoder() -> None:
    assert jpeg_size(make_jpeg(40, 30), **LIMITS) == (40, 30)
    assert jpeg_size(_jpeg_with("L"), **LIMITS) == (40, 30)
    assert jpeg_size(_jpeg_with(orientation=1), **LIMITS) == (40, 30)
    assert jpeg_size(_jpeg_with(orientation=6), **LIMITS) is None  # rotated: Pillow applies EXIF
    assert jpeg_size(_jpeg_with("CMYK"), **LIMITS) is None
    assert jpeg_size(make_png(40, 30), **LIMITS) is None
    assert jpeg_size(b"\xff\xd8\xff\xe0 not really", **LIMITS) is None
    assert jpeg_size(b"", **LIMITS) is None
    whole = make_jpeg(40, 30)
    assert jpeg_size(whole[:-2], **LIMITS) is None  # truncated: Pillow's verdict decides
    assert jpeg_size(whole + b"trailing", **LIMITS) is None
    big = make_jpeg(400, 300)
    assert jpeg_size(big, max_bytes=len(big) - 1, max_pixels=10**9) is None
    assert jpeg_size(big, max_bytes=1 << 30, max_pixels=400 * 300 - 1) is None
    assert jpeg_size(big, max_bytes=1 << 30, max_pixels=400 * 300) == (400, 300)


def test_decoder_matches_pillow_and_refuses_per_image() -> None:
    good = [make_jpeg(61, 47, seed=1), _jpeg_with("L"), make_jpeg(500, 375, seed=2)]
    corrupt = good[0][: len(good[0]) // 3]
    out = decode_jpegs([good[0], corrupt, good[1], good[2]], torch.device("cpu"))
    assert out[1] is None
    for data, t in zip(good, [out[0], out[2], out[3]], strict=True):
        assert t is not None and t.dtype == torch.uint8
        ref = pil_to_tensor(Image.open(io.BytesIO(data)))
        assert t.shape == ref.shape
        assert int((t.int() - ref.int()).abs().max()) <= 1
    assert decode_jpegs([], torch.device("cpu")) == []


def test_pil_to_tensor_converts_modes() -> None:
    t = pil_to_tensor(Image.new("L", (5, 4), 7))
    assert t.shape == (3, 4, 5) and t.dtype == torch.uint8 and int(t.max()) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_matches_the_cpu_decoder() -> None:
    blobs = [make_jpeg(300 + i, 200, seed=i) for i in range(6)]
    corrupt = blobs[0][:200]
    gpu = decode_jpegs([*blobs, corrupt], torch.device("cuda"))
    cpu = decode_jpegs(blobs, torch.device("cpu"))
    assert gpu[-1] is None
    for g, c in zip(gpu, cpu, strict=False):
        assert g is not None and c is not None and g.is_cuda
        # nvJPEG's IDCT and chroma upsampling differ slightly from libjpeg's: on these noisy
        # synthetic JPEGs by 2.1 levels on average (H200, torchvision 0.26), against tens of
        # levels between two different images.
        assert float((g.cpu().float() - c.float()).abs().mean()) < 3.0
    other = cpu[1]
    assert other is not None and cpu[0] is not None
    far = (cpu[0].float() - other[:, :200, :300].float()).abs().mean()
    assert float(far) > 20.0
