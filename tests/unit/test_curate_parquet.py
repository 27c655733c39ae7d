"""`infogrowth curate --format parquet` on an img2dataset-style Parquet file whose images come as
bytes, as http:// URLs (a local server) and as s3:// URLs (moto's server), read back with
``datasets.load_dataset("parquet")``: every input exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from infogrowth.cli import main
from infogrowth.parquet_out import output_schema
from infogrowth.schema import load_schema
from tests.fixtures.models import make_jpeg, tiny_clip
from tests.fixtures.servers import http_files, moto_s3, s3_options

OUTPUTS = ("accepted", "relabeled", "rejected")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("models") / "clip")


def load(out: Path) -> Any:
    import datasets

    files = [str(out / f"{name}.parquet") for name in OUTPUTS]
    cache = out.parent / f"{out.name}-hf-cache"
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache))


def curate(out: str, table: Path, config: Path, *extra: str) -> None:
    args = ["curate", "--input", str(table), "--out", out, "--config", str(config)]
    res = CliRunner().invoke(main, [*args, "--format", "parquet", "--no-progress", *extra])
    assert res.exit_code == 0, res.output + repr(res.exception)


def test_img2dataset_parquet_with_bytes_http_and_s3_images(tmp_path: Path, clip_dir: Path) -> None:
    http_imgs = {f"/img/{i}.jpg": make_jpeg(48, 40, seed=100 + i) for i in range(4)}
    s3_imgs = {f"img/{i}.jpg": make_jpeg(40, 48, seed=200 + i) for i in range(4)}
    with (
        http_files({**http_imgs, "/private/p.jpg": make_jpeg(40, 40)}) as srv,
        moto_s3({"bkt": s3_imgs}) as endpoint,
    ):
        rows: list[dict[str, Any]] = []
        for i in range(4):
            rows.append({"key": f"b{i}", "jpg": make_jpeg(40, 40, seed=i), "url": None})
            rows.append({"key": f"h{i}", "jpg": None, "url": f"{srv.url}/img/{i}.jpg"})
            rows.append({"key": f"s{i}", "jpg": None, "url": f"s3://bkt/img/{i}.jpg"})
        rows.append({"key": "refused", "jpg": None, "url": f"{srv.url}/private/p.jpg"})
        rows.append({"key": "missing", "jpg": None, "url": f"{srv.url}/img/none.jpg"})
        for r in rows:
            r.update(caption=f"a photo {r['key']}", status="success", width=40, height=40)
        table = tmp_path / "00000.parquet"
        pq.write_table(pa.Table.from_pylist(rows), table)
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "encoder": {"kind": "dual", "model": str(clip_dir)},
                    "limits": {"image_uri_allow": [f"{srv.url}/img/", "s3://bkt/img/"]},
                    "storage": {"options": {"s3": s3_options(endpoint)}},
                }
            )
        )
        curate(str(tmp_path / "out"), table, config)
        curate(str(tmp_path / "bytes"), table, config, "--include-images")
        curate("s3://bkt/runs/one/", table, config)
        assert "/private/p.jpg" not in srv.paths_requested()

        import s3fs

        fs = s3fs.S3FileSystem(**s3_options(endpoint))
        remote = tmp_path / "from-s3"
        fs.get("bkt/runs/one/", str(remote), recursive=True)

    ds = load(tmp_path / "out")
    counts = Counter(ds["id"])
    assert set(counts) == {r["key"] for r in rows} and set(counts.values()) == {1}
    by_id = {r["id"]: r for r in ds}
    for sid in ("refused", "missing"):
        assert (by_id[sid]["decision"], by_id[sid]["reason"]) == ("rejected", "malformed")
    assert "image_uri_allow" in by_id["refused"]["detail"]
    for sid in [f"{p}{i}" for p in "bhs" for i in range(4)]:
        assert by_id[sid]["reason"] != "malformed", by_id[sid]
        assert by_id[sid]["alignment"] is not None
        assert by_id[sid]["image"] is None  # reference mode: no bytes
    assert by_id["h1"]["image_uri"] == f"{srv.url}/img/1.jpg"
    assert by_id["s2"]["image_uri"] == "s3://bkt/img/2.jpg"
    assert ds.features["gain"].dtype == "float64"
    assert ds.features["gain_by_space"]["image"].dtype == "float64"

    with_bytes = {r["id"]: r for r in load(tmp_path / "bytes")}
    assert with_bytes["h3"]["image"] == http_imgs["/img/3.jpg"]
    assert with_bytes["s0"]["image"] == s3_imgs["img/0.jpg"]

    remote_ids = Counter(load(remote)["id"])
    assert remote_ids == counts
    assert (remote / "report.json").is_file()


def test_parquet_columns_cover_the_output_schema() -> None:
    """A new field in output-record.v1.json gets its column (the schema is derived), with the
    same types after the validator has rewritten the shared schema's ``$ref``s."""
    import pyarrow as pa

    from infogrowth.schema import validate

    output_schema.cache_clear()
    validate(
        "output",
        {
            "v": 1,
            "id": "a",
            "decision": "accepted",
            "reason": None,
            "gain": 0.1,
            "thresholds": {"policy": "all", "k": 4},
        },
    )
    output_schema.cache_clear()
    schema = output_schema()
    assert schema.names == list(load_schema("output")["properties"])
    per_space = pa.struct([pa.field("image", pa.float64()), pa.field("text", pa.float64())])
    assert schema.field("gain_by_space").type == per_space
    assert schema.field("thresholds").type.field("epsilon").type == per_space
    assert schema.field("vote").type.value_type.field("value").type == pa.float64()
    assert schema.field("image").type == pa.binary()
