"""Prometheus metrics and the HTTP endpoint serving /metrics, /healthz and /readyz.

Every metric lives on a dedicated :class:`~prometheus_client.CollectorRegistry` owned by
:class:`Metrics` (never the global one), so several instances can coexist in one process. Names
carry the ``infogrowth_`` prefix and base units; labels are bounded (stage, decision, reason,
step, topic, partition, result, version), never per sample. ``/metrics`` answers in the
OpenMetrics format when the scraper asks for it (Accept header), else in Prometheus text.
With ``runtime=True`` the standard ``process_*`` and ``python_*`` families are added; nothing
else is exposed, in particular no configuration value.
"""

from __future__ import annotations

import http.client
import logging
import math
import socket
import sys
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from infogrowth import __version__

if TYPE_CHECKING:
    from infogrowth.online import OnlineState
    from infogrowth.select import Thresholds

__all__ = [
    "ALIGNMENT_BUCKETS",
    "GAIN_BUCKETS",
    "STEPS",
    "Check",
    "Metrics",
    "MetricsServer",
]

log = logging.getLogger(__name__)

STEPS: Final = frozenset({"decode", "embed", "clean", "select", "produce", "commit"})
"""Allowed values of the ``step`` label of ``infogrowth_stage_duration_seconds``."""

GAIN_BUCKETS: Final = tuple(round(0.1 * i, 1) for i in range(21))
"""0.0, 0.1, ..., 2.0: gains live in [0, 2] (chord distances between unit vectors)."""

ALIGNMENT_BUCKETS: Final = tuple(round(-1.0 + 0.1 * i, 1) for i in range(21))
"""-1.0, -0.9, ..., 1.0: cosine similarities."""

_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_STALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_RESTORE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

Check = Callable[[], tuple[bool, str]]
"""A health or readiness probe: ``(ok, reason)``."""


class _SnapshotAge:
    """Custom collector: ``infogrowth_snapshot_age_seconds{partition}``, computed at scrape."""

    NAME = "infogrowth_snapshot_age_seconds"
    HELP = "Seconds since the partition's last completed snapshot."

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._marks: dict[str, float] = {}

    def mark(self, partition: str, ts: float) -> None:
        with self._lock:
            self._marks[partition] = ts

    def drop(self, partition: str) -> None:
        with self._lock:
            self._marks.pop(partition, None)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["partition"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["partition"])
        now = self._clock()
        with self._lock:
            marks = sorted(self._marks.items())
        for partition, ts in marks:
            family.add_metric([partition], max(0.0, now - ts))
        yield family


class _LagAge:
    """Custom collector: ``infogrowth_consumer_lag_seconds{stage,topic,partition}``, the age of
    the oldest message a stage has not processed yet, computed at scrape (so it keeps growing
    while a stage is stuck); 0 once the stage has caught up with the partition."""

    NAME = "infogrowth_consumer_lag_seconds"
    HELP = "Age of the oldest message of the partition the stage has not processed (0: caught up)."
    LABELS: Final = ["stage", "topic", "partition"]

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._oldest: dict[tuple[str, str, str], float | None] = {}

    def set(self, key: tuple[str, str, str], ts: float | None) -> None:
        with self._lock:
            self._oldest[key] = ts

    def drop(self, partition: str, stage: str | None) -> None:
        with self._lock:
            for key in [k for k in self._oldest if k[2] == partition]:
                if stage is None or key[0] == stage:
                    del self._oldest[key]

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
        now = self._clock()
        with self._lock:
            items = sorted(self._oldest.items())
        for key, ts in items:
            family.add_metric(list(key), 0.0 if ts is None else max(0.0, now - ts))
        yield family


def _labelsets(metric: Gauge) -> list[dict[str, str]]:
    """The label sets a labelled gauge currently exports (public API only)."""
    return [dict(s.labels) for family in metric.collect() for s in family.samples]


