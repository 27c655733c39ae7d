"""Output records as Parquet: one table per decision, typed columns derived from
``schemas/output-record.v1.json`` (so a new field gets its column without a second list).

Numbers are ``double``, integers ``int64``, per-space scores and ``thresholds`` structs,
``vote`` a list of ``{key, value}`` pairs (label, share; ``datasets`` has no map type),
``image`` and ``payload`` binary; the free-form ``meta`` and ``source`` objects are JSON text.
The files load with ``datasets.load_dataset("parquet", ...)``, pandas or DuckDB.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any

from infogrowth.errors import DataError
from infogrowth.schema import BINARY_FIELDS, load_schema, to_json_safe

OUTPUTS = ("accepted", "relabeled", "rejected")
ROWS_PER_GROUP = 1024
JSON_TEXT = ("meta", "source")
"""Objects with free-form keys, stored as JSON text."""


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """``node``, or the definition its ``$ref`` names (relative, or made absolute with the
    schema's ``$id``, as fastjsonschema rewrites them in the shared schema object)."""
    ref = node.get("$ref")
    if isinstance(ref, str):
        fragment = ref.partition("#")[2]
        if fragment.startswith("/definitions/"):
            resolved: dict[str, Any] = root["definitions"][fragment.rsplit("/", 1)[1]]
            return resolved
    return node


def _arrow_type(name: str, node: dict[str, Any], root: dict[str, Any]) -> Any:
    import pyarrow as pa

    node = _resolve(node, root)
    if "const" in node:
        return pa.int64()
    if "enum" in node:
        return pa.string()
    kinds = node.get("type", "string")
    kinds = [kinds] if isinstance(kinds, str) else [k for k in kinds if k != "null"]
    kind = kinds[0] if kinds else "string"
    if name in JSON_TEXT:
        return pa.string()
    if kind == "string":
        return pa.binary() if name in BINARY_FIELDS else pa.string()
    if kind == "number":
        return pa.float64()
    if kind == "integer":
        return pa.int64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array":
        return pa.list_(_arrow_type(name, node.get("items", {}), root))
    if kind == "object" and "properties" in node:
        return pa.struct(
            [pa.field(k, _arrow_type(k, v, root)) for k, v in node["properties"].items()]
        )
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        value = _arrow_type(name, node["additionalProperties"], root)
        return pa.list_(pa.struct([pa.field("key", pa.string()), pa.field("value", value)]))
    return pa.string()


@cache
def output_schema() -> Any:
    """The Arrow schema of output records."""
    import pyarrow as pa

    root = load_schema("output")
    return pa.schema([pa.field(k, _arrow_type(k, v, root)) for k, v in root["properties"].items()])


def to_row(rec: dict[str, Any]) -> dict[str, Any]:
    """An output record as a row of :func:`output_schema` (JSON text for free-form objects,
    non-finite floats as null)."""
    row: dict[str, Any] = {}
    pairs = {f.name for f in output_schema() if _is_pairs(f.type)}
    for field in output_schema().names:
        value = rec.get(field)
        if field in pairs and value is not None:
            value = [{"key": k, "value": _finite(v)} for k, v in value.items()]
        elif field in JSON_TEXT:
            value = None if value is None else json.dumps(to_json_safe(value), sort_keys=True)
        elif field not in BINARY_FIELDS and value is not None:
            value = _finite(value)
        row[field] = value
    return row


def _is_pairs(t: Any) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_list(t)
        and pa.types.is_struct(t.value_type)
        and [f.name for f in t.value_type] == ["key", "value"]
    )


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _culprit(rows: list[dict[str, Any]]) -> str:
    """The first record and column that do not fit the schema (for the error message)."""
    import pyarrow as pa

    for field in output_schema():
        for row in rows:
            try:
                pa.array([row[field.name]], type=field.type)
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                return f"record {row.get('id')!r}, column {field.name} = {row[field.name]!r:.200}"
    return "no single value"  # pragma: no cover - the batch failed as a whole


class ParquetWriter:
    """``accepted.parquet``, ``relabeled.parquet``, ``rejected.parquet`` (each written even
    when empty), into temp files renamed into place on a clean close."""

    def __init__(self, out_dir: Path, names: tuple[str, ...] = OUTPUTS) -> None:
        self.dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.names = names
        self.counts = dict.fromkeys(names, 0)
        self._rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        self._writers: dict[str, Any] = {}

    def _tmp(self, name: str) -> Path:
        return self.dir / f".{name}.parquet.tmp"

    def write(self, record: dict[str, Any], table: str | None = None) -> None:
        """Add ``record`` to its decision's table (or to ``table``)."""
        name = table or str(record["decision"])
        rows = self._rows[name]
        rows.append(to_row(record))
        self.counts[name] += 1
        if len(rows) >= ROWS_PER_GROUP:
            self._flush(name)

    def _writer(self, name: str) -> Any:
        import pyarrow.parquet as pq

        if name not in self._writers:
            self._writers[name] = pq.ParquetWriter(self._tmp(name), output_schema())
        return self._writers[name]

    def _flush(self, name: str) -> None:
        import pyarrow as pa

        rows = self._rows[name]
        writer = self._writer(name)
        if not rows:  # no empty row group: readers size their batches by row groups
            return
        try:
            table = pa.Table.from_pylist(rows, schema=output_schema())
        except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
            raise DataError(f"{name} table: {_culprit(rows)}: {exc}") from None
        writer.write_table(table)
        rows.clear()

    def close(self, commit: bool = True) -> None:
        for name in self.names:
            if commit:
                self._flush(name)
            writer = self._writers.pop(name, None)
            if writer is not None:
                writer.close()
            tmp = self._tmp(name)
            if commit:
                with tmp.open("rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, self.dir / f"{name}.parquet")
            else:
                tmp.unlink(missing_ok=True)

    def __enter__(self) -> ParquetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(commit=exc_type is None)
