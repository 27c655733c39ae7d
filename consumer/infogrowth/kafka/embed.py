"""Embed stage on Kafka: ingest → decode, validate, embed, clean → embedded (by cell) | rejected."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from confluent_kafka import Message, TopicPartition

from infogrowth.cells import Cells, random_centroids
from infogrowth.config import Settings
from infogrowth.kafka.clients import fits, record_limit, source_of
from infogrowth.kafka.loop import Output
from infogrowth.pipeline import EmbedStage
from infogrowth.records import Outcome, output_record, source_key, too_large
from infogrowth.schema import Embedded, Malformed, Sample, pack, parse_msgpack_sample
from infogrowth.schema import vector_to_bytes as v2b
from infogrowth.select import Thresholds

log = logging.getLogger(__name__)
DECISION_HEADROOM = 16 * 1024
"""Bytes an embedded record must leave free under the record limit for what the select stage
adds to its output record (gains, thresholds, vote), so a record that passes here fits there."""
DELAY_ENV = "INFOGROWTH_TESTING_EMBED_DELAY_S"
"""Testing aid, not a setting: seconds the embed stage sleeps in every batch, inside its
transaction (a slow encoder), so that chaos tests land rebalances mid-batch. Unset in production."""


def delay_from_env() -> float:
    """:data:`DELAY_ENV` as seconds (0 when unset); a value that is not a finite number >= 0
    fails fast, naming the variable."""
    raw = os.environ.get(DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{DELAY_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def embedded_record(e: Embedded, include_image: bool) -> dict[str, Any]:
    return {
        "v": 1,
        "id": e.id,
        "text": e.text,
        "label": e.label,
        "image": e.image if include_image else None,
        "meta": e.meta,
        "vectors": {s: v2b(v) for s, v in e.vectors.items()},
        "alignment": e.alignment,
        "original_alignment": e.original_alignment,
        "original_text": e.original_text,
        "original_label": e.original_label,
        "fix": e.fix,
        "cell": e.cell,
        "source": e.source,
    }


class EmbedProcessor:
    """Stateless: nothing to restore on assign, nothing to rebuild after an abort."""

    name = "embed"

    def __init__(
        self,
        settings: Settings,
        stage: EmbedStage,
        thresholds: Thresholds,
        cells: Cells | None,
        partitions: int,
        metrics: Any = None,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self.thresholds = thresholds
        self.cells = cells
        self.partitions = partitions
        self.metrics = metrics
        self.topics = settings.kafka.topics
        self.include_image = settings.outputs_include_image
        stage.router = self._route
        self.delay_s = delay_from_env()
        if self.delay_s:
            log.warning("testing aid %s: every embed batch sleeps %.3f s", DELAY_ENV, self.delay_s)
        self.pending = 0
        self.committed_outputs = 0
        """Rejections this stage committed (its other results are the select stage's input)."""

    def _route(self, e: Embedded) -> int:
        if self.partitions <= 1:
            return 0
        if self.cells is None:
            spaces: tuple[str, ...] = tuple(s for s in ("image", "text") if s in e.vectors)
            dims: dict[str, int] = {s: int(e.vectors[s].shape[0]) for s in spaces}
            n_cells = self.settings.kafka.cells or self.partitions
            self.cells = random_centroids(spaces, dims, n_cells)
        return self.cells.route(e.vectors) % self.partitions

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        pass

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        pass

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        pass

    def on_abort(self, partitions: list[TopicPartition]) -> None:
        self.pending = 0

    def on_commit(self, out: Output) -> None:
        self.committed_outputs += self.pending
        self.pending = 0

    def close(self) -> None:
        pass

    def reject(self, message: Message, reason: str, detail: str, out: Output) -> None:
        """A trimmed rejection for an ingest message that no transaction could carry."""
        src = source_of(message)
        value = message.value()
        parsed = None if value is None else parse_msgpack_sample(value, self.settings.limits, src)
        sid = parsed.id if parsed is not None and parsed.id else source_key(src)
        o = Outcome(id=sid, decision="rejected", reason=reason, detail=detail, source=src)
        self.pending += 1
        rec = output_record(o, self.thresholds, include_image=False)
        out.produce(self.topics.rejected, pack("output", rec), key=sid.encode())

    def process(self, messages: list[Message], out: Output) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        lim = self.settings.limits
        items: list[Sample | Malformed] = []
        for m in messages:
            value = m.value()
            src = source_of(m)
            if value is None:
                items.append(Malformed(None, "empty message (null value)", b"", src))
            else:
                items.append(parse_msgpack_sample(value, lim, src))
        results = self.stage.process(items)
        rejected: list[Outcome] = []
        limit = record_limit(lim)
        for r in results:
            if isinstance(r, Embedded):
                value = pack("embedded", embedded_record(r, include_image=True), check=False)
                key = str(r.cell).encode()
                if fits(lim, value, key, DECISION_HEADROOM):
                    out.produce(
                        self.topics.embedded, value, key=key, partition=r.cell % self.partitions
                    )
                    continue
                # Produced, the broker would refuse it and abort the batch on every retry.
                r = too_large(Outcome.rejected(r, "", ""), "embedded record", len(value), limit)
            rejected.append(r)
            self.pending += 1
            rec = output_record(r, self.thresholds, include_image=self.include_image)
            value = pack("output", rec)
            if not fits(lim, value, r.id.encode()):
                rec = output_record(
                    too_large(r, "output record", len(value), limit),
                    self.thresholds,
                    include_image=False,
                )
                value = pack("output", rec)
            out.produce(self.topics.rejected, value, key=r.id.encode())
        if self.metrics is not None:
            self.metrics.observe_outcomes(
                "embed", [(o.decision, o.reason, o.gain, o.alignment) for o in rejected]
            )
