"""Errors and construction in their places: the import arrows between the runners, the error
classes, the settings model's cross-field checks and what the embed stage is built with."""

from __future__ import annotations

import ast
from pathlib import Path

import msgpack
import numpy as np
import pytest

import infogrowth
from infogrowth.calibrate import Calibration
from infogrowth.cells import Cells
from infogrowth.config import load_settings
from infogrowth.errors import ConfigError, DataError, InfoGrowthError
from infogrowth.kafka.embed import EmbedProcessor
from infogrowth.models import StagedImageEncoder
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import SchemaError
from infogrowth.select import Thresholds
from tests.fixtures.helpers import make_settings
from tests.unit.test_replication import Msg, Out

PACKAGE = Path(infogrowth.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every ``infogrowth`` module ``path`` imports, at any depth of the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("infogrowth")}


def _closure(module: str) -> set[str]:
    """``module`` and every package module it imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        rel = Path(*name.split(".")[1:])
        for path in (PACKAGE / rel.with_suffix(".py"), PACKAGE / rel / "__init__.py"):
            if name not in seen and path.is_file():
                seen.add(name)
                todo.extend(_imports(path) - seen)
    return seen


def test_the_file_runner_never_reaches_the_kafka_runner() -> None:
    reached = _closure("infogrowth.curate")
    assert "infogrowth.models" in reached and "infogrowth.pipeline" in reached
    assert not {m for m in reached if m.startswith("infogrowth.kafka")}


def test_the_kafka_runner_never_imports_the_file_runner() -> None:
    kafka = sorted((PACKAGE / "kafka").glob("*.py"))
    assert kafka
    for path in kafka:
        assert "infogrowth.curate" not in _imports(path), path.name


def test_errors_split_into_data_and_configuration() -> None:
    assert issubclass(DataError, InfoGrowthError) and issubclass(ConfigError, InfoGrowthError)
    assert not issubclass(DataError, ConfigError) and not issubclass(ConfigError, DataError)
    assert issubclass(SchemaError, DataError)
    assert issubclass(DataError, ValueError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"INFOGROWTH_CLEAN__FIXER": "recaption"}, "clean.recaption_model"),
        ({"INFOGROWTH_CLEAN__FIXER": "zero-shot"}, "clean.classes"),
    ],
)
def test_fixer_needs_fail_at_load_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, str], key: str
) -> None:
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=key):
        load_settings()


def test_fixer_settings_that_have_what_they_need_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFOGROWTH_CLEAN__FIXER", "zero-shot")
    monkeypatch.setenv("INFOGROWTH_CLEAN__CLASSES", '["cat", "dog"]')
    assert load_settings().clean.classes == ["cat", "dog"]


T = Thresholds(
    policy="all", k=2, epsilon={"image": 0.01}, delta=0.31, alignment_quartiles=(0.1, 0.2, 0.3)
)


def test_embed_stage_takes_its_thresholds_at_construction() -> None:
    settings = make_settings(**{"clean.delta": 0.05})
    plain = EmbedStage(settings, None, spaces=("image",), dims={"image": 4})
    assert (plain.delta, plain.alignment_reference) == (0.05, None)
    stage = EmbedStage(settings, None, spaces=("image",), dims={"image": 4}, thresholds=T)
    assert (stage.delta, stage.alignment_reference) == (0.31, (0.1, 0.2, 0.3))


def test_embed_stage_takes_up_a_calibration() -> None:
    stage = EmbedStage(make_settings(), None)
    stage.calibrate(Calibration(T, ("image",), {"image": 4}, epoch=3))
    assert (stage.delta, stage.spaces, stage.dims) == (0.31, ("image",), {"image": 4})


def test_embed_processor_routes_by_cell_to_its_partition() -> None:
    settings = make_settings(**{"clean.enabled": False})
    stage = EmbedStage(settings, None, spaces=("image",), dims={"image": 4})
    cells = Cells("kmeans", ("image",), np.eye(4, dtype=np.float32)[:2], 2, (4,))
    proc = EmbedProcessor(settings, stage, T, cells, 2)
    out = Out()
    msgs = [
        Msg(msgpack.packb({"v": 1, "id": i, "embedding": {"image": v}}), 0, n)
        for n, (i, v) in enumerate([("x", [1.0, 0, 0, 0]), ("y", [0, 1.0, 0, 0])])
    ]
    proc.process(msgs, out)  # type: ignore[arg-type]
    assert [(p, r["id"], r["cell"]) for p, r in out.on("embedded")] == [(0, "x", 0), (1, "y", 1)]


def test_the_staged_image_path_is_part_of_the_encoder_protocol() -> None:
    class Whole:
        spaces, dims, fingerprint = ("image",), {"image": 2}, "w"

        def encode_images(self, images: object) -> np.ndarray:
            return np.zeros((0, 2), np.float32)

        def encode_texts(self, texts: object) -> np.ndarray:
            return np.zeros((0, 2), np.float32)

    class Staged(Whole):
        batch_size, prefetch_depth, device = 8, 1, "cpu"

        def preprocess_images(self, images: object) -> object:
            return images

        def forward_images(self, batch: object) -> np.ndarray:
            return np.zeros((0, 2), np.float32)

    assert isinstance(Staged(), StagedImageEncoder)
    assert not isinstance(Whole(), StagedImageEncoder)
