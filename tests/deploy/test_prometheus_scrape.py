"""A real Prometheus server scrapes a real `infogrowth run` on a real broker.

Prometheus (Debian's package) scrapes the service's /metrics every second on loopback and loads
the alert rules. Once every ingest message is decided, `sum(infogrowth_samples_total)` and its
split by decision, queried over Prometheus's HTTP API, must equal what `audit` reads from the
output topics; every dashboard query must evaluate, and every alert rule must evaluate cleanly.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infogrowth.kafka.tools import audit
from tests.deploy.conftest import DASHBOARD, RULES
from tests.deploy.promql import dashboard_exprs, grafana_to_promql, load_dashboard
from tests.integration.test_lifecycle import _prepare, _ready, _scrape, _start

pytestmark = [pytest.mark.integration, pytest.mark.deploy]

N = 600
"""Ingest messages: enough for every decision to occur, small enough for a quick run."""


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[str]:
    from infogrowth_dev.kafka.broker import broker_for_tests

    with broker_for_tests() as servers:
        yield servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PromAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        try:
            body = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as exc:  # 400 carries the parser's message
            raise AssertionError(f"{expr!r}: {exc.read().decode()}") from exc
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


def _wait(what: str, predicate: Any, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what}: process exited with {proc.returncode}"
        if predicate():
            return
        time.sleep(0.25)
    raise TimeoutError(f"{what}: not within {timeout_s}s")


def _start_prometheus(
    binary: str, tmp: Path, target_port: int
) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "infogrowth",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{target_port}"],
                        # What the chart's ServiceMonitor attaches (namespace, release).
                        "labels": {"namespace": "it", "app_kubernetes_io_instance": "it"},
                    }
                ],
            }
        ],
    }
    cfg = tmp / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, port


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def test_prometheus_scrape_matches_audit(
    bootstrap: str, prometheus_bin: str, tmp_path: Path
) -> None:
    # a keep budget, so the keep-scale series exists too; a memory budget (far above what the
    # run needs: it stays ready) so the budget series does
    conf, settings, _inp, _seed = _prepare(
        tmp_path,
        bootstrap,
        n=N,
        **{"select.keep_fraction": 0.5, "limits.memory_budget_bytes": 64 << 30},
    )
    port = settings.serve.port
    service = _start(conf, log=tmp_path / "run.log")
    prom, prom_port = _start_prometheus(prometheus_bin, tmp_path, port)
    api = PromAPI(prom_port)
    try:
        _wait("prometheus ready", api.ready, 60, prom)
        _wait("service ready", lambda: _ready(port), 120, service)

        # Drained: the service's own counters account for every ingest message...
        def decided() -> bool:
            try:
                return sum(_scrape(port).values()) >= N
            except OSError:
                return False

        _wait("all messages decided", decided, 180, service)
        final = sum(_scrape(port).values())
        assert final == N
        # ...then Prometheus scrapes at least once more and sees the same total.
        _wait(
            "prometheus caught up",
            lambda: api.scalar("sum(infogrowth_samples_total)") == N,
            30,
            prom,
        )

        up = api.query('up{job="infogrowth"}')
        assert [float(s["value"][1]) for s in up] == [1.0]
        total = api.scalar("sum(infogrowth_samples_total)")
        by_decision = {
            s["metric"]["decision"]: float(s["value"][1])
            for s in api.query("sum by (decision) (infogrowth_samples_total)")
        }
        by_reason = {
            (s["metric"]["decision"], s["metric"].get("reason", "")): float(s["value"][1])
            for s in api.query("sum by (decision, reason) (infogrowth_samples_total)")
        }

        # Every dashboard query is valid PromQL for a real server and has data: the run decides
        # image+text samples, restores (replaying the seeded changelog) and snapshots every second.
        # Rates need two scrapes inside their window: on a loaded machine give them a minute.
        dashboard = load_dashboard(DASHBOARD)
        deadline = time.monotonic() + 60
        while True:
            empty = [
                title
                for title, expr in dashboard_exprs(dashboard)
                if not api.query(grafana_to_promql(expr, "1m"))
            ]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert not empty, f"dashboard queries without data: {empty}"

        # The alert rules loaded and evaluate without errors against real series.
        def rules_evaluated() -> bool:
            groups = api.get("/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return bool(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in rules)

        _wait("rules evaluated", rules_evaluated, 30, prom)
        groups = api.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(yaml.safe_load(RULES.read_text())["groups"][0]["rules"])
        assert all(r["health"] == "ok" for r in rules), [
            (r["name"], r.get("lastError")) for r in rules
        ]
    finally:
        service_rc = _stop(service, 60)
        prom_rc = _stop(prom)
    assert service_rc == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert prom_rc == 0, (tmp_path / "prometheus.log").read_text()[-3000:]

    result = audit(settings)
    assert result.ok, result.as_dict()
    assert result.ingest == N
    assert total == sum(result.outputs.values()) == N
    assert {"accepted", "rejected"} <= set(by_decision)
    assert by_decision == {k: float(v) for k, v in result.outputs.items() if v}
    assert by_reason == {
        (k.split("/")[0], k.split("/")[1] if "/" in k else ""): float(v)
        for k, v in result.reasons.items()
    }
