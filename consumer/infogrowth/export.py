"""``infogrowth export``: materialise the curated topics for offline training.

Reads ``accepted`` and ``relabeled`` (read_committed, from the log start to the end offsets
captured when the export starts, topic by topic and partition by partition) and writes into
``--out``:

* ``manifest.jsonl``: one output record per line in the exact shape ``infogrowth curate`` writes
  (JSON-safe: bytes as base64), in (topic, partition, offset) order; gains included.
* with ``--format webdataset``, also ``shard-NNNNNN.tar`` WebDataset shards: per sample
  ``KEY.json`` (the record without its image), ``KEY.txt`` (text) and the image bytes as
  ``KEY.jpg`` (or ``png``, ``webp``, ``gif``, ``bmp``, ``bin`` by magic number); manifest records
  then carry ``image: null`` and ``export: {shard, key}``.
* with ``--format parquet``, also ``accepted.parquet``, ``relabeled.parquet`` (and
  ``rejected.parquet`` when that topic is exported): one table per decision with the output
  schema as typed columns (:mod:`infogrowth.parquet_out`), images included; manifest records
  then carry ``image: null`` and ``export: {table, row}``.
* ``export.json`` (written last): format, counts, per-partition offset ranges, g_scale, shards.

``--out`` may be a URL (``s3://bucket/export/``): the export is staged locally and uploaded,
``export.json`` last.

Idempotent: every run rewrites the whole export from the topics into a temporary directory and
moves it into place (stale shards removed), so re-running never duplicates a record; on
unchanged topics the files are byte-identical.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import click

from infogrowth.config import Settings, load_settings
from infogrowth.errors import ConfigError, DataError
from infogrowth.sampling.records import EXPORT_INFO, MANIFEST, recorded_g_scale

Format = Literal["jsonl", "webdataset", "parquet"]
EXPORT_GROUP = "infogrowth-export"
"""Group id of the export's consumer (it assigns partitions itself and never commits)."""
SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass
class ExportResult:
    out_dir: Path | str
    format: Format
    records: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    offsets: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """topic -> partition -> [first offset, end offset) read."""
    shards: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    g_scale: float | None = None


