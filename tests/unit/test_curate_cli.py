"""`infogrowth curate` end to end on files (precomputed embeddings)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from infogrowth.cli import main
from tests.fixtures.data import clustered, read_jsonl, write_jsonl


def _curate(tmp: Path, name: str, *args: str) -> tuple[int, str, Path]:
    out = tmp / name
    res = CliRunner().invoke(main, ["curate", *args, "--out", str(out), "--no-progress"])
    return res.exit_code, res.output, out


def _outputs(out: Path) -> list[dict[str, object]]:
    rows = []
    for name in ("accepted", "relabeled", "rejected"):
        rows += read_jsonl(out / f"{name}.jsonl")
    return rows


def test_curate_exactly_one_record_per_input_and_deterministic(tmp_path: Path) -> None:
    data = clustered(300, dup_rate=0.1, flip_rate=0.1, seed=40)
    rows: list[dict[str, object]] = list(data.samples)
    rows.insert(5, {"id": "bad-nan", "embedding": {"image": [1.0] * 31 + [float("nan")]}})
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, rows)
    with inp.open("a") as fh:
        fh.write("{not json\n")
    seed = write_jsonl(tmp_path / "seed.jsonl", clustered(100, seed=41, prefix="seed").samples)

    code, output, out = _curate(tmp_path, "a", "--input", str(inp), "--seed", str(seed))
    assert code == 0, output
    recs = _outputs(out)
    ids = Counter(str(r["id"]) for r in recs)
    assert len(recs) == len(rows) + 1
    assert all(n == 1 for n in ids.values())
    assert set(ids) >= {str(r["id"]) for r in rows}
    bad = [r for r in recs if r["reason"] == "malformed"]
    assert len(bad) == 2 and any(r["id"] == "bad-nan" for r in bad)
    assert all(r["payload"] for r in bad)

    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == len(rows) + 1
    assert sum(report["decisions"].values()) == len(rows) + 1
    assert report["thresholds"]["policy"] == "all"
    assert report["calibration"]["seed"] is True and report["calibration"]["vote"] is not None
    assert report["online"]["seen"] == report["online"]["kept"] > 0
    assert set(report["stage_samples_per_s"]) >= {"embed", "select"}

    code, output, out_b = _curate(tmp_path, "b", "--input", str(inp), "--seed", str(seed))
    assert code == 0
    for name in ("accepted", "relabeled", "rejected"):
        assert (out / f"{name}.jsonl").read_bytes() == (out_b / f"{name}.jsonl").read_bytes()


def test_curate_config_error_names_key(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", clustered(5, seed=42).samples)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("select:\n  k: zero\n")
    code, output, out = _curate(tmp_path, "o", "--input", str(inp), "--config", str(cfg))
    assert code != 0 and "select.k" in output
    assert not out.exists()


def test_sample_policy_without_calibration_fails_fast(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", clustered(5, seed=43).samples)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("select:\n  policy: sample\n")
    code, output, _ = _curate(tmp_path, "o", "--input", str(inp), "--config", str(cfg))
    assert code != 0 and "g_scale" in output


def test_secrets_never_reach_report_or_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hunter2-do-not-print"
    monkeypatch.setenv(
        "INFOGROWTH_KAFKA__CLIENT",
        json.dumps({"security.protocol": "SASL_SSL", "sasl.password": secret}),
    )
    inp = write_jsonl(tmp_path / "in.jsonl", clustered(20, seed=44).samples)
    code, output, out = _curate(tmp_path, "o", "--input", str(inp))
    assert code == 0, output
    report = (out / "report.json").read_text()
    assert secret not in report and "SASL_SSL" in report
    assert secret not in output and secret not in caplog.text
