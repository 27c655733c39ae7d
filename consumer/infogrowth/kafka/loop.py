"""The transactional consume → process → produce loop both stages run.

One fetch (up to ``commit_max_messages`` messages, waiting at most ``commit_interval_ms`` for
them, or ``commit_idle_ms`` of quiet once every partition read is at its end) is one Kafka
transaction: the batch's outputs, its changelog records and its input offsets commit
together or not at all. After an abort the consumer is rewound to the committed offsets and the
processor rebuilds its state before the next batch. Rebalance callbacks run inside ``consume()``,
so no transaction is ever open while partitions move.

A stateful processor's newly assigned partitions are paused in the assign callback and restored
in the main loop, in steps between ``consume()`` calls: the committed offsets are fetched first
(a zombie's pending transaction resolves before that fetch returns, so its changelog records are
in the restored state), then the state is rebuilt, then the partition is sought to those offsets
and resumed. A long restore therefore never stalls a cooperative rebalance, and a revoke during
the restore cancels it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from infogrowth.config import Settings
from infogrowth.kafka.clients import consumer_config, position, producer_config
from infogrowth.kafka.headers import Headers

log = logging.getLogger(__name__)
TXN_TIMEOUT_S = 30.0
LAG_INTERVAL_S = 2.0
MAX_ABORTS = 3
"""Aborts of a batch starting at the same offsets before it is bisected for a culprit."""
_COMMITTED_AGAIN = frozenset(
    {
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.NOT_COORDINATOR,
        KafkaError.UNSTABLE_OFFSET_COMMIT,
    }
)
"""Errors of a committed-offsets lookup that mean "not yet" rather than "never"."""
STUCK_PAUSE_S = 30.0
"""Wait before retrying a batch whose culprit could not be rejected either (unready meanwhile)."""
RESTORE_STEP_S = 0.2
"""Restore work done between two ``consume()`` calls while partitions restore."""
SEEK_TRIES = 50
PRODUCER_RESETS = 5
PRODUCER_RESET_WINDOW_S = 600.0
"""A producer that failed fatally is replaced at most this often per window; more is fatal."""
_FOR_GOOD = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
"""Fatal producer errors a new producer would meet again, or must not override: another
instance took over the transactional id (fenced), or the id is not authorised."""


@dataclass
class Output:
    """Produces into the open transaction and collects delivery reports."""

    producer: Producer
    errors: list[str] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    """Highest delivered offset per (topic, partition)."""
    first: dict[tuple[str, int], int] = field(default_factory=dict)
    """Lowest delivered offset per (topic, partition)."""
    count: int = 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")
            return
        t, p, o = position(msg)
        self.offsets[(t, p)] = max(self.offsets.get((t, p), -1), o)
        self.first[(t, p)] = min(self.first.get((t, p), o), o)

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"on_delivery": self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, **kwargs)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                self.producer.poll(0.05)
            except KafkaException as exc:
                raise _abortable(exc, self.producer) from exc
        self.count += 1


def _abortable(exc: KafkaException, producer: Producer) -> KafkaException:
    """A ``produce()`` error as the transaction's state makes it. A record the broker refused
    earlier in the transaction (too large for the topic, a missing ACL, a delivery timeout)
    puts the transaction in its must-abort state, and the next ``produce()`` raises an error
    that librdkafka flags neither abortable nor fatal (``_STATE``): it is flagged abortable
    here, so the loop aborts, retries and bisects to the culprit instead of ending the stage.
    A producer that failed for good (``_FATAL``: fenced, among others) stays fatal."""
    err = exc.args[0]
    if err.fatal() or err.txn_requires_abort() or err.code() == KafkaError._FATAL:
        return exc
    producer.poll(0)  # the delivery report that explains it, into ``Output.errors``
    return KafkaException(KafkaError(err.code(), f"produce: {err.str()}", txn_requires_abort=True))


class Processor(Protocol):
    """Stage logic plugged into :class:`TransactionalLoop`."""

    name: str
    stateful: bool
    """Whether assigned partitions are paused until :meth:`restore_step` reports them restored."""

    def on_assign(self, partitions: list[TopicPartition]) -> None: ...

    def on_revoke(self, partitions: list[TopicPartition]) -> None: ...

    def on_lost(self, partitions: list[TopicPartition]) -> None: ...

    def process(self, messages: list[Message], out: Output) -> None: ...

    def on_commit(self, out: Output) -> None: ...

    def maintain(self) -> list[int]:
        """Between batches (no transaction open): partitions whose state must be rebuilt now
        (a new calibration epoch, a gap in the changelog); the loop restores them."""
        ...

    def begin_restore(self, partition: int) -> None:
        """Start rebuilding ``partition`` (its committed input offsets are known by now)."""
        ...

    def restore_step(self, budget_s: float) -> list[int]:
        """Advance the restores for about ``budget_s`` seconds; the partitions finished."""
        ...

    def on_abort(self, partitions: list[TopicPartition]) -> None: ...

    def reject(self, message: Message, reason: str, detail: str, out: Output) -> None:
        """Produce one trimmed ``rejected`` record for ``message``, a batch's culprit that
        aborted every transaction it was in (nothing, if the message needs no output)."""
        ...

    def close(self) -> None: ...


class FatalStageError(RuntimeError):
    """The stage cannot continue (fenced, misconfigured); the process should exit."""


class StaleBatch(RuntimeError):
    """The batch holds messages of partitions this member no longer owns: abort, do not decide."""


class TransactionalLoop:
    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        *,
        group: str,
        topics: list[str],
        transactional_id: str,
        on_batch: Callable[[str, int, float, bool], None] | None = None,
        on_lag: Callable[[str, str, int, int], None] | None = None,
        on_step: Callable[[str, str, float], None] | None = None,
        on_backlog: Callable[[str, str, int, float | None], None] | None = None,
    ) -> None:
        """``on_lag(stage, topic, partition, messages)`` reports lag in messages;
        ``on_backlog(stage, topic, partition, ts)`` the timestamp (epoch seconds) of the oldest
        message not processed yet, None once the stage has reached the partition's end."""
        self.settings = settings
        self.processor = processor
        self.group = group
        self.topics = topics
        self.transactional_id = transactional_id
        self.on_batch = on_batch
        self.on_lag = on_lag
        self.on_step = on_step
        self.on_backlog = on_backlog
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self.last_progress = time.monotonic()
        self.last_processed = time.monotonic()
        self._last_lag = 0.0
        self.assigned: set[tuple[str, int]] = set()
        self.rebalances = 0
        """Assignment changes so far: a batch whose ``consume()`` saw one straddles a rebalance."""
        self.discarded = 0
        """Messages dropped because their partition was not (or no longer) owned."""
        self._streak: tuple[tuple[tuple[str, int, int], ...], int] = ((), 0)
        """(start offsets of the last aborted batch, consecutive aborts there)."""
        self.stuck: str | None = None
        """Why the stage cannot make progress (a culprit's rejection aborted too): unready."""
        self.culprits = 0
        """Messages rejected because every transaction holding them aborted."""
        self._last_error: str | None = None
        self.started = threading.Event()
        self.assigned_once = threading.Event()
        """Set after the first assignment (possibly empty)."""
        self.restoring: dict[tuple[str, int], int | None] = {}
        """Paused partitions being restored -> their committed offset (None until fetched)."""
        self.producer_resets: list[float] = []
        """When the producer was replaced after a fatal error (within the last window)."""
        self._at_end: set[tuple[str, int]] = set()
        """Partitions whose end the consumer reached (an EOF event after their last message)."""

    # -- rebalance callbacks (run inside consume) ---------------------------------------

    def _assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s: assigned %s", self.processor.name, _fmt(partitions))
        self.processor.on_assign(partitions)
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}
        self._at_end -= {(tp.topic, tp.partition) for tp in partitions}
        self.rebalances += bool(partitions)
        if partitions and self.processor.stateful:
            # Assign here (the client would right after this callback) so that the partitions
            # can be paused before a fetch starts; they are restored in the main loop.
            consumer.incremental_assign(partitions)
            self._queue_restore(partitions)
        self.assigned_once.set()

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s: revoked %s", self.processor.name, _fmt(partitions))
        self._unqueue(partitions)
        self.processor.on_revoke(partitions)
        self.assigned -= {(tp.topic, tp.partition) for tp in partitions}
        self._at_end -= {(tp.topic, tp.partition) for tp in partitions}
        self.rebalances += bool(partitions)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("%s: lost %s", self.processor.name, _fmt(partitions))
        self._unqueue(partitions)
        self.processor.on_lost(partitions)
        self.assigned -= {(tp.topic, tp.partition) for tp in partitions}
        self._at_end -= {(tp.topic, tp.partition) for tp in partitions}
        self.rebalances += bool(partitions)

    # -- restores (main loop, between batches) ------------------------------------------

    def _queue_restore(self, partitions: list[TopicPartition]) -> None:
        """Pause ``partitions`` and restore them before they are read again."""
        assert self.consumer is not None
        tps = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        self.consumer.pause(tps)
        for tp in tps:
            self.restoring[(tp.topic, tp.partition)] = None

    def _unqueue(self, partitions: list[TopicPartition]) -> None:
        cancelled = [tp for tp in partitions if (tp.topic, tp.partition) in self.restoring]
        for tp in cancelled:
            del self.restoring[(tp.topic, tp.partition)]
        if cancelled:
            log.info("%s: restore of %s cancelled", self.processor.name, _fmt(cancelled))

    def _maintain(self) -> None:
        """Rebuild what the processor asks for, then advance the restores in progress."""
        assert self.consumer is not None
        rebuild = set(self.processor.maintain())
        again = [(t, p) for t, p in self.assigned if p in rebuild]
        if again:
            self._queue_restore([TopicPartition(t, p) for t, p in sorted(again)])
        if not self.restoring:
            return
        unfetched = [TopicPartition(t, p) for (t, p), o in self.restoring.items() if o is None]
        if unfetched:
            # Committed offsets first: a read_committed fetch waits for pending transactional
            # offset commits (a zombie's), whose changelog records the restore must then see.
            committed = self._committed(unfetched)
            for tp in committed:
                self.restoring[(tp.topic, tp.partition)] = tp.offset
                self.processor.begin_restore(tp.partition)
        for p in self.processor.restore_step(RESTORE_STEP_S):
            key = next(((t, q) for t, q in self.restoring if q == p), None)
            if key is None:
                continue
            offset = self.restoring.pop(key)
            start = offset if offset is not None and offset >= 0 else -2  # -2: the beginning
            self._seek(TopicPartition(key[0], p, start))
            self.consumer.resume([TopicPartition(key[0], p)])
            log.info("%s: %s[%d] restored; resumed at %s", self.processor.name, key[0], p, offset)

    def _committed(
        self, parts: list[TopicPartition], what: str = "committed"
    ) -> list[TopicPartition]:
        """The group's committed offsets of ``parts``. A read_committed lookup waits for offsets
        a transaction left pending (a member killed between sending its offsets and its commit),
        which only the coordinator's abort at ``kafka.transaction_timeout_ms`` ends; so a
        timeout, an unreachable coordinator or a partition's own error is asked again, for up
        to twice that, before it ends the stage."""
        assert self.consumer is not None
        deadline = time.monotonic() + 2 * self.settings.kafka.transaction_timeout_ms / 1000.0
        delay = 0.5
        while True:
            try:
                got = self.consumer.committed(parts, timeout=TXN_TIMEOUT_S)
                failed = next((tp.error for tp in got if tp.error is not None), None)
                if failed is not None:
                    raise KafkaException(failed)
                return list(got)
            except KafkaException as exc:
                err = exc.args[0]
                transient = err.retriable() or err.code() in _COMMITTED_AGAIN
                if err.fatal() or not transient or time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: %s lookup again: %s", self.processor.name, what, err)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _seek(self, tp: TopicPartition) -> None:
        """Seek, waiting out the moment right after an assignment when the client refuses."""
        assert self.consumer is not None
        self._at_end.discard((tp.topic, tp.partition))
        for attempt in range(SEEK_TRIES):
            try:
                self.consumer.seek(tp)
                return
            except KafkaException as exc:
                if attempt == SEEK_TRIES - 1:
                    raise FatalStageError(
                        f"{self.processor.name}: seek {tp} failed: {exc}"
                    ) from exc
                time.sleep(0.1)

    # -- main loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        k = self.settings.kafka
        self._new_producer(stop)
        # Partition EOF events say when the stage has caught up (lag 0, nothing waiting).
        conf = consumer_config(self.settings, self.group, **{"enable.partition.eof": True})
        self.consumer = Consumer(conf)
        self.consumer.subscribe(
            self.topics, on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost
        )
        self.started.set()
        try:
            while not stop.is_set():
                self._maintain()
                generation = self.rebalances
                wait = 0.0 if self.restoring else k.commit_interval_ms / 1000.0
                msgs = self._fetch(wait)
                ends = self._note_backlog(msgs)
                batch = self._owned([m for m in msgs if self._keep(m)], generation)
                self.last_progress = time.monotonic()
                if batch:
                    self._run_batch(batch, stop)
                    self._report_lag(batch)
                    self.last_processed = time.monotonic()
                if not self._streak[1]:  # nothing aborted: what was fetched is processed
                    self._caught_up(ends)
        except BaseException:
            self._shutdown(clean=False)
            raise
        self._shutdown(clean=True)

    def _fetch(self, wait: float) -> list[Message]:
        """The next batch: up to ``commit_max_messages`` messages, waiting at most ``wait``
        seconds for it to fill. Once every partition read is at its end and nothing new came
        for ``commit_idle_ms``, a partial batch is taken at once: the end of a burst commits
        within tens of milliseconds instead of lingering for ``commit_interval_ms``, while a
        steady trickle still gathers into batches. Batch boundaries never change decisions
        (batched == sequential), only how many transactions carry them. A rebalance ends the
        fetch at once: its batch is discarded anyway (:meth:`_owned`), and new partitions'
        restores should start now, not after ``commit_interval_ms``."""
        assert self.consumer is not None
        k = self.settings.kafka
        want = k.commit_max_messages
        generation = self.rebalances
        msgs = self.consumer.consume(want, 0.0)  # what the client has fetched already
        got = self._track_ends(msgs)
        deadline = time.monotonic() + wait
        idle = k.commit_idle_ms / 1000.0
        quiet = False
        while got < want and self.rebalances == generation:
            left = deadline - time.monotonic()
            # The client counts its timeout in whole milliseconds: less is no wait at all.
            if left < 0.001 or (got and quiet and self._all_at_end()):
                break
            more = self.consumer.consume(want - got, min(idle, left))
            n = self._track_ends(more)
            msgs.extend(more)
            got += n
            quiet = n == 0
        return msgs

    def _track_ends(self, msgs: list[Message]) -> int:
        """Note partitions reaching (EOF event) or leaving (a message) their end, in order;
        the number of messages that are not events or errors."""
        n = 0
        for m in msgs:
            err, t, p = m.error(), m.topic(), m.partition()
            n += err is None
            if t is None or p is None:
                continue
            if err is None:
                self._at_end.discard((t, p))
            elif err.code() == KafkaError._PARTITION_EOF:
                self._at_end.add((t, p))
        return n

    def _all_at_end(self) -> bool:
        """Every partition this member reads (assigned, not restoring) is at its end."""
        reading = self.assigned - self.restoring.keys()
        return bool(reading) and reading <= self._at_end

    def _keep(self, m: Message) -> bool:
        err = m.error()
        if err is None:
            return True
        if err.code() == KafkaError._PARTITION_EOF:
            return False
        if err.fatal():
            raise FatalStageError(f"{self.processor.name}: fatal consumer error: {err}")
        log.warning("%s: consumer error: %s", self.processor.name, err)
        return False

    def _owned(self, batch: list[Message], generation: int) -> list[Message]:
        """The batch, if every message belongs to a partition this member owns and no
        rebalance ran inside the ``consume()`` that returned it; else nothing.

        Messages fetched before an incremental revoke can come back from the same ``consume()``,
        and the group coordinator accepts a transactional offset commit for a partition the
        member no longer owns (it checks member and generation only): the old and the new owner
        would both produce the range. A straddling batch is discarded whole and the partitions
        it read that are still owned are rewound to their committed offsets.
        """
        if not batch:
            return batch
        if self.rebalances != generation:
            parts = sorted({position(m)[:2] for m in batch} & self.assigned)
            log.info(
                "%s: batch of %d straddles a rebalance: discarded, rewinding %s",
                self.processor.name,
                len(batch),
                _fmt([TopicPartition(t, p) for t, p in parts]),
            )
            self.discarded += len(batch)
            self._rewind([TopicPartition(t, p) for t, p in parts])
            return []
        # A restoring partition's messages were fetched before its pause; it is sought back to
        # its committed offset once restored, so they come again.
        kept = [
            m
            for m in batch
            if position(m)[:2] in self.assigned and position(m)[:2] not in self.restoring
        ]
        if len(kept) < len(batch):
            log.warning(
                "%s: dropped %d messages of partitions not assigned to this member or restoring",
                self.processor.name,
                len(batch) - len(kept),
            )
            self.discarded += len(batch) - len(kept)
        return kept

    def _run_batch(self, batch: list[Message], stop: threading.Event) -> None:
        """One transaction for the batch; after :data:`MAX_ABORTS` aborts at the same start
        offsets, bisect it instead. A record the broker refuses for good (too large for the
        topic, a missing ACL) aborts its transaction on every retry; without this the batch
        would come back forever while the process looks healthy."""
        key = _starts(batch)
        last, aborts = self._streak
        if key == last and aborts >= MAX_ABORTS:
            log.error(
                "%s: batch at %s aborted %d times; bisecting it for the culprit",
                self.processor.name,
                _fmt_starts(key),
                aborts,
            )
            self._bisect(batch, stop)
            self._rewind(_parts(batch, self.assigned))  # resume after what committed
            if self.stuck is None:
                self._streak = ((), 0)
            return
        status = self._transact(batch, stop)
        if status == "aborted":
            self._streak = (key, aborts + 1 if key == last else 1)
        elif status == "committed":
            self._streak = ((), 0)
            self.stuck = None

    def _try(
        self, piece: list[Message], stop: threading.Event, reject: tuple[str, str] | None = None
    ) -> tuple[str, list[str]]:
        """:meth:`_transact`, again up to :data:`MAX_ABORTS` times while it aborts (the first
        transaction after an abort can fail on its own, e.g. while the coordinator is looked
        up); the last status and the errors of the aborts."""
        errors: list[str] = []
        for attempt in range(MAX_ABORTS):
            status = self._transact(piece, stop, reject)
            if status != "aborted":
                return status, errors
            errors.append(self._last_error or "unknown error")
            if stop.wait(0.2 * (attempt + 1)):
                break
        return "aborted", errors

    def _bisect(self, batch: list[Message], stop: threading.Event) -> bool:
        """Commit the batch in halves, down to the single message that still aborts, which is
        rejected instead; False if that fails too (the stage is then stuck and unready) or the
        stage is stopping. The consumer must be rewound afterwards."""
        if stop.is_set():
            return False
        mid = len(batch) // 2
        for half in (batch[:mid], batch[mid:]) if len(batch) > 1 else (batch,):
            status, errors = self._try(half, stop)
            if status == "stale" or stop.is_set():
                return False
            if status == "aborted":
                ok = self._reject_culprit(half[0], errors, stop) if len(half) == 1 else None
                if ok is False or (ok is None and not self._bisect(half, stop)):
                    return False
        return True

    def _reject_culprit(self, m: Message, errors: list[str], stop: threading.Event) -> bool:
        """Reject the message every transaction of which aborted (``errors``)."""
        too_large = any("MSG_SIZE_TOO_LARGE" in e for e in errors)
        reason = "too_large" if too_large else "unproducible"
        err = errors[-1] if errors else "unknown error"
        if too_large:
            err = next(e for e in errors if "MSG_SIZE_TOO_LARGE" in e)
        t, p, o = position(m)
        detail = f"every transaction holding it aborted: {err}"[:1000]
        status, _ = self._try([m], stop, reject=(reason, detail))
        if status == "committed":
            self.culprits += 1
            log.error("%s: %s[%d]@%d rejected as %s: %s", self.processor.name, t, p, o, reason, err)
            return True
        if status == "aborted":
            self.stuck = (
                f"{self.processor.name}: cannot produce for {t}[{p}]@{o}, not even its "
                f"rejection: {self._last_error}"
            )
            log.error("%s; unready, retrying in %.0f s", self.stuck, STUCK_PAUSE_S)
            stop.wait(STUCK_PAUSE_S)
        return False

    def _transact(
        self,
        batch: list[Message],
        stop: threading.Event,
        reject: tuple[str, str] | None = None,
    ) -> str:
        """One transaction: "committed", "aborted" (a Kafka error that requires an abort) or
        "stale" (a rebalance overtook the batch). With ``reject``, the single message of the
        batch is rejected (reason, detail) instead of processed."""
        assert self.producer is not None and self.consumer is not None
        t0 = time.perf_counter()
        producer = self.producer
        out = Output(producer)
        offsets: dict[tuple[str, int], int] = {}
        for m in batch:
            t, p, o = position(m)
            offsets[(t, p)] = max(offsets.get((t, p), -1), o)
        try:
            producer.begin_transaction()
            if reject is None:
                self.processor.process(batch, out)
            else:
                self.processor.reject(batch[0], reject[0], reject[1], out)
            producer.poll(0)
            t1 = time.perf_counter()
            tps = [TopicPartition(t, p, o + 1) for (t, p), o in sorted(offsets.items())]
            consumer = self.consumer
            self._retriable(
                lambda: producer.send_offsets_to_transaction(
                    tps, consumer.consumer_group_metadata(), TXN_TIMEOUT_S
                ),
                "send offsets",
            )
            self._retriable(lambda: producer.commit_transaction(TXN_TIMEOUT_S), "commit")
            if self.on_step:
                name = self.processor.name
                self.on_step(name, name, t1 - t0)
                self.on_step(name, "commit", time.perf_counter() - t1)
            if out.errors:  # commit succeeded only if every delivery did; keep it loud anyway
                raise FatalStageError(f"delivery errors after commit: {out.errors[:3]}")
        except KafkaException as exc:
            err = exc.args[0]
            recoverable = err.fatal() and _replaceable(err)
            if not recoverable and (err.fatal() or not err.txn_requires_abort()):
                raise FatalStageError(f"{self.processor.name}: transaction failed: {err}") from exc
            self._last_error = "; ".join([str(err), *out.errors[:3]])
            log.warning("%s: aborting transaction: %s", self.processor.name, self._last_error)
            self._abort(offsets, stop, fatal=exc if recoverable else None)
            if self.on_batch:
                self.on_batch(self.processor.name, len(batch), time.perf_counter() - t0, False)
            return "aborted"
        except FatalStageError:
            raise
        except StaleBatch as exc:
            log.warning("%s: %s; aborting the transaction", self.processor.name, exc)
            self._abort(offsets, stop)
            return "stale"
        except Exception:
            log.exception("%s: processing failed; aborting the transaction", self.processor.name)
            self._abort(offsets, stop)
            raise
        self.processor.on_commit(out)
        if self.on_batch:
            self.on_batch(self.processor.name, len(batch), time.perf_counter() - t0, True)
        return "committed"

    def _retriable(self, fn: Callable[[], None], what: str) -> None:
        """Call a transactional API again while its error is retriable (e.g. a broker bounce);
        abortable and fatal errors propagate."""
        delay = 0.5
        while True:
            try:
                fn()
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() or err.txn_requires_abort() or err.fatal():
                    raise
                log.warning("%s: %s retry: %s", self.processor.name, what, err)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _abort(
        self,
        offsets: dict[tuple[str, int], int],
        stop: threading.Event,
        fatal: KafkaException | None = None,
    ) -> None:
        """Abort the open transaction, rewind its partitions and roll the processor back.

        A producer that failed fatally (``fatal``, or the abort itself failing so) cannot abort:
        it is replaced, and the new producer's ``init_transactions`` under the same
        transactional id bumps the epoch, which aborts what the old one left open. This happens
        when the broker was away longer than the transaction timeout: the coordinator aborted
        the transaction itself and the producer's end-transaction call is refused as
        ``INVALID_TXN_STATE``."""
        assert self.producer is not None and self.consumer is not None
        if fatal is None:
            try:
                self._retry(lambda: self.producer.abort_transaction(TXN_TIMEOUT_S), stop, "abort")  # type: ignore[union-attr]
            except FatalStageError as exc:
                cause = exc.__cause__
                if not (
                    isinstance(cause, KafkaException)
                    and cause.args[0].fatal()
                    and _replaceable(cause.args[0])
                ):
                    raise
                fatal = cause
        if fatal is not None:
            self._replace_producer(fatal, stop)
        parts = [TopicPartition(t, p) for (t, p) in offsets if (t, p) in self.assigned]
        self._rewind(parts)
        self.processor.on_abort(parts)

    def _new_producer(self, stop: threading.Event) -> None:
        self.producer = Producer(producer_config(self.settings, self.transactional_id))
        self._retry(lambda: self.producer.init_transactions(TXN_TIMEOUT_S), stop, "init")  # type: ignore[union-attr]

    def _replace_producer(self, exc: KafkaException, stop: threading.Event) -> None:
        """Drop a producer that failed fatally and start another with the same transactional
        id; more than :data:`PRODUCER_RESETS` replacements within
        :data:`PRODUCER_RESET_WINDOW_S` end the stage (something is wrong for good)."""
        now = time.monotonic()
        recent = [t for t in self.producer_resets if now - t < PRODUCER_RESET_WINDOW_S]
        self.producer_resets = [*recent, now]
        name = self.processor.name
        if len(self.producer_resets) > PRODUCER_RESETS:
            raise FatalStageError(
                f"{name}: producer failed fatally {len(self.producer_resets)} times in "
                f"{PRODUCER_RESET_WINDOW_S:.0f} s; last: {exc.args[0]}"
            ) from exc
        log.warning("%s: producer failed fatally (%s); replacing it", name, exc.args[0])
        old, self.producer = self.producer, None
        if old is not None:
            # Undelivered records of a transaction that will never commit; a producer in this
            # state may refuse even that, and the new one's init_transactions aborts it anyway.
            with contextlib.suppress(KafkaException, RuntimeError):
                old.purge()
        del old
        self._new_producer(stop)

    def _rewind(self, parts: list[TopicPartition]) -> None:
        """Seek to the committed offsets so the aborted batch is consumed again."""
        assert self.consumer is not None
        if not parts:
            return
        for tp in self._committed(parts, "rewind"):
            offset = tp.offset if tp.offset >= 0 else -2  # OFFSET_BEGINNING
            self._at_end.discard((tp.topic, tp.partition))
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))

    def _retry(self, fn: Callable[[], None], stop: threading.Event, what: str) -> None:
        delay = 0.5
        deadline = time.monotonic() + self.settings.kafka.transaction_timeout_ms / 1000.0 * 2
        while True:
            try:
                fn()
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() or time.monotonic() > deadline:
                    raise FatalStageError(f"{self.processor.name}: {what} failed: {err}") from exc
                log.warning("%s: %s retry: %s", self.processor.name, what, err)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _report_lag(self, batch: list[Message]) -> None:
        # Watermark lookups cost tens of ms: report lag every few seconds, not every batch.
        if self.on_lag is None or self.consumer is None:
            return
        now = time.monotonic()
        if now - self._last_lag < LAG_INTERVAL_S:
            return
        self._last_lag = now
        seen = {(t, p): o for t, p, o in map(position, batch)}
        for (t, p), off in seen.items():
            try:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                self.on_lag(self.processor.name, t, p, max(0, high - off - 1))

    def _note_backlog(self, msgs: list[Message]) -> set[tuple[str, int]]:
        """Report the oldest waiting message per partition (the first of each in a fetched
        batch: everything before it is processed); return the partitions at their end."""
        ends: set[tuple[str, int]] = set()
        first: dict[tuple[str, int], float] = {}
        for m in msgs:
            t, p = m.topic(), m.partition()
            if t is None or p is None:
                continue
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    ends.add((t, p))
                continue
            kind, ms = m.timestamp()
            if (t, p) not in first and kind != TIMESTAMP_NOT_AVAILABLE and ms > 0:
                first[(t, p)] = ms / 1000.0
        if self.on_backlog is not None:
            for (t, p), ts in first.items():
                if (t, p) in self.assigned:
                    self.on_backlog(self.processor.name, t, p, ts)
        return ends

    def _caught_up(self, ends: set[tuple[str, int]]) -> None:
        """Partitions whose end the consumer reached, their fetched messages processed."""
        for t, p in sorted(ends & self.assigned):
            if self.on_backlog is not None:
                self.on_backlog(self.processor.name, t, p, None)
            if self.on_lag is not None:
                self.on_lag(self.processor.name, t, p, 0)

    def _shutdown(self, clean: bool) -> None:
        """Close the processor (it snapshots only committed state), leave the group and
        destroy the clients.

        After an error the producer is not flushed: whatever it still holds belongs to a
        transaction that never committed, and a fenced producer raises from every call.
        """
        try:
            self.processor.close()
        finally:
            if self.consumer is not None:
                self.consumer.close()  # leaves the group: revoke callbacks run here
            if self.producer is not None and clean:
                self.producer.flush(5)
            # Release the clients now: a handle kept alive (by whoever holds this loop) keeps
            # reconnecting, and logs connection errors once the brokers go away.
            self.consumer = None
            self.producer = None


def _replaceable(err: KafkaError) -> bool:
    """A fatal producer error a new producer with the same transactional id recovers from."""
    return bool(err.code() not in _FOR_GOOD)


def _starts(batch: list[Message]) -> tuple[tuple[str, int, int], ...]:
    """The first offset of each partition in the batch (where it resumes after an abort)."""
    first: dict[tuple[str, int], int] = {}
    for m in batch:
        t, p, o = position(m)
        first[(t, p)] = min(first.get((t, p), o), o)
    return tuple(sorted((t, p, o) for (t, p), o in first.items()))


def _fmt_starts(starts: tuple[tuple[str, int, int], ...]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for t, p, o in starts)


def _parts(batch: list[Message], assigned: set[tuple[str, int]]) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t, p in sorted({position(m)[:2] for m in batch} & assigned)]


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "-"
