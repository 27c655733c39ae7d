"""A shared real broker for the chaos scenarios (broker-bounce starts its own), and a shared
3-node cluster for the cluster scenarios (started only when one of them runs)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    from infogrowth_dev.kafka.broker import broker_for_tests

    with broker_for_tests() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[Any]:
    from infogrowth_dev.kafka.cluster import LocalCluster

    with LocalCluster(3) as cluster:
        yield cluster
