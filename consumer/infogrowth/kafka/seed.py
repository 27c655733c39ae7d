"""``infogrowth seed``: calibrate on a seed file, publish the calibration and seed the changelog."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from confluent_kafka import Producer

from infogrowth.calibrate import Calibration
from infogrowth.cells import Cells, kmeans
from infogrowth.config import Settings
from infogrowth.files import settings_inputs
from infogrowth.kafka.clients import instance_id, producer_config
from infogrowth.kafka.control import CALIBRATION_KEY, read_calibration
from infogrowth.kafka.headers import record_headers
from infogrowth.kafka.select import replica_partitions
from infogrowth.locations import Location
from infogrowth.messages import calibration_record, changelog_record
from infogrowth.models import build_models
from infogrowth.pipeline import Curator
from infogrowth.schema import Sample, pack

log = logging.getLogger(__name__)


@dataclass
class SeedResult:
    calibration: Calibration
    items: int
    malformed: int
    per_partition: dict[int, int]


class CalibrationExists(ValueError):
    """The control topic already holds a calibration and ``reset`` was not asked for."""


def seed(
    settings: Settings, path: Location, *, reset: bool = False, image_root: Path | None = None
) -> SeedResult:
    """Calibrate on ``path``, publish the calibration and write the seed into the changelog.

    Image paths in JSONL lines are confined to ``image_root`` (default: the file's folder),
    as for ``curate`` and ``produce``: anything outside is a malformed seed item.

    Refuses when a calibration is already published, unless ``reset``. A reset publishes the
    next calibration epoch: its seed records carry the new epoch, running stages notice it on
    the control topic and change epoch cleanly (embed reloads thresholds and cells; select drops
    its state and rebuilds it from the new epoch's changelog records, so the old seed and the
    items kept under it no longer count; embedded records still in flight from the old epoch
    are rejected as ``stale_epoch``).
    """
    existing = read_calibration(settings)
    if not reset and existing is not None:
        raise CalibrationExists(
            f"{settings.kafka.topics.control} already holds a calibration (seed of "
            f"{existing.seed_count} items, epoch {existing.epoch}); pass --reset to replace "
            "it: a new calibration epoch, whose select state starts again from this seed"
        )
    epoch = existing.epoch + 1 if existing is not None else 1
    items = list(settings_inputs(settings, [path], image_root))
    probe = next((i for i in items if isinstance(i, Sample)), None)
    encoder, captioner = build_models(settings, probe)
    cur = Curator(settings, encoder, captioner)
    cur.seed(items)
    assert cur.thresholds is not None and cur.embed.spaces and cur.embed.dims
    spaces = cur.embed.spaces
    partitions = settings.kafka.topics.embedded_partitions
    n_cells = settings.kafka.cells or partitions
    seeds = cur.seed_items
    cells: Cells = kmeans(
        spaces, {s: np.stack([e.vectors[s] for e in seeds]) for s in spaces}, n_cells
    )
    cal = Calibration(
        thresholds=cur.thresholds,
        spaces=tuple(spaces),
        dims=dict(cur.embed.dims),
        seed_count=len(seeds),
        fingerprint=cur.embed.fingerprint,
        cells=cells.as_record(),
        epoch=epoch,
    )
    producer = Producer(
        producer_config(
            settings,
            f"{settings.kafka.transactional_id_prefix}-seed-{instance_id(settings)}",
        )
    )
    producer.init_transactions(60)
    producer.begin_transaction()
    errors: list[str] = []

    def on_delivery(err: object, msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    per_part: dict[int, int] = {}
    margin = settings.kafka.cells_replication_margin
    homes = [cells.route(e.vectors) % partitions for e in seeds]
    replicas: list[list[tuple[int, int]]] = [[] for _ in seeds]
    for p in sorted(set(homes)):  # boundary replicas, as the select stage sends them
        mine = [i for i, h in enumerate(homes) if h == p]
        got = replica_partitions(cells, [seeds[i] for i in mine], p, partitions, margin)
        for i, targets in zip(mine, got, strict=True):
            replicas[i] = targets
    for e, home, targets in zip(seeds, homes, replicas, strict=True):
        for p in [home, *(q for _, q in targets)]:
            per_part[p] = per_part.get(p, 0) + 1
            producer.produce(
                settings.kafka.topics.changelog,
                value=pack("changelog", changelog_record(e, seed=True, epoch=epoch)),
                key=e.id.encode(),
                partition=p,
                on_delivery=on_delivery,
                headers=record_headers("changelog"),
            )
            producer.poll(0)
    producer.produce(
        settings.kafka.topics.control,
        value=pack("calibration", calibration_record(cal)),
        key=CALIBRATION_KEY,
        partition=0,
        on_delivery=on_delivery,
        headers=record_headers("calibration"),
    )
    producer.commit_transaction(120)
    if errors:
        raise RuntimeError(f"seeding failed: {errors[:3]}")
    log.info("seeded %d items into %s (calibration epoch %d)", len(seeds), per_part, epoch)
    return SeedResult(cal, len(seeds), len(cur.seed_rejected), per_part)
