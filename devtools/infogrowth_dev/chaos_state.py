"""Chaos against ownership and state: a fenced producer, topics recreated under kept snapshots,
and a second ``seed`` while the stages run.

Each function drives :class:`~infogrowth_dev.chaos.Proc` instances like the scenarios in
:mod:`infogrowth_dev.chaos` and returns (faults injected, failed checks); a failed check is a
sentence saying what did not hold.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from infogrowth.config import Settings

if TYPE_CHECKING:
    from infogrowth_dev.chaos import Proc

STALE_MARK = "(topics recreated?)"
"""What the select stage logs when it discards a snapshot of a changelog topic that is gone."""


def fence(settings: Settings, transactional_id: str) -> None:
    """Fence the producer that holds ``transactional_id``: a new one with the same id bumps its
    epoch, so the old one's next transactional call fails for good (a zombie's successor)."""
    from confluent_kafka import Producer

    from infogrowth.kafka.clients import producer_config

    p = Producer(producer_config(settings, transactional_id))
    p.init_transactions(60)
    p.flush(5)


def fenced(
    procs: list[Proc],
    rng: random.Random,
    faults: int,
    rec: list[float],
    settings: Settings,
    feed: Callable[[int], None],
) -> tuple[int, list[str]]:
    """Start, wait until ready and mid-stream, fence one stage's producer (select and embed in
    turn); the process must exit non-zero on the fatal error, then it is started again.
    ``feed(i)`` produces the ``i``-th held-back piece of the stream right after each fence, so
    the fenced stage has another transaction to run even if it had drained everything."""
    proc = procs[0]
    prefix = settings.kafka.transactional_id_prefix
    failed: list[str] = []
    done = 0
    for i in range(faults):
        stage = ("select", "embed")[i % 2]
        proc.start()
        rec.append(proc.wait_ready())
        time.sleep(rng.uniform(0.3, 1.5))
        log_from = proc.log_path.stat().st_size
        fence(settings, f"{prefix}-{stage}-i0")
        feed(i)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:  # drained before the fence: nothing left to fail
            proc.signal(signal.SIGTERM)
            proc.wait(60)
            failed.append(f"fault {i}: the {stage} stage never noticed it was fenced")
            continue
        text = proc.log_path.read_bytes()[log_from:].decode(errors="replace").lower()
        if code == 0 or "fenced" not in text:
            failed.append(f"fault {i}: fenced {stage} stage exited {code} without saying so")
        done += 1
    return done, failed


def _delete_topics(settings: Settings, timeout_s: float = 60.0) -> None:
    from confluent_kafka.admin import AdminClient

    from infogrowth.kafka.admin import admin_config
    from infogrowth_dev.kafka.sandbox import TOPIC_ROLES

    admin = AdminClient(admin_config(settings))
    names = sorted({getattr(settings.kafka.topics, r) for r in TOPIC_ROLES})
    for fut in admin.delete_topics(names, operation_timeout=30).values():
        fut.result(timeout_s)
    deadline = time.monotonic() + timeout_s
    while set(names) & set(admin.list_topics(timeout=10).topics):
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {names} still listed {timeout_s:.0f} s after deletion")
        time.sleep(0.5)


def recreate(
    procs: list[Proc],
    rng: random.Random,
    faults: int,
    rec: list[float],
    settings: Settings,
    rebuild: Callable[[], None],
) -> tuple[int, list[str]]:
    """Run a while, SIGTERM (snapshots are written), delete every topic and ``rebuild`` them
    (create, seed, produce the whole stream again), keeping the snapshot directory. The next
    start must discard every snapshot as stale and replay the new changelog instead; the
    caller's final drain is that start for the last round, and :func:`stale_discards` counts."""
    proc = procs[0]
    state = Path(settings.snapshot.directory)
    failed: list[str] = []
    for i in range(faults):
        proc.start()
        rec.append(proc.wait_ready())
        time.sleep(rng.uniform(2.0, 4.0))
        proc.signal(signal.SIGTERM)
        if proc.wait(90) != 0:
            failed.append(f"round {i}: SIGTERM exit was not 0")
        if not list(state.glob("*/CURRENT")):
            failed.append(f"round {i}: no snapshot was written, nothing could go stale")
        _delete_topics(settings)
        rebuild()
    return faults, failed


def stale_discards(proc: Proc) -> int:
    """Snapshots the process logged as discarded because their changelog topic is gone."""
    return proc.log_path.read_text(errors="replace").count(STALE_MARK)


def reseed(
    procs: list[Proc],
    rng: random.Random,
    faults: int,
    rec: list[float],
    config: Path,
    seed_file: Path,
) -> tuple[int, list[str]]:
    """Run ``infogrowth seed`` again while the stages run: it must refuse (exit non-zero,
    naming ``--reset``) and write nothing, and the running process must not notice."""
    proc = procs[0]
    proc.start()
    rec.append(proc.wait_ready())
    failed: list[str] = []
    for i in range(faults):
        time.sleep(rng.uniform(0.5, 2.0))
        cmd = [sys.executable, "-m", "infogrowth.cli", "seed"]
        cmd += ["--input", str(seed_file), "--config", str(config)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        said = res.stdout + res.stderr
        if res.returncode == 0 or "--reset" not in said:
            failed.append(f"seed {i} while running: exit {res.returncode}, {said[-300:]!r}")
        if not proc.alive():
            failed.append(f"seed {i}: the running process died: {proc.tail()}")
            return i + 1, failed
    proc.signal(signal.SIGTERM)
    if proc.wait(90) != 0:
        failed.append("SIGTERM exit after the refused seeds was not 0")
    return faults, failed
