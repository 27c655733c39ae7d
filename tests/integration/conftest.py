"""A real Kafka broker for the integration tests (never a mock; a missing broker fails)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infogrowth.config import Settings, load_settings
from infogrowth_dev.kafka.sandbox import write_sandbox_config


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    from infogrowth_dev.kafka.broker import broker_for_tests

    with broker_for_tests() as bootstrap:
        yield bootstrap


def write_config(
    path: Path, bootstrap: str, state_dir: Path, *, run_id: str | None = None, **extra: Any
) -> Path:
    """A config file with topics and groups unique to one test (dotted ``extra`` overrides)."""
    overrides: dict[str, Any] = {
        "kafka.commit_interval_ms": 300,
        "kafka.commit_max_messages": 64,
        "kafka.session_timeout_ms": 10000,
        "snapshot.interval_s": 1.0,
        "snapshot.interval_items": 100,
        "select.batch_size": 64,
        **extra,
    }
    return write_sandbox_config(path, bootstrap, state_dir, run_id=run_id, overrides=overrides)


def settings_from(path: Path) -> Settings:
    return load_settings(path)
