"""The ``eval`` subcommand (registered lazily by :mod:`infogrowth.cli`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

DATASETS = ("fashion-mnist", "rotten-tomatoes")


def _floats(value: str, name: str, lo: float, hi: float) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not out or any(not lo < v <= hi for v in out):
        raise click.BadParameter(f"each {name} must be in ({lo:g}, {hi:g}]")
    return out


def _ints(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not out or any(not 0 < v <= 256 for v in out):
        raise click.BadParameter("each k must be in 1..256")
    return out


def default_cache() -> Path:
    return Path(os.environ.get("INFOGROWTH_CACHE_DIR", "~/.cache/infogrowth")).expanduser() / "eval"


@click.command("eval")
@click.option(
    "--dataset",
    "datasets",
    type=click.Choice([*DATASETS, "all"]),
    multiple=True,
    default=("fashion-mnist",),
    show_default=True,
    help="Repeat for several; `all` runs both.",
)
@click.option(
    "--noise",
    type=click.FloatRange(0.0, 0.9),
    default=0.2,
    show_default=True,
    help="Share of originals whose label (caption) is replaced by a wrong one.",
)
@click.option(
    "--dup",
    type=click.FloatRange(0.0, 2.0),
    default=0.2,
    show_default=True,
    help="Injected copies, as a share of the originals.",
)
@click.option(
    "--budget",
    "budget",
    default="0.3,0.5",
    show_default=True,
    help="Subset sizes as shares of the corrupted stream (comma-separated).",
)
@click.option("--seeds", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option(
    "--k",
    "k_values",
    default="1,2,4,8,16",
    show_default=True,
    help="Neighbourhood sizes for the k ablation.",
)
@click.option(
    "--ablation-budget",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Budget of the ablations (default: the smallest budget).",
)
@click.option("--ablation/--no-ablation", default=True, show_default=True)
@click.option(
    "--mlp/--no-mlp",
    default=True,
    show_default=True,
    help="Also train the MLP (besides logistic regression).",
)
@click.option(
    "--captions/--no-captions",
    default=True,
    show_default=True,
    help="Fashion-MNIST: also run the image–text (caption noise) path.",
)
@click.option("--quick", is_flag=True, help="Small splits (a few thousand items), for tests.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("out/eval"),
    show_default=True,
    help="Where results.json per data set goes.",
)
@click.option(
    "--docs",
    "docs_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write quality.md and its PNG figures into this folder.",
)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Pipeline settings (YAML) that override the eval's.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder with the Fashion-MNIST idx files (default: the Debian package's).",
)
@click.option(
    "--report-only",
    is_flag=True,
    help="Rebuild --docs from the results.json files already in --out (no experiments).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="MiniLM vector cache (default: $INFOGROWTH_CACHE_DIR/eval).",
)
def command(
    datasets: tuple[str, ...],
    noise: float,
    dup: float,
    budget: str,
    seeds: int,
    k_values: str,
    ablation_budget: float | None,
    ablation: bool,
    mlp: bool,
    captions: bool,
    quick: bool,
    out_dir: Path,
    docs_dir: Path | None,
    config: Path | None,
    data_dir: Path | None,
    cache_dir: Path | None,
    report_only: bool,
) -> None:
    """Does it select better data? Corrupt real data, curate it with the real pipeline, and
    score redundancy and noise detection and the accuracy of models trained on budget subsets
    (random vs curated), with ablations; optionally write docs/quality.md."""
    from rich.console import Console

    from infogrowth_dev.evaluate import core
    from infogrowth_dev.evaluate.data import DatasetMissing

    console = Console(stderr=True)
    names = DATASETS if "all" in datasets else tuple(dict.fromkeys(datasets))
    opts = core.Options(
        noise=noise,
        dup=dup,
        budgets=_floats(budget, "budget", 0.0, 1.0),
        seeds=seeds,
        k_values=_ints(k_values),
        ablation_budget=ablation_budget,
        quick=quick,
        mlp=mlp,
        ablation=ablation,
        captions=captions,
        data_dir=data_dir,
        cache_dir=cache_dir if cache_dir is not None else default_cache(),
        config=config,
        progress=lambda msg: console.print(f"[dim]{msg}[/dim]"),
    )
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    if report_only:
        if docs_dir is None:
            raise click.UsageError("--report-only needs --docs")
        for name in names:
            path = out_dir / name / "results.json"
            if not path.is_file():
                raise click.ClickException(f"{path} not found: run the eval first")
            results.append(json.loads(path.read_text(encoding="utf-8")))
    for name in () if report_only else names:
        t0 = time.perf_counter()
        prepare = core.prepare_fashion if name == "fashion-mnist" else core.prepare_rotten
        try:
            prep = prepare(opts)
        except DatasetMissing as exc:
            raise click.ClickException(str(exc)) from None
        res = core.evaluate(prep, opts)
        opts.progress(f"{name}: label cleaning at other noise rates ...")
        res["noise_rates"] = core.noise_rates(prepare, opts, res["noise"][0])
        res["timing"]["total_wall_s"] = round(time.perf_counter() - t0, 1)
        target = out_dir / name / "results.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
        console.print(_summary(res))
        console.print(f"results: {target}")
        results.append(res)
    if docs_dir is not None:
        from infogrowth_dev.evaluate.report import render

        cmd = " ".join(
            [
                "infogrowth eval",
                *(f"--dataset {n}" for n in names),
                f"--noise {noise:g} --dup {dup:g} --budget {budget} --seeds {seeds}",
                f"--k {k_values}",
                *([f"--ablation-budget {ablation_budget:g}"] if ablation_budget else []),
                *([] if ablation else ["--no-ablation"]),
                *([] if mlp else ["--no-mlp"]),
                *([] if captions else ["--no-captions"]),
                *(["--quick"] if quick else []),
                *([f"--config {config}"] if config else []),
                f"--docs {docs_dir}",
            ]
        )
        path = render(results, docs_dir, cmd, None if report_only else time.perf_counter() - start)
        console.print(f"report: {path}")


def _summary(res: dict[str, Any]) -> Any:
    from rich.table import Table

    clfs = [c for c in ("lr", "mlp") if c in res["downstream"][0]]
    table = Table(title=f"{res['dataset']}: test accuracy (mean ± std over seeds)")
    for col in ("subset", "budget", "size", "wrong labels", "redundant", *clfs):
        table.add_column(col, justify="left" if col == "subset" else "right")
    for r in res["downstream"]:
        cells = [
            f"{100 * r[c]['mean']:.2f} ± {100 * r[c]['std']:.2f}" if c in r else "-" for c in clfs
        ]
        table.add_row(
            r["arm"],
            f"{r['budget']:g}",
            str(r["size"]),
            f"{100 * r['noisy_labels']:.1f}%",
            f"{100 * r['redundant']:.1f}%",
            *cells,
        )
    return table
