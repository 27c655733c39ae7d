"""Configs for isolated runs (tests, chaos, benchmarks, the demo): their own topics and groups.

Every run gets topic names, consumer groups and transactional ids derived from one run id, so
runs on a shared broker never see each other's data.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml

TOPIC_ROLES = ("ingest", "embedded", "changelog", "control", "accepted", "relabeled", "rejected")


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(cfg, "kafka.topics.ingest_partitions", 2)`` on a nested mapping."""
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def sandbox_config(
    bootstrap: str,
    state_dir: Path,
    *,
    run_id: str | None = None,
    prefix: str = "t",
    instance: str = "i0",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A settings mapping for one isolated run; ``overrides`` uses dotted keys."""
    rid = run_id or uuid.uuid4().hex[:8]
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": {role: f"{prefix}{rid}.{role}" for role in TOPIC_ROLES},
            "embed_group": f"{prefix}{rid}-embed",
            "select_group": f"{prefix}{rid}-select",
            "transactional_id_prefix": f"{prefix}{rid}",
            "instance_id": instance,
            "client": {"topic.metadata.refresh.interval.ms": 2000},
        },
        "snapshot": {"directory": str(state_dir)},
        "serve": {"host": "127.0.0.1", "port": 0},
    }
    for key, value in (overrides or {}).items():
        set_dotted(cfg, key, value)
    return cfg


def write_sandbox_config(path: Path, bootstrap: str, state_dir: Path, **kwargs: Any) -> Path:
    """:func:`sandbox_config` written as YAML (for ``infogrowth run --config``)."""
    path.write_text(yaml.safe_dump(sandbox_config(bootstrap, state_dir, **kwargs)))
    return path
