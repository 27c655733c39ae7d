"""``infogrowth run``: the embed and/or select stage loops, metrics server and signal handling."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from infogrowth.calibrate import Calibration, resolve_thresholds
from infogrowth.cells import Cells
from infogrowth.config import Settings
from infogrowth.errors import ConfigError
from infogrowth.kafka.clients import instance_id
from infogrowth.kafka.control import read_calibration
from infogrowth.kafka.embed import EmbedProcessor
from infogrowth.kafka.loop import TXN_TIMEOUT_S, TransactionalLoop
from infogrowth.kafka.select import SelectProcessor
from infogrowth.membudget import MemoryBudget, resolve_budget
from infogrowth.messages import calibration_record
from infogrowth.models import build_models, resolve_encoder_config
from infogrowth.pipeline import EmbedStage, configured_dims
from infogrowth.schema import SPACES

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The running stages; tests drive it in-process, the CLI through :func:`main`."""

    settings: Settings
    role: str
    loops: list[TransactionalLoop] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    select: SelectProcessor | None = None
    metrics: Any = None
    server: Any = None
    watchdog_started: bool = False
    memory: MemoryBudget | None = None

    def __post_init__(self) -> None:
        if self.memory is None:
            self.memory = MemoryBudget(resolve_budget(self.settings.limits))
        if self.metrics is not None:
            self.metrics.memory_budget.set(self.memory.budget or 0)
        if self.memory.budget is not None:
            log.info("memory budget: %.2f GiB resident", self.memory.budget / 2**30)

    def ready(self) -> bool:
        return self.ready_status()[0]

    def ready_status(self) -> tuple[bool, str]:
        if not self.loops or not all(lp.started.is_set() for lp in self.loops):
            return False, "starting"
        if not all(lp.assigned_once.is_set() for lp in self.loops):
            return False, "waiting for a partition assignment"
        if any(lp.restoring for lp in self.loops) or (self.select and self.select.restoring):
            return False, "restoring state"
        if self.stop.is_set():
            return False, "draining"
        stuck = [lp.stuck for lp in self.loops if lp.stuck]
        if stuck:
            return False, f"stuck: {stuck[0]}"
        over = self.memory.check() if self.memory is not None else None
        if over:
            return False, over
        return True, "ready"

    def healthy(self) -> tuple[bool, str]:
        if self.errors:
            return False, f"stage failed: {self.errors[0]}"
        dead = [t.name for t in self.threads if not t.is_alive()]
        if dead and not self.stop.is_set():
            return False, f"stage thread ended: {dead}"
        stalled = self.stalled()
        if stalled:
            return False, stalled
        return True, "ok"

    def stalled(self) -> str | None:
        """Why a stage counts as hung: it has not come back to its loop for longer than any
        wait of its own (a transactional call blocked past the transaction timeout, e.g. after
        its coordinator died); None while restoring, draining, or not started yet. Liveness
        then restarts the process instead of leaving it fenced-to-be behind a healthy probe."""
        if self.stop.is_set() or (self.select is not None and self.select.restoring):
            return None
        k = self.settings.kafka
        bound = max(2 * TXN_TIMEOUT_S, (k.max_poll_interval_ms + k.transaction_timeout_ms) / 1e3)
        now = time.monotonic()
        for lp in self.loops:
            idle = now - lp.last_progress
            if lp.started.is_set() and idle > bound:
                return f"{lp.processor.name} stage has not returned to its loop for {idle:.0f} s"
        return None

    def drained(self) -> bool:
        """Every input topic fully consumed and committed by its group (not just this member)."""
        from infogrowth.kafka.tools import group_drained

        return all(group_drained(self.settings, lp.group, lp.topics[0]) for lp in self.loops)

    def committed_outputs(self) -> int:
        """Output records this process has committed (embed rejections + select outputs)."""
        return sum(getattr(lp.processor, "committed_outputs", 0) for lp in self.loops)

    def idle_for(self) -> float:
        if not self.loops:
            return 0.0
        return time.monotonic() - max(lp.last_processed for lp in self.loops)


def build(settings: Settings, role: str, rt: Runtime | None = None) -> Runtime:
    """Read the calibration, load the models and wire the stage loops (nothing runs yet)."""
    if rt is None:
        from infogrowth.metrics import Metrics

        rt = Runtime(settings, role, metrics=Metrics())
    cal: Calibration | None = read_calibration(settings)
    if cal is not None:
        thresholds = cal.thresholds
        log.info("calibration: %s", calibration_record(cal) | {"cells": "..."})
    else:
        thresholds = resolve_thresholds(settings, SPACES, None)
        log.info("no calibration on the control topic: thresholds from config %s", thresholds)
    prefix = settings.kafka.transactional_id_prefix
    inst = instance_id(settings)
    k = settings.kafka
    dims = cal.dims if cal else _configured_dims(settings)
    if role in ("embed", "all"):
        encoder, captioner = build_models(settings, None)
        spaces = tuple(dims) if dims else None
        stage = EmbedStage(
            settings, encoder, captioner, spaces=spaces, dims=dims, thresholds=thresholds
        )
        if cal is not None and encoder is not None and cal.fingerprint != encoder.fingerprint:
            raise ConfigError(
                f"encoder fingerprint {encoder.fingerprint!r} differs from the seeded "
                f"calibration's {cal.fingerprint!r}: re-seed or configure the same model"
            )
        n_cells = k.cells or k.topics.embedded_partitions
        cells = Cells.from_record(cal.cells, n_cells) if cal and cal.cells else None
        proc = EmbedProcessor(
            settings, stage, thresholds, cells, k.topics.embedded_partitions, rt.metrics
        )
        proc.epoch = cal.epoch if cal else 0
        rt.loops.append(_loop(settings, rt, proc, k.embed_group, k.topics.ingest, prefix, inst))
    if role in ("select", "all"):
        fingerprint = cal.fingerprint if cal and cal.fingerprint else _config_fingerprint(settings)
        sel = SelectProcessor(settings, thresholds, cal, fingerprint, rt.metrics)
        if cal is None and dims is not None:
            sel.spaces, sel.dims = tuple(dims), dict(dims)
        rt.select = sel
        rt.loops.append(_loop(settings, rt, sel, k.select_group, k.topics.embedded, prefix, inst))
    return rt


