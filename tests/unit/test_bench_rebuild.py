"""``bench --stage restore``'s restore-at-scale part: with snapshot, full replay, fast rebuild."""

from __future__ import annotations

from pathlib import Path

import pytest

from infogrowth_dev.bench import rebuild


def test_rebuild_bench_measures_the_three_restores_side_by_side(tmp_path: Path) -> None:
    res = rebuild.bench(sizes=[600], dim=8, tail=200, workdir=tmp_path)
    (row,) = res["sizes"]
    assert row["n"] == 600 and row["snapshot_bytes"] > 0
    # each figure is rounded to 0.01 s on its own: the sum of two rounded parts may differ by one
    parts = row["snapshot_load_s"] + row["tail_s"]
    assert row["with_snapshot_s"] == pytest.approx(parts, abs=0.011)
    for key in ("full_replay_items_per_s", "fast_rebuild_items_per_s", "tail_items_per_s"):
        assert row[key] > 0
    assert res["params"]["fast_threads_per_index"] >= 1
    (table,) = rebuild.tables(res)
    assert len(table.rows) == 1 and "600" in table.markdown()


def test_the_fast_rebuild_alone_is_timed_when_asked(tmp_path: Path) -> None:
    """At millions of items on many cores only the fast rebuild fits a short machine loan: the
    other restores are left out of the row and shown as a dash."""
    res = rebuild.bench(sizes=[500], dim=8, tail=100, workdir=tmp_path, modes=["fast"])
    (row,) = res["sizes"]
    assert row["fast_rebuild_items_per_s"] > 0
    assert "full_replay_s" not in row and "with_snapshot_s" not in row
    assert res["params"]["modes"] == ["fast"]
    (table,) = rebuild.tables(res)
    assert table.markdown().count("—") == 4
    with pytest.raises(ValueError, match="choose from"):
        rebuild.bench(sizes=[10], dim=8, tail=10, modes=["fastest"])


def test_the_restore_stage_can_run_the_replay_table_alone(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from infogrowth_dev.bench import command

    out = tmp_path / "r.json"
    args = ["--stage", "restore", "--restore-sizes", "none", "--rebuild-sizes", "400"]
    args += ["--rebuild-modes", "fast", "--dim", "8", "--json", str(out)]
    got = CliRunner().invoke(command, args)
    assert got.exit_code == 0, got.output
    import json

    stage = json.loads(out.read_text())["stages"]["restore"]
    assert "sizes" not in stage, "no snapshot table"
    assert stage["rebuild"]["params"]["modes"] == ["fast"]
    bad = CliRunner().invoke(command, [*args[:4], "--rebuild-sizes", "none"])
    assert bad.exit_code != 0 and "both 'none'" in bad.output
