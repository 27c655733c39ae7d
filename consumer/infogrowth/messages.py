"""One home for each message shape: every schema kind (``schemas/*.json``) beside its dataclass
and its to/from-record functions, listed in :data:`KINDS`.

Records are plain dicts that :mod:`infogrowth.codec` encodes; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, cast

import numpy as np

from infogrowth.calibrate import Calibration
from infogrowth.config import ImageMode
from infogrowth.errors import DataError
from infogrowth.index import PartitionState
from infogrowth.schema import Embedded, Malformed, Sample, sample_from_obj, vector_from_bytes
from infogrowth.schema import vector_to_bytes as v2b
from infogrowth.select import Decision, Thresholds, Verdict


def source_key(source: dict[str, str | int] | None) -> str:
    """A stable identifier for an input position, used as the id of id-less malformed input."""
    if not source:
        return "@unknown"
    return "@" + ":".join(str(v) for v in source.values())


# -- ingest --------------------------------------------------------------------------------


def sample_record(sample: Sample) -> dict[str, Any]:
    """The ingest record of a sample (for `produce`); read back by ``schema.sample_from_obj``."""
    obj: dict[str, Any] = {"v": 1, "id": sample.id}
    if sample.text is not None:
        obj["text"] = sample.text
    if sample.image is not None:
        obj["image"] = sample.image
    if sample.image_uri is not None:
        obj["image_uri"] = sample.image_uri
    if sample.label is not None:
        obj["label"] = sample.label
    if sample.embedding is not None:
        obj["embedding"] = {k: [float(x) for x in v] for k, v in sample.embedding.items()}
    if sample.meta is not None:
        obj["meta"] = sample.meta
    return obj


# -- embedded and changelog ------------------------------------------------------------------


def embedded_record(e: Embedded, include_image: bool, epoch: int = 0) -> dict[str, Any]:
    """The embedded-topic record; image bytes only when the outputs will carry them."""
    return {
        "v": 1,
        "id": e.id,
        "text": e.text,
        "label": e.label,
        "image": e.image if include_image else None,
        "image_uri": e.image_uri,
        "meta": e.meta,
        "vectors": {s: v2b(v) for s, v in e.vectors.items()},
        "alignment": e.alignment,
        "original_alignment": e.original_alignment,
        "original_text": e.original_text,
        "original_label": e.original_label,
        "fix": e.fix,
        "cell": e.cell,
        "source": e.source,
        "epoch": epoch,
    }


def replica_record(e: Embedded, cell: int, epoch: int = 0) -> dict[str, Any]:
    """What the neighbouring cell's partition needs to index a kept item: id, label, vectors."""
    return {
        "v": 1,
        "id": e.id,
        "label": e.label,
        "vectors": {s: v2b(v) for s, v in e.vectors.items()},
        "cell": cell,
        "replica": True,
        "fix": e.fix,
        "epoch": epoch,
    }


def embedded_from_record(rec: dict[str, Any], dims: dict[str, int] | None) -> Embedded:
    """An embedded or changelog record's item; :class:`DataError` on wrong spaces, dims or
    NaN/Inf."""
    vecs = {
        s: vector_from_bytes(b, None if dims is None else dims.get(s))
        for s, b in rec["vectors"].items()
    }
    if dims is not None and set(vecs) != set(dims):
        raise DataError(f"vectors for {sorted(vecs)}, expected {sorted(dims)}")
    for s, v in vecs.items():
        if not np.all(np.isfinite(v)):
            raise DataError(f"vectors.{s}: NaN or Inf")
    return Embedded(
        id=rec["id"],
        vectors=vecs,
        text=rec.get("text"),
        label=rec.get("label"),
        image=rec.get("image"),
        meta=rec.get("meta"),
        alignment=rec.get("alignment"),
        original_alignment=rec.get("original_alignment"),
        original_text=rec.get("original_text"),
        original_label=rec.get("original_label"),
        fix=rec.get("fix"),
        cell=rec.get("cell", 0),
        source=rec.get("source"),
        image_uri=rec.get("image_uri"),
    )


