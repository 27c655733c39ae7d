"""Inputs found by review that escaped as exceptions (a stage that crash-loops on its batch, a
file run that loses every output) instead of becoming ``rejected/malformed``: deep nesting,
text that is not text, lone surrogates, integers beyond 64 bits, tar member names that are not
UTF-8, a location that is not a URL, an unbounded label."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import msgpack
import pytest

from infogrowth.config import load_settings
from infogrowth.files import read_tar
from infogrowth.kafka.embed import EmbedProcessor
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import Malformed, Sample, parse_json_sample, parse_msgpack_sample
from infogrowth.select import Thresholds
from tests.unit.test_headers import RawOut
from tests.unit.test_replication import Msg

LIMITS = load_settings(None).limits


def _nested(depth: int) -> Any:
    x: Any = 0
    for _ in range(depth):
        x = [x]
    return x


def _embed_processor(**cfg: Any) -> EmbedProcessor:
    s = load_settings(None, **{"clean.enabled": False, **cfg})
    stage = EmbedStage(s, None, spaces=("image",), dims={"image": 4})
    t = Thresholds(policy="all", k=2, epsilon={"image": 0.01})
    return EmbedProcessor(s, stage, t, None, 1)


def test_deep_nesting_is_malformed_on_the_kafka_path() -> None:
    """An unknown key sends the record to the generic validator, which used to recurse into
    600 nested lists and raise RecursionError from process() and from the loop's reject()."""
    poison = {"id": "p", "extra": 1, "meta": {"m": _nested(600)}}
    poison["embedding"] = {"image": [1.0, 0, 0, 0]}
    good = {"id": "g", "embedding": {"image": [1.0, 0, 0, 0]}}
    msgs = [
        Msg(msgpack.packb(good), 0, 0, "infogrowth.ingest"),
        Msg(msgpack.packb(poison), 0, 1, "infogrowth.ingest"),
    ]
    proc = _embed_processor()
    out = RawOut()
    proc.process(msgs, out)  # type: ignore[arg-type]
    rejected = [msgpack.unpackb(v) for t, _, v, _ in out.records if t.endswith("rejected")]
    assert [(r["id"], r["reason"]) for r in rejected] == [("p", "malformed")]
    assert "nests too deeply" in rejected[0]["detail"]
    proc.reject(msgs[1], "unproducible", "test", RawOut())  # type: ignore[arg-type]


def test_deep_json_is_malformed() -> None:
    got = parse_json_sample(b"[" * 5000 + b"]" * 5000, LIMITS, None)
    assert isinstance(got, Malformed) and "nests too deeply" in got.detail


@pytest.mark.parametrize(
    ("obj", "expect"),
    [
        ({"id": "a", "text": b"a red car"}, "a red car"),  # msgpack bin, UTF-8
        ({"id": "a", "text": b"\xff\xfe"}, "not UTF-8"),
        ({"id": "a", "text": "x", "label": b"cat"}, "cat"),
        ({"id": "a", "text": "x", "label": "c" * 5000}, "label of 5000 characters"),
    ],
)
def test_text_and_label_are_text(obj: dict[str, Any], expect: str) -> None:
    """A binary text used to reach the text tower (which raised for the whole batch) and a
    binary label became "b'cat'"; valid UTF-8 is decoded, anything else is malformed."""
    got = parse_msgpack_sample(msgpack.packb(obj, use_bin_type=True), LIMITS)
    if isinstance(got, Sample):
        assert expect in (got.text, got.label)
    else:
        assert expect in got.detail


@pytest.mark.parametrize("field", ["id", "text", "label"])
def test_lone_surrogates_are_malformed_and_the_rejection_is_writable(field: str) -> None:
    obj = {"id": "a", "text": "x", field: "caf\ud800"}
    got = parse_json_sample(json.dumps(obj).encode(), LIMITS, None)
    assert isinstance(got, Malformed) and "not valid Unicode" in got.detail
    (got.id or "").encode("utf-8")  # the rejection's id can be written


