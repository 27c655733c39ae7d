from __future__ import annotations

from pathlib import Path

import pytest

from infogrowth.caption import Captioner
from tests.fixtures.models import (
    CAPTION_WORDS,
    make_image,
    tiny_captioner,
    tiny_clip,
    tiny_vision_encoder_decoder,
)

IMAGES = [make_image(20 + 5 * i, 30, seed=i) for i in range(5)]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_captioner(tmp_path_factory.mktemp("models") / "blip")


@pytest.fixture(scope="module")
def blip(blip_dir: Path) -> Captioner:
    return Captioner(str(blip_dir), device="auto", dtype="auto", max_new_tokens=6, batch_size=2)


def _assert_captions(captions: list[str], n: int) -> None:
    assert len(captions) == n
    for text in captions:
        assert isinstance(text, str)
        assert text
        assert text == text.strip()
        assert "[" not in text  # no [SEP], [PAD], [DEC]...
        assert set(text.split()) <= set(CAPTION_WORDS)


def test_blip_captions_every_image(blip: Captioner) -> None:
    assert blip.device == "cpu"
    assert blip.dtype == "float32"
    _assert_captions(blip.caption(IMAGES), len(IMAGES))


def test_blip_is_deterministic_and_batch_independent(blip: Captioner, blip_dir: Path) -> None:
    first = blip.caption(IMAGES)
    assert blip.caption(IMAGES) == first
    big_batches = Captioner(str(blip_dir), max_new_tokens=6, batch_size=16)
    assert big_batches.caption(IMAGES) == first
    assert [blip.caption([img])[0] for img in IMAGES] == first


def test_max_new_tokens_bounds_length(blip_dir: Path) -> None:
    short = Captioner(str(blip_dir), max_new_tokens=2)
    for text in short.caption(IMAGES[:2]):
        assert 1 <= len(text.split()) <= 2


def test_empty_and_non_rgb_input(blip: Captioner) -> None:
    assert blip.caption([]) == []
    _assert_captions(blip.caption([IMAGES[0].convert("L"), IMAGES[1].convert("RGBA")]), 2)


def test_vision_encoder_decoder(tmp_path: Path) -> None:
    path = tiny_vision_encoder_decoder(tmp_path / "ved")
    captioner = Captioner(str(path), max_new_tokens=4)
    captions = captioner.caption(IMAGES[:3])
    _assert_captions(captions, 3)
    assert captioner.caption(IMAGES[:3]) == captions


def test_bad_arguments(blip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        Captioner(str(blip_dir), max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        Captioner(str(blip_dir), batch_size=0)
    with pytest.raises(ValueError, match="image-to-text"):
        Captioner(str(tiny_clip(tmp_path / "clip")))
    with pytest.raises(ValueError, match="cannot load captioning model"):
        Captioner(str(tmp_path / "missing"))
