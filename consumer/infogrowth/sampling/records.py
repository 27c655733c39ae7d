"""Curated samples as a trainer sees them, gain normalisation, and reading exported files.

Nothing here imports torch or Kafka, so ``infogrowth export`` and file loaders stay light.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CURATED = ("accepted", "relabeled")
"""The decisions a trainer consumes (``rejected`` samples are never trained on)."""
MANIFEST = "manifest.jsonl"
EXPORT_INFO = "export.json"


@dataclass(frozen=True, slots=True)
class CuratedSample:
    """One curated sample: the payload a model trains on plus the curator's scores.

    ``gain`` is the InfoGrowth gain (mean cosine distance to the nearest accepted items, in
    ``[0, 2]``); ``g_scale`` is the sampling scale the curator recorded with it (its
    ``thresholds.g_scale``; ``None`` without a calibration). For relabeled samples ``text`` /
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

    @property
    def relabeled(self) -> bool:
        """True when the curator repaired the text or label."""
        return self.decision == "relabeled"

    def normalised_gain(self, g_scale: float | None = None) -> float:
        """``clip(gain / g_scale, 0, 1)`` with ``g_scale`` given or recorded (1 when missing)."""
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
        g_scale = thresholds.get("g_scale") if isinstance(thresholds, Mapping) else None
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
            g_scale=g_scale,
            source=rec.get("source"),
            position=position,
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
        raise ValueError(f"g_scale must be positive, got {g_scale}")
    g = np.asarray(gains, dtype=np.float64)
    q = np.clip(g / g_scale, 0.0, 1.0)
    return np.where(np.isnan(q), 1.0, q)


def recorded_g_scale(recorded: Iterable[float | None]) -> float | None:
    """The ``thresholds.g_scale`` recorded most often (ties: the larger), None if none was."""
    counts = Counter(float(g) for g in recorded if g is not None and g > 0)
    if not counts:
        return None
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


def resolve_g_scale(
    explicit: float | None, recorded: Iterable[float | None], gains: np.ndarray
) -> float:
    """The scale that maps gains to ``[0, 1]``.

    Order: ``explicit``; else the value the curator recorded most often (``thresholds.g_scale``,
    one per calibration); else the largest gain in the set (so the most novel sample gets 1);
    else 1.
    """
    if explicit is not None:
        if not explicit > 0:
            raise ValueError(f"g_scale must be positive, got {explicit}")
        return float(explicit)
    found = recorded_g_scale(recorded)
    if found is not None:
        return found
    finite = gains[np.isfinite(gains)]
    if finite.size and float(finite.max()) > 0:
        return float(finite.max())
    return 1.0


def read_jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """Output records from one JSONL file (as ``infogrowth curate`` / ``export`` write them)."""
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc}") from None
            if not isinstance(rec, dict) or "id" not in rec or "decision" not in rec:
                raise ValueError(f"{path}:{lineno}: not an output record")
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
