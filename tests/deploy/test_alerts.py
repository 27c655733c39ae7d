"""Alert rules: `promtool check rules`, `promtool test rules` (a firing and a silent case per
alert), only exported metric names, and the chart's PrometheusRule checked by promtool too."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import CI_VALUES, RULES, RULES_TESTS, Helm
from tests.deploy.promql import exported_metric_names, metric_names

pytestmark = pytest.mark.deploy

REQUIRED = {
    "InfoGrowthConsumerLagGrowing",  # consumer lag growing
    "InfoGrowthNoProgress",  # no progress
    "InfoGrowthInputWaitingTooLong",  # lag in seconds (the oldest waiting message)
    "InfoGrowthTransactionAborts",  # transaction aborts rate
    "InfoGrowthSnapshotTooOld",  # snapshot too old
    "InfoGrowthRestoreSlow",  # restore taking too long (completed restores)
    "InfoGrowthNotReady",  # restore taking too long (still restoring)
    "InfoGrowthMalformedRatioHigh",  # malformed ratio spike
}


def _rules(path: Path = RULES) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text())
    return [r for g in data["groups"] for r in g["rules"]]


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)


def test_promtool_check_rules(promtool_bin: str) -> None:
    res = _promtool(promtool_bin, "check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in res.stdout


def test_promtool_unit_tests(promtool_bin: str) -> None:
    res = _promtool(promtool_bin, "test", "rules", str(RULES_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {r["alert"] for r in _rules()}
    assert alerts == REQUIRED
    tests = yaml.safe_load(RULES_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fires == alerts, f"no firing case for {alerts - fires}"
    assert silent == alerts, f"no silent case for {alerts - silent}"


def test_rules_read_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for rule in _rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']} reads unknown metrics {names - exported}"


def test_every_alert_is_documented() -> None:
    for rule in _rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_chart_prometheusrule_passes_promtool(
    helm: Helm, promtool_bin: str, tmp_path: Path
) -> None:
    """The groups the chart renders (extra labels merged in) are valid Prometheus rules."""
    gpu = next(p for p in CI_VALUES if p.name == "gpu-values.yaml")
    (rule,) = helm.template(gpu).of("PrometheusRule")
    path = tmp_path / "rendered-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    res = _promtool(promtool_bin, "check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
