"""A real Kafka broker for the integration tests (never a mock; a missing broker fails)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infogrowth.config import Settings, load_settings


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    from infogrowth.kafka.broker import broker_for_tests

    with broker_for_tests() as bootstrap:
        yield bootstrap


def write_config(
    path: Path, bootstrap: str, state_dir: Path, *, run_id: str | None = None, **extra: Any
) -> Path:
    """A config file with topics and groups unique to one test."""
    rid = run_id or uuid.uuid4().hex[:8]
    topics = {
        name: f"t{rid}.{name}"
        for name in (
            "ingest",
            "embedded",
            "changelog",
            "control",
            "accepted",
            "relabeled",
            "rejected",
        )
    }
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": topics,
            "embed_group": f"g{rid}-embed",
            "select_group": f"g{rid}-select",
            "transactional_id_prefix": f"x{rid}",
            "instance_id": "i0",
            "commit_interval_ms": 300,
            "commit_max_messages": 64,
            "session_timeout_ms": 10000,
            "client": {"topic.metadata.refresh.interval.ms": 2000},
        },
        "snapshot": {"directory": str(state_dir), "interval_s": 1.0, "interval_items": 100},
        "serve": {"host": "127.0.0.1", "port": 0},
        "select": {"batch_size": 64},
    }
    for key, value in extra.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def settings_from(path: Path) -> Settings:
    return load_settings(path)
