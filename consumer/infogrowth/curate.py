"""The file runner behind ``infogrowth curate``: inputs → Curator → three outputs (JSONL or
Parquet, local or remote) + report."""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infogrowth.config import ImageMode, Settings, redacted_settings
from infogrowth.files import OutputFormat, open_outputs, settings_inputs, write_json_atomic
from infogrowth.locations import Location, OutputDir
from infogrowth.messages import output_record
from infogrowth.models import CaptionerLike, EncoderLike, build_models
from infogrowth.pipeline import Curator
from infogrowth.schema import Malformed, Sample

log = logging.getLogger(__name__)


@dataclass
class CurateResult:
    inputs: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    report: dict[str, Any] = field(default_factory=dict)


def _first_valid(items: Iterable[Sample | Malformed]) -> Sample | None:
    for it in items:
        if isinstance(it, Sample):
            return it
    return None


def _batches(items: Iterator[Sample | Malformed], size: int) -> Iterator[list[Sample | Malformed]]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk


def curate(
    settings: Settings,
    inputs: list[Location],
    out_dir: Location,
    *,
    seed: Location | None = None,
    include_images: ImageMode = "reference",
    progress: Callable[[int], None] | None = None,
    models: tuple[EncoderLike | None, CaptionerLike | None] | None = None,
    image_root: Path | None = None,
    fmt: OutputFormat = "jsonl",
) -> CurateResult:
    """Curate ``inputs`` into ``out_dir`` (a folder or a URL); returns counts and the report
    also written there.

    ``image_root`` confines image paths in JSONL lines and tables (default: each file's own
    folder); ``include_images``: image bytes (``True``), only ``image_uri`` or nothing."""
    target = OutputDir(out_dir, settings.storage)
    try:
        result = _curate(
            settings, inputs, target.local, seed, include_images, progress, models, image_root, fmt
        )
        result.report["out"] = str(out_dir)
        write_json_atomic(target.local / "report.json", result.report)
        target.publish()
    finally:
        target.close()
    return result


def _curate(
    settings: Settings,
    inputs: list[Location],
    out_dir: Path,
    seed: Location | None,
    include_images: ImageMode,
    progress: Callable[[int], None] | None,
    models: tuple[EncoderLike | None, CaptionerLike | None] | None,
    image_root: Path | None,
    fmt: OutputFormat,
) -> CurateResult:
    start = time.time()
    seed_items = list(settings_inputs(settings, [seed], image_root)) if seed else []
    probe = _first_valid(seed_items) or _first_valid(settings_inputs(settings, inputs, image_root))
    encoder, captioner = models if models is not None else build_models(settings, probe)
    cur = Curator(settings, encoder, captioner)
    seed_info: dict[str, Any] | None = None
    if seed_items:
        stats = cur.seed(seed_items)
        seed_info = {
            "file": str(seed),
            "items": len(seed_items),
            "indexed": cur.state.count if cur.state else 0,
            "malformed": len(cur.seed_rejected),
            "alignments": len(stats.alignments),
        }

    result = CurateResult()
    with open_outputs(out_dir, fmt) as writer:
        items = settings_inputs(settings, inputs, image_root)
        for batch in _batches(items, settings.select.batch_size):
            outcomes = cur.process(batch)
            assert cur.thresholds is not None or all(o.decision == "rejected" for o in outcomes)
            thresholds = cur.thresholds
            for o in outcomes:
                if thresholds is None:
                    from infogrowth.calibrate import resolve_thresholds

                    thresholds = resolve_thresholds(settings, (), None)
                writer.write(output_record(o, thresholds, include_image=include_images))
                result.decisions[o.decision] += 1
                result.reasons[f"{o.decision}/{o.reason}" if o.reason else o.decision] += 1
            result.inputs += len(batch)
            if progress is not None:
                progress(len(batch))
    elapsed = time.time() - start
    result.report = {
        "inputs": [str(p) for p in inputs],
        "samples": result.inputs,
        "decisions": dict(sorted(result.decisions.items())),
        "reasons": dict(sorted(result.reasons.items())),
        "thresholds": cur.report_thresholds(),
        "online": cur.report_online(),
        "calibration": cur.report_calibration(),
        "encoder": cur.embed.fingerprint if cur.embed.spaces else None,
        "spaces": cur.embed.dims,
        "index_size": cur.state.count if cur.state else 0,
        "seed": seed_info,
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(result.inputs / elapsed, 1) if elapsed > 0 else None,
        "stage_samples_per_s": cur.times.rates(),
        "stage_seconds": {k: round(v, 3) for k, v in cur.times.seconds.items()},
        "format": fmt,
        "config": redacted_settings(settings),
    }
    cur.embed.close()
    return result
