"""``infogrowth dev-broker``: a detached local Kafka for development (see :mod:`.kafka.broker`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click


def _state_dir() -> Path:
    return Path(os.environ.get("INFOGROWTH_CACHE_DIR", Path.home() / ".cache" / "infogrowth"))


@click.group("dev-broker")
def command() -> None:
    """A local single-node Kafka 4.x (KRaft) from Maven Central jars, for development."""


@command.command("start")
def start() -> None:
    """Start (or find) the detached broker; prints its bootstrap address."""
    from infogrowth_dev.kafka.broker import start_detached

    click.echo(start_detached(_state_dir()))


@command.command("stop")
def stop() -> None:
    """Stop the detached broker."""
    from infogrowth_dev.kafka.broker import stop_detached

    click.echo("stopped" if stop_detached(_state_dir()) else "not running")


@command.command("status")
def status() -> None:
    """Print the detached broker's address and process (exit 1 when none runs)."""
    from infogrowth_dev.kafka.broker import detached_status

    st = detached_status(_state_dir())
    click.echo(json.dumps(st, indent=2) if st else "not running")
    sys.exit(0 if st else 1)
