"""The ``infogrowth`` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infogrowth.config import Settings, load_settings
from infogrowth.errors import ConfigError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

console = Console(stderr=True)
log = logging.getLogger("infogrowth.cli")


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _setup_logging(settings: Settings) -> None:
    from infogrowth.config import secret_values
    from infogrowth.logs import configure

    configure(settings.log_level, settings.log_json, secret_values(settings))


def _failure(exc: BaseException, settings: Settings) -> click.ClickException:
    """A CLI error whose message cannot quote a configured secret."""
    from infogrowth.config import scrub, secret_values

    return click.ClickException(scrub(str(exc), secret_values(settings)))


def _summary(title: str, reasons: dict[str, int], total: int) -> Table:
    table = Table(title=title)
    table.add_column("decision / reason")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for key, n in sorted(reasons.items()):
        table.add_row(key, str(n), f"{n / total:.1%}" if total else "-")
    table.add_row("total", str(total), "", style="bold")
    return table


COMMANDS_GROUP = "infogrowth.commands"
"""Entry-point group through which other distributions (``infogrowth-dev``) add subcommands."""


class LazyGroup(click.Group):
    """Subcommands imported only when invoked: the product's own modules, plus those other
    installed distributions register under the :data:`COMMANDS_GROUP` entry points.

    Each product module exposes a ``click.Command`` named ``command``; heavy imports stay inside
    it. A plugin entry point names such a command object directly.
    """

    lazy: ClassVar[dict[str, str]] = {"export": "infogrowth.export"}

    def _plugins(self) -> dict[str, EntryPoint]:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy, *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        own = super().get_command(ctx, cmd_name)
        if own is not None:
            return own
        if cmd_name in self.lazy:
            import importlib

            cmd = importlib.import_module(self.lazy[cmd_name]).command
        elif (ep := self._plugins().get(cmd_name)) is not None:
            try:
                cmd = ep.load()
            except (ImportError, AttributeError) as exc:
                raise click.ClickException(f"{cmd_name}: cannot load {ep.value}: {exc}") from exc
        else:
            return None
        if not isinstance(cmd, click.Command):
            raise click.ClickException(f"{cmd_name}: {cmd!r} is not a click command")
        return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="infogrowth")
def main() -> None:
    """InfoGrowth: online cleaning and selection of training data."""


class LocationParam(click.ParamType):  # type: ignore[type-arg]
    """A URL (``s3://``, ``https://``...) as text, else a local path that must exist."""

    name = "path|url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from infogrowth.locations import as_location

        loc = as_location(str(value))
        if isinstance(loc, Path) and self.must_exist and not loc.exists():
            self.fail(f"{loc} does not exist", param, ctx)
        return loc

    def __init__(self, must_exist: bool = True) -> None:
        self.must_exist = must_exist


def column_options(fn: Any) -> Any:
    """``--id-col`` ... ``--embedding-col``: override ``inputs.columns`` for this run."""
    options = [
        click.option("--id-col", default=None, help="Table column holding the sample id."),
        click.option("--text-col", default=None, help="Column holding the text / caption."),
        click.option(
            "--image-col", default=None, help="Column holding image bytes, a URI or a path."
        ),
        click.option("--image-uri-col", default=None, help="Column holding image URIs."),
        click.option("--label-col", default=None, help="Column holding the class label."),
        click.option(
            "--embedding-col",
            "embedding_cols",
            multiple=True,
            metavar="SPACE=COLUMN",
            help="Precomputed vectors, e.g. image=img_emb (repeatable).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _with_columns(settings: Settings, cols: dict[str, Any]) -> Settings:
    """``settings`` with the column flags applied (they override the config)."""
    from infogrowth.config import ColumnsConfig, InputsConfig

    current = settings.inputs.columns.model_dump()
    for role in ("id", "text", "image", "image_uri", "label"):
        if cols.get(f"{role}_col") is not None:
            current[role] = cols[f"{role}_col"]
    for spec in cols.get("embedding_cols") or ():
        space, eq, column = str(spec).partition("=")
        if not eq or not space or not column:
            raise click.BadParameter(
                f"{spec!r}: expected SPACE=COLUMN", param_hint="--embedding-col"
            )
        current["embedding"] = {**current["embedding"], space: column}
    try:
        columns = ColumnsConfig(**current)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--embedding-col") from None
    inputs = settings.inputs.model_copy(update={"columns": columns})
    assert isinstance(inputs, InputsConfig)
    return settings.model_copy(update={"inputs": inputs})


INPUT_HELP = (
    "JSONL, WebDataset tar shard, Parquet file, or a folder (Parquet files, a Hugging Face "
    "save_to_disk dataset, clip-retrieval embeddings); a local path or a URL (repeatable)."
)


@main.command()
@click.option(
    "--input", "inputs", multiple=True, required=True, type=LocationParam(), help=INPUT_HELP
)
@click.option(
    "--out",
    required=True,
    type=LocationParam(must_exist=False),
    help="Output folder, local or a URL (s3://bucket/run/).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "parquet"]),
    default="jsonl",
    show_default=True,
    help="accepted / relabeled / rejected as JSONL files or Parquet tables.",
)
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--seed",
    type=LocationParam(),
    help="Known-clean samples: bootstrap the index and calibrate thresholds.",
)
@click.option(
    "--include-images",
    is_flag=True,
    help="Copy image bytes into the outputs (default: only the input's image_uri).",
)
@click.option(
    "--image-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Image paths in JSONL lines and tables must stay under this folder (default: each "
    "file's folder).",
)
@column_options
@click.option("--no-progress", is_flag=True)
def curate(
    inputs: tuple[Any, ...],
    out: Any,
    fmt: str,
    config: Path | None,
    seed: Any,
    include_images: bool,
    image_root: Path | None,
    no_progress: bool,
    **cols: Any,
) -> None:
    """Curate files into accepted / relabeled / rejected (JSONL or Parquet) plus report.json."""
    from infogrowth.curate import curate as run_curate
    from infogrowth.files import count_inputs

    settings = _with_columns(_settings(config), cols)
    _setup_logging(settings)
    paths = list(inputs)
    total = count_inputs(paths, settings.storage)
    progress = Progress(
        TextColumn("curating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=no_progress or not console.is_terminal,
    )
    try:
        with progress:
            task = progress.add_task("curate", total=total)
            result = run_curate(
                settings,
                paths,
                out,
                seed=seed,
                include_images=True if include_images else "reference",
                progress=lambda n: progress.advance(task, n),
                image_root=image_root,
                fmt="parquet" if fmt == "parquet" else "jsonl",
            )
    except (ValueError, OSError) as exc:
        raise _failure(exc, settings) from None
    rep: dict[str, Any] = result.report
    console.print(_summary(f"infogrowth curate → {out}", rep["reasons"], result.inputs))
    online = rep.get("online") or {}
    if online.get("keep_rate") is not None:
        console.print(
            f"keep policy: kept {online['kept']} of {online['seen']} "
            f"(realised keep rate {online['keep_rate']:.1%})"
        )
    for note in rep.get("calibration", {}).get("notes", []):
        console.print(f"[yellow]calibration: {note}[/yellow]")
    console.print(
        f"thresholds: {rep['thresholds']}\n"
        f"{result.inputs} samples in {rep['elapsed_s']} s "
        f"({rep['samples_per_s']} samples/s); stages: {rep['stage_samples_per_s']}"
    )


# -- Kafka ---------------------------------------------------------------------------------


@main.command()
@click.option("--role", type=click.Choice(["all", "embed", "select"]), default="all")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--exit-when-idle",
    type=float,
    default=None,
    help="Drain and exit after this many seconds without input (batch jobs, demos, tests).",
)
def run(role: str, config: Path | None, exit_when_idle: float | None) -> None:
    """Run the stage loops on Kafka until SIGTERM (exactly-once, transactional)."""
    from infogrowth.kafka.run import main as run_main

    settings = _settings(config)
    _setup_logging(settings)
    from infogrowth.config import redacted_settings

    log.info(
        "infogrowth run --role %s; settings: %s",
        role,
        json.dumps(redacted_settings(settings), sort_keys=True),
    )
    try:
        code = run_main(settings, role, idle_exit_s=exit_when_idle)
    except ValueError as exc:
        raise _failure(exc, settings) from None
    sys.exit(code)


@main.command()
@click.option("--input", "input_", required=True, type=LocationParam(), help=INPUT_HELP)
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--reset",
    is_flag=True,
    help="Replace a published calibration: a new calibration epoch (running stages follow it).",
)
@click.option(
    "--image-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Image paths in JSONL lines must stay under this folder (default: the file's folder).",
)
def seed(input_: Any, config: Path | None, reset: bool, image_root: Path | None) -> None:
    """Calibrate on known-clean samples, publish the calibration and seed the changelog.

    Refuses when a calibration is already published, unless --reset (a new calibration epoch:
    running stages change to it cleanly)."""
    from infogrowth.kafka.seed import seed as run_seed
    from infogrowth.messages import calibration_record

    settings = _settings(config)
    _setup_logging(settings)
    try:
        res = run_seed(settings, input_, reset=reset, image_root=image_root)
    except ValueError as exc:
        raise _failure(exc, settings) from None
    rec = {k: v for k, v in calibration_record(res.calibration).items() if k != "cells"}
    console.print(f"seeded {res.items} items ({res.malformed} malformed) into {res.per_partition}")
    console.print(f"calibration: {rec}")


@main.group()
def topics() -> None:
    """Manage the topics."""


@topics.command("create")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--check-only", is_flag=True, help="Report, create nothing.")
def topics_create(config: Path | None, check_only: bool) -> None:
    """Create missing topics; report existing ones whose layout differs (exit 1)."""
    from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs

    settings = _settings(config)
    _setup_logging(settings)
    report = ensure_topics(
        admin_config(settings),
        topic_specs(settings.kafka.topics, settings.limits),
        create=not check_only,
    )
    for name in report.created:
        console.print(f"created  {name}")
    for name in report.ok:
        console.print(f"ok       {name}")
    for line in report.mismatches:
        console.print(f"[red]MISMATCH[/red] {line}")
    if not report.ok_all:
        sys.exit(1)


@main.command()
@click.option(
    "--input", "inputs", multiple=True, required=True, type=LocationParam(), help=INPUT_HELP
)
@click.option("--topic", default=None, help="Default: the configured ingest topic.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--image-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Image paths in JSONL lines and tables must stay under this folder (default: each "
    "file's folder).",
)
@column_options
def produce(
    inputs: tuple[Any, ...],
    topic: str | None,
    config: Path | None,
    image_root: Path | None,
    **cols: Any,
) -> None:
    """Load JSONL, WebDataset shards, Parquet or table folders into the ingest topic."""
    from infogrowth.files import count_inputs
    from infogrowth.kafka.tools import produce as run_produce

    settings = _with_columns(_settings(config), cols)
    _setup_logging(settings)
    with Progress(
        TextColumn("producing"), BarColumn(), MofNCompleteColumn(), console=console
    ) as progress:
        task = progress.add_task("produce", total=count_inputs(list(inputs), settings.storage))
        try:
            n = run_produce(
                settings,
                list(inputs),
                topic,
                lambda k: progress.advance(task, k),
                image_root=image_root,
            )
        except (ValueError, OSError) as exc:
            raise _failure(exc, settings) from None
    console.print(f"produced {n} messages to {topic or settings.kafka.topics.ingest}")


@main.command()
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def audit(config: Path | None, as_json: bool) -> None:
    """Verify every ingest message has exactly one output record (exit 1 otherwise)."""
    from infogrowth.kafka.tools import audit as run_audit

    settings = _settings(config)
    res = run_audit(settings)
    if as_json:
        click.echo(json.dumps(res.as_dict(), indent=2, sort_keys=True))
    else:
        console.print(
            _summary("audit (read_committed)", dict(res.reasons), sum(res.outputs.values()))
        )
        console.print(
            f"ingest messages: {res.ingest}; outputs: {sum(res.outputs.values())}; "
            f"missing: {len(res.missing)}; duplicated: {len(res.duplicated)}; "
            f"unexpected: {len(res.unexpected)}"
        )
        console.print(
            f"embedded records: {res.embedded}; "
            f"ingest offsets embedded twice: {len(res.embedded_duplicated)}"
        )
        for label, ids in (
            ("missing", res.missing),
            ("duplicated", res.duplicated),
            ("embedded twice", res.embedded_duplicated),
        ):
            if ids:
                console.print(f"{label}: {', '.join(ids[:20])}")
        console.print("[green]AUDIT PASSED[/green]" if res.ok else "[red]AUDIT FAILED[/red]")
    sys.exit(0 if res.ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="infogrowth")
