"""Boundary replication in the Kafka select stage, without a broker (fake messages and output)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infogrowth.cells import Cells
from infogrowth.kafka.select import SelectProcessor
from infogrowth.messages import embedded_record
from infogrowth.metrics import Metrics
from infogrowth.schema import Embedded, pack, unpack
from infogrowth.select import Thresholds
from tests.fixtures.helpers import make_settings

EMBEDDED = "infogrowth.embedded"


@dataclass
class Msg:
    """What the select stage reads off a consumed message."""

    _value: bytes
    _partition: int
    _offset: int
    _topic: str = EMBEDDED
    _key: bytes | None = None
    _headers: list[tuple[str, bytes]] | None = None

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def error(self) -> None:
        return None

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


@dataclass
class Out:
    records: list[tuple[str, int | None, dict[str, Any]]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    first: dict[tuple[str, int], int] = field(default_factory=dict)
    headers: list[list[tuple[str, bytes]] | None] = field(default_factory=list)
    """The headers of each record in ``records``."""

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        kind = "embedded" if topic.endswith("embedded") else "changelog"
        if not topic.endswith(("embedded", "changelog")):
            kind = "output"
        self.records.append((topic, partition, unpack(kind, value, max_bytes=1 << 30)))
        self.headers.append(headers)

    def on(self, suffix: str) -> list[tuple[int | None, dict[str, Any]]]:
        return [(p, r) for t, p, r in self.records if t.endswith(suffix)]


def _unit(*x: float) -> np.ndarray:
    v = np.asarray(x, dtype=np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


CENTROIDS = np.eye(4, dtype=np.float32)[:2]  # cell 0 along x, cell 1 along y (image only)


def _proc(margin: float = 0.05) -> SelectProcessor:
    settings = make_settings(
        kafka={
            "topics": {"embedded": EMBEDDED, "embedded_partitions": 2},
            "cells_replication_margin": margin,
        },
        **{"index.threads": 1},
    )
    t = Thresholds(policy="all", k=2, epsilon={"image": 0.01})
    proc = SelectProcessor(settings, t, None, "test")
    proc.cells = Cells("kmeans", ("image",), CENTROIDS, 2, (4,))
    proc.owned = {0, 1}
    return proc


def _msg(e: Embedded, partition: int, offset: int) -> Msg:
    return Msg(pack("embedded", embedded_record(e, include_image=False)), partition, offset)


BORDER = Embedded(id="border", vectors={"image": _unit(1.0, 0.98, 0.0, 0.1)}, cell=0)
INNER = Embedded(id="inner", vectors={"image": _unit(1.0, 0.1, 0.0, 0.1)}, cell=0)
COPY = Embedded(id="copy", vectors={"image": _unit(0.98, 1.0, 0.0, 0.1)}, cell=1)


def test_a_kept_border_item_is_replicated_to_the_neighbouring_partition() -> None:
    proc, out = _proc(), Out()
    proc.metrics = Metrics()
    proc.process([_msg(BORDER, 0, 0), _msg(INNER, 0, 1)], out)  # type: ignore[arg-type]
    assert sorted(r["id"] for _, r in out.on("accepted")) == ["border", "inner"]
    items = [(p, r["id"]) for p, r in out.on("changelog") if "id" in r]  # not the state record
    assert sorted(items) == [(0, "border"), (0, "inner")]
    replicas = out.on("embedded")
    assert [(p, r["id"], r["cell"], r["replica"]) for p, r in replicas] == [(1, "border", 1, True)]
    assert proc.replicas_sent == 1
    sent = proc.metrics.registry.get_sample_value(
        "infogrowth_cell_replicas_total", {"direction": "sent"}
    )
    assert sent == 1.0


def test_margin_zero_replicates_nothing() -> None:
    proc, out = _proc(margin=0.0), Out()
    proc.process([_msg(BORDER, 0, 0)], out)  # type: ignore[arg-type]
    assert out.on("embedded") == []


def test_the_owner_indexes_a_replica_without_an_output_and_the_copy_meets_it() -> None:
    proc, out = _proc(), Out()
    proc.process([_msg(BORDER, 0, 0)], out)  # type: ignore[arg-type]
    (_, rec), *_ = out.on("embedded")
    replica = Msg(pack("embedded", rec), 1, 0)
    out2 = Out()
    # the replica, then the copy, in one batch: the copy sees the replica (input order)
    proc.process([replica, _msg(COPY, 1, 1)], out2)  # type: ignore[arg-type]
    assert "border" in proc.states[1] and proc.replicas_applied == 1
    outputs = [r for t, _, r in out2.records if not t.endswith(("changelog", "embedded"))]
    assert [(r["id"], r["decision"], r.get("reason")) for r in outputs] == [
        ("copy", "rejected", "duplicate")
    ]
    # the replica went to the owner's own changelog partition, and is not replicated again
    items = [(q, r["id"]) for q, r in out2.on("changelog") if "id" in r]  # not the state record
    assert items == [(1, "border")]
    assert out2.on("embedded") == []
    assert proc.pending == 2  # outputs of border and copy only


def test_a_copy_before_the_replica_in_the_input_does_not_see_it() -> None:
    proc, out = _proc(), Out()
    proc.process([_msg(BORDER, 0, 0)], out)  # type: ignore[arg-type]
    (_, rec), *_ = out.on("embedded")
    out2 = Out()
    proc.process([_msg(COPY, 1, 0), Msg(pack("embedded", rec), 1, 1)], out2)  # type: ignore[arg-type]
    outputs = [r for t, _, r in out2.records if not t.endswith(("changelog", "embedded"))]
    assert [(r["id"], r["decision"]) for r in outputs] == [("copy", "accepted")]
    # the copy is kept in partition 1 and itself sits near the border: replicated to partition 0
    assert [(q, r["id"]) for q, r in out2.on("embedded")] == [(0, "copy")]