def image_extension(data: bytes) -> str:
    """A file extension for encoded image bytes, from their magic number (``bin`` if unknown)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    return "bin"


def _json_line(rec: dict[str, Any]) -> str:
    from infogrowth.schema import to_json_safe

    return json.dumps(to_json_safe(rec), ensure_ascii=False, sort_keys=True) + "\n"


class _Writer:
    """Writes the manifest (and shards) of one export into a temporary directory."""

    def __init__(self, tmp: Path, fmt: Format, shard_size: int) -> None:
        self.tmp = tmp
        self.fmt = fmt
        self.shard_size = shard_size
        self.count = 0
        self.shards: list[str] = []
        self._manifest: IO[str] = (tmp / MANIFEST).open("w", encoding="utf-8")
        self._tar: tarfile.TarFile | None = None
        self._tables: Any = None
        if fmt == "parquet":
            from infogrowth.parquet_out import ParquetWriter

            self._tables = ParquetWriter(tmp)

    @property
    def tables(self) -> list[str]:
        """The Parquet tables written (``--format parquet``)."""
        if self._tables is None:
            return []
        return [f"{name}.parquet" for name, n in self._tables.counts.items() if n]

    def write(self, rec: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self._manifest.write(_json_line(rec))
        elif self.fmt == "parquet":
            name = str(rec["decision"])
            row = self._tables.counts[name]
            self._tables.write(rec)
            pointer = {"table": f"{name}.parquet", "row": row}
            self._manifest.write(_json_line({**rec, "image": None, "export": pointer}))
        else:
            self._write_sample(rec)
        self.count += 1

    def _write_sample(self, rec: dict[str, Any]) -> None:
        if self._tar is None or self.count % self.shard_size == 0:
            self._close_tar()
            name = SHARD_PATTERN.format(len(self.shards))
            self.shards.append(name)
            # One open shard at a time, closed by _close_tar (the writer is the context manager).
            self._tar = tarfile.open(  # noqa: SIM115
                self.tmp / name, mode="w", format=tarfile.USTAR_FORMAT
            )
        key = f"{self.count:09d}"
        image = rec.get("image")
        body = {**rec, "image": None}
        self._add(f"{key}.json", _json_line(body).encode("utf-8"))
        if isinstance(rec.get("text"), str):
            self._add(f"{key}.txt", rec["text"].encode("utf-8"))
        if isinstance(image, bytes | bytearray):
            self._add(f"{key}.{image_extension(bytes(image))}", bytes(image))
        self._manifest.write(_json_line({**body, "export": {"shard": self.shards[-1], "key": key}}))

    def _add(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # deterministic shards: re-running gives identical bytes
        self._tar.addfile(info, io.BytesIO(data))

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> None:
        self._close_tar()
        if self._tables is not None:
            self._tables.close()
        self._manifest.flush()
        os.fsync(self._manifest.fileno())
        self._manifest.close()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _install(tmp: Path, out_dir: Path, files: list[str], info: dict[str, Any]) -> None:
    """Move a finished export into ``out_dir``: drop the old marker, replace the files, remove
    stale shards and tables, write the new ``export.json`` last."""
    (out_dir / EXPORT_INFO).unlink(missing_ok=True)
    os.replace(tmp / MANIFEST, out_dir / MANIFEST)
    for name in files:
        os.replace(tmp / name, out_dir / name)
    keep = set(files)
    for pattern in ("shard-*.tar", "*.parquet"):
        for old in out_dir.glob(pattern):
            if old.name not in keep:
                old.unlink()
    marker = tmp / EXPORT_INFO
    marker.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(marker, out_dir / EXPORT_INFO)


def export(
    settings: Settings,
    out_dir: Path | str,
    *,
    fmt: Format = "jsonl",
    shard_size: int = 10_000,
    topics: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    timeout_s: float = 60.0,
) -> ExportResult:
    """Export the curated topics (default: accepted, relabeled) into ``out_dir`` (a folder or
    a URL).

    ``on_total`` receives the number of offsets to read (records plus transaction markers) once
    the end offsets are known; ``progress`` then receives offsets as they are passed.
    """
    from infogrowth.locations import OutputDir

    target = OutputDir(out_dir, settings.storage)
    try:
        result = _export(
            settings, target.local, fmt, shard_size, topics, progress, on_total, timeout_s
        )
        target.publish(last=(EXPORT_INFO,))
    finally:
        target.close()
    result.out_dir = out_dir
    return result


def _export(
    settings: Settings,
    out_dir: Path,
    fmt: Format,
    shard_size: int,
    topics: Sequence[str] | None,
    progress: Callable[[int], None] | None,
    on_total: Callable[[int], None] | None,
    timeout_s: float,
) -> ExportResult:
    from infogrowth.kafka.reader import list_partitions, open_consumer, plan_ranges, read_ranges
    from infogrowth.sampling.kafka import decode_record
    from infogrowth.schema import validate

    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    t = settings.kafka.topics
    names = list(topics) if topics else [t.accepted, t.relabeled]
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".export-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    result = ExportResult(out_dir=out_dir, format=fmt)
    recorded: list[float | None] = []
    max_bytes = settings.limits.max_message_bytes
    consumer = open_consumer(settings, EXPORT_GROUP)
    try:
        ranges = []
        for name in names:  # topic order as given, then partition order
            ranges += plan_ranges(
                consumer, list_partitions(consumer, [name], timeout_s), "earliest", timeout_s
            )
        if on_total is not None:
            on_total(sum(r.span for r in ranges))
        with _Writer(tmp, fmt, shard_size) as writer:
            for r in ranges:
                passed = r.start
                for _, m in read_ranges(consumer, [r], timeout_s):
                    offset = int(m.offset())
                    try:
                        rec = decode_record(m.value(), max_bytes)
                        validate("output", rec)
                    except Exception as exc:
                        where = f"{r.topic}[{r.partition}]@{offset}"
                        raise DataError(f"{where}: bad output record: {exc}") from None
                    writer.write(rec)
                    result.decisions[str(rec["decision"])] += 1
                    recorded.append((rec.get("thresholds") or {}).get("g_scale"))
                    if progress is not None:
                        progress(offset + 1 - passed)
                    passed = offset + 1
                if progress is not None and r.end > passed:
                    progress(r.end - passed)
                result.offsets.setdefault(r.topic, {})[str(r.partition)] = [r.start, r.end]
            writer_count, result.shards = writer.count, list(writer.shards)
        result.tables = writer.tables
        result.records = writer_count
        result.g_scale = recorded_g_scale(recorded)
        info = {
            "version": 1,
            "format": fmt,
            "topics": names,
            "records": result.records,
            "decisions": dict(sorted(result.decisions.items())),
            "offsets": result.offsets,
            "g_scale": result.g_scale,
            "manifest": MANIFEST,
            "shards": result.shards,
            "tables": result.tables,
        }
        _install(tmp, out_dir, result.shards + result.tables, info)
    finally:
        consumer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


@click.command("export")
@click.option("--out", required=True, help="Output folder, local or a URL (s3://bucket/export/).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "webdataset", "parquet"]),
    default="jsonl",
    show_default=True,
    help="jsonl: manifest.jsonl with every record; webdataset: also tar shards with images; "
    "parquet: also one Parquet table per decision.",
)
@click.option("--shard-size", default=10_000, show_default=True, help="Samples per shard.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--no-progress", is_flag=True)
def command(out: str, fmt: Format, shard_size: int, config: Path | None, no_progress: bool) -> None:
    """Materialise the accepted and relabeled topics into DIR for offline training.

    Re-running rewrites the export (never duplicates): the files reflect the topics up to the
    end offsets at the start of the run.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    from infogrowth.logs import configure

    configure(settings.log_level, settings.log_json)
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("exporting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=no_progress or not console.is_terminal,
    )
    with progress:
        task = progress.add_task("export", total=None)
        try:
            from infogrowth.locations import as_location

            res = export(
                settings,
                as_location(out),
                fmt=fmt,
                shard_size=shard_size,
                progress=lambda n: progress.advance(task, n),
                on_total=lambda n: progress.update(task, total=n),
            )
        except (LookupError, TimeoutError, ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    decisions = ", ".join(f"{k} {v}" for k, v in sorted(res.decisions.items())) or "none"
    shards = f", {len(res.shards)} shards" if res.shards else ""
    shards += f", tables {', '.join(res.tables)}" if res.tables else ""
    console.print(f"exported {res.records} records ({decisions}{shards}) to {out}")
