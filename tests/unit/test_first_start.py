"""A first start (no snapshot yet) is normal and logged as such, at INFO; a snapshot that
exists but cannot be used still warns. The changelog is stubbed out: no broker needed."""

from __future__ import annotations

import logging
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from infogrowth.kafka import control, restore
from infogrowth.kafka.select import SelectProcessor
from infogrowth.select import Thresholds
from tests.fixtures.helpers import make_settings


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SelectProcessor:
    class NoChangelog:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.end: int | None = 0

        def __iter__(self) -> Generator[Any, None, None]:
            yield from ()

    monkeypatch.setattr(control, "end_offset", lambda *a, **k: 0)
    monkeypatch.setattr(control, "PartitionReader", NoChangelog)
    monkeypatch.setattr(restore, "PartitionReader", NoChangelog)
    settings = make_settings(**{"index.threads": 1, "snapshot.directory": str(tmp_path)})
    p = SelectProcessor(
        settings, Thresholds(policy="all", k=2, epsilon={"image": 0.01}), None, "test"
    )
    p.spaces, p.dims = ("image",), {"image": 8}
    p.changelog_id = "changelog-id"
    return p


def test_first_start_logs_info_not_a_warning(
    proc: SelectProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="infogrowth")
    assert proc.restore(0) is None
    ours = [r for r in caplog.records if r.name == "infogrowth.kafka.restore"]
    assert not [r for r in ours if r.levelno >= logging.WARNING], [r.message for r in ours]
    assert any(r.levelno == logging.INFO and "first start" in r.message for r in ours)


def test_an_unusable_snapshot_still_warns(
    proc: SelectProcessor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snap = proc.snapshot_dir(0)
    snap.mkdir(parents=True)
    (snap / "CURRENT").write_text("snap-000001\n")  # names a snapshot that is not there
    caplog.set_level(logging.INFO, logger="infogrowth")
    assert proc.restore(0) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("replaying the changelog" in r.message for r in warnings)
    assert not any("first start" in r.message for r in caplog.records)
