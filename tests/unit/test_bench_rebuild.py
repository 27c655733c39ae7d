"""``bench --stage restore``'s restore-at-scale part: with snapshot, full replay, fast rebuild."""

from __future__ import annotations

from pathlib import Path

from infogrowth.bench import rebuild


def test_rebuild_bench_measures_the_three_restores_side_by_side(tmp_path: Path) -> None:
    res = rebuild.bench(sizes=[600], dim=8, tail=200, workdir=tmp_path)
    (row,) = res["sizes"]
    assert row["n"] == 600 and row["snapshot_bytes"] > 0
    assert row["with_snapshot_s"] == round(row["snapshot_load_s"] + row["tail_s"], 2)
    for key in ("full_replay_items_per_s", "fast_rebuild_items_per_s", "tail_items_per_s"):
        assert row[key] > 0
    assert res["params"]["fast_threads_per_index"] >= 1
    (table,) = rebuild.tables(res)
    assert len(table.rows) == 1 and "600" in table.markdown()
