"""Metrics over real HTTP: scrapes, probes, method/path handling and no config leaks."""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Iterator

import pytest

from infogrowth.config import load_settings
from infogrowth.metrics import ALIGNMENT_BUCKETS, GAIN_BUCKETS, Metrics, MetricsServer

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cr3t-Pa55-do-not-leak"


def _request(
    server: MetricsServer, path: str, method: str = "GET"
) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read().decode()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    with MetricsServer(metrics, "127.0.0.1", 0) as srv:
        yield srv


def test_scrape_over_http_moves_counters(metrics: Metrics, server: MetricsServer) -> None:
    assert server.port > 0
    status, headers, body = _request(server, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    before = _samples(body)
    assert before['infogrowth_build_info{version="0.1.0"}'] == 1.0
    assert before["infogrowth_ready"] == 0.0

    n = metrics.observe_outcomes(
        "select",
        [
            ("accepted", None, 0.42, 0.31),
            ("accepted", None, 1.5, None),
            ("rejected", "duplicate", 0.0, float("nan")),
        ],
    )
    assert n == 3
    metrics.observe_batch("select", 0.2)
    metrics.observe_step("select", "embed", 0.01)
    metrics.record_transaction("select", "committed")
    metrics.record_transaction("select", "aborted")
    metrics.set_lag("select", "ig.embedded", 0, 17)
    metrics.set_index_items(0, 1234, 5678)
    metrics.observe_restore(1.5, replayed=40)

    after = _samples(_request(server, "/metrics")[2])
    key = 'infogrowth_samples_total{decision="%s",reason="%s",stage="select"}'
    assert after[key % ("accepted", "")] == 2.0
    assert after[key % ("rejected", "duplicate")] == 1.0
    assert after["infogrowth_gain_count"] == 3.0
    assert after["infogrowth_gain_sum"] == pytest.approx(1.92)
    assert after["infogrowth_alignment_count"] == 1.0  # None and NaN are skipped
    assert after['infogrowth_alignment_bucket{le="0.4"}'] == 1.0
    assert after['infogrowth_alignment_bucket{le="0.3"}'] == 0.0
    assert after['infogrowth_batch_duration_seconds_count{stage="select"}'] == 1.0
    assert after['infogrowth_stage_duration_seconds_count{stage="select",step="embed"}'] == 1.0
    assert after['infogrowth_transactions_total{result="committed",stage="select"}'] == 1.0
    assert after['infogrowth_transactions_total{result="aborted",stage="select"}'] == 1.0
    assert after['infogrowth_consumer_lag{partition="0",stage="select",topic="ig.embedded"}'] == 17
    assert after['infogrowth_index_items{partition="0"}'] == 1234.0
    assert after['infogrowth_index_bytes{partition="0"}'] == 5678.0
    assert after["infogrowth_restore_duration_seconds_count"] == 1.0
    assert after["infogrowth_replayed_items_total"] == 40.0


def test_buckets_cover_ranges() -> None:
    assert GAIN_BUCKETS[0] == 0.0 and GAIN_BUCKETS[-1] == 2.0
    assert ALIGNMENT_BUCKETS[0] == -1.0 and ALIGNMENT_BUCKETS[-1] == 1.0
    assert list(GAIN_BUCKETS) == sorted(set(GAIN_BUCKETS))
    assert list(ALIGNMENT_BUCKETS) == sorted(set(ALIGNMENT_BUCKETS))


def test_snapshot_age_is_computed_at_scrape() -> None:
    now = [1000.0]
    m = Metrics(runtime=False, clock=lambda: now[0])
    m.mark_snapshot(2, 990.0, duration_s=0.5, size_bytes=4096)
    first = _samples(m.exposition().decode())
    assert first['infogrowth_snapshot_age_seconds{partition="2"}'] == 10.0
    assert first['infogrowth_snapshot_bytes{partition="2"}'] == 4096.0
    assert first["infogrowth_snapshot_duration_seconds_count"] == 1.0
    now[0] = 1060.0
    later = _samples(m.exposition().decode())
    assert later['infogrowth_snapshot_age_seconds{partition="2"}'] == 70.0
    m.mark_snapshot(2, 2000.0)  # a clock step backwards never gives a negative age
    assert _samples(m.exposition().decode())['infogrowth_snapshot_age_seconds{partition="2"}'] == 0


def test_consumer_lag_seconds_is_the_age_of_the_oldest_unprocessed_message() -> None:
    now = [1000.0]
    m = Metrics(runtime=False, clock=lambda: now[0])
    key = 'infogrowth_consumer_lag_seconds{partition="3",stage="select",topic="emb"}'
    assert key not in _samples(m.exposition().decode())  # no series before the first batch
    m.set_oldest_unprocessed("select", "emb", 3, 940.0)
    assert _samples(m.exposition().decode())[key] == 60.0
    now[0] = 1030.0  # stuck: the age keeps growing between updates
    assert _samples(m.exposition().decode())[key] == 90.0
    m.set_oldest_unprocessed("select", "emb", 3, 2000.0)  # a producer clock ahead of ours
    assert _samples(m.exposition().decode())[key] == 0.0
    m.set_oldest_unprocessed("select", "emb", 3, None)  # caught up
    assert _samples(m.exposition().decode())[key] == 0.0


def _request_accept(server: MetricsServer, accept: str | None) -> tuple[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        return resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
"""What Prometheus sends by default."""


def test_metrics_answer_openmetrics_when_asked(metrics: Metrics, server: MetricsServer) -> None:
    metrics.observe_outcomes("select", [("accepted", None, 0.5, 0.5)])
    metrics.set_oldest_unprocessed("embed", "in", 0, None)
    ctype, body = _request_accept(server, PROMETHEUS_ACCEPT)
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    assert "# TYPE infogrowth_samples counter" in body  # OpenMetrics names the family
    assert 'infogrowth_samples_total{decision="accepted",reason="",stage="select"} 1.0' in body
    assert 'infogrowth_consumer_lag_seconds{partition="0",stage="embed",topic="in"} 0.0' in body
    for accept in (None, "text/plain;version=0.0.4", "*/*"):
        ctype, body = _request_accept(server, accept)
        assert ctype.startswith("text/plain; version=0.0.4"), accept
        assert "# EOF" not in body and "# TYPE infogrowth_samples_total counter" in body


def test_drop_partition_removes_its_series() -> None:
    m = Metrics(runtime=False)
    for p in (0, 1):
        m.set_lag("embed", "in", p, 5)
        m.set_lag("select", "emb", p, 7)
        m.set_oldest_unprocessed("embed", "in", p, 1.0)
        m.set_oldest_unprocessed("select", "emb", p, None)
        m.set_index_items(p, 10, 1000)
        m.mark_snapshot(p, size_bytes=100)
    m.drop_partition(1, "embed", state=False)
    s = _samples(m.exposition().decode())
    assert 'infogrowth_consumer_lag{partition="1",stage="embed",topic="in"}' not in s
    assert 'infogrowth_consumer_lag_seconds{partition="1",stage="embed",topic="in"}' not in s
    assert s['infogrowth_consumer_lag{partition="1",stage="select",topic="emb"}'] == 7.0
    assert s['infogrowth_consumer_lag_seconds{partition="1",stage="select",topic="emb"}'] == 0
    assert 'infogrowth_consumer_lag_seconds{partition="0",stage="embed",topic="in"}' in s
    assert 'infogrowth_index_items{partition="1"}' in s

    m.drop_partition(1)
    text = m.exposition().decode()
    assert 'partition="1"' not in text
    assert (
        text.count('partition="0"') == 8
    )  # 2 lags, 2 lag ages, items, index bytes, snapshot bytes, age
    m.drop_partition(7)  # unknown partitions are a no-op


def test_invalid_step_and_result_are_refused() -> None:
    m = Metrics(runtime=False)
    with pytest.raises(ValueError, match="unknown step"):
        m.observe_step("select", "sleep", 1.0)
    with pytest.raises(ValueError, match="unknown transaction result"):
        m.record_transaction("select", "maybe")  # type: ignore[arg-type]


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.observe_outcomes("embed", [("accepted", None, None, None)])
    assert 'stage="embed"' in a.exposition().decode()
    assert 'stage="embed"' not in b.exposition().decode()


def test_readyz_flips_from_503_to_200(metrics: Metrics, server: MetricsServer) -> None:
    status, _, body = _request(server, "/readyz")
    assert (status, body) == (503, "starting\n")
    metrics.set_ready(False, "restoring partition 3")
    assert _request(server, "/readyz")[:3:2] == (503, "restoring partition 3\n")
    metrics.set_ready(True)
    assert _request(server, "/readyz")[:3:2] == (200, "ok\n")
    assert _samples(_request(server, "/metrics")[2])["infogrowth_ready"] == 1.0
    metrics.set_ready(False, "draining")
    assert _request(server, "/readyz")[0] == 503


def test_custom_probes() -> None:
    alive = threading.Event()
    alive.set()
    state = {"ready": False}

    def health() -> tuple[bool, str]:
        return alive.is_set(), "process loop stalled"

    def ready() -> tuple[bool, str]:
        if state.get("boom"):
            raise RuntimeError(f"detail with {SECRET}")
        return state["ready"], "waiting for\r\nassignment"

    with MetricsServer(Metrics(runtime=False), "127.0.0.1", 0, health=health, ready=ready) as srv:
        assert _request(srv, "/healthz")[:3:2] == (200, "ok\n")
        assert _request(srv, "/readyz")[:3:2] == (503, "waiting for  assignment\n")
        state["ready"] = True
        assert _request(srv, "/readyz")[0] == 200
        alive.clear()
        # /healthz never echoes its reason (it may quote an exception): the log has it
        assert _request(srv, "/healthz")[:3:2] == (503, "unhealthy\n")
        state["boom"] = True  # a raising probe is a 503 that does not echo the exception
        status, _, body = _request(srv, "/readyz")
        assert status == 503 and SECRET not in body and body == "readiness probe failed\n"


def test_unknown_paths_404_and_other_methods_405(server: MetricsServer) -> None:
    for path in ("/", "/metricsx", "/metrics/", "/admin", "/../etc/passwd"):
        status, _, body = _request(server, path)
        assert status == 404, path
        assert path not in body
    assert _request(server, "/metrics?name[]=x")[0] == 200
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"):
        for path in ("/metrics", "/healthz", "/readyz", "/nope"):
            status, headers, _ = _request(server, path, method)
            assert status == 405, (method, path)
            assert headers["allow"] == "GET"
    status, headers, body = _request(server, "/metrics", "HEAD")
    assert (status, body) == (405, "")


def test_start_stop_idempotent_and_releases_port(metrics: Metrics) -> None:
    srv = MetricsServer(metrics, "127.0.0.1", 0)
    srv.start()
    srv.start()
    port = srv.port
    assert srv.running and _request(srv, "/healthz")[0] == 200
    srv.stop()
    srv.stop()
    assert not srv.running
    again = MetricsServer(metrics, "127.0.0.1", port).start()  # the port is free again
    try:
        assert _request(again, "/healthz")[0] == 200
    finally:
        again.stop()


def test_concurrent_scrapes(metrics: Metrics, server: MetricsServer) -> None:
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            for _ in range(10):
                assert _request(server, "/metrics")[0] == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for i in range(200):
        metrics.observe_outcomes("select", [("accepted", None, 0.1, 0.2)])
        metrics.set_lag("select", "t", i % 4, i)
    for t in threads:
        t.join()
    assert not errors


def test_no_config_or_secret_in_any_response(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets in the process config never reach a response; only known families exist."""
    monkeypatch.setenv("INFOGROWTH_KAFKA__CLIENT", f'{{"sasl.password": "{SECRET}"}}')
    monkeypatch.setenv("INFOGROWTH_KAFKA__BOOTSTRAP_SERVERS", "secret-host.internal:9093")
    settings = load_settings()
    assert settings.kafka.client["sasl.password"] == SECRET  # the secret is really loaded
    m = Metrics()
    m.observe_outcomes("select", [("rejected", "redundant", 0.1, 0.9)])
    m.set_ready(True)
    with MetricsServer(m, "127.0.0.1", 0) as srv:
        bodies = [_request(srv, p)[2] for p in ("/metrics", "/healthz", "/readyz", "/x")]
        bodies.append(_request(srv, "/metrics", "POST")[2])
    for body in bodies:
        assert SECRET not in body
        assert "secret-host" not in body
        assert "sasl" not in body
    allowed = re.compile(r"^(infogrowth_[a-z_]+|python_[a-z_]+|process_[a-z_]+)$")
    families = _families(bodies[0])
    assert families, "empty exposition"
    assert all(allowed.match(f) for f in families), sorted(families)
    ours = {f for f in families if f.startswith("infogrowth_")}
    assert ours >= {
        "infogrowth_samples_total",
        "infogrowth_gain",
        "infogrowth_alignment",
        "infogrowth_snapshot_age_seconds",
        "infogrowth_ready",
        "infogrowth_build_info",
    }
    runtime_only = _families(Metrics(runtime=False).exposition().decode())
    assert all(f.startswith("infogrowth_") for f in runtime_only)


def test_failing_exposition_is_a_500(
    metrics: Metrics, server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(accept: str | None) -> tuple[bytes, str]:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(metrics, "negotiate", boom)
    status, _, body = _request(server, "/metrics")
    assert (status, body) == (500, "exposition failed\n")
    assert _request(server, "/healthz")[0] == 200  # the server keeps serving