def changelog_record(e: Embedded, epoch: int = 0, *, seed: bool = False) -> dict[str, Any]:
    """A kept item's changelog record (read back by :func:`embedded_from_record`)."""
    rec: dict[str, Any] = {
        "v": 1,
        "id": e.id,
        "label": e.label,
        "vectors": {s: v2b(v) for s, v in e.vectors.items()},
        "epoch": epoch,
    }
    if e.fix is not None:
        rec["fixed"] = True
    if seed:
        rec["seed"] = True
    return rec


def state_record(state: PartitionState, epoch: int = 0) -> dict[str, Any]:
    """A partition's online-state changelog record (under the state key)."""
    return {"v": 1, "state": state.online.as_record(), "epoch": epoch}


# -- thresholds and calibration ------------------------------------------------------------


def thresholds_record(t: Thresholds) -> dict[str, Any]:
    """The one encoding of thresholds, in output records and in the calibration."""
    return {
        "policy": t.policy,
        "k": t.k,
        "delta": t.delta,
        "epsilon": dict(t.epsilon),
        "epsilon_online": t.epsilon_online,
        "g_scale": t.g_scale,
        "keep_fraction": t.keep_fraction,
        "tau": t.tau,
        "seed": t.seed,
        "radius": t.radius,
        "vote_k": t.vote_k,
        "confidence": t.confidence,
        "reject_share": t.reject_share,
        "flag_share": t.flag_share,
        "vote_scale": t.vote_scale,
        "alignment_quartiles": list(t.alignment_quartiles) if t.alignment_quartiles else None,
    }


def thresholds_from_record(rec: dict[str, Any]) -> Thresholds:
    """Thresholds from :func:`thresholds_record`; also reads calibrations written before the
    coin seed's key was ``seed`` (they call it ``sample_seed``)."""
    quartiles = rec.get("alignment_quartiles")
    return Thresholds(
        policy=rec["policy"],
        k=int(rec["k"]),
        epsilon=dict(rec.get("epsilon") or {}),
        delta=rec.get("delta"),
        g_scale=rec.get("g_scale"),
        tau=rec.get("tau"),
        seed=int(rec.get("seed", rec.get("sample_seed", 0))),
        radius=rec.get("radius"),
        keep_fraction=rec.get("keep_fraction"),
        epsilon_online=bool(rec.get("epsilon_online", False)),
        vote_k=int(rec.get("vote_k", 10)),
        confidence=rec.get("confidence"),
        reject_share=rec.get("reject_share"),
        flag_share=rec.get("flag_share"),
        vote_scale=rec.get("vote_scale"),
        alignment_quartiles=(quartiles[0], quartiles[1], quartiles[2]) if quartiles else None,
    )


def calibration_record(cal: Calibration) -> dict[str, Any]:
    """The control topic's calibration record."""
    rec: dict[str, Any] = {"v": 1, "spaces": list(cal.spaces), "dims": dict(cal.dims)}
    rec.update(thresholds_record(cal.thresholds))
    rec.update(
        {
            "seed_count": cal.seed_count,
            "fingerprint": cal.fingerprint,
            "cells": cal.cells,
            "epoch": cal.epoch,
        }
    )
    return rec


def calibration_from_record(rec: dict[str, Any]) -> Calibration:
    return Calibration(
        thresholds=thresholds_from_record(rec),
        spaces=tuple(rec["spaces"]),
        dims={k: int(v) for k, v in rec["dims"].items()},
        seed_count=int(rec.get("seed_count", 0)),
        fingerprint=rec.get("fingerprint"),
        cells=rec.get("cells"),
        epoch=int(rec.get("epoch", 0)),
    )


# -- output ----------------------------------------------------------------------------------


T = TypeVar("T")


def _none() -> None:
    return None


class _Part(Generic[T]):
    """A read-only attribute of an outcome, read from its ``item`` or its ``verdict`` by the same
    name; ``empty()`` when the outcome has no such part."""

    def __init__(self, part: Literal["item", "verdict"], empty: Callable[[], T]) -> None:
        self.part, self.empty, self.name = part, empty, ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Outcome | None, owner: type | None = None) -> T:
        source = None if obj is None else getattr(obj, self.part)
        return self.empty() if source is None else cast(T, getattr(source, self.name))


