"""Table inputs: img2dataset Parquet, folders of Parquet files, Hugging Face save_to_disk
folders, clip-retrieval embeddings, column mapping, and the same read from HTTP and S3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infogrowth.config import ColumnsConfig, LimitsConfig, StorageConfig
from infogrowth.errors import ConfigError
from infogrowth.files import count_inputs, read_inputs
from infogrowth.schema import Malformed, Sample
from tests.fixtures.models import make_jpeg
from tests.fixtures.servers import http_files, moto_s3, s3_options

LIMITS = LimitsConfig()


def img2dataset_table(n: int, start: int = 0) -> pa.Table:
    """The columns img2dataset writes with ``output_format="parquet"``."""
    keys = [f"{i:09d}" for i in range(start, start + n)]
    return pa.table(
        {
            "url": [f"https://img.example/{k}.jpg" for k in keys],
            "caption": [f"photo {k}" for k in keys],
            "key": keys,
            "status": ["success"] * n,
            "error_message": [None] * n,
            "width": [40] * n,
            "height": [40] * n,
            "jpg": [make_jpeg(40, 40, seed=i) for i in range(start, start + n)],
        }
    )


def read(paths: list[Any], **kw: Any) -> list[Sample | Malformed]:
    return list(read_inputs(paths, kw.pop("limits", LIMITS), **kw))


def test_img2dataset_parquet(tmp_path: Path) -> None:
    path = tmp_path / "00000.parquet"
    pq.write_table(img2dataset_table(3), path, row_group_size=2)
    items = read([path])
    assert [type(i) for i in items] == [Sample] * 3
    first = items[0]
    assert isinstance(first, Sample)
    assert first.id == "000000000" and first.text == "photo 000000000"
    assert first.image == make_jpeg(40, 40, seed=0)
    assert first.image_uri == "https://img.example/000000000.jpg"
    assert first.meta == {"status": "success", "width": 40, "height": 40}
    assert first.source == {"file": "00000.parquet", "row": 0}
    assert count_inputs([path]) == 3


def test_column_flags_and_config_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(
        pa.table(
            {
                "uid": ["a", "b"],
                "body": ["first", "second"],
                "cls": [1, 2],
                "vec": [[1.0, 0.0], [0.0, 2.0]],
            }
        ),
        path,
    )
    cols = ColumnsConfig(id="uid", text="body", label="cls", embedding={"text": "vec"})
    items = read([path], columns=cols)
    a = items[0]
    assert isinstance(a, Sample) and (a.id, a.text, a.label) == ("a", "first", "1")
    assert a.embedding is not None and list(a.embedding["text"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"inputs\.columns\.text \(--text-col\).*'caption'"):
        read([path], columns=ColumnsConfig(text="caption"))
    with pytest.raises(ConfigError, match=r"inputs\.columns\.embedding\.image"):
        read([path], columns=ColumnsConfig(embedding={"image": "nope"}))
    with pytest.raises(ValueError, match="unknown space"):
        ColumnsConfig(embedding={"audio": "vec"})


def test_rows_without_an_id_column_are_named_by_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"text": ["x", "y"]}), path)
    assert [i.id for i in read([path])] == ["plain:0", "plain:1"]


def test_folder_of_parquet_files_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    pq.write_table(img2dataset_table(2, start=2), tmp_path / "ds" / "00001.parquet")
    pq.write_table(img2dataset_table(2, start=0), tmp_path / "ds" / "00000.parquet")
    (tmp_path / "ds" / "00000_stats.json").write_text("{}")
    items = read([tmp_path / "ds"])
    assert [i.id for i in items] == [f"{i:09d}" for i in range(4)]


def test_bad_rows_and_bad_files_become_malformed(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "t.parquet"
    table = {"id": ["ok", "no-content", "escape"], "image": [None, None, "../x.jpg"]}
    table["text"] = ["a", None, "c"]
    pq.write_table(pa.table(table), path)
    (tmp_path / "x.jpg").write_bytes(make_jpeg(8, 8))  # exists, but outside the table's folder
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet PAR1")
    items = read([path, broken])
    assert [type(i).__name__ for i in items] == ["Sample", "Malformed", "Malformed", "Malformed"]
    assert [i.id for i in items[:3]] == ["ok", "no-content", "escape"]
    assert "outside the image root" in items[2].detail  # type: ignore[union-attr]
    assert items[3].detail.startswith("unreadable table broken.parquet")  # type: ignore[union-attr]


def test_hugging_face_save_to_disk(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "text": datasets.Value("string"),
        }
    )
    rows = {
        "image": [{"bytes": make_jpeg(20, 20, seed=i), "path": None} for i in range(3)],
        "label": [0, 1, 1],
        "text": ["a cat", "a dog", "another dog"],
    }
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    items = read([tmp_path / "hf"])
    assert [i.id for i in items] == ["hf:0", "hf:1", "hf:2"]
    assert [i.label for i in items] == ["cat", "dog", "dog"]  # type: ignore[union-attr]
    assert items[0].image == make_jpeg(20, 20, seed=0)  # type: ignore[union-attr]

    dd = datasets.DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "hfdict"))
    items = read([tmp_path / "hfdict"])
    assert [(i.id, i.text, i.source["file"]) for i in items] == [  # type: ignore[union-attr,index]
        ("train:0", "a cat", "train/data-00000-of-00001.arrow"),
        ("train:1", "a dog", "train/data-00000-of-00001.arrow"),
        ("test:0", "another dog", "test/data-00000-of-00001.arrow"),
    ]


def clip_retrieval_folder(root: Path, rows: int = 3, vec_rows: int | None = None) -> Path:
    for sub in ("metadata", "img_emb", "text_emb"):
        (root / sub).mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "image_path": [f"/data/{i}.jpg" for i in range(rows)],
                "caption": [f"c{i}" for i in range(rows)],
            }
        ),
        root / "metadata" / "metadata_0.parquet",
    )
    rng = np.random.default_rng(0)
    n = rows if vec_rows is None else vec_rows
    np.save(root / "img_emb" / "img_emb_0.npy", rng.normal(size=(n, 8)).astype(np.float16))
    np.save(root / "text_emb" / "text_emb_0.npy", rng.normal(size=(n, 8)).astype(np.float32))
    return root


def test_clip_retrieval_embeddings_are_precomputed_vectors(tmp_path: Path) -> None:
    root = clip_retrieval_folder(tmp_path / "emb")
    img = np.load(root / "img_emb" / "img_emb_0.npy")
    items = read([root])
    assert [i.id for i in items] == ["/data/0.jpg", "/data/1.jpg", "/data/2.jpg"]
    s = items[1]
    assert isinstance(s, Sample) and s.embedding is not None and s.text == "c1"
    np.testing.assert_allclose(s.embedding["image"], img[1].astype(np.float32))
    assert set(s.embedding) == {"image", "text"}

    short = clip_retrieval_folder(tmp_path / "short", vec_rows=2)
    (bad,) = read([short])
    assert isinstance(bad, Malformed) and "2 rows for 3 metadata rows" in bad.detail


def test_remote_tables_over_http_and_s3(tmp_path: Path) -> None:
    path = tmp_path / "00000.parquet"
    pq.write_table(img2dataset_table(2), path)
    lines = "\n".join(json.dumps({"id": f"j{i}", "text": "t"}) for i in range(2)) + "\n"
    data = path.read_bytes()
    with http_files({"/d/00000.parquet": data, "/d/x.jsonl": lines.encode()}) as srv:
        items = read([f"{srv.url}/d/00000.parquet", f"{srv.url}/d/x.jsonl"])
        assert [i.id for i in items] == ["000000000", "000000001", "j0", "j1"]
    with moto_s3({"bkt": {"ds/00000.parquet": data, "ds/00001.parquet": data}}) as endpoint:
        storage = StorageConfig(options={"s3": s3_options(endpoint)})
        assert count_inputs(["s3://bkt/ds/00000.parquet"], storage) == 2
        items = read(["s3://bkt/ds/"], storage=storage)
        assert [i.source["file"] for i in items] == ["00000.parquet"] * 2 + ["00001.parquet"] * 2  # type: ignore[index]


def test_remote_jsonl_never_reads_a_local_path(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(make_jpeg(8, 8))
    line = json.dumps({"id": "x", "text": "t", "image": str(secret)}).encode() + b"\n"
    with http_files({"/x.jsonl": line}) as srv:
        (item,) = read([f"{srv.url}/x.jsonl"])
    assert isinstance(item, Malformed) and "image" in item.detail


def test_curate_column_flags(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from infogrowth.cli import main

    path = tmp_path / "t.parquet"
    vecs = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    pq.write_table(pa.table({"uid": ["a", "b", "c"], "body": ["x", "y", "z"], "vec": vecs}), path)

    def run(*flags: str) -> Any:
        args = ["curate", "--input", str(path), "--out", str(tmp_path / "out"), "--no-progress"]
        return CliRunner().invoke(main, [*args, *flags])

    res = run("--id-col", "uid", "--text-col", "body", "--embedding-col", "text=vec")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "out" / "accepted.jsonl").read_text().splitlines()]
    rejected = (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()
    assert sorted(r["id"] for r in rows) == ["a", "b"]
    assert json.loads(rejected[0])["id"] == "c" and json.loads(rejected[0])["reason"] == "duplicate"
    assert rows[0]["text"] in ("x", "y")

    res = run("--text-col", "caption")
    assert res.exit_code != 0 and "inputs.columns.text (--text-col)" in res.output
    res = run("--embedding-col", "vec")
    assert res.exit_code == 2 and "SPACE=COLUMN" in res.output
    res = run("--embedding-col", "audio=vec")
    assert res.exit_code == 2 and "unknown space" in res.output
