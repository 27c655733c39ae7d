"""Image bytes to model-ready tensors with torch ops, on the encoder's device.

The reference path decodes with Pillow (:func:`infogrowth.imaging.decode_image`) and prepares
pixels with the model's image processor, on the CPU. This module is the fast path: JPEGs are
decoded by torchvision (nvJPEG on CUDA, many images per call) and resized, cropped, rescaled
and normalised as tensor ops where the pixels already are. :class:`TensorTransform` reproduces
the processor's steps and checks itself against the processor on probe images when built.

Only plain JPEGs take the fast decoder (:func:`jpeg_size`): RGB or greyscale, no EXIF
rotation, ending in an end-of-image marker, within the size limits. Everything else (PNG, WebP,
CMYK, rotated, oversized, truncated) and any image the decoder refuses goes through the
reference decoder, one image at a time, so errors and limits stay exactly those of the CPU
path.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from infogrowth.errors import DataError
from infogrowth.imaging import MAX_JPEG_SCANS

__all__ = [
    "TensorTransform",
    "UnsupportedProcessor",
    "decode_jpegs",
    "jpeg_size",
    "pil_to_tensor",
    "torchvision_available",
]

_INTERPOLATION = {2: "bilinear", 3: "bicubic"}  # PIL resample codes the fast path reproduces
_EXIF_ORIENTATION = 0x0112
# Probe images the transform is checked on (width, height): landscape, portrait, small.
_PROBES = ((300, 200), (170, 260), (40, 30))
# torchvision 0.29 announces that its image codecs will move to TorchCodec; until then they are
# what decodes here (and the warning would repeat for every batch).
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)
_PROBE_MEAN_ABS = 0.03
"""Mean |difference| allowed between the transform and the processor on a probe, in the
processor's output units (PIL and torch resampling round differently; a misread mean, std or
scale shows as 0.1 or more)."""


class UnsupportedProcessor(ValueError):
    """The image processor does something the tensor transform does not reproduce."""


def torchvision_available() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # absent, or built for another torch
        return False
    return True


@dataclass(frozen=True)
class TensorTransform:
    """Resize, centre-crop, rescale and normalise a uint8 ``(3, H, W)`` tensor, as the image
    processor it was read from does; the result is float32 ``(3, h, w)`` on the same device."""

    shortest_edge: int | None
    """Resize so the shorter side is this (the longer one scaled and truncated, as
    transformers does); ``None`` with ``resize_to`` set."""
    resize_to: tuple[int, int] | None
    """Resize to exactly (height, width)."""
    crop: tuple[int, int] | None
    interpolation: str
    scale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, proc: Any) -> TensorTransform:
        """Read ``proc``'s settings; :class:`UnsupportedProcessor` when they go beyond resize,
        crop, rescale and normalise, or when the result differs from ``proc`` on a probe."""
        t = cls._read(proc)
        t.check_against(proc)
        return t

    @classmethod
    def _read(cls, proc: Any) -> TensorTransform:
        if getattr(proc, "do_pad", False) or getattr(proc, "do_reduce_labels", False):
            raise UnsupportedProcessor("the processor pads its images")
        shortest: int | None = None
        resize_to: tuple[int, int] | None = None
        if getattr(proc, "do_resize", True):
            size = _as_dict(getattr(proc, "size", None))
            if size.get("longest_edge") or size.get("max_height"):
                raise UnsupportedProcessor(f"resize rule {size} is not reproduced")
            if size.get("shortest_edge"):
                shortest = int(size["shortest_edge"])
            elif size.get("height") and size.get("width"):
                resize_to = (int(size["height"]), int(size["width"]))
            else:
                raise UnsupportedProcessor(f"resize rule {size} is not reproduced")
        resample = getattr(proc, "resample", 2)
        code = int(getattr(resample, "value", resample))
        if code not in _INTERPOLATION:
            raise UnsupportedProcessor(f"resampling filter {resample!r} is not reproduced")
        crop = None
        if getattr(proc, "do_center_crop", False):
            c = _as_dict(getattr(proc, "crop_size", None))
            if not (c.get("height") and c.get("width")):
                raise UnsupportedProcessor(f"crop size {c} is not reproduced")
            crop = (int(c["height"]), int(c["width"]))
        scale = float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else None
        mean = std = None
        if getattr(proc, "do_normalize", False):
            mean, std = _triple(proc.image_mean), _triple(proc.image_std)
        return cls(shortest, resize_to, crop, _INTERPOLATION[code], scale, mean, std)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step."""
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is None:
            return height, width
        s = self.shortest_edge
        if width <= height:
            return int(s * height / width), s
        return s, int(s * width / height)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One uint8 ``(3, H, W)`` image to float32 ``(3, h, w)``."""
        return self.batch([image])[0]

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 ``(3, H, W)`` images (one device) to a float32 ``(n, 3, h, w)`` batch.

        Images of equal size are resized together (one call per size); the resized uint8
        pixels are rounded as Pillow rounds them, then the whole batch is rescaled and
        normalised at once.
        """
        if not images:
            raise DataError("no images")
        for im in images:
            if im.dtype != torch.uint8 or im.ndim != 3 or im.shape[0] != 3:
                raise DataError(f"expected uint8 (3, H, W) tensors, got {tuple(im.shape)}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault((int(im.shape[1]), int(im.shape[2])), []).append(i)
        done: list[torch.Tensor | None] = [None] * len(images)
        for (h, w), idx in groups.items():
            stack = torch.stack([images[i] for i in idx])
            out = self._geometry(stack, h, w)
            for row, i in enumerate(idx):
                done[i] = out[row]
        x = torch.stack([d for d in done if d is not None]).to(torch.float32)
        if self.scale is not None:
            x = x * self.scale
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def _geometry(self, stack: torch.Tensor, h: int, w: int) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvf

        new = self.resized_size(h, w)
        if new != (h, w):
            mode = InterpolationMode(self.interpolation)
            stack = tvf.resize(stack, list(new), interpolation=mode, antialias=True)
        if self.crop is not None:
            stack = _center_crop(stack, self.crop)
        return stack

    def check_against(self, proc: Any) -> None:
        """:class:`UnsupportedProcessor` unless this transform gives ``proc``'s output shape
        and values (within resampling rounding) on the probe images."""
        rng = np.random.default_rng(0)
        for w, h in _PROBES:
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
            pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, "RGB")
            ref = proc(images=[img], return_tensors="pt")["pixel_values"][0].float()
            got = self(pil_to_tensor(img))
            if tuple(got.shape) != tuple(ref.shape):
                raise UnsupportedProcessor(
                    f"a {w}x{h} probe gives shape {tuple(got.shape)}, the processor "
                    f"{tuple(ref.shape)}"
                )
            err = float((got - ref).abs().mean())
            if err > _PROBE_MEAN_ABS:
                raise UnsupportedProcessor(
                    f"a {w}x{h} probe differs from the processor by {err:.4f} on average"
                )


