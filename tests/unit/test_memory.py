"""Memory floods and encoder failures: bounded decoded images, a failing batch split to its
culprit instead of crash-looping (issue 13 item 4)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from infogrowth.pipeline import EmbedStage
from infogrowth.records import Outcome
from infogrowth.schema import Embedded, Sample
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
