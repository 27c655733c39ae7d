"""Memory floods and encoder failures: bounded decoded images, a failing batch split to its
culprit instead of crash-looping (issue 13 item 4)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infogrowth.messages import Outcome
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import Embedded, Malformed, Sample
from tests.fixtures.helpers import make_settings


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError (matched by name, torch not needed)."""


class FlakyEncoder:
    """Image-only encoder: fails on a 13-pixel-wide image; out of memory above ``fits``."""

    spaces = ("image",)
    fingerprint = "flaky"
    device = "cuda:0"
    dtype = "float32"

    def __init__(self, batch_size: int, fits: int) -> None:
        self.dims = {"image": 4}
        self.batch_size = batch_size
        self.fits = fits
        self.calls: list[int] = []

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.calls.append(len(images))
        if len(images) > self.fits:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(im.width == 13 for im in images):
            raise ValueError("model error on an odd input")
        rows = np.array([[im.width, im.height, 1.0, 1.0] for im in images], dtype=np.float32)
        out: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return out

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise AssertionError("no text tower")


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 256, h % 256, 7)).save(buf, "PNG")
    return buf.getvalue()


def _stage(enc: FlakyEncoder) -> EmbedStage:
    stage = EmbedStage(make_settings(**{"clean.enabled": False}), enc)
    stage.threads = 1
    return stage


def test_encoder_error_rejects_the_culprit_not_the_batch() -> None:
    enc = FlakyEncoder(batch_size=8, fits=8)
    stage = _stage(enc)
    widths = [20, 21, 13, 22, 23, 24]
    items = [Sample(id=f"s{w}", image=_png(w, 10)) for w in widths]
    res = stage.process(items)
    assert [r.id for r in res] == [f"s{w}" for w in widths]
    bad = [r for r in res if isinstance(r, Outcome)]
    assert [(r.id, r.reason) for r in bad] == [("s13", "malformed")]
    assert bad[0].detail is not None and "model error on an odd input" in bad[0].detail
    assert all(isinstance(r, Embedded) for r in res if r.id != "s13")


def test_cuda_oom_halves_the_encoder_batch() -> None:
    enc = FlakyEncoder(batch_size=8, fits=2)
    stage = _stage(enc)
    items = [Sample(id=f"s{i}", image=_png(30 + i, 10)) for i in range(6)]
    res = stage.process(items)
    assert all(isinstance(r, Embedded) for r in res)
    assert enc.batch_size < 8
    assert [r.id for r in res] == [f"s{i}" for i in range(6)]


def test_systemic_encoder_failure_still_raises() -> None:
    """Every item failing alone is not a culprit: the error propagates (never all rejected)."""
    enc = FlakyEncoder(batch_size=8, fits=8)
    stage = _stage(enc)
    items = [Sample(id=f"s{i}", image=_png(13, 10 + i)) for i in range(4)]
    with pytest.raises(ValueError, match="odd input"):
        stage.process(items)


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 90)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


@pytest.mark.parametrize("make", [_png, _jpeg])
def test_decode_downscales_to_fit(make: object) -> None:
    """A small file can decode to a huge bitmap (a 131 KB PNG held 119 MB until embedded):
    decoding reduces the shorter side to ``fit`` right away, aspect kept."""
    from infogrowth.imaging import decode_image

    data = make(6000, 4000)  # type: ignore[operator]
    assert len(data) < 2_000_000
    img = decode_image(data, max_bytes=8 << 20, max_pixels=40_000_000, fit=448)
    assert img.size == (672, 448) and img.mode == "RGB"
    small = decode_image(make(300, 200), max_bytes=8 << 20, max_pixels=40_000_000, fit=448)  # type: ignore[operator]
    assert small.size == (300, 200)  # never enlarged
    full = decode_image(data, max_bytes=8 << 20, max_pixels=40_000_000)
    assert full.size == (6000, 4000)  # without fit: unchanged behaviour


class SizedEncoder(FlakyEncoder):
    image_input_size = 32

    def __init__(self) -> None:
        super().__init__(batch_size=8, fits=8)
        self.sizes: list[tuple[int, int]] = []

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.sizes += [im.size for im in images]
        return super().encode_images(images)


def test_embed_stage_holds_images_at_model_scale() -> None:
    enc = SizedEncoder()
    stage = _stage(enc)
    res = stage.process(
        [Sample(id="big", image=_png(5000, 2500)), Sample(id="s", image=_png(40, 30))]
    )
    assert all(isinstance(r, Embedded) for r in res)
    assert enc.sizes == [(896, 448), (40, 30)]  # shorter side: max(2 x 32, 448)


def test_transformers_encoder_reports_its_input_size(tmp_path: Path) -> None:
    from infogrowth.encode import TransformersEncoder
    from infogrowth_dev.bench import models

    path = str(models.tiny_clip(tmp_path / "clip", image_size=32, patch=8))
    settings = make_settings(**{"encoder.model": path})
    enc = TransformersEncoder.load(path, settings.encoder, settings.limits)
    assert enc.image_input_size == 32
    assert EmbedStage(settings, enc)._image_fit() == 448


def test_batch_is_embedded_in_parts_within_the_pixel_and_byte_budgets() -> None:
    """A batch whose decoded images exceed limits.max_batch_pixels (or whose bytes exceed
    max_batch_bytes) is embedded in parts; the results are the same, in order."""
    items: list[Sample | Malformed] = [
        Sample(id=f"s{i}", image=_png(40 + i, 30), text="t") for i in range(6)
    ]
    items.insert(3, Malformed("bad", "broken", b"", None))
    whole_enc = SizedEncoder()
    whole = _stage(whole_enc).process(items)
    assert whole_enc.calls == [6]

    enc = SizedEncoder()
    stage = EmbedStage(
        make_settings(**{"clean.enabled": False, "limits.max_batch_pixels": 2 * 45 * 30}), enc
    )
    stage.threads = 1
    parts = stage.process(items)
    assert enc.calls == [2, 2, 2]
    assert [r.id for r in parts] == [r.id for r in whole]
    for a, b in zip(parts, whole, strict=True):
        assert type(a) is type(b)
        if isinstance(a, Embedded) and isinstance(b, Embedded):
            assert np.array_equal(a.vectors["image"], b.vectors["image"])

    by_bytes = SizedEncoder()
    stage = EmbedStage(
        make_settings(**{"clean.enabled": False, "limits.max_batch_bytes": 1}), by_bytes
    )
    stage.threads = 1
    assert [r.id for r in stage.process(items)] == [r.id for r in whole]
    assert by_bytes.calls == [1] * 6
