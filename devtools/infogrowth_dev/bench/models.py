"""Random-weight CLIPs with a real 224-pixel image processor, built offline for the embed bench.

``tiny_clip`` is small on purpose: on a CPU it stands in for the GPU forward pass, so what the
bench shows is the cost of everything around the forward pass (decode, resize, tokenise, copies).
``clip_b16`` has the shape of OpenAI's ViT-B/16 image tower (12 layers, width 768, 16-pixel
patches, 512-d projection): on a GPU its forward costs what the real model's does. Neither is
downloaded; weights come from ``torch.manual_seed(0)``. :class:`TowerPair` joins an image
encoder and a text encoder (the packaged MiniLM) into one dual encoder for the stage.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

B16_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 16,
}
"""ViT-B/16 as in OpenAI's CLIP (openai/clip-vit-base-patch16's vision_config)."""
B16_PROJECTION = 512

WORDS = [
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "of",
    "on",
    "in",
    "with",
    "and",
    "cat",
    "dog",
    "bird",
    "car",
    "tree",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "sitting",
    "standing",
    "table",
    "grass",
    "sky",
    "man",
    "woman",
    "street",
    "house",
    "water",
    "beach",
]


def byte_clip_tokenizer(max_tokens: int = 77) -> Any:
    """Byte-level BPE with no merges: every byte is a token, so any text is encodable offline."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_map: Any = bytes_to_unicode  # untyped upstream
    chars = list(byte_map().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (root / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return transformers.CLIPTokenizer.from_pretrained(tmp, model_max_length=max_tokens)


def tiny_clip(directory: Path, image_size: int = 224, patch: int = 32) -> Path:
    """2 layers, width 32: a forward pass that costs next to nothing."""
    hidden = 32
    vision = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
    }
    return random_clip(directory, vision, projection=16)


def clip_b16(directory: Path) -> Path:
    """The ViT-B/16 image tower's shape at 224 px, random weights (the text tower is tiny: the
    bench embeds text with MiniLM)."""
    return random_clip(directory, B16_VISION, projection=B16_PROJECTION)


def random_clip(directory: Path, vision: dict[str, Any], projection: int) -> Path:
    """A CLIP with the given vision config, a 2-layer text tower over a byte tokenizer, and a
    CLIP image processor at the vision config's size; saved to ``directory``."""
    import torch
    import transformers

    tokenizer = byte_clip_tokenizer(77)
    hidden = 32
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = transformers.CLIPConfig(
        text_config=text_config, vision_config=dict(vision), projection_dim=projection
    )
    torch.manual_seed(0)
    model: Any = transformers.CLIPModel(config)
    model.eval()
    size = int(vision["image_size"])
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor_cls: Any = transformers.CLIPProcessor
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


class TowerPair:
    """A dual encoder made of an image-only and a text-only encoder (different models, so
    there is no alignment: the spaces have their own dimensions). The image-side attributes
    the embed stage looks for (batch size, processor stages, device decoding) are the image
    encoder's; setting ``batch_size`` (the stage halves it on CUDA OOM) sets both."""

    def __init__(self, image: Any, text: Any) -> None:
        if image.spaces != ("image",) or text.spaces != ("text",):
            raise ValueError("TowerPair needs an image-only and a text-only encoder")
        self.image = image
        self.text = text

    @property
    def spaces(self) -> tuple[str, ...]:
        return ("image", "text")

    @property
    def dims(self) -> dict[str, int]:
        return {**self.image.dims, **self.text.dims}

    @property
    def fingerprint(self) -> str:
        return f"{self.image.fingerprint}+{self.text.fingerprint}"

    @property
    def device(self) -> str:
        return str(self.image.device)

    @property
    def dtype(self) -> str:
        return str(self.image.dtype)

    @property
    def batch_size(self) -> int:
        return int(self.image.batch_size)

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.image.batch_size = value
        self.text.batch_size = value

    @property
    def prefetch_depth(self) -> int:
        return int(self.image.prefetch_depth)

    @property
    def image_decode(self) -> str:
        return str(self.image.image_decode)

    @property
    def image_input_size(self) -> int | None:
        return self.image.image_input_size  # type: ignore[no-any-return]

    @property
    def torch_device(self) -> Any:
        return self.image.torch_device

    def encode_images(self, images: Sequence[Image.Image]) -> Any:
        return self.image.encode_images(images)

    def encode_texts(self, texts: Sequence[str]) -> Any:
        return self.text.encode_texts(texts)

    def preprocess_images(self, images: Sequence[Image.Image]) -> Any:
        return self.image.preprocess_images(images)

    def forward_images(self, batch: Any) -> Any:
        return self.image.forward_images(batch)

    def pixel_batch(self, images: Sequence[Any]) -> Any:
        return self.image.pixel_batch(images)


def jpeg(w: int, h: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients, shapes and noise, about 40-60 KB at 500 x 375."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-0.5, 0.5, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img[mask] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(
        buf, format="JPEG", quality=quality
    )
    return buf.getvalue()


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(6, 16))).tolist())
