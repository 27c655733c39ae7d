"""A shared real broker for the chaos scenarios (broker-bounce starts its own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    from infogrowth.kafka.broker import broker_for_tests

    with broker_for_tests() as bootstrap:
        yield bootstrap
