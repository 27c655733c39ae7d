"""The one output shape for accepted / relabeled / rejected, built from stage results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infogrowth.config import ImageMode
from infogrowth.schema import Embedded, Malformed
from infogrowth.select import Decision, Thresholds, Verdict


def source_key(source: dict[str, str | int] | None) -> str:
    """A stable identifier for an input position, used as the id of id-less malformed input."""
    if not source:
        return "@unknown"
    return "@" + ":".join(str(v) for v in source.values())


@dataclass
class Outcome:
    """Final result for one input message: exactly one per message."""

    id: str
    decision: Decision
    reason: str | None
    detail: str | None = None
    text: str | None = None
    label: str | None = None
    image: bytes | None = None
    meta: dict[str, Any] | None = None
    original_text: str | None = None
    original_label: str | None = None
    alignment: float | None = None
    original_alignment: float | None = None
    gain: float | None = None
    gain_by_space: dict[str, float | None] = field(default_factory=dict)
    nn_distance: dict[str, float | None] = field(default_factory=dict)
    keep_probability: float | None = None
    keep_scale: float | None = None
    duplicate_of: str | None = None
    vote: dict[str, float] | None = None
    payload: bytes | None = None
    source: dict[str, str | int] | None = None
    image_uri: str | None = None

    @classmethod
    def malformed(cls, m: Malformed) -> Outcome:
        return cls(
            id=m.id if m.id is not None else source_key(m.source),
            decision="rejected",
            reason="malformed",
            detail=m.detail,
            payload=m.payload,
            source=m.source,
        )

    @classmethod
    def rejected(cls, e: Embedded, reason: str, detail: str) -> Outcome:
        o = cls._from_embedded(e, "rejected", reason)
        o.detail = detail
        return o

    @classmethod
    def from_verdict(cls, v: Verdict) -> Outcome:
        o = cls._from_embedded(v.item, v.decision, v.reason)
        o.detail = v.detail
        o.gain = v.gain
        o.gain_by_space = v.gain_by_space
        o.nn_distance = v.nn_distance
        o.keep_probability = v.keep_probability
        o.keep_scale = v.keep_scale
        o.duplicate_of = v.duplicate_of
        o.vote = v.vote
        return o

    @classmethod
    def _from_embedded(cls, e: Embedded, decision: Decision, reason: str | None) -> Outcome:
        return cls(
            id=e.id,
            decision=decision,
            reason=reason,
            text=e.text,
            label=e.label,
            image=e.image,
            meta=e.meta,
            original_text=e.original_text,
            original_label=e.original_label,
            alignment=e.alignment,
            original_alignment=e.original_alignment,
            source=e.source,
            image_uri=e.image_uri,
        )


def too_large(o: Outcome, what: str, size: int, limit: int) -> Outcome:
    """A trimmed ``rejected/too_large`` outcome in place of ``o``, whose record (``what``, of
    ``size`` bytes) would exceed the ``limit`` topics and producers accept.

    Only bounded fields survive (id, label, scores, source, image_uri): the image, meta, texts
    and the original bytes are dropped, so the record always fits and the input keeps its one
    output.
    """
    was = o.decision if o.reason is None else f"{o.decision}/{o.reason}"
    return Outcome(
        id=o.id,
        decision="rejected",
        reason="too_large",
        detail=f"{what} of {size} bytes exceeds the {limit}-byte record limit (was {was})",
        label=o.label,
        alignment=o.alignment,
        original_alignment=o.original_alignment,
        source=o.source,
        image_uri=o.image_uri,
    )


def output_record(
    o: Outcome, thresholds: Thresholds, *, include_image: ImageMode
) -> dict[str, Any]:
    """The schema ``output`` record for an outcome. ``include_image``: ``True`` carries the
    image bytes and ``image_uri``, ``"reference"`` only ``image_uri``, ``False`` neither."""
    rec: dict[str, Any] = {
        "v": 1,
        "id": o.id,
        "decision": o.decision,
        "reason": o.reason,
        "detail": o.detail,
        "gain": o.gain,
        "gain_by_space": o.gain_by_space or None,
        "nn_distance": o.nn_distance or None,
        "keep_probability": o.keep_probability,
        "keep_scale": o.keep_scale,
        "duplicate_of": o.duplicate_of,
        "vote": o.vote,
        "alignment": o.alignment,
        "original_alignment": o.original_alignment,
        "thresholds": thresholds.as_record(),
        "text": o.text,
        "label": o.label,
        "original_text": o.original_text,
        "original_label": o.original_label,
        "meta": o.meta,
        "image": o.image if include_image is True else None,
        "image_uri": o.image_uri if include_image in (True, "reference") else None,
        "payload": o.payload,
        "source": o.source,
    }
    return rec
