"""The ``infogrowth`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infogrowth.config import ConfigError, Settings, load_settings

console = Console(stderr=True)


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _setup_logging(settings: Settings) -> None:
    from infogrowth.logs import configure

    configure(settings.log_level, settings.log_json)


def _summary(title: str, reasons: dict[str, int], total: int) -> Table:
    table = Table(title=title)
    table.add_column("decision / reason")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for key, n in sorted(reasons.items()):
        table.add_row(key, str(n), f"{n / total:.1%}" if total else "-")
    table.add_row("total", str(total), "", style="bold")
    return table


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="infogrowth")
def main() -> None:
    """InfoGrowth: online cleaning and selection of training data."""


@main.command()
@click.option(
    "--input",
    "inputs",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL file or WebDataset tar shard (repeatable).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--seed",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Known-clean samples: bootstrap the index and calibrate thresholds.",
)
@click.option("--include-images", is_flag=True, help="Copy image bytes into the outputs.")
@click.option("--no-progress", is_flag=True)
def curate(
    inputs: tuple[Path, ...],
    out: Path,
    config: Path | None,
    seed: Path | None,
    include_images: bool,
    no_progress: bool,
) -> None:
    """Curate files into accepted / relabeled / rejected JSONL plus report.json."""
    from infogrowth.curate import curate as run_curate
    from infogrowth.files import count_inputs

    settings = _settings(config)
    _setup_logging(settings)
    sel = settings.select
    if sel.policy == "sample" and sel.g_scale is None and seed is None:
        raise click.UsageError(
            "select.policy=sample needs select.g_scale or --seed to calibrate it"
        )
    paths = list(inputs)
    total = count_inputs(paths)
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
                include_images=include_images,
                progress=lambda n: progress.advance(task, n),
            )
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    rep: dict[str, Any] = result.report
    console.print(_summary(f"infogrowth curate → {out}", rep["reasons"], result.inputs))
    console.print(
        f"thresholds: {rep['thresholds']}\n"
        f"{result.inputs} samples in {rep['elapsed_s']} s "
        f"({rep['samples_per_s']} samples/s); stages: {rep['stage_samples_per_s']}"
    )


def run() -> None:  # pragma: no cover - console entry used by python -m
    main(prog_name="infogrowth")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