@dataclass
class Outcome:
    """Final result for one input message, exactly one per message: the embedded sample it is
    about (None for malformed input) and, when the select stage decided it, the verdict."""

    id: str
    decision: Decision
    reason: str | None
    detail: str | None = None
    item: Embedded | None = None
    """The sample as it leaves: relabelled when the verdict relabels it."""
    verdict: Verdict | None = None
    payload: bytes | None = None
    source: dict[str, str | int] | None = None

    text = _Part[str | None]("item", _none)
    label = _Part[str | None]("item", _none)
    image = _Part[bytes | None]("item", _none)
    meta = _Part[dict[str, Any] | None]("item", _none)
    image_uri = _Part[str | None]("item", _none)
    original_text = _Part[str | None]("item", _none)
    original_label = _Part[str | None]("item", _none)
    alignment = _Part[float | None]("item", _none)
    original_alignment = _Part[float | None]("item", _none)
    gain = _Part[float | None]("verdict", _none)
    gain_by_space = _Part[dict[str, float | None]]("verdict", dict)
    nn_distance = _Part[dict[str, float | None]]("verdict", dict)
    keep_probability = _Part[float | None]("verdict", _none)
    keep_scale = _Part[float | None]("verdict", _none)
    duplicate_of = _Part[str | None]("verdict", _none)
    vote = _Part[dict[str, float] | None]("verdict", _none)

    @classmethod
    def malformed(cls, m: Malformed) -> Outcome:
        sid = m.id if m.id is not None else source_key(m.source)
        return cls(sid, "rejected", "malformed", m.detail, payload=m.payload, source=m.source)

    @classmethod
    def rejected(cls, e: Embedded, reason: str, detail: str) -> Outcome:
        return cls(e.id, "rejected", reason, detail, item=e, source=e.source)

    @classmethod
    def from_verdict(cls, v: Verdict) -> Outcome:
        e = v.result()
        return cls(e.id, v.decision, v.reason, v.detail, item=e, verdict=v, source=e.source)


def too_large(o: Outcome, what: str, size: int, limit: int) -> Outcome:
    """A trimmed ``rejected/too_large`` outcome in place of ``o``, whose record (``what``, of
    ``size`` bytes) would exceed the ``limit`` topics and producers accept.

    Only bounded fields survive (id, label, scores, source, image_uri): the image, meta, texts
    and the original bytes are dropped, so the record always fits and the input keeps its one
    output.
    """
    was = o.decision if o.reason is None else f"{o.decision}/{o.reason}"
    trimmed = Embedded(
        id=o.id,
        vectors={},
        label=o.label,
        alignment=o.alignment,
        original_alignment=o.original_alignment,
        image_uri=o.image_uri,
    )
    detail = f"{what} of {size} bytes exceeds the {limit}-byte record limit (was {was})"
    return Outcome(o.id, "rejected", "too_large", detail, item=trimmed, source=o.source)


def output_record(
    o: Outcome, thresholds: Thresholds, *, include_image: ImageMode, epoch: int | None = None
) -> dict[str, Any]:
    """The schema ``output`` record for an outcome. ``include_image``: ``True`` carries the
    image bytes and ``image_uri``, ``"reference"`` only ``image_uri``, ``False`` neither.
    ``epoch``: the calibration epoch it was decided under (None without one: the file runner).
    The trainer side reads it back as ``sampling.records.CuratedSample``."""
    return {
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
        "epoch": epoch,
        "duplicate_of": o.duplicate_of,
        "vote": o.vote,
        "alignment": o.alignment,
        "original_alignment": o.original_alignment,
        "thresholds": thresholds_record(thresholds),
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


@dataclass(frozen=True)
class Kind:
    """A schema kind: the dataclass its records carry and the functions between the two."""

    shape: type
    to_record: Callable[..., dict[str, Any]]
    from_record: Callable[..., Any] | None
    """None for ``output``: the product only writes it (the trainer reads it as
    ``sampling.records.CuratedSample``)."""


KINDS: dict[str, Kind] = {
    "ingest": Kind(Sample, sample_record, sample_from_obj),
    "embedded": Kind(Embedded, embedded_record, embedded_from_record),
    "changelog": Kind(Embedded, changelog_record, embedded_from_record),
    "calibration": Kind(Calibration, calibration_record, calibration_from_record),
    "output": Kind(Outcome, output_record, None),
}
"""Every schema kind in ``schemas/`` (the keys of ``schema.SCHEMA_FILES``) and its home here."""
