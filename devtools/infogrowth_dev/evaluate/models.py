"""Small real models the eval trains on CPU with fixed seeds.

* :class:`SmallCNN`, the image encoder: two conv blocks and a 64-d embedding layer, trained as a
  classifier on a slice of the training split that the stream never sees. Its embeddings reach
  the pipeline as precomputed vectors (``embedding.image``).
* :class:`Bridge`, a linear map from the CNN embedding into the MiniLM text space, trained on
  another disjoint slice, so that ``cos(image, caption)`` is a real alignment signal.
* :class:`CNNCaptioner`, the recaption model: the CNN's predicted class as a caption.
* Downstream classifiers: multinomial logistic regression (full-batch L-BFGS, L2 weight picked
  on a held-out part of the training subset) and a one-hidden-layer MLP (Adam, a fixed number of
  steps), both in torch, on one thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

EMBED_DIM = 64


def _seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def pixels(x: np.ndarray) -> torch.Tensor:
    """uint8 (n, 28, 28) → float (n, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(np.array(x, dtype=np.float32)).div_(255.0).unsqueeze(1)


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 10, dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def train_cnn(
    x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, n_classes: int = 10
) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = pixels(x), torch.from_numpy(y)
    gen = _seeded(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for lo in range(0, len(xt), 128):
            idx = perm[lo : lo + 128]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    model.eval()
    return model


@torch.inference_mode()
def cnn_embed(model: SmallCNN, x: np.ndarray) -> np.ndarray:
    parts = [model.embed(pixels(x[lo : lo + 2048])) for lo in range(0, len(x), 2048)]
    return torch.cat(parts).numpy().astype(np.float32)


@torch.inference_mode()
def cnn_predict(model: SmallCNN, x: np.ndarray) -> np.ndarray:
    parts = [model(pixels(x[lo : lo + 2048])).argmax(1) for lo in range(0, len(x), 2048)]
    return torch.cat(parts).numpy()


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Bridge(nn.Module):
    """Image embedding → text space (unit vectors)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(x), dim=1)


def train_bridge(img: np.ndarray, txt: np.ndarray, *, epochs: int, seed: int) -> Bridge:
    """Fit the bridge with a CLIP-style contrastive loss over the batch (cosine similarities)."""
    torch.manual_seed(seed)
    bridge = Bridge(img.shape[1], txt.shape[1])
    opt = torch.optim.Adam(bridge.parameters(), lr=3e-3)
    xi = torch.from_numpy(img)
    xt = nn.functional.normalize(torch.from_numpy(txt), dim=1)
    gen = _seeded(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xi), generator=gen)
        for lo in range(0, len(xi), 256):
            idx = perm[lo : lo + 256]
            opt.zero_grad()
            sims = bridge(xi[idx]) @ xt[idx].T
            # captions repeat within a batch: every item with the same caption is a positive
            pos = (xt[idx] @ xt[idx].T > 0.999).float()
            logp = nn.functional.log_softmax(sims / 0.05, dim=1)
            loss = -(logp * pos).sum(1).div(pos.sum(1)).mean()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    bridge.eval()
    return bridge


@torch.inference_mode()
def bridge_embed(bridge: Bridge, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = bridge(torch.from_numpy(x)).numpy().astype(np.float32)
    return out


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


class CNNCaptioner:
    """Recaptioning with the image encoder's own classifier: ``prompt`` of the predicted class."""

    def __init__(self, model: SmallCNN, classes: Sequence[str], prompt: str) -> None:
        self.model = model
        self.classes = list(classes)
        self.prompt = prompt

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        if not images:
            return []
        arr = np.stack([np.asarray(im.convert("L").resize((28, 28))) for im in images])
        pred = cnn_predict(self.model, arr)
        return [self.prompt.format(label=self.classes[int(p)]) for p in pred]


class CaptionEncoder:
    """The eval's two-tower encoder: CNN + bridge for images, the real MiniLM for captions.

    Stream samples carry both vectors precomputed; the pipeline calls :meth:`encode_texts` for
    recaptions only. Text vectors are cached by caption.
    """

    def __init__(self, cnn: SmallCNN, bridge: Bridge, text: object, fingerprint: str) -> None:
        self.cnn = cnn
        self.bridge = bridge
        self.text = text
        self._cache: dict[str, np.ndarray] = {}
        dim = int(bridge.proj.out_features)
        self._dims = {"image": dim, "text": dim}
        self._fingerprint = fingerprint

    @property
    def spaces(self) -> tuple[str, ...]:
        return ("image", "text")

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        arr = np.stack([np.asarray(im.convert("L").resize((28, 28))) for im in images])
        return bridge_embed(self.bridge, cnn_embed(self.cnn, arr))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            vecs = self.text.encode_texts(missing)  # type: ignore[attr-defined]
            for t, v in zip(missing, vecs, strict=True):
                self._cache[t] = np.asarray(v, dtype=np.float32)
        if not texts:
            return np.zeros((0, self._dims["text"]), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])


# ---- downstream classifiers -------------------------------------------------------------------


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Small models train faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def pooled_pixels(x: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) → float (n, 196): 2×2 average pooling, scaled to [0, 1]."""
    f: np.ndarray = x.astype(np.float32).reshape(len(x), 14, 2, 14, 2).mean(axis=(2, 4)) / 255.0
    return f.reshape(len(x), 196)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mu = train.mean(0, keepdims=True)
    sd = train.std(0, keepdims=True) + 1e-6
    return (
        torch.from_numpy(((train - mu) / sd).astype(np.float32)),
        torch.from_numpy(((test - mu) / sd).astype(np.float32)),
    )


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def _logreg_fit(
    xt: torch.Tensor, yt: torch.Tensor, n_classes: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(xt.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=200, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with single_thread():
        opt.step(closure)  # type: ignore[no-untyped-call]
    return w.detach(), b.detach()


def logreg_accuracy(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    *,
    seed: int = 0,
) -> tuple[float, float]:
    """Multinomial logistic regression (L2, full-batch L-BFGS, standardised features).

    The L2 weight is picked from :data:`L2_GRID` on a held-out fifth of the training subset (its
    own, possibly wrong, labels: what a practitioner without clean labels would do), then the
    model is refit on the whole subset. Returns (test accuracy, chosen L2).
    """
    xt, xe = _standardise(x, x_test)
    yt = torch.from_numpy(y.astype(np.int64))
    perm = torch.randperm(len(xt), generator=_seeded(seed))
    n_val = max(len(xt) // 5, 1)
    val, fit = perm[:n_val], perm[n_val:]
    best, best_acc = L2_GRID[0], -1.0
    for l2 in L2_GRID:
        w, b = _logreg_fit(xt[fit], yt[fit], n_classes, l2)
        acc = float(((xt[val] @ w + b).argmax(1) == yt[val]).float().mean())
        if acc > best_acc + 1e-9:
            best, best_acc = l2, acc
    w, b = _logreg_fit(xt, yt, n_classes, best)
    pred = (xe @ w + b).argmax(1).numpy()
    return float((pred == y_test).mean()), best


def mlp_accuracy(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    *,
    seed: int,
    hidden: int = 128,
    steps: int = 3000,
    batch: int = 128,
) -> float:
    """One hidden layer (ReLU), Adam, the same number of steps for every training set (equal
    compute: a smaller subset gets more passes), seeded init and order."""
    torch.manual_seed(seed)
    xt, xe = _standardise(x.reshape(len(x), -1), x_test.reshape(len(x_test), -1))
    yt = torch.from_numpy(y.astype(np.int64))
    model = nn.Sequential(nn.Linear(xt.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = _seeded(seed)
    done = 0
    with single_thread():
        while done < steps:
            perm = torch.randperm(len(xt), generator=gen)
            for lo in range(0, len(xt), batch):
                if done == steps:
                    break
                idx = perm[lo : lo + batch]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                done += 1
    with torch.no_grad():
        pred = model(xe).argmax(1).numpy()
    return float((pred == y_test).mean())
