"""Deployment artefacts checked with the real tools: hadolint, helm, kubernetes-validate, promtool,
a Prometheus server. `make tools` (part of `make test`) installs them; a missing tool fails the
tests with the command that installs it, never skips them."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "infogrowth"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RULES = ROOT / "deploy" / "prometheus" / "infogrowth-alerts.yaml"
RULES_TESTS = ROOT / "deploy" / "prometheus" / "infogrowth-alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "infogrowth-dashboard.json"
INSTALL_TOOLS = ROOT / "scripts" / "install-tools.sh"

KUBE_VERSIONS = ("1.29.0", "1.37.0")
"""Kubernetes versions the manifests are validated against: the chart's minimum (Chart.yaml
kubeVersion) and the newest kubernetes-validate (pinned in pyproject) ships schemas for."""


def _tool(name: str, path: str | None) -> str:
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"{name} is not installed: run `make tools` (scripts/install-tools.sh)")
    return path


@pytest.fixture(scope="session")
def helm_bin() -> str:
    path = (
        os.environ.get("HELM")
        or subprocess.run(
            ["bash", str(INSTALL_TOOLS), "--print-helm"], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    return _tool("helm", path)


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    return _tool("promtool", shutil.which("promtool"))


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _tool("prometheus", shutil.which("prometheus"))


@dataclass
class Rendered:
    """`helm template` output: the manifests, parsed."""

    docs: list[dict[str, Any]]

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.of(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]


class Helm:
    def __init__(self, binary: str) -> None:
        self.binary = binary

    def run(self, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120
        )

    def template(
        self, *values: Path, sets: tuple[str, ...] = (), release: str = "ig", namespace: str = "ml"
    ) -> Rendered:
        res = self.template_raw(*values, sets=sets, release=release, namespace=namespace)
        assert res.returncode == 0, res.stderr
        docs = [d for d in yaml.safe_load_all(res.stdout) if d]
        return Rendered(docs)

    def template_raw(
        self, *values: Path, sets: tuple[str, ...] = (), release: str = "ig", namespace: str = "ml"
    ) -> subprocess.CompletedProcess[str]:
        args = ["template", release, str(CHART), "--namespace", namespace]
        args += ["--kube-version", KUBE_VERSIONS[0]]
        for v in values:
            args += ["-f", str(v)]
        for s in sets:
            args += ["--set", s]
        return self.run(*args)


@pytest.fixture(scope="session")
def helm(helm_bin: str) -> Helm:
    return Helm(helm_bin)
