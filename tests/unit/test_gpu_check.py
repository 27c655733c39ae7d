"""scripts/gpu-check.sh, reduced to a few samples on the CPU: it must work before a GPU is
ever lent (the same script, the same bench code, only smaller and without CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
BIN = Path(sys.executable).parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GPU_CHECK_BIN": str(BIN),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "consumer"), str(ROOT / "devtools"), env.get("PYTHONPATH", "")]
            ),
            "INFOGROWTH_CACHE_DIR": str(tmp_path / "cache"),
            **extra,
        }
    )
    return env


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "infogrowth").exists(), reason="needs the installed CLI")
def test_gpu_check_runs_reduced_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = _env(
        tmp_path,
        GPU_CHECK_ALLOW_CPU="1",
        GPU_CHECK_MODEL="tiny",
        GPU_CHECK_SAMPLES="16",
        GPU_CHECK_BATCH="8",
        GPU_CHECK_REPEATS="1",
        GPU_CHECK_SELECT_N="1000",
        GPU_CHECK_SELECT_STREAM="256",
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu-check.json").read_text())
    embed = result["stages"]["embed"]
    assert embed["params"]["n"] == 16 and embed["params"]["batch"] == 8
    assert embed["params"]["model"].startswith("tiny")
    assert embed["params"]["decodes"] == ["cpu", "device"]
    rates = embed["samples_per_s"]
    for row in ("bare forward (floor)", "embed stage, decode cpu", "embed stage, decode device"):
        assert rates[row]["median"] > 0, row
    assert set(embed["ratio_vs_forward"]) == {"decode cpu", "decode device"}
    assert all(r["median"] > 0 for r in embed["ratio_vs_forward"].values())
    select = result["stages"]["select"]
    assert select["params"]["n"] == 1000
    assert result["machine"]["cores"] == os.cpu_count()

    md = (out / "gpu-check.md").read_text()
    assert md.startswith("Machine: ")
    for text in (
        "| bare forward (floor) |",
        "| embed stage, decode device |",
        "| ratio stage / floor, decode cpu |",
        "| ratio stage / floor, decode device |",
        "**select: 1,000 prefilled",
    ):
        assert text in md, text
    assert not (out / "work").exists()  # scratch models removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_gpu_check_refuses_a_cpu_machine_unless_allowed(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr
    assert not (tmp_path / "out" / "gpu-check.json").exists()