def jpeg_size(data: bytes, *, max_bytes: int, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a JPEG the fast decoder may take; else ``None`` (the
    reference decoder then decodes it, or rejects it with its usual error)."""
    if len(data) > max_bytes or not data.startswith(b"\xff\xd8\xff"):
        return None
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS:  # the reference decoder rejects it
        return None
    if not data.endswith(b"\xff\xd9"):
        # No end-of-image marker: truncated (or with data appended). nvJPEG may decode what
        # is there where Pillow refuses; the reference decoder decides, as on the CPU path.
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return None
                w, h = img.size
                if w <= 0 or h <= 0 or w * h > max_pixels:
                    return None
                if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                    return None
                return int(w), int(h)
    except Exception:  # anything odd in the header: the reference decoder reports it
        return None


def decode_jpegs(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs to uint8 RGB ``(3, H, W)`` tensors on ``device``; ``None`` for each image
    the decoder refuses. On CUDA the images go to nvJPEG in one call; when that call fails,
    each image is retried alone so one bad image does not send the others to the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    if not data:
        return []
    if device.type == "cuda":
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
    out: list[torch.Tensor | None] = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a uint8 ``(3, H, W)`` tensor (CPU)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _center_crop(image: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Centre crop of ``(..., H, W)`` as transformers does it: offsets floor((size - crop) / 2);
    an image smaller than the crop is zero-padded, ceil(padding / 2) of it before the image."""
    ch, cw = crop
    h, w = int(image.shape[-2]), int(image.shape[-1])
    if h < ch or w < cw:
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        top, left = (pad_h + 1) // 2, (pad_w + 1) // 2
        image = torch.nn.functional.pad(image, (left, pad_w - left, top, pad_h - top))
        h, w = int(image.shape[-2]), int(image.shape[-1])
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[..., top : top + ch, left : left + cw]


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, int):
        return {"shortest_edge": value}
    if value is None:
        return {}
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
    return {k: getattr(value, k, None) for k in keys}  # transformers' SizeDict


def _triple(value: Any) -> tuple[float, ...]:
    vals = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(vals) != 3:
        raise UnsupportedProcessor(f"normalisation {value!r} is not per RGB channel")
    return tuple(vals)
