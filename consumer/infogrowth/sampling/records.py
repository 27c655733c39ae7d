"""Curated samples as a trainer sees them, gain normalisation, and reading exported files.

Nothing here imports torch or Kafka, so ``infogrowth export`` and file loaders stay light.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infogrowth.errors import ConfigError, DataError
from infogrowth.schema import SchemaError, validate

CURATED = ("accepted", "relabeled")
"""The decisions a trainer consumes (``rejected`` samples are never trained on)."""
MANIFEST = "manifest.jsonl"
EXPORT_INFO = "export.json"


@dataclass(frozen=True, slots=True)
class CuratedSample:
    """One curated sample: the payload a model trains on plus the curator's scores.

    ``gain`` is the InfoGrowth gain (mean cosine distance to the nearest accepted items, in
    ``[0, 2]``); ``g_scale`` is the scale the curator recorded with it (its ``keep_scale``
    under a keep budget, else ``thresholds.g_scale``; ``None`` without one) and ``policy`` its
    ``thresholds.policy``: ``"sample"`` means the stream already kept this sample by a gain coin
    (:attr:`sampled_online`), so a trainer must not sample it by gain again. For relabeled
    samples ``text`` /
    ``label`` are the repaired values and ``original_text`` / ``original_label`` the input's.
    ``position`` is ``(topic, partition, offset)`` of the output record when it came from Kafka.
    """

    id: str
    decision: str
    reason: str | None = None
    gain: float | None = None
    alignment: float | None = None
    keep_probability: float | None = None
    text: str | None = None
    label: str | None = None
    original_text: str | None = None
    original_label: str | None = None
    image: bytes | None = None
    meta: dict[str, Any] | None = None
    g_scale: float | None = None
    source: dict[str, str | int] | None = None
    position: tuple[str, int, int] | None = None
    policy: str | None = None
    vote: dict[str, float] | None = None
    """Label shares of the voting neighbours (why a sample was relabelled)."""
    image_uri: str | None = None
    """Where the image is, when the input referred to it (``outputs_include_image: reference``
    records carry this instead of ``image``)."""
    epoch: int | None = None
    """The calibration epoch it was decided under: each ``seed --reset`` starts a new one with
    a new index, so an input produced again after a reset is kept again, under the new epoch
    (None: the file runner, or a record written before epochs were recorded)."""

    @property
    def relabeled(self) -> bool:
        """True when the curator repaired the text or label."""
        return self.decision == "relabeled"

    @property
    def sampled_online(self) -> bool:
        """True when the stream kept this sample by its gain coin (``thresholds.policy ==
        "sample"``): it has had its one sampling step."""
        return self.policy == "sample"

    def normalised_gain(self, g_scale: float | None = None) -> float:
        """``clip(gain / g_scale, 0, 1)`` with ``g_scale`` given, else the stream's recorded
        scale, else 1. This is the stream's view of one sample; the trainer-side default
        (the set's own percentile) is :meth:`CuratedSet.weights`."""
        scale = g_scale if g_scale is not None else self.g_scale
        return float(normalise_gains(np.array([_float(self.gain)]), scale or 1.0)[0])

    @classmethod
    def from_record(
        cls, rec: Mapping[str, Any], position: tuple[str, int, int] | None = None
    ) -> CuratedSample:
        """Build from an output record, msgpack (``image`` bytes) or JSON (``image`` base64)."""
        image = rec.get("image")
        if isinstance(image, str):
            image = base64.b64decode(image)
        elif isinstance(image, bytearray | memoryview):
            image = bytes(image)
        thresholds = rec.get("thresholds") or {}
        if not isinstance(thresholds, Mapping):
            thresholds = {}
        policy = thresholds.get("policy")
        return cls(
            id=str(rec["id"]),
            decision=str(rec["decision"]),
            reason=rec.get("reason"),
            gain=rec.get("gain"),
            alignment=rec.get("alignment"),
            keep_probability=rec.get("keep_probability"),
            text=rec.get("text"),
            label=rec.get("label"),
            original_text=rec.get("original_text"),
            original_label=rec.get("original_label"),
            image=image,
            meta=rec.get("meta"),
            # under a keep budget the scale follows the stream: the record's own scale applies
            g_scale=rec.get("keep_scale") or thresholds.get("g_scale"),
            source=rec.get("source"),
            position=position,
            policy=None if policy is None else str(policy),
            vote=rec.get("vote"),
            image_uri=rec.get("image_uri"),
            epoch=rec.get("epoch"),
        )


def _float(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def gain_array(gains: Iterable[float | None]) -> np.ndarray:
    """Gains as float64 with NaN for a missing gain."""
    return np.array([_float(g) for g in gains], dtype=np.float64)


def normalise_gains(gains: np.ndarray, g_scale: float) -> np.ndarray:
    """``clip(g / g_scale, 0, 1)``: gains (cosine distances in ``[0, 2]``) as probabilities.

    A missing (NaN) gain counts as ``g_scale`` (normalised 1): a sample is never dropped for
    lacking a score.
    """
    if not g_scale > 0:
        raise ConfigError(f"g_scale must be positive, got {g_scale}")
    g = np.asarray(gains, dtype=np.float64)
    q = np.clip(g / g_scale, 0.0, 1.0)
    return np.where(np.isnan(q), 1.0, q)


def recorded_g_scale(recorded: Iterable[float | None]) -> float | None:
    """The ``thresholds.g_scale`` recorded most often (ties: the larger), None if none was.

    This is the *stream's* scale (what its ``sample`` policy used), reported by ``infogrowth
    export``; trainer-side sampling does not use it (see :func:`gain_weights`).
    """
    counts = Counter(float(g) for g in recorded if g is not None and g > 0)
    if not counts:
        return None
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


DEFAULT_G_PERCENTILE = 99.0
"""The authors' normalisation: gains are divided by the curated set's own 99th percentile."""


def check_percentile(percentile: float) -> float:
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"g_percentile must be in (0, 100], got {percentile}")
    return float(percentile)


def percentile_g_scale(gains: np.ndarray, percentile: float = DEFAULT_G_PERCENTILE) -> float:
    """The ``percentile``-th percentile of the finite gains (numpy's linear interpolation, as
    the authors' ``np.quantile(gains, 0.99)``).

    A percentile rather than the maximum: one isolated item (gain 1.0) would otherwise shrink
    every other item's probability. Degenerate sets fall back: when the percentile is not
    positive (almost every gain is 0), the largest gain; when no gain is positive, 1.
    """
    check_percentile(percentile)
    finite = np.asarray(gains, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 1.0
    value = float(np.percentile(finite, percentile))
    if value > 0:
        return value
    top = float(finite.max())
    return top if top > 0 else 1.0


def resolve_g_scale(
    explicit: float | None, gains: np.ndarray, percentile: float = DEFAULT_G_PERCENTILE
) -> float:
    """The scale that maps gains to ``[0, 1]``: ``explicit`` when given (it always wins), else
    the ``percentile``-th percentile of ``gains`` themselves (:func:`percentile_g_scale`)."""
    if explicit is not None:
        if not explicit > 0:
            raise ConfigError(f"g_scale must be positive, got {explicit}")
        return float(explicit)
    return percentile_g_scale(gains, percentile)


@dataclass(frozen=True, slots=True)
class GainWeights:
    """Per-item sampling weights ``q`` in ``[0, 1]`` and how they were made."""

    q: np.ndarray
    """``clip(g / g_scale, 0, 1)``, or 1 where :attr:`unweighted`."""
    g_scale: float
    """The scale applied to the gain-weighted items."""
    unweighted: np.ndarray
    """Boolean mask: items the stream already sampled online, held at ``q = 1`` so that they
    are not sampled by gain a second time (none with ``resample_online``)."""
    explicit: bool
    """True when ``g_scale`` was given by the user."""


def gain_weights(
    gains: np.ndarray,
    *,
    g_scale: float | None = None,
    percentile: float = DEFAULT_G_PERCENTILE,
    sampled_online: np.ndarray | None = None,
    resample_online: bool = False,
) -> GainWeights:
    """The trainer-side normalisation: one sampling step, never two.

    Items the stream already sampled online (``sampled_online``, from ``thresholds.policy ==
    "sample"``) get ``q = 1``: sampling them by gain again would keep them with about ``q²``.
    Only ``resample_online`` asks for that second weighting. The rest get ``q = clip(g / s, 0,
    1)`` with ``s`` = ``g_scale`` when given (a fixed scale, for example the grown set's when
    only new records are read), else the ``percentile``-th percentile of *their* gains (the
    authors' rule: the curated set's own 99th percentile). A missing gain counts as 1.
    """
    g = np.asarray(gains, dtype=np.float64).reshape(-1)
    online = (
        np.zeros(len(g), dtype=bool)
        if sampled_online is None
        else np.asarray(sampled_online, dtype=bool).reshape(-1)
    )
    if len(online) != len(g):
        raise DataError(f"sampled_online has {len(online)} entries for {len(g)} gains")
    if resample_online:
        online = np.zeros(len(g), dtype=bool)
    scale = resolve_g_scale(g_scale, g[~online], percentile)
    q = normalise_gains(g, scale)
    q[online] = 1.0
    return GainWeights(q, scale, online, g_scale is not None)


def check_output_record(rec: Any, where: str) -> None:
    """:class:`DataError` naming ``where`` unless ``rec`` is a valid output record (its JSON
    Schema, and a finite, non-negative gain: a cosine distance)."""
    try:
        validate("output", rec)
    except SchemaError as exc:
        raise DataError(f"{where}: invalid output record: {exc}") from None
    gain = rec.get("gain")
    if gain is not None and not (math.isfinite(gain) and gain >= 0):
        raise DataError(f"{where}: gain {gain!r} is not a finite cosine distance")


def read_jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """Output records from one JSONL file (as ``infogrowth curate`` / ``export`` write them),
    each checked as the stream checks what it reads (:func:`check_output_record`)."""
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc}") from None
            # a WebDataset export's manifest adds where each sample's files are ("export")
            check_output_record({k: v for k, v in rec.items() if k != "export"}, f"{path}:{lineno}")
            yield rec


def read_curated_records(path: Path | str) -> Iterator[dict[str, Any]]:
    """Curated records from an export directory (``manifest.jsonl``), a ``curate`` output
    directory (``accepted.jsonl`` then ``relabeled.jsonl``) or one JSONL file.

    Records whose decision is not accepted or relabeled are skipped.
    """
    p = Path(path)
    if p.is_dir():
        if (p / MANIFEST).is_file():
            files = [p / MANIFEST]
        else:
            files = [p / f"{name}.jsonl" for name in CURATED if (p / f"{name}.jsonl").is_file()]
            if not files:
                raise FileNotFoundError(f"{p}: no {MANIFEST}, accepted.jsonl or relabeled.jsonl")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"not found: {p}")
    for f in files:
        for rec in read_jsonl_records(f):
            if rec.get("decision") in CURATED:
                yield rec
