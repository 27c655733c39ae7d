"""Embed stage on Kafka: ingest → decode, validate, embed, clean → embedded (by cell) | rejected."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from confluent_kafka import Message, TopicPartition

from infogrowth.calibrate import Calibration
from infogrowth.cells import Cells, random_centroids
from infogrowth.codec import codec
from infogrowth.config import Settings
from infogrowth.errors import ConfigError
from infogrowth.kafka import headers
from infogrowth.kafka.clients import fits, record_limit, source_of
from infogrowth.kafka.control import ControlWatcher
from infogrowth.kafka.headers import record_headers, traceparent_of
from infogrowth.kafka.loop import FatalStageError, Output
from infogrowth.messages import Outcome, embedded_record, output_record, source_key, too_large
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import Embedded, Malformed, Sample, parse_msgpack_sample
from infogrowth.select import Thresholds

log = logging.getLogger(__name__)
EMBEDDED, OUTPUT = codec("embedded"), codec("output")
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
        raise ConfigError(f"{DELAY_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


class EmbedProcessor:
    """Stateless: nothing to restore on assign, nothing to rebuild after an abort. A new
    calibration epoch on the control topic only replaces its thresholds and cells."""

    name = "embed"
    stateful = False

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
        self.epoch = 0
        self.watcher: Any = None
        """The control topic's follower (a ControlWatcher), made on the first maintain()."""
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

    def maintain(self) -> list[int]:
        if self.watcher is None:
            self.watcher = ControlWatcher(self.settings)
        cal = self.watcher.poll()
        if cal is not None and cal.epoch != self.epoch:
            self.calibrate(cal)
        return []

    def calibrate(self, cal: Calibration) -> None:
        """Take up ``cal`` (its epoch, thresholds, layout and cells) between batches."""
        stage = self.stage
        if stage.encoder is not None and cal.fingerprint not in (None, stage.encoder.fingerprint):
            raise FatalStageError(
                f"calibration epoch {cal.epoch} was seeded with model {cal.fingerprint!r}, this "
                f"stage runs {stage.encoder.fingerprint!r}: restart it with that model"
            )
        log.warning("embed: calibration epoch %d -> %d: thresholds reloaded", self.epoch, cal.epoch)
        self.epoch = cal.epoch
        self.thresholds = cal.thresholds
        stage.calibrate(cal)
        n_cells = self.settings.kafka.cells or self.partitions
        self.cells = Cells.from_record(cal.cells, n_cells) if cal.cells else None

    def begin_restore(self, partition: int) -> None:
        pass

    def restore_step(self, budget_s: float) -> list[int]:
        return []

    def on_abort(self, partitions: list[TopicPartition]) -> None:
        self.pending = 0

    def on_commit(self, out: Output) -> None:
        self.committed_outputs += self.pending
        self.pending = 0

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None

    def reject(self, message: Message, reason: str, detail: str, out: Output) -> None:
        """A trimmed rejection for an ingest message that no transaction could carry."""
        src = source_of(message)
        value = message.value()
        parsed = None if value is None else parse_msgpack_sample(value, self.settings.limits, src)
        sid = parsed.id if parsed is not None and parsed.id else source_key(src)
        o = Outcome(id=sid, decision="rejected", reason=reason, detail=detail, source=src)
        self.pending += 1
        rec = output_record(o, self.thresholds, include_image=False, epoch=self.epoch)
        hdrs = record_headers(
            "output", decision="rejected", reason=reason, traceparent=traceparent_of(message)
        )
        out.produce(self.topics.rejected, OUTPUT.encode(rec), key=sid.encode(), headers=hdrs)

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
        for m, r in zip(messages, results, strict=True):
            trace = traceparent_of(m)
            if isinstance(r, Embedded):
                r.cell = self._route(r)
                rec = embedded_record(r, self.include_image is True, self.epoch)
                value = EMBEDDED.encode(rec, check=False)
                key = str(r.cell).encode()
                hdrs = record_headers("embedded", traceparent=trace)
                if fits(lim, value, key, DECISION_HEADROOM + headers.size(hdrs)):
                    out.produce(
                        self.topics.embedded,
                        value,
                        key=key,
                        partition=r.cell % self.partitions,
                        headers=hdrs,
                    )
                    continue
                # Produced, the broker would refuse it and abort the batch on every retry.
                r = too_large(Outcome.rejected(r, "", ""), "embedded record", len(value), limit)
            rejected.append(r)
            self.pending += 1
            if r.reason == "malformed" and self._dead_letter(m, r, out):
                continue
            self._reject(r, out, trace)
        if self.metrics is not None:
            self.metrics.observe_outcomes(
                "embed", [(o.decision, o.reason, o.gain, o.alignment) for o in rejected]
            )

    def _reject(self, r: Outcome, out: Output, trace: bytes | None) -> None:
        """The rejected record of ``r`` (trimmed to ``too_large`` if it would not fit)."""
        lim = self.settings.limits
        rec = output_record(r, self.thresholds, include_image=self.include_image, epoch=self.epoch)
        value = OUTPUT.encode(rec)
        if not fits(lim, value, r.id.encode()):
            r = too_large(r, "output record", len(value), record_limit(lim))
            value = OUTPUT.encode(
                output_record(r, self.thresholds, include_image=False, epoch=self.epoch)
            )
        hdrs = record_headers("output", decision=r.decision, reason=r.reason, traceparent=trace)
        out.produce(self.topics.rejected, value, key=r.id.encode(), headers=hdrs)

    def _dead_letter(self, m: Message, r: Outcome, out: Output) -> bool:
        """Send malformed input to the dead-letter topic (when one is configured): its original
        key, value and headers plus the error headers. False when there is no such topic or
        the record would not fit it (it is then rejected as usual)."""
        topic = self.topics.dead_letter
        if topic is None:
            return False
        value, key = m.value(), m.key()
        hdrs = headers.dead_letter_headers(
            m.headers(), reason="malformed", detail=r.detail or "", source=source_of(m)
        )
        if not fits(self.settings.limits, value or b"", key, headers.size(hdrs)):
            return False
        out.produce(topic, value, key=key, headers=hdrs)
        return True