def test_meta_beyond_what_msgpack_carries_is_malformed() -> None:
    for meta in ({"n": 2**70}, {"s": "\udc80"}):
        line = json.dumps({"id": "a", "text": "x", "meta": meta}).encode()
        assert isinstance(parse_json_sample(line, LIMITS, None), Malformed)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_odd_tar_shards_become_rejections(tmp_path: Path) -> None:
    """A member name that is not UTF-8, key.json with an integer beyond 64 bits, a lone
    surrogate or deep nesting: each key is one malformed record, the others go on."""
    shard = tmp_path / "s.tar"
    shard.write_bytes(
        _tar(
            [
                ("good.txt", b"cap"),
                ("caf\xff.txt", b"cap2"),
                ("big.txt", b"x"),
                ("big.json", b'{"n": 1180591620717411303424}'),
                ("sur.txt", b"x"),
                ("sur.json", b'{"s": "\\udc80"}'),
                ("deep.txt", b"x"),
                ("deep.json", b"[" * 5000 + b"]" * 5000),
                ("z.txt", b"cap3"),
            ]
        )
    )
    items = list(read_tar(shard, LIMITS))
    kinds = [(type(i).__name__, i.id) for i in items]
    assert kinds == [
        ("Sample", "good"),
        ("Malformed", "caf\\udcff"),
        ("Malformed", "big"),
        ("Malformed", "sur"),
        ("Malformed", "deep"),
        ("Sample", "z"),
    ]
    for i in items:
        msgpack.packb(i.source)  # every source can be written


def test_an_image_uri_that_is_not_a_url_is_malformed(caplog: pytest.LogCaptureFixture) -> None:
    class _Images:
        spaces, dims, fingerprint, batch_size = ("image",), {"image": 4}, "fake", 8

        def encode_images(self, imgs: list[Any]) -> Any:
            import numpy as np

            return np.ones((len(imgs), 4), "f4")

    s = load_settings(None, **{"clean.enabled": False, "limits.image_uri_allow": ["https://"]})
    proc = EmbedProcessor(
        s, EmbedStage(s, _Images()), Thresholds(policy="all", k=2, epsilon={"image": 0.01}), None, 1
    )
    out = RawOut()
    with caplog.at_level(logging.WARNING):
        msg = Msg(msgpack.packb({"id": "u", "image_uri": "http://[bad/x.jpg"}), 0, 0, "in")
        proc.process([msg], out)  # type: ignore[arg-type]
    (rec,) = [msgpack.unpackb(v) for _, _, v, _ in out.records]
    assert rec["reason"] == "malformed" and "not a URL" in rec["detail"]


