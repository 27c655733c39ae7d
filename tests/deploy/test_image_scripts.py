"""The image scripts' own logic (scripts/image): how the smoke test reads the chart and the image,
how it finds writes outside the volumes, the layer table, and the CI wiring. The image itself is
built and run by `make image && make test-image` (.ci/run), not here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.conftest import ROOT

pytestmark = pytest.mark.deploy


def _load(name: str) -> ModuleType:
    path = ROOT / "scripts" / "image" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"image_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


smoke = _load("smoke")
layers = _load("layers")


def _image_config(**overrides: Any) -> dict[str, Any]:
    """What `buildah inspect` reports for an image built from the Dockerfile."""
    cfg: dict[str, Any] = {
        "User": "10001:10001",
        "Entrypoint": ["infogrowth"],
        "Cmd": ["run", "--role", "all"],
        "WorkingDir": "/var/lib/infogrowth",
        "Env": [
            "PATH=/opt/venv/bin:/usr/bin",
            "HF_HOME=/opt/infogrowth/models",
            "HF_HUB_OFFLINE=1",
        ],
        "Healthcheck": {"Test": ["CMD", "python", "-c", "print(1)"]},
    }
    cfg.update(overrides)
    return {"config": cfg}


@pytest.fixture(scope="module")
def chart(helm_bin: str) -> Any:
    return smoke.render_chart(helm_bin, "infogrowth:0.1.0", "127.0.0.1:39092", 39108, "abc123")


def test_chart_run_is_what_the_statefulset_gets(chart: Any) -> None:
    assert chart.image == "infogrowth:0.1.0"
    assert chart.args == ["run", "--role", "all", "--config", "/etc/infogrowth/config.yaml"]
    assert chart.env["HF_HUB_OFFLINE"] == "1"
    assert chart.env["INFOGROWTH_KAFKA__INSTANCE_ID"] == "smoke-infogrowth-0"
    assert chart.mounts == {"/etc/infogrowth": True, "/tmp": False, "/var/lib/infogrowth": False}
    assert (chart.run_as_user, chart.run_as_group, chart.read_only_root) == (10001, 10001, True)
    assert chart.topics_args[:2] == ["topics", "create"]
    assert "127.0.0.1:39092" in chart.config_yaml
    assert "port: 39108" in chart.config_yaml
    assert "smokeabc123.ingest" in chart.config_yaml


def test_image_matching_the_chart_passes(chart: Any) -> None:
    smoke.check_image_matches_chart(_image_config(), chart)


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ({"User": "0:0"}, "USER"),
        ({"Entrypoint": ["/bin/sh", "-c"]}, "ENTRYPOINT"),
        ({"Cmd": ["curate"]}, "CMD"),
        ({"WorkingDir": "/"}, "WORKDIR"),
        ({"Env": ["HF_HOME=/root/.cache", "HF_HUB_OFFLINE=1"]}, "HF_HOME"),
        ({"Env": ["HF_HOME=/opt/infogrowth/models"]}, "HF_HUB_OFFLINE"),
        ({"Healthcheck": None}, "HEALTHCHECK"),
    ],
)
def test_image_differing_from_the_chart_fails(
    chart: Any, override: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(smoke.SmokeFailure, match=complaint):
        smoke.check_image_matches_chart(_image_config(**override), chart)


def test_healthcheck_argv() -> None:
    assert smoke.healthcheck_argv(_image_config()) == ["python", "-c", "print(1)"]
    shell = _image_config(Healthcheck={"Test": ["CMD-SHELL", "curl -f x"]})
    assert smoke.healthcheck_argv(shell) == ["/bin/sh", "-c", "curl -f x"]
    with pytest.raises(smoke.SmokeFailure):
        smoke.healthcheck_argv(_image_config(Healthcheck={"Test": ["NONE"]}))


def _product_help(monkeypatch: pytest.MonkeyPatch, *, with_tooling: bool) -> str:
    """``infogrowth --help`` as the product prints it, with or without infogrowth-dev."""
    from click.testing import CliRunner

    from infogrowth.cli import main

    if not with_tooling:
        monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0, res.output
    return res.output


def test_help_check_passes_the_product_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = _product_help(monkeypatch, with_tooling=False)
    assert smoke.check_runtime_commands(help_text) == list(smoke.RUNTIME_COMMANDS)


def test_help_check_fails_when_the_tooling_is_in_the_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    help_text = _product_help(monkeypatch, with_tooling=True)
    with pytest.raises(smoke.SmokeFailure, match=r"not in the image's set \['bench', 'chaos'"):
        smoke.check_runtime_commands(help_text)
    with pytest.raises(smoke.SmokeFailure, match=r"missing \['run'\]"):
        smoke.check_runtime_commands(help_text.replace("  run ", "  rum "))


def test_smoke_data_has_near_copies_and_one_shape() -> None:
    rows = smoke.samples(200, seed=181, prefix="c")
    assert [r["id"] for r in rows] == [f"c{i:06d}" for i in range(200)]
    assert rows == smoke.samples(200, seed=181, prefix="c")
    assert all(len(r["embedding"][s]) == smoke.DIM for r in rows for s in ("image", "text"))
    labels = {r["label"] for r in rows}
    assert 4 <= len(labels) <= 8
    img = [tuple(round(x, 2) for x in r["embedding"]["image"]) for r in rows]
    assert 5 <= len(img) - len(set(img)) <= 40  # about 10 % near-copies


def test_written_outside_sees_writes_beyond_the_volumes(tmp_path: Path) -> None:
    for d in ("var/tmp", "tmp", "var/lib/infogrowth", "home/infogrowth", "opt", "run"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "opt" / "old").write_text("from the image")
    since = time.time()
    os.utime(tmp_path / "opt" / "old", (since - 10, since - 10))
    for d in ("var/tmp", "tmp", "var/lib/infogrowth", "home/infogrowth", "opt"):
        os.utime(tmp_path / d, (since - 10, since - 10))
    time.sleep(0.01)
    assert smoke.written_outside(tmp_path, since, ["/tmp", "/var/lib/infogrowth"]) == []
    (tmp_path / "tmp" / "cache").write_text("x")
    (tmp_path / "var" / "lib" / "infogrowth" / "snap").write_text("x")
    assert smoke.written_outside(tmp_path, since, ["/tmp", "/var/lib/infogrowth"]) == []
    (tmp_path / "run" / "lock").mkdir()  # buildah run itself touches /run, not its content
    assert smoke.written_outside(tmp_path, since, ["/tmp", "/var/lib/infogrowth"]) == ["/run/lock"]
    (tmp_path / "var" / "tmp" / "stray").write_text("x")
    (tmp_path / "home" / "infogrowth" / ".cache").mkdir()
    found = smoke.written_outside(tmp_path, since, ["/tmp", "/var/lib/infogrowth"])
    assert "/var/tmp/stray" in found
    assert "/home/infogrowth/.cache" in found
    assert "/opt/old" not in found


def test_layer_rows_pair_history_with_sizes() -> None:
    image = {
        "OCIv1": {
            "rootfs": {"diff_ids": ["sha256:a", "sha256:b"]},
            "history": [
                {"created_by": "|1 VERSION=0.1.0 /bin/sh -c groupadd  x"},
                {"created_by": "/bin/sh -c #(nop) ENV X=1", "empty_layer": True},
                {"created_by": "/bin/sh -c #(nop) COPY dir:x in /opt/venv"},
            ],
        }
    }
    rows = layers.layer_rows(image, {"sha256:a": 5, "sha256:b": 7_000_000_000})
    assert rows == [(5, "RUN groupadd x"), (7_000_000_000, "COPY dir:x in /opt/venv")]
    assert layers.human(7_000_000_000) == "7.00 GB"
    with pytest.raises(SystemExit, match="sha256:b"):
        layers.layer_rows(image, {"sha256:a": 5})


def test_default_image_is_the_charts_default(helm_bin: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IMAGE"}
    image = subprocess.run(
        ["bash", "-c", "source scripts/image/env.sh && echo $IMAGE"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    rendered = subprocess.run(
        [helm_bin, "template", "x", str(ROOT / "helm" / "infogrowth")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f'image: "{image}"' in rendered


def test_ci_builds_and_tests_the_image_after_the_tests() -> None:
    steps = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith("make ")
    ]
    assert steps.index("make image") > steps.index("make test")
    assert steps.index("make test-image") == steps.index("make image") + 1


def test_every_stage_builds_on_the_base_argument() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert all(f in ("${PYTHON_IMAGE}", "builder") for f in froms), froms
    assert froms.count("${PYTHON_IMAGE}") == 2  # builder and runtime: the same interpreter path
