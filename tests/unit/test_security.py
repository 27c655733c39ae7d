"""Security holes of issue 13: image paths confined to a root, secrets redacted wherever settings
are printed, /healthz without exception text, a bounded metrics HTTP server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from infogrowth.cli import main
from infogrowth.config import LimitsConfig
from infogrowth.files import read_inputs, read_jsonl
from infogrowth.schema import Malformed, Sample
from tests.fixtures.data import read_jsonl as read_records
from tests.fixtures.data import write_jsonl
from tests.fixtures.models import make_jpeg

pytestmark = pytest.mark.timeout(60)

LIMITS = LimitsConfig()
JPEG = make_jpeg(24, 16, seed=3)


# ---- image paths ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``data/`` (the input's folder, one good image) next to ``outside/`` (a valid JPEG that
    must never be read through a JSONL line); HOME points at ``home/`` holding another."""
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "ok.jpg").write_bytes(JPEG)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jpg").write_bytes(JPEG)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "h.jpg").write_bytes(JPEG)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "outside")  # nor through the working directory
    return tmp_path


def _one(tree: Path, image: str, **kw: Any) -> Sample | Malformed:
    path = write_jsonl(tree / "data" / "in.jsonl", [{"id": "x", "text": "t", "image": image}])
    items = list(read_jsonl(path, kw.pop("limits", LIMITS), **kw))
    assert len(items) == 1
    return items[0]


@pytest.mark.parametrize(
    "image",
    [
        "../outside/secret.jpg",
        "imgs/../../outside/secret.jpg",
        "~/h.jpg",
        "secret.jpg",  # relative to the working directory
        "ABSOLUTE",
    ],
)
def test_paths_out_of_the_input_folder_are_malformed(tree: Path, image: str) -> None:
    if image == "ABSOLUTE":
        image = str(tree / "outside" / "secret.jpg")
    item = _one(tree, image)
    assert isinstance(item, Malformed), image
    assert item.detail.startswith("image:")
    assert "image root" in item.detail or "neither" in item.detail, item.detail
    assert item.id == "x"


def test_system_files_never_load(tree: Path) -> None:
    for image in ("/proc/self/environ", "/etc/passwd", "../../../../../../../../etc/passwd"):
        item = _one(tree, image)
        assert isinstance(item, Malformed), image
        assert "image root" in item.detail, item.detail


def test_symlink_out_of_the_root_is_refused_inside_is_fine(tree: Path) -> None:
    (tree / "data" / "escape.jpg").symlink_to(tree / "outside" / "secret.jpg")
    (tree / "data" / "dirlink").symlink_to(tree / "outside", target_is_directory=True)
    (tree / "data" / "alias.jpg").symlink_to(tree / "data" / "imgs" / "ok.jpg")
    for image in ("escape.jpg", "dirlink/secret.jpg"):
        item = _one(tree, image)
        assert isinstance(item, Malformed), image
        assert "outside the image root" in item.detail
    for image in ("alias.jpg", "imgs/ok.jpg", str(tree / "data" / "imgs" / "ok.jpg")):
        item = _one(tree, image)
        assert isinstance(item, Sample) and item.image == JPEG, image


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_special_files_are_refused_without_blocking(tree: Path) -> None:
    os.mkfifo(tree / "data" / "pipe.jpg")  # a read would block forever
    item = _one(tree, "pipe.jpg")
    assert isinstance(item, Malformed) and "not a regular file" in item.detail
    (tree / "data" / "dir.jpg").mkdir()
    item = _one(tree, "dir.jpg")
    assert isinstance(item, Malformed) and "not a regular file" in item.detail


def test_image_files_are_bounded_by_limits(tree: Path) -> None:
    small = LimitsConfig(max_image_bytes=len(JPEG) - 1)
    item = _one(tree, "imgs/ok.jpg", limits=small)
    assert isinstance(item, Malformed) and "over the limit" in item.detail
    assert isinstance(_one(tree, "imgs/ok.jpg"), Sample)


def test_explicit_image_root(tree: Path) -> None:
    """``image_root`` widens (or narrows) the root; relative paths still start at the file."""
    item = _one(tree, "../outside/secret.jpg", image_root=tree)
    assert isinstance(item, Sample) and item.image == JPEG
    item = _one(tree, "imgs/ok.jpg", image_root=tree / "outside")
    assert isinstance(item, Malformed) and "outside the image root" in item.detail
    path = tree / "data" / "in.jsonl"
    assert all(isinstance(it, Sample) for it in read_inputs([path], LIMITS, image_root=tree))


def test_curate_turns_refused_paths_into_one_malformed_record_each(tree: Path) -> None:
    rows = [
        {"id": "good", "text": "a cat", "embedding": {"text": [1.0, 0.0, 0.0]}},
        {"id": "abs", "text": "t", "image": str(tree / "outside" / "secret.jpg")},
        {"id": "up", "text": "t", "image": "../outside/secret.jpg"},
        {"id": "env", "text": "t", "image": "/proc/self/environ"},
    ]
    inp = write_jsonl(tree / "data" / "in.jsonl", rows)
    out = tree / "out"
    args = ["curate", "--input", str(inp), "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rejected = {r["id"]: r for r in read_records(out / "rejected.jsonl")}
    assert set(rejected) == {"abs", "up", "env"}
    for r in rejected.values():
        assert r["reason"] == "malformed"
        assert "image root" in r["detail"]
    # --image-root one level up lets ../outside in
    res = CliRunner().invoke(main, [*args[:-1], "--image-root", str(tree), "--no-progress"])
    assert res.exit_code == 0, res.output
    rejected = {r["id"]: r for r in read_records(out / "rejected.jsonl")}
    assert "up" not in rejected or "image root" not in rejected["up"]["detail"]
    assert "image root" in rejected["env"]["detail"]


def test_produce_never_ships_files_out_of_the_root(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``produce`` sends the refused line as it is (the curator rejects it): never the bytes."""
    import infogrowth.kafka.tools as tools
    from tests.fixtures.helpers import make_settings

    secret = b"TOP-SECRET-BYTES"
    (tree / "outside" / "secret.jpg").write_bytes(secret)
    sent: list[bytes] = []

    class FakeProducer:
        def __init__(self, conf: dict[str, Any]) -> None:
            pass

        def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any) -> None:
            sent.append(value)

        def poll(self, timeout: float) -> int:
            return 0

        def flush(self, timeout: float) -> int:
            return 0

    monkeypatch.setattr(tools, "Producer", FakeProducer)
    rows = [
        {"id": "abs", "text": "t", "image": str(tree / "outside" / "secret.jpg")},
        {"id": "up", "text": "t", "image": "../outside/secret.jpg"},
    ]
    inp = write_jsonl(tree / "data" / "in.jsonl", rows)
    assert tools.produce(make_settings(), [inp], "t") == 2
    assert len(sent) == 2 and not any(secret in v for v in sent)
    sent.clear()
    assert tools.produce(make_settings(), [inp], "t", image_root=tree) == 2
    assert all(secret in v for v in sent)  # an explicit root lets them in


def test_produce_cli_has_image_root() -> None:
    res = CliRunner().invoke(main, ["produce", "--help"])
    assert "--image-root" in res.output
    res = CliRunner().invoke(main, ["curate", "--help"])
    assert "--image-root" in res.output
