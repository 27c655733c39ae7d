"""Image captioning for the recaption fixer: greedy decoding with an image-to-text model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from infogrowth.encode import from_pretrained_kwargs, resolve_device, resolve_dtype
from infogrowth.errors import ConfigError

__all__ = ["Captioner"]

log = logging.getLogger(__name__)


class Captioner:
    """Greedy (deterministic) captions from BLIP, VisionEncoderDecoder or any model that
    ``AutoModelForImageTextToText`` (or, on transformers 4.x, ``AutoModelForVision2Seq``) loads
    and that captions from pixels alone."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 30,
        *,
        batch_size: int = 16,
        trust_remote_code: bool = False,
    ) -> None:
        if max_new_tokens <= 0:
            raise ConfigError("max_new_tokens must be positive")
        if batch_size <= 0:
            raise ConfigError("batch_size must be positive")
        self.name = model
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._model = _load_captioning_model(model, self._dtype, trust_remote_code)
        self._model.eval()
        self._model.to(self._device)
        self._image_processor, self._tokenizer = _load_processor(model, trust_remote_code)

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> str:
        return str(self._dtype).removeprefix("torch.")

    def __repr__(self) -> str:
        return f"Captioner(name={self.name!r}, device={self.device}, dtype={self.dtype})"

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image, in order; special tokens removed, whitespace stripped."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            captions.extend(self._caption_batch(images[start : start + self.batch_size]))
        return captions

    def _caption_batch(self, images: Sequence[Image.Image]) -> list[str]:
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        batch = self._image_processor(images=rgb, return_tensors="pt")
        inputs = {
            key: value.to(self._device, self._dtype)
            if value.is_floating_point()
            else value.to(self._device)
            for key, value in batch.items()
        }
        with torch.inference_mode():
            out = self._model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
        texts = self._tokenizer.batch_decode(out, skip_special_tokens=True)
        return [str(t).strip() for t in texts]


def _load_captioning_model(name: str, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load captioning model {name!r}: {exc}") from exc
    model_type = getattr(config, "model_type", "")
    candidates: list[Any] = []
    if model_type == "blip":
        candidates.append(transformers.BlipForConditionalGeneration)
    if model_type == "vision-encoder-decoder":
        candidates.append(transformers.VisionEncoderDecoderModel)
    for auto_name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto_cls = getattr(transformers, auto_name, None)  # Vision2Seq is gone in 5.x
        if auto_cls is not None:
            candidates.append(auto_cls)
    kwargs = from_pretrained_kwargs(dtype, trust_remote_code)
    errors: list[str] = []
    for cls in candidates:
        try:
            return cls.from_pretrained(name, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            errors.append(f"{getattr(cls, '__name__', cls)}: {exc}")
            log.debug("captioner %s: %s failed: %s", name, cls, exc)
    raise ConfigError(
        f"cannot load {name!r} (model_type={model_type!r}) as an image-to-text model: "
        + "; ".join(errors)
    )


def _load_processor(name: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """(image processor, tokenizer), from the processor if there is one, else loaded separately."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    image_processor: Any | None = None
    tokenizer: Any | None = None
    try:
        proc = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # e.g. VisionEncoderDecoder checkpoints without processor files
        log.debug("AutoProcessor failed for %s: %s", name, exc)
    else:
        image_processor = getattr(proc, "image_processor", None)
        tokenizer = getattr(proc, "tokenizer", None)
    try:
        if image_processor is None:
            image_processor = AutoImageProcessor.from_pretrained(
                name, trust_remote_code=trust_remote_code
            )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load the processor/tokenizer of {name!r}: {exc}") from exc
    return image_processor, tokenizer
