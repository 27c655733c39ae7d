"""The Grafana dashboard: valid JSON, the panels operators need, and PromQL that names only the
metrics the service exports (the scrape test also runs every query on a real Prometheus)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.conftest import DASHBOARD
from tests.deploy.promql import dashboard_exprs, exported_metric_names, load_dashboard, metric_names

pytestmark = pytest.mark.deploy


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard(DASHBOARD)


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_parses_and_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "infogrowth"
    assert dashboard["title"] == "InfoGrowth"
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_query_names_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_metric_names()
    seen: set[str] = set()
    for title, expr in dashboard_exprs(dashboard):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= exported, f"{title}: unknown metrics {names - exported} in {expr!r}"
        seen |= names
    # Every family the service exports is on the dashboard.
    missing = {_family(n) for n in exported} - {_family(n) for n in seen}
    assert not missing, f"exported but not shown: {sorted(missing)}"


def _family(name: str) -> str:
    for suffix in ("_total", "_bucket", "_sum", "_count", "_created"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_required_panels(dashboard: dict[str, Any]) -> None:
    by_title = {p["title"]: p for p in _panels(dashboard)}
    required = {
        "Throughput by decision": ("infogrowth_samples_total", "by (decision)"),
        "Gain distribution": ("infogrowth_gain_bucket", ""),
        "Alignment distribution": ("infogrowth_alignment_bucket", ""),
        "Consumer lag by stage and partition": ("infogrowth_consumer_lag", ""),
        "Stage step latency (p50 / p99)": ("infogrowth_stage_duration_seconds_bucket", ""),
        "Index size by partition": ("infogrowth_index_items", "by (partition)"),
    }
    for title, (metric, grouping) in required.items():
        assert title in by_title, f"missing panel {title!r}"
        exprs = [t["expr"] for t in by_title[title]["targets"]]
        assert any(metric in e and grouping in e for e in exprs), (title, exprs)
    assert by_title["Gain distribution"]["type"] == "heatmap"
    assert by_title["Gain distribution"]["targets"][0]["format"] == "heatmap"


def test_panels_use_the_datasource_variable_and_fit_the_grid(dashboard: dict[str, Any]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'namespace=~"$namespace"' in target["expr"], (panel["title"], target["expr"])