class Metrics:
    """All InfoGrowth metrics on one private registry.

    The attributes are the raw prometheus_client objects; the methods are the common updates.
    ``clock`` (wall-clock seconds) drives the snapshot age and is injectable for tests.
    """

    def __init__(
        self,
        *,
        runtime: bool = True,
        version: str = __version__,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.samples: Counter = Counter(
            "infogrowth_samples",
            "Samples decided, by stage, decision and reason ('' when none).",
            ["stage", "decision", "reason"],
            registry=reg,
        )
        self.batch_duration: Histogram = Histogram(
            "infogrowth_batch_duration_seconds",
            "Wall time to process one batch, poll to commit.",
            ["stage"],
            buckets=_BATCH_BUCKETS,
            registry=reg,
        )
        self.stage_duration: Histogram = Histogram(
            "infogrowth_stage_duration_seconds",
            "Wall time of one step of a batch (decode|embed|clean|select|produce|commit).",
            ["stage", "step"],
            buckets=_STEP_BUCKETS,
            registry=reg,
        )
        self.gain: Histogram = Histogram(
            "infogrowth_gain",
            "Information gain of decided samples (distance units, [0, 2]).",
            buckets=GAIN_BUCKETS,
            registry=reg,
        )
        self.alignment: Histogram = Histogram(
            "infogrowth_alignment",
            "Image-text alignment (cosine, [-1, 1]) of decided samples.",
            buckets=ALIGNMENT_BUCKETS,
            registry=reg,
        )
        self.index_items: Gauge = Gauge(
            "infogrowth_index_items",
            "Items held in the partition's selection index.",
            ["partition"],
            registry=reg,
        )
        self.index_bytes: Gauge = Gauge(
            "infogrowth_index_bytes",
            "Estimated resident bytes of the partition's selection state (indexes, vector "
            "mirror, id map).",
            ["partition"],
            registry=reg,
        )
        self.memory_budget: Gauge = Gauge(
            "infogrowth_memory_budget_bytes",
            "Resident memory above which the process reports not ready (0: no budget).",
            registry=reg,
        )
        self.keep_rate: Gauge = Gauge(
            "infogrowth_keep_rate",
            "Share of the items reaching the keep policy that it kept (realised keep rate).",
            ["partition"],
            registry=reg,
        )
        self.keep_scale: Gauge = Gauge(
            "infogrowth_keep_scale",
            "Scale of the sample policy under select.keep_fraction (follows the stream).",
            ["partition"],
            registry=reg,
        )
        self.epsilon: Gauge = Gauge(
            "infogrowth_epsilon",
            "Duplicate floor ε in use per space (0: the floor is off): a cosine distance, or "
            "for the online estimate the ratio of the nearest to the reference neighbour's.",
            ["partition", "space"],
            registry=reg,
        )
        self.vote_rule: Gauge = Gauge(
            "infogrowth_vote_rule_enabled",
            "1 when the label-vote rule (relabel | reject) is on, 0 when the seed calibration "
            "switched it off; flag: 1 when only a label holding at most the flag share of the "
            "vote counts as wrong, 0 when being outvoted is enough.",
            ["rule"],
            registry=reg,
        )
        self.consumer_lag: Gauge = Gauge(
            "infogrowth_consumer_lag",
            "Messages between the consumer position and the partition's end offset.",
            ["stage", "topic", "partition"],
            registry=reg,
        )
        self._lag_age = _LagAge(clock)
        reg.register(self._lag_age)
        self.transactions: Counter = Counter(
            "infogrowth_transactions",
            "Kafka transactions ended, by result (committed|aborted).",
            ["stage", "result"],
            registry=reg,
        )
        self._snapshot_age = _SnapshotAge(clock)
        reg.register(self._snapshot_age)
        self.snapshot_duration: Histogram = Histogram(
            "infogrowth_snapshot_duration_seconds",
            "Wall time to write one partition snapshot (in the forked child, or in-process).",
            buckets=_SNAPSHOT_BUCKETS,
            registry=reg,
        )
        self.snapshot_stall: Histogram = Histogram(
            "infogrowth_snapshot_stall_seconds",
            "Time one partition snapshot held the partition's processing (the fork, or the "
            "whole write where snapshots are written in-process).",
            buckets=_STALL_BUCKETS,
            registry=reg,
        )
        self.snapshot_failures: Counter = Counter(
            "infogrowth_snapshot_failures",
            "Snapshots that failed or were abandoned (the previous snapshot stayed current).",
            registry=reg,
        )
        self.snapshot_bytes: Gauge = Gauge(
            "infogrowth_snapshot_bytes",
            "Size of the partition's last snapshot.",
            ["partition"],
            registry=reg,
        )
        self.restore_duration: Histogram = Histogram(
            "infogrowth_restore_duration_seconds",
            "Wall time to restore a partition (snapshot load plus changelog replay).",
            buckets=_RESTORE_BUCKETS,
            registry=reg,
        )
        self.replayed_items: Counter = Counter(
            "infogrowth_replayed_items",
            "Changelog items replayed into indexes during restores.",
            registry=reg,
        )
        self.restores: Counter = Counter(
            "infogrowth_restores",
            "Partition restores by where they started (local|remote snapshot, or changelog "
            "alone: no usable snapshot).",
            ["source"],
            registry=reg,
        )
        for source in ("local", "remote", "changelog"):
            self.restores.labels(source=source)
        self.snapshot_uploads: Counter = Counter(
            "infogrowth_snapshot_uploads",
            "Snapshot uploads to snapshot.remote that ended, by result (ok|failed).",
            ["result"],
            registry=reg,
        )
        for result in ("ok", "failed"):
            self.snapshot_uploads.labels(result=result)
        self.snapshot_upload_duration: Histogram = Histogram(
            "infogrowth_snapshot_upload_duration_seconds",
            "Wall time of one snapshot upload to snapshot.remote (on a background thread).",
            buckets=_RESTORE_BUCKETS,
            registry=reg,
        )
        self.cell_replicas: Counter = Counter(
            "infogrowth_cell_replicas",
            "Boundary replicas: kept items sent to a neighbouring cell's partition (sent), and "
            "replicas indexed by the partition that owns that cell (applied).",
            ["direction"],
            registry=reg,
        )
        for direction in ("sent", "applied"):  # known label values start at 0, not absent
            self.cell_replicas.labels(direction=direction)
        self.ready: Gauge = Gauge(
            "infogrowth_ready", "1 when the process is ready to serve, else 0.", registry=reg
        )
        self.build_info: Gauge = Gauge(
            "infogrowth_build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            registry=reg,
        )
        self.build_info.labels(version).set(1)
        if runtime:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
        self._ready_lock = threading.Lock()
        self._ready_state: tuple[bool, str] = (False, "starting")

    # ------------------------------------------------------------------ updates

    def observe_outcomes(
        self,
        stage: str,
        outcomes: Iterable[tuple[str, str | None, float | None, float | None]],
    ) -> int:
        """Count ``(decision, reason, gain, alignment)`` outcomes; return how many there were.

        ``None`` (or NaN) gain/alignment values are not observed.
        """
        tally: Tally[tuple[str, str]] = Tally()
        for decision, reason, gain, alignment in outcomes:
            tally[(decision, reason or "")] += 1
            if gain is not None and not math.isnan(gain):
                self.gain.observe(gain)
            if alignment is not None and not math.isnan(alignment):
                self.alignment.observe(alignment)
        for (decision, reason), n in tally.items():
            self.samples.labels(stage, decision, reason).inc(n)
        return sum(tally.values())

    def observe_online(self, partition: str, online: OnlineState) -> None:
        """Keep rate, keep scale and online ε of a select partition."""
        if online.keep_rate is not None:
            self.keep_rate.labels(partition=partition).set(online.keep_rate)
        if online.scale is not None:
            self.keep_scale.labels(partition=partition).set(online.scale)
        for space, est in online.eps.items():
            self.epsilon.labels(partition=partition, space=space).set(est.epsilon)

    def observe_thresholds(self, partition: str, t: Thresholds, spaces: Sequence[str]) -> None:
        """The static part of a partition's thresholds (ε when not online, vote rules)."""
        if not t.epsilon_online:
            for space in spaces:
                self.epsilon.labels(partition=partition, space=space).set(t.epsilon.get(space, 0))
        self.vote_rule.labels(rule="relabel").set(int(t.confidence is not None))
        self.vote_rule.labels(rule="reject").set(int(t.reject_share is not None))
        self.vote_rule.labels(rule="flag").set(int(t.flag_share is not None))

    def observe_batch(self, stage: str, seconds: float) -> None:
        """Record one batch's wall time."""
        self.batch_duration.labels(stage).observe(seconds)

    def observe_step(self, stage: str, step: str, seconds: float) -> None:
        """Record one step's wall time; ``step`` must be one of :data:`STEPS`."""
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; expected one of {sorted(STEPS)}")
        self.stage_duration.labels(stage, step).observe(seconds)

    def record_transaction(self, stage: str, result: Literal["committed", "aborted"]) -> None:
        """Count one ended transaction."""
        if result not in ("committed", "aborted"):
            raise ValueError(f"unknown transaction result {result!r}")
        self.transactions.labels(stage, result).inc()

    def set_lag(self, stage: str, topic: str, partition: int | str, lag: int) -> None:
        """Set a partition's consumer lag in messages (negative values clamp to 0)."""
        self.consumer_lag.labels(stage, topic, str(partition)).set(max(0, lag))

    def set_oldest_unprocessed(
        self, stage: str, topic: str, partition: int | str, ts: float | None
    ) -> None:
        """The timestamp (epoch seconds) of the oldest message of the partition that the stage
        has not processed, or None when it has caught up; ``infogrowth_consumer_lag_seconds``
        is its age at each scrape."""
        self._lag_age.set((stage, topic, str(partition)), ts)

    def set_index_items(self, partition: int | str, items: int, nbytes: int | None = None) -> None:
        """Set how many items a partition's index holds (and its estimated bytes)."""
        self.index_items.labels(str(partition)).set(items)
        if nbytes is not None:
            self.index_bytes.labels(str(partition)).set(nbytes)

    def mark_snapshot(
        self,
        partition: int | str,
        ts: float | None = None,
        *,
        duration_s: float | None = None,
        size_bytes: int | None = None,
    ) -> None:
        """Record a completed snapshot taken at ``ts`` (epoch seconds, default now).

        The age gauge is computed from ``ts`` at each scrape; ``duration_s`` and ``size_bytes``
        feed the duration histogram and the size gauge when given.
        """
        p = str(partition)
        self._snapshot_age.mark(p, time.time() if ts is None else ts)
        if duration_s is not None:
            self.snapshot_duration.observe(duration_s)
        if size_bytes is not None:
            self.snapshot_bytes.labels(p).set(size_bytes)

    def observe_restore(self, seconds: float, replayed: int = 0) -> None:
        """Record one restore: its wall time and the changelog items it replayed."""
        self.restore_duration.observe(seconds)
        if replayed:
            self.replayed_items.inc(replayed)

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Set readiness (the ``infogrowth_ready`` gauge and what :meth:`readiness` answers)."""
        with self._ready_lock:
            self._ready_state = (ready, reason or ("ready" if ready else "not ready"))
            self.ready.set(1 if ready else 0)

    def readiness(self) -> tuple[bool, str]:
        """The last :meth:`set_ready` state; the default ``/readyz`` probe."""
        with self._ready_lock:
            return self._ready_state

    def drop_partition(
        self, partition: int | str, stage: str | None = None, *, state: bool = True
    ) -> None:
        """Forget a revoked partition's label sets.

        Drops the lag series of ``stage`` (every stage when None) and, with ``state``, the
        partition's index and snapshot series (pass ``state=False`` from a stage holding no
        per-partition state, e.g. the embed stage).
        """
        p = str(partition)
        for labels in _labelsets(self.consumer_lag):
            if labels["partition"] == p and (stage is None or labels["stage"] == stage):
                self.consumer_lag.remove(labels["stage"], labels["topic"], p)
        self._lag_age.drop(p, stage)
        if state:
            for gauge in (self.keep_rate, self.keep_scale):
                if {"partition": p} in _labelsets(gauge):
                    gauge.remove(p)
            for labels in _labelsets(self.epsilon):
                if labels["partition"] == p:
                    self.epsilon.remove(p, labels["space"])
            self.index_items.remove(p)
            if {"partition": p} in _labelsets(self.index_bytes):
                self.index_bytes.remove(p)
            self.snapshot_bytes.remove(p)
            self._snapshot_age.drop(p)

    def exposition(self, accept: str | None = None) -> bytes:
        """The current scrape in Prometheus text format, or OpenMetrics when ``accept`` (the
        scraper's Accept header) asks for it."""
        return self.negotiate(accept)[0]

    def negotiate(self, accept: str | None) -> tuple[bytes, str]:
        """(the scrape, its content type) in the format the Accept header ``accept`` prefers:
        OpenMetrics 1.0 when it lists ``application/openmetrics-text``, else the Prometheus
        text format 0.0.4."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


# ---------------------------------------------------------------------- HTTP


MAX_CONNECTIONS: Final = 16
"""Requests served at once; more connections get an immediate 503 instead of a thread each."""
MAX_REQUEST_BYTES: Final = 8192
"""Request line plus headers; a scrape or a probe sends a few hundred bytes."""
REQUEST_TIMEOUT_S: Final = 5.0
"""Wall-clock budget to receive a whole request (a slow drip cannot hold a worker), and the
socket timeout for sending the response."""
_BUSY_RESPONSE: Final = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 5\r\nRetry-After: 1\r\nConnection: close\r\n\r\nbusy\n"
)


def _always_ok() -> tuple[bool, str]:
    return True, "ok"


class _RequestTooLarge(http.client.LineTooLong):
    """The request line and headers exceeded the byte budget (431, or 414 on the request line)."""


class _BoundedReader:
    """``rfile`` for the handler: reads the raw socket byte by byte under a byte budget and a
    wall-clock deadline for the whole request, whatever pace the client sends at."""

    def __init__(self, raw: Any, sock: socket.socket, max_bytes: int, timeout_s: float) -> None:
        self._raw = raw
        self._sock = sock
        self._left = max_bytes
        self._deadline = time.monotonic() + timeout_s

    def readline(self, size: int = -1) -> bytes:
        out = bytearray()
        cap = size if size >= 0 else self._left + 1
        while len(out) < cap:
            if self._left <= 0:
                raise _RequestTooLarge("request line and headers over the size limit")
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request not received in time")
            self._sock.settimeout(remaining)
            b = self._raw.read(1)
            if not b:
                break
            out += b
            self._left -= 1
            if b == b"\n":
                break
        return bytes(out)

    def read(self, size: int = -1) -> bytes:  # GET carries no body; nothing calls this
        return b""

    def close(self) -> None:
        self._raw.close()


class _Handler(BaseHTTPRequestHandler):
    """GET-only handler; the server instance carries the metrics, probes and bounds.

    One request per connection (HTTP/1.0). The request line and headers must arrive within
    ``request_timeout_s`` and ``max_request_bytes`` (414 / 431 / closed otherwise).
    """

    server: _Server
    rbufsize = 0  # unbuffered: _BoundedReader counts every byte and watches the clock itself
    timeout = REQUEST_TIMEOUT_S
    server_version = "infogrowth"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout_s)
        self.rfile = _BoundedReader(  # type: ignore[assignment]
            self.rfile,
            self.connection,
            self.server.max_request_bytes,
            self.server.request_timeout_s,
        )

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def handle_one_request(self) -> None:
        try:
            try:
                self.raw_requestline = self.rfile.readline(self.server.max_request_bytes + 1)
            except _RequestTooLarge:
                self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                self._linger()
                return
            if not self.raw_requestline.endswith(b"\n"):
                return  # the client hung up mid-line
            if not self.parse_request():  # 431 from parse_request on _RequestTooLarge
                self._linger()
                return
            self.connection.settimeout(self.server.request_timeout_s)
            getattr(self, "do_" + self.command)()
            self.wfile.flush()
        except TimeoutError as exc:
            log.debug("metrics request from %s: %s", self.client_address, exc)
            self.close_connection = True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, content_type = self.server.metrics.negotiate(self.headers.get("Accept"))
            except Exception:
                log.exception("metrics exposition failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"exposition failed\n")
                return
            self._send(HTTPStatus.OK, body, content_type)
        elif path == "/healthz":
            self._probe(self.server.health, "health", echo=False)
        elif path == "/readyz":
            self._probe(self.server.ready, "readiness", echo=True)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n")

    if not TYPE_CHECKING:  # hidden from mypy, which would otherwise allow any attribute

        def __getattr__(self, name):
            # Every method but GET (HEAD, POST, PUT, ..., even unknown ones) gets a 405.
            if name.startswith("do_"):
                return self._not_allowed
            raise AttributeError(name)

    def _linger(self, max_bytes: int = 65536, timeout_s: float = 1.0) -> None:
        """After an error answer to a request not read to its end: half-close and discard a
        bounded amount of what the client still sends, so closing does not reset the connection
        (a reset can destroy the answer before the client reads it)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + timeout_s
            while max_bytes > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.connection.recv(min(max_bytes, 16384))
                if not chunk:
                    break
                max_bytes -= len(chunk)
        except OSError:
            pass

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", allow="GET")

    def _probe(self, check: Check, what: str, *, echo: bool) -> None:
        """200 "ok", else 503. With ``echo`` the reason is the body (readiness: fixed strings
        such as "restoring state"); without it the body is "unhealthy" and the reason, which
        may quote an exception, goes to the log (once per change) and never to the client."""
        try:
            ok, reason = check()
        except Exception:
            log.exception("%s probe raised", what)
            ok, reason = False, f"{what} probe failed"
        if ok:
            self.server.last_unhealthy = None
            self._send(HTTPStatus.OK, b"ok\n")
        elif echo:
            text = (reason or "not ok").replace("\r", " ").replace("\n", " ")[:200]
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"{text}\n".encode())
        else:
            if reason != self.server.last_unhealthy:
                self.server.last_unhealthy = reason
                log.warning("%s probe failing: %s", what, reason)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"unhealthy\n")

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        allow: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    """A thread per request, at most ``max_connections`` at once: a connection over the bound
    gets an immediate 503 "busy" from the accept loop and is closed, no thread started."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics,
        health: Check,
        ready: Check,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.ready = ready
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.last_unhealthy: str | None = None
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("metrics server busy: refusing %s", client_address)
            try:
                request.settimeout(0.5)
                request.sendall(_BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response is routine; anything else is logged, not printed.
        exc = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(exc, (ConnectionError, TimeoutError)) else logging.ERROR
        log.log(level, "metrics request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` from a daemon thread.

    ``health`` answers ``/healthz`` (default: always ok while the server runs); ``ready`` answers
    ``/readyz`` (default: :meth:`Metrics.readiness`). Both return ``(ok, reason)``: 200 "ok"
    when ok, else 503: ``/readyz`` with the reason, ``/healthz`` with "unhealthy" (its reason may
    quote an exception, so it is logged instead). Unknown paths get 404, methods other than GET
    405. At most ``max_connections`` requests are served at once (503 "busy" beyond), each must
    arrive within ``request_timeout_s`` and ``max_request_bytes``. Port 0 picks a free port,
    readable from :attr:`port` after :meth:`start`.
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str = "0.0.0.0",
        port: int = 9108,
        *,
        health: Check | None = None,
        ready: Check | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self._bounds: dict[str, Any] = {
            "max_connections": max_connections,
            "max_request_bytes": max_request_bytes,
            "request_timeout_s": request_timeout_s,
        }
        self._requested_port = port
        self._health: Check = health or _always_ok
        self._ready: Check = ready or metrics.readiness
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the requested one before :meth:`start`)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MetricsServer:
        """Bind and serve in a daemon thread; idempotent."""
        if self._server is not None:
            return self
        cls = _Server6 if ":" in self.host else _Server
        server = cls(
            (self.host, self._requested_port),
            self.metrics,
            self._health,
            self._ready,
            **self._bounds,
        )
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"metrics-http-{server.server_address[1]}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        log.info("serving metrics on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and release the port; idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
        self._server, self._thread = None, None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
