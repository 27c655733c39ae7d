"""The embed stage tokenises a call's texts on a thread of its own while the image tower runs
(``EmbedStage._stage_texts``). The staged batches are the ones ``encode_texts`` would make, so
the text vectors are bit-identical to the plain path; when the texts to embed change (an image
failed to decode) or the batch size changed (CUDA out of memory), the plain path runs instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infogrowth.encode import TransformersEncoder
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import Embedded, Sample
from tests.fixtures.models import make_jpeg, tiny_clip
from tests.unit.test_device_path import _settings


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(params=["cpu", "device"])
def enc(request: pytest.FixtureRequest, clip_dir: Path) -> TransformersEncoder:
    s = _settings(clip_dir, request.param)
    return TransformersEncoder.load(str(clip_dir), s.encoder, s.limits)


def _samples(n: int, broken: tuple[int, ...] = ()) -> list[Sample]:
    words = ["a", "cat on a mat", "two dogs running in a very long field", "sky", "red car"]
    return [
        Sample(
            id=f"s{i}",
            text=" ".join(words[: 1 + i % len(words)]) + f" {i}",
            image=b"\xff\xd8 broken" if i in broken else make_jpeg(40 + i, 30 + 2 * i, seed=i),
        )
        for i in range(n)
    ]


def _run(enc: TransformersEncoder, items: list[Sample], threads: int) -> tuple[list[Any], int]:
    calls = {"staged": 0}
    real = enc.encode_staged_texts

    def spy(staged: Any) -> np.ndarray:
        calls["staged"] += 1
        return real(staged)

    enc.encode_staged_texts = spy  # type: ignore[method-assign]
    stage = EmbedStage(_settings(Path(enc.name), enc.image_decode), enc)
    stage.threads = threads
    try:
        return stage.process(items), calls["staged"]
    finally:
        stage.close()
        del enc.encode_staged_texts


def _texts(out: list[Any]) -> dict[str, np.ndarray]:
    return {o.id: o.vectors["text"] for o in out if isinstance(o, Embedded)}


def test_staged_texts_give_the_plain_paths_vectors_bit_for_bit(enc: TransformersEncoder) -> None:
    items = _samples(11)
    plain, used_plain = _run(enc, items, threads=1)
    staged, used = _run(enc, items, threads=2)
    assert used_plain == 0 and used == 1
    ref, got = _texts(plain), _texts(staged)
    assert list(got) == list(ref) == [s.id for s in items]
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def test_texts_of_images_that_fail_are_not_embedded(enc: TransformersEncoder) -> None:
    items = _samples(9, broken=(2, 5))
    plain, _ = _run(enc, items, threads=1)
    staged, used = _run(enc, items, threads=2)
    # On the CPU path images are decoded before anything is staged, so the staged texts already
    # leave the two malformed samples out; on the device path they fail inside the image tower.
    assert used == (1 if enc.image_decode == "cpu" else 0)
    assert [type(o) for o in staged] == [type(o) for o in plain]
    assert [o.decision for o in staged if not isinstance(o, Embedded)] == ["rejected"] * 2
    ref, got = _texts(plain), _texts(staged)
    assert list(got) == list(ref)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def test_a_halved_batch_size_makes_the_stage_tokenise_again(
    enc: TransformersEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = enc.forward_images

    def oom_once(batch: Any) -> np.ndarray:
        enc.batch_size = 2  # what EmbedStage._halve_batch does after a CUDA OOM
        return real(batch)

    monkeypatch.setattr(enc, "forward_images", oom_once)
    items = _samples(7)
    staged, used = _run(enc, items, threads=2)
    assert used == 0
    assert enc.batch_size == 2
    ref = enc.encode_texts([s.text or "" for s in items])
    got = _texts(staged)
    for i, s in enumerate(items):
        assert np.array_equal(ref[i], got[s.id]), s.id
