"""The embed stage's image path when the encoder decodes on its device: encoded bytes in, one
vector (or the reason the image could not be decoded) out per image.

Per encoder batch, on a background thread (:func:`infogrowth.prefetch.prefetch`, so the next
batch is decoded while the model runs this one): plain JPEGs go to torchvision's decoder on
the device (nvJPEG on CUDA, in calls of at most :data:`DECODE_PIXELS` pixels); every other
image, and any the decoder refuses, is decoded by the CPU path's decoder
(``decode_cpu``, Pillow with the usual limits) and uploaded; then the batch is resized and
normalised on the device and joined. On CUDA that work runs on a side stream, and the model's
stream waits for it through an event. The model runs exactly ``batch_size`` images at a time,
so an out-of-memory error reaches the stage, which halves the batch and retries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from infogrowth.prefetch import prefetch

if TYPE_CHECKING:  # torch is imported when the path runs: the stage module stays torch-free
    import torch

__all__ = ["DECODE_PIXELS", "DecodeFailure", "DeviceImageEncoder", "embed_image_bytes"]

DECODE_PIXELS = 256_000_000
"""Most pixels (by their headers) decoded on the device in one call: 768 MB of RGB."""


class DecodeFailure(str):
    """Why an image could not be decoded: the sample is malformed (with its bytes)."""

    __slots__ = ()


class DeviceImageEncoder(Protocol):
    """What the fast path needs from the encoder (``TransformersEncoder``)."""

    batch_size: int
    prefetch_depth: int

    @property
    def torch_device(self) -> torch.device: ...

    def pixel_batch(self, images: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def forward_images(self, batch: dict[str, torch.Tensor]) -> np.ndarray: ...


@dataclass
class _Prepared:
    rows: list[int] = field(default_factory=list)
    """Positions (in the whole call) of the images in ``batch``, in order."""
    batch: dict[str, torch.Tensor] | None = None
    failures: dict[int, str] = field(default_factory=dict)
    ready: Any = None
    """CUDA event recorded after the batch was made on the side stream."""


@dataclass
class _Limits:
    max_bytes: int
    max_pixels: int


def embed_image_bytes(
    enc: DeviceImageEncoder,
    blobs: Sequence[bytes],
    *,
    decode_cpu: Callable[[bytes], Image.Image | str],
    map_fn: Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]],
    max_bytes: int,
    max_pixels: int,
) -> list[np.ndarray | DecodeFailure]:
    """One unit vector or :class:`DecodeFailure` per blob, in order.

    ``decode_cpu(data)`` is the reference decoder (an image, or the error text); ``map_fn``
    maps a function over a list (the stage's thread pool).
    """
    import torch

    device = enc.torch_device
    limits = _Limits(max_bytes, max_pixels)
    bs = max(1, enc.batch_size)
    chunks = [list(range(i, min(i + bs, len(blobs)))) for i in range(0, len(blobs), bs)]
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def prepare(chunk: list[int]) -> _Prepared:
        if side is None:
            return _prepare(enc, blobs, chunk, decode_cpu, map_fn, limits)
        with torch.cuda.stream(side):
            prep = _prepare(enc, blobs, chunk, decode_cpu, map_fn, limits)
            prep.ready = torch.cuda.Event()
            prep.ready.record(side)
        return prep

    out: list[np.ndarray | DecodeFailure | None] = [None] * len(blobs)
    depth = enc.prefetch_depth if len(chunks) > 1 else 0
    for prep in prefetch(chunks, prepare, depth, name="embed-images"):
        for pos, why in prep.failures.items():
            out[pos] = DecodeFailure(why)
        if prep.batch is None:
            continue
        if prep.ready is not None:
            _wait(prep)
        vecs = enc.forward_images(prep.batch)
        for row, pos in enumerate(prep.rows):
            out[pos] = vecs[row]
    assert all(o is not None for o in out)
    return [o for o in out if o is not None]


def _prepare(
    enc: DeviceImageEncoder,
    blobs: Sequence[bytes],
    chunk: list[int],
    decode_cpu: Callable[[bytes], Image.Image | str],
    map_fn: Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]],
    limits: _Limits,
) -> _Prepared:
    from infogrowth.devimage import decode_jpegs, jpeg_size, pil_to_tensor

    device = enc.torch_device
    tensors: dict[int, torch.Tensor] = {}
    sizes = {
        pos: jpeg_size(blobs[pos], max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
        for pos in chunk
    }
    fast = [pos for pos in chunk if sizes[pos] is not None]
    if device.type == "cuda":
        for group in _by_pixels(fast, sizes):
            for pos, t in zip(group, decode_jpegs([blobs[p] for p in group], device), strict=True):
                if t is not None:
                    tensors[pos] = t
    else:  # one image per call, spread over the stage's threads
        decoded = map_fn(lambda p: decode_jpegs([blobs[p]], device)[0], fast)
        tensors.update({p: t for p, t in zip(fast, decoded, strict=True) if t is not None})
    prep = _Prepared()
    slow = [pos for pos in chunk if pos not in tensors]
    for pos, res in zip(slow, map_fn(lambda p: decode_cpu(blobs[p]), slow), strict=True):
        if isinstance(res, str):
            prep.failures[pos] = res
        else:
            tensors[pos] = pil_to_tensor(res)
    prep.rows = [pos for pos in chunk if pos in tensors]
    if prep.rows:
        prep.batch = enc.pixel_batch([tensors[pos] for pos in prep.rows])
    return prep


def _by_pixels(positions: list[int], sizes: dict[int, tuple[int, int] | None]) -> list[list[int]]:
    """Consecutive groups of at most :data:`DECODE_PIXELS` pixels (at least one image each)."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for pos in positions:
        w, h = sizes[pos] or (0, 0)
        if current and total + w * h > DECODE_PIXELS:
            groups.append(current)
            current, total = [], 0
        current.append(pos)
        total += w * h
    if current:
        groups.append(current)
    return groups


def _wait(prep: _Prepared) -> None:
    """Make the model's stream wait for the side stream's batch, and keep the batch's memory
    from being reused by the side stream until the model's stream is done with it."""
    import torch

    stream = torch.cuda.current_stream()
    stream.wait_event(prep.ready)
    for t in (prep.batch or {}).values():
        t.record_stream(stream)
