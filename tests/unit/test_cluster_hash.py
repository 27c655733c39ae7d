"""Which broker coordinates a transactional id or group: Kafka's own hash, reproduced.

Expected values are Java's ``String.hashCode()`` as printed by jshell (OpenJDK 17)."""

from __future__ import annotations

import pytest

from infogrowth_dev.kafka.cluster import LocalCluster, coordinator_partition, java_string_hash


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("a", 97),
        ("Aa", 2112),
        ("BB", 2112),
        ("hello", 99162322),
        ("the quick brown fox", 1302335171),
        ("chaos-abc123-select-i0", 594636552),
        ("\u00e9\u20ac\U0001f600", 16752006),  # a surrogate pair counts as two code units
        ("polygenelubricants", -(1 << 31)),  # Integer.MIN_VALUE
    ],
)
def test_java_string_hash(text: str, expected: int) -> None:
    assert java_string_hash(text) == expected


def test_coordinator_partition_uses_utils_abs() -> None:
    assert coordinator_partition("polygenelubricants", 4) == 0  # Utils.abs(MIN_VALUE) == 0
    assert coordinator_partition("hello", 50) == 99162322 % 50
    assert coordinator_partition("chaos-abc123-select-i0", 4) == 594636552 % 4


def test_cluster_config_is_validated() -> None:
    with pytest.raises(ValueError, match="min_isr"):
        LocalCluster(3, replication=2, min_isr=3)
    with pytest.raises(ValueError, match="at least one node"):
        LocalCluster(0)
