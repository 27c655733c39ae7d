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