def _configured_dims(settings: Settings) -> dict[str, int] | None:
    """``encoder.dims`` for an unseeded run; required when it runs on precomputed vectors,
    where otherwise the first valid sample would fix the dimensions for the whole process."""
    configured = configured_dims(settings)
    if configured:
        return configured
    if resolve_encoder_config(settings, None).kind == "precomputed":
        raise ConfigError(
            "encoder.dims: an unseeded run on precomputed embeddings needs their dimensions per "
            "space (e.g. encoder.dims: {image: 512, text: 512}), or run `infogrowth seed` first"
        )
    return None


def _config_fingerprint(settings: Settings) -> str:
    return f"config:{settings.encoder.kind}:{settings.encoder.model or 'precomputed'}"


def _loop(
    settings: Settings,
    rt: Runtime,
    proc: Any,
    group: str,
    topic: str,
    prefix: str,
    inst: str,
) -> TransactionalLoop:
    m = rt.metrics

    def on_batch(stage: str, n: int, seconds: float, committed: bool) -> None:
        if m is None:
            return
        m.batch_duration.labels(stage=stage).observe(seconds)
        m.transactions.labels(stage=stage, result="committed" if committed else "aborted").inc()

    def on_lag(stage: str, topic: str, partition: int, lag: int) -> None:
        if m is not None:
            m.set_lag(stage, topic, partition, lag)

    def on_backlog(stage: str, topic: str, partition: int, ts: float | None) -> None:
        if m is not None:
            m.set_oldest_unprocessed(stage, topic, partition, ts)

    def on_step(stage: str, step: str, seconds: float) -> None:
        if m is not None:
            m.observe_step(stage, step, seconds)

    return TransactionalLoop(
        settings,
        proc,
        group=group,
        topics=[topic],
        transactional_id=f"{prefix}-{proc.name}-{inst}",
        on_batch=on_batch,
        on_lag=on_lag,
        on_step=on_step,
        on_backlog=on_backlog,
    )


def start(rt: Runtime) -> None:
    def target(loop: TransactionalLoop) -> None:
        try:
            loop.run(rt.stop)
        except BaseException as exc:
            log.exception("%s stage failed", loop.processor.name)
            rt.errors.append(exc)
            rt.stop.set()

    for lp in rt.loops:
        t = threading.Thread(target=target, args=(lp,), name=f"stage-{lp.processor.name}")
        t.start()
        rt.threads.append(t)


def serve(rt: Runtime) -> None:
    if rt.metrics is None:
        return
    from infogrowth.metrics import MetricsServer

    s = rt.settings.serve
    rt.server = MetricsServer(rt.metrics, s.host, s.port, health=rt.healthy, ready=rt.ready_status)
    rt.server.start()
    log.info("metrics on http://%s:%d/metrics", s.host, rt.server.port)


def main(settings: Settings, role: str, idle_exit_s: float | None = None) -> int:
    """Run until SIGTERM/SIGINT (or idle for ``idle_exit_s``); exit code 0 on a clean drain.

    The HTTP endpoint starts first, so /healthz answers while a large model loads (/readyz says
    "starting" until state is restored).
    """
    from infogrowth.metrics import Metrics

    rt = Runtime(settings, role, metrics=Metrics())
    serve(rt)
    try:
        build(settings, role, rt)
    except BaseException:
        if rt.server is not None:
            rt.server.stop()
        raise

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: draining", signum)
        rt.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start(rt)
    next_drain_check = 0.0
    try:
        while any(t.is_alive() for t in rt.threads):
            if rt.metrics is not None:
                rt.metrics.ready.set(1 if rt.ready() else 0)
            if (
                idle_exit_s is not None
                and not rt.stop.is_set()
                and rt.ready()
                and rt.idle_for() > idle_exit_s
                and time.monotonic() >= next_drain_check
            ):
                next_drain_check = time.monotonic() + 2.0
                if not rt.drained():
                    continue
                log.info("input drained and idle for %.1fs: stopping", idle_exit_s)
                rt.stop.set()
            if rt.stop.is_set():
                _watchdog(rt, settings.kafka.drain_timeout_s)
            time.sleep(0.2)
    finally:
        rt.stop.set()
        for t in rt.threads:
            t.join()
        if rt.server is not None:
            rt.server.stop()
    return 1 if rt.errors else 0


def _watchdog(rt: Runtime, timeout_s: float) -> None:
    """A stuck broker must not hang shutdown forever: exit hard after the drain timeout."""
    if rt.watchdog_started:
        return
    rt.watchdog_started = True
    deadline = time.monotonic() + timeout_s
    if rt.select is not None:  # its snapshot and upload waits end first, leaving time to leave
        rt.select.drain_by = deadline - min(2.0, 0.1 * timeout_s)  # the group and to flush

    def bite() -> None:
        while time.monotonic() < deadline:
            if not any(t.is_alive() for t in rt.threads):
                return
            time.sleep(0.2)
        log.error("drain did not finish within %.0fs: exiting; stacks follow", timeout_s)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(3)

    threading.Thread(target=bite, daemon=True, name="drain-watchdog").start()
