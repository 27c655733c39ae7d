"""The real process: SIGTERM and restart, snapshot variants, two instances, metrics."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
from infogrowth.kafka.seed import seed
from infogrowth.kafka.tools import audit, produce
from tests.fixtures.data import clustered, write_jsonl
from tests.integration.conftest import settings_from, write_config
from tests.integration.test_pipeline import curate_decisions, kafka_decisions

pytestmark = pytest.mark.integration
N = 1500
ONLINE: dict[str, Any] = {"select.keep_fraction": 0.5, "select.epsilon_mode": "online"}
"""Decisions that depend on online partition state (keep scale, ε): restore == replay for it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """Sum of infogrowth_samples_total per stage."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("infogrowth_samples_total{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            out[stage] = out.get(stage, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
    except OSError:
        return False


def _start(cfg: Path, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "infogrowth.cli", "run", "--config", str(cfg), *extra],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _prepare(tmp: Path, bootstrap: str, n: int = N, **cfg: Any) -> tuple[Path, Any, Path, Path]:
    port = _free_port()
    conf = write_config(tmp / "c.yaml", bootstrap, tmp / "state", **{"serve.port": port, **cfg})
    settings = settings_from(conf)
    assert ensure_topics(admin_config(settings), topic_specs(settings.kafka.topics)).ok_all
    data = clustered(n, dup_rate=0.1, flip_rate=0.05, seed=60)
    inp = write_jsonl(tmp / "in.jsonl", data.samples)
    seed_file = write_jsonl(tmp / "seed.jsonl", clustered(100, seed=61, prefix="seed").samples)
    seed(settings, seed_file)
    produce(settings, [inp])
    return conf, settings, inp, seed_file


def _wait_outputs(port: int, at_least: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "consumer died"
        try:
            if sum(_scrape(port).values()) >= at_least:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {at_least} outputs after {timeout}s")


def _check(settings: Any, inp: Path, seed_file: Path, tmp: Path) -> None:
    result = audit(settings)
    assert result.ok, result.as_dict()
    assert result.ingest == N
    reference = curate_decisions(settings, inp, seed_file, tmp / "curate")
    got = kafka_decisions(settings)
    assert {k: v for k, v in reference.items() if got.get(k) != v} == {}


def test_sigterm_mid_stream_then_restart(kafka_bootstrap: str, tmp_path: Path) -> None:
    conf, settings, inp, seed_file = _prepare(tmp_path, kafka_bootstrap, **ONLINE)
    port = settings.serve.port
    log = tmp_path / "run.log"
    proc = _start(conf, log=log)
    _wait_outputs(port, 200, proc, 120)
    scraped = _scrape(port)
    assert sum(scraped.values()) >= 200  # counters move during the run
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert "draining" in log.read_text()
    snaps = list((tmp_path / "state").glob("*/CURRENT"))
    assert snaps, "SIGTERM must leave a snapshot"

    proc = _start(conf, "--exit-when-idle", "3", log=log)
    assert proc.wait(180) == 0, log.read_text()[-3000:]
    _check(settings, inp, seed_file, tmp_path)


@pytest.mark.parametrize("damage", ["none", "corrupt", "delete"])
def test_restore_with_and_without_snapshot(
    kafka_bootstrap: str, tmp_path: Path, damage: str
) -> None:
    conf, settings, inp, seed_file = _prepare(tmp_path, kafka_bootstrap, **ONLINE)
    log = tmp_path / "run.log"
    proc = _start(conf, log=log)
    _wait_outputs(settings.serve.port, 300, proc, 120)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    state = tmp_path / "state"
    if damage == "corrupt":
        for f in state.glob("*/snap-*/space-*.bin"):
            data = bytearray(f.read_bytes())
            data[len(data) // 3] ^= 0x55
            f.write_bytes(bytes(data))
    elif damage == "delete":
        shutil.rmtree(state)
    proc = _start(conf, "--exit-when-idle", "3", log=log)
    assert proc.wait(180) == 0, log.read_text()[-3000:]
    text = log.read_text()
    if damage == "corrupt":
        assert "checksum mismatch" in text
    _check(settings, inp, seed_file, tmp_path)


def test_metrics_match_audit(kafka_bootstrap: str, tmp_path: Path) -> None:
    conf, settings, _inp, _seed_file = _prepare(tmp_path, kafka_bootstrap, n=N)
    port = settings.serve.port
    proc = _start(conf, log=tmp_path / "run.log")
    try:
        deadline = time.monotonic() + 120
        while not _ready(port):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        _wait_outputs(port, N, proc, 120)
        scraped = _scrape(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    result = audit(settings)
    assert result.ok
    assert scraped.get("select", 0) + scraped.get("embed", 0) == sum(result.outputs.values())


def test_two_instances_split_partitions(kafka_bootstrap: str, tmp_path: Path) -> None:
    parts = {
        "kafka.topics.ingest_partitions": 2,
        "kafka.topics.embedded_partitions": 2,
        "kafka.topics.output_partitions": 2,
    }
    conf, settings, _inp, _seed_file = _prepare(tmp_path, kafka_bootstrap, **parts)
    rid = settings.kafka.topics.ingest.split(".")[0][1:]
    confs = [conf]
    for i in (1,):
        confs.append(
            write_config(
                tmp_path / f"c{i}.yaml",
                kafka_bootstrap,
                tmp_path / f"state{i}",
                run_id=rid,
                **{"serve.port": _free_port(), "kafka.instance_id": f"i{i}", **parts},
            )
        )
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = [_start(c, "--exit-when-idle", "6", log=lg) for c, lg in zip(confs, logs, strict=True)]
    for p, lg in zip(procs, logs, strict=True):
        assert p.wait(240) == 0, lg.read_text()[-3000:]
    result = audit(settings)
    assert result.ok, result.as_dict()
    assert result.ingest == N
    embedded = settings.kafka.topics.embedded
    for lg in logs:  # each instance held a share of the select partitions
        assert f"select: assigned {embedded}[" in lg.read_text()


def test_a_lost_volume_restores_from_the_shared_snapshot(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """``snapshot.remote``: the shutdown uploads the last snapshot; a restart without the volume
    starts from it and replays only the changelog after it; decisions as ``curate``'s."""
    shared = tmp_path / "shared"
    conf, settings, inp, seed_file = _prepare(
        tmp_path, kafka_bootstrap, **ONLINE, **{"snapshot.remote": f"file://{shared}"}
    )
    log = tmp_path / "run.log"
    proc = _start(conf, log=log)
    port = settings.serve.port
    deadline = time.monotonic() + 120
    while _scrape_or_empty(port).get("select", 0) < 300:  # decided here: a state to snapshot
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    currents = {
        c.parent.name: c.read_text().strip() for c in (tmp_path / "state").glob("*/CURRENT")
    }
    newest = {
        part: max(
            (m.parent.name for m in shared.glob(f"*/{part}/snap-*/manifest.json")), default=""
        )
        for part in currents
    }
    # the snapshot written at shutdown went up too
    assert currents and newest == currents, log.read_text()[-3000:]
    shutil.rmtree(tmp_path / "state")
    proc = _start(conf, "--exit-when-idle", "3", log=log)
    assert proc.wait(180) == 0, log.read_text()[-3000:]
    assert "shared snapshot snap-" in log.read_text()
    _check(settings, inp, seed_file, tmp_path)


def _scrape_or_empty(port: int) -> dict[str, float]:
    try:
        return _scrape(port)
    except OSError:
        return {}
