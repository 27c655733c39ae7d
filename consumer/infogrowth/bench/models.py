"""A tiny random CLIP with a real 224-pixel image processor, built offline for the embed bench.

The model is small on purpose: on a CPU it stands in for the GPU forward pass, so what the bench
shows is the cost of everything around the forward pass (decode, resize, tokenise, copies).
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
    vision_config = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
    }
    config = transformers.CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=16
    )
    torch.manual_seed(0)
    model: Any = transformers.CLIPModel(config)
    model.eval()
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = cls(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor_cls: Any = transformers.CLIPProcessor
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


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