def test_parquet_files_of_one_base_name_keep_their_rows_apart(tmp_path: Path) -> None:
    """train/part-0.parquet and val/part-0.parquet without an id column used to give their rows
    the same ids: the second file's rows were rejected as duplicate ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from infogrowth.files import read_inputs

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        table = pa.table({"caption": [f"{split} {i}" for i in range(2)]})
        pq.write_table(table, tmp_path / split / "part-0.parquet")
    s = load_settings(None)
    as_inputs = list(
        read_inputs([tmp_path / "train/part-0.parquet", tmp_path / "val/part-0.parquet"], s.limits)
    )
    in_folder = list(read_inputs([tmp_path], s.limits))
    for items in (as_inputs, in_folder):
        ids = [i.id for i in items]
        assert len(set(ids)) == 4, ids
        assert len({(i.source["file"], i.source["row"]) for i in items}) == 4
    assert sorted(i.id for i in in_folder) == [
        "train/part-0:0",
        "train/part-0:1",
        "val/part-0:0",
        "val/part-0:1",
    ]


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding() -> None:
    """A progressive JPEG decodes every scan over the whole image: 20,000 tiny scans took 17 s."""
    from PIL import Image

    from infogrowth.imaging import MAX_JPEG_SCANS, ImageError, decode_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "JPEG", progressive=True)
    ok = buf.getvalue()
    kw = {"max_bytes": 1 << 20, "max_pixels": 1 << 24}
    decode_image(ok, **kw)  # a real progressive JPEG has a handful of scans
    body = ok[:-2]
    scan = body[body.rfind(b"\xff\xda") :]
    bomb = body + scan * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    with pytest.raises(ImageError, match="scans"):
        decode_image(bomb, **kw)


def test_tar_members_beside_the_samples_are_not_read(tmp_path: Path) -> None:
    limits = load_settings(None, **{"limits.max_message_bytes": 4096}).limits
    shard = tmp_path / "s.tar"
    members = [("k.txt", b"cap")] + [(f"k.x{i:03d}", b"z" * 3000) for i in range(50)]
    members += [("m.txt", b"a" * 3000), ("m.json", b'{"caption": "' + b"b" * 2000 + b'"}')]
    shard.write_bytes(_tar(members))
    k, m = list(read_tar(shard, limits))
    assert isinstance(k, Sample) and k.text == "cap"
    assert isinstance(m, Malformed) and "exceeds the message limit" in m.detail


def test_an_over_long_jsonl_line_is_not_held_whole(tmp_path: Path) -> None:
    from infogrowth.files import OVERSIZE_KEPT, read_jsonl

    limits = load_settings(None, **{"limits.max_message_bytes": 100_000}).limits
    path = tmp_path / "in.jsonl"
    long = json.dumps({"id": "big", "text": "x" * 500_000})
    path.write_text(long + "\n" + json.dumps({"id": "ok", "text": "fine"}) + "\n")
    big, ok = list(read_jsonl(path, limits))
    assert isinstance(big, Malformed) and f"line of {len(long)} bytes" in big.detail
    assert len(big.payload) == OVERSIZE_KEPT and big.source == {"file": "in.jsonl", "line": 1}
    assert isinstance(ok, Sample) and ok.id == "ok"


def test_the_file_runner_honours_encoder_dims_as_the_kafka_path(tmp_path: Path) -> None:
    """With encoder.dims set, a first line of another dimension is the one rejected (the file
    runner used to let it fix the dimension and reject every later, correct line)."""
    from infogrowth.curate import curate

    s = load_settings(None, encoder={"dims": {"text": 3}}, **{"clean.enabled": False})
    rows = [{"id": "odd", "text": "a", "embedding": {"text": [1.0, 0.0]}}]
    rows += [
        {"id": f"r{i}", "text": "b", "embedding": {"text": [0.0, 1.0, float(i)]}} for i in range(3)
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = curate(s, [tmp_path / "in.jsonl"], tmp_path / "out")
    assert dict(result.reasons) == {"rejected/malformed": 1, "accepted": 3}
    rejected = [json.loads(x) for x in (tmp_path / "out/rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejected] == ["odd"]


def test_rejections_after_parsing_carry_the_original_message() -> None:
    """A vector of the wrong dimension or a sample with nothing to embed is rejected after it
    parsed; its rejection used to carry no bytes (or only the image's): nothing to re-produce."""
    wrong = msgpack.packb({"id": "w", "text": "t", "embedding": {"image": [1.0, 0.0]}})
    nothing = msgpack.packb({"id": "n", "text": "no image here", "meta": {"k": 1}})
    proc = _embed_processor()
    out = RawOut()
    msgs = [Msg(wrong, 0, 0, "in"), Msg(nothing, 0, 1, "in")]
    proc.process(msgs, out)  # type: ignore[arg-type]
    rejected = {
        r["id"]: r for r in (msgpack.unpackb(v) for t, _, v, _ in out.records) if "reason" in r
    }
    assert rejected["w"]["payload"] == wrong and rejected["n"]["payload"] == nothing


def test_a_message_of_empty_maps_is_refused_while_unpacking() -> None:
    """A message of 1-byte empty maps unpacks to ~70x its size (16 MiB held 1.1 GiB before the
    meta check refused it); a meta at its own limits still unpacks."""
    bomb = msgpack.packb([[{}] * 8 for _ in range(8000)])  # 72,000 containers in 80 KB
    got = parse_msgpack_sample(bomb, LIMITS)
    assert isinstance(got, Malformed) and "more maps and arrays" in got.detail
    many = {"id": "a", "text": "x", "meta": {"lists": [[] for _ in range(7000)]}}
    assert isinstance(parse_msgpack_sample(msgpack.packb(many), LIMITS), Sample)
