"""Known near-copies of seed images, for the image-space duplicate floor.

A copy that a user would call a duplicate is the same picture re-encoded, resized, lightly cropped
or colour-shifted. Embedding such copies of seed images measures how far the encoder puts them
from their original, so ε can be chosen to catch them instead of guessed from the originals alone.
Deterministic: fixed parameters, no random state.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, ImageEnhance

AUGMENT_ITEMS = 200
"""Seed images augmented (the first ones with an image)."""


def _jpeg(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=70)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def _resize(img: Image.Image) -> Image.Image:
    w, h = img.size
    small = img.resize((max(1, int(w * 0.75)), max(1, int(h * 0.75))), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.BILINEAR)


def _crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    dx, dy = max(1, w // 20), max(1, h // 20)
    if w - 2 * dx < 1 or h - 2 * dy < 1:
        return img.copy()
    return img.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.BILINEAR)


def _colour(img: Image.Image) -> Image.Image:
    out = ImageEnhance.Brightness(img.convert("RGB")).enhance(1.1)
    return ImageEnhance.Contrast(out).enhance(0.9)


AUGMENTATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg70": _jpeg,
    "resize75": _resize,
    "crop5": _crop,
    "colour10": _colour,
}


def augmented_copies(img: Image.Image) -> list[Image.Image]:
    """One copy of ``img`` per augmentation, in ``AUGMENTATIONS`` order."""
    return [fn(img) for fn in AUGMENTATIONS.values()]
