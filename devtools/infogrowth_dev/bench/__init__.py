"""``infogrowth bench``: throughput of every stage against its own floor.

Each figure is the median of repeated runs with min and max; every ratio is measured side by side
in the same run. Results print as tables and, with ``--json FILE``, are written with the machine
and the commit they were measured on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

STAGES = ("select", "embed", "parse", "kafka", "scale", "restore", "memory")


@click.command("bench")
@click.option(
    "--stage",
    "stages",
    multiple=True,
    type=click.Choice([*STAGES, "all"]),
    default=("select",),
    show_default=True,
    help="Stage(s) to measure; repeat the option for several.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write results here.")
@click.option(
    "--markdown", "md_path", type=click.Path(path_type=Path), help="Write the tables as Markdown."
)
@click.option(
    "--n", "n", type=int, default=100_000, show_default=True, help="Prefilled index size."
)
@click.option("--stream", type=int, default=None, help="Measured samples per run.")
@click.option("--batch", type=int, default=256, show_default=True, help="Select batch size.")
@click.option("--threads", default=None, help="Thread counts, e.g. 1,2 (default 1, 2, cores).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Runs per figure.")
@click.option("--dim", type=int, default=256, show_default=True, help="Vector dimension.")
@click.option("--sizes", default=None, help="select: index sizes for the throughput-vs-size sweep.")
@click.option(
    "--restore-sizes",
    default=None,
    help="restore: index sizes for the snapshot table (default: --n; 'none' skips it).",
)
@click.option(
    "--rebuild-sizes",
    default=None,
    help="restore: sizes for the replay/fast-rebuild table (default: --restore-sizes; "
    "'none' skips it: a full single-writer replay of millions of items takes hours on few cores).",
)
@click.option(
    "--rebuild-modes",
    default="snapshot,full,fast",
    show_default=True,
    help="restore: which restores the replay table times (snapshot, full, fast; e.g. 'fast' "
    "alone for the fast rebuild at millions of items on many cores).",
)
@click.option(
    "--spaces",
    "spaces_n",
    type=click.IntRange(1, 2),
    default=2,
    show_default=True,
    help="restore: embedding spaces per item (1 where two do not fit in memory).",
)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="select: sweep PNG.")
@click.option("--workdir", type=click.Path(path_type=Path), help="Scratch directory.")
@click.option(
    "--embed-model",
    default="tiny",
    show_default=True,
    help="embed: image tower: tiny, b16 (random ViT-B/16-shaped CLIP) or a model path.",
)
@click.option(
    "--embed-samples", type=int, default=None, help="embed: samples per run (default 512)."
)
@click.option(
    "--embed-batch",
    type=int,
    default=None,
    help="embed: encoder batch size (default: the warm-up picks it on CUDA, 64 on a CPU).",
)
@click.option(
    "--embed-calls",
    default=None,
    help="embed: samples per stage call, e.g. 512,4096 (what one Kafka batch hands the stage; "
    "default max(256, 4 × batch)).",
)
@click.option(
    "--decode",
    "decodes",
    default="cpu,device",
    show_default=True,
    help="embed: decode paths to compare (cpu: Pillow; device: torchvision, nvJPEG on CUDA).",
)
@click.option(
    "--cache/--no-cache",
    default=True,
    show_default=True,
    help="select: keep the prefilled index under $INFOGROWTH_CACHE_DIR/bench for later runs.",
)
def command(
    stages: tuple[str, ...],
    json_path: Path | None,
    md_path: Path | None,
    n: int,
    stream: int | None,
    batch: int,
    threads: str | None,
    repeats: int,
    dim: int,
    sizes: str | None,
    restore_sizes: str | None,
    rebuild_sizes: str | None,
    rebuild_modes: str,
    spaces_n: int,
    plot_path: Path | None,
    workdir: Path | None,
    cache: bool,
    embed_model: str,
    embed_samples: int | None,
    embed_batch: int | None,
    embed_calls: str | None,
    decodes: str,
) -> None:
    """Measure stages against their floors; print tables, optionally write JSON."""
    from rich.console import Console
    from rich.table import Table as RichTable

    from infogrowth_dev.bench.common import Table, commit, machine, threads_list

    chosen = list(STAGES) if "all" in stages else list(dict.fromkeys(stages))
    th = threads_list(threads)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": machine(),
        "commit": commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stages": {},
    }
    tables: list[Table] = []
    for stage in chosen:
        t0 = time.perf_counter()
        res, tabs = _run(
            stage,
            n=n,
            stream=stream,
            batch=batch,
            threads=th,
            repeats=repeats,
            dim=dim,
            sizes=_ints(sizes),
            restore_sizes=_ints(restore_sizes) if restore_sizes is not None else [n],
            rebuild_sizes=None if rebuild_sizes is None else _ints(rebuild_sizes),
            rebuild_modes=[m.strip() for m in rebuild_modes.split(",") if m.strip()],
            spaces_n=spaces_n,
            workdir=workdir,
            cache=cache,
            embed_model=embed_model,
            embed_samples=embed_samples,
            embed_batch=embed_batch,
            embed_calls=_ints(embed_calls),
            decodes=[d.strip() for d in decodes.split(",") if d.strip()],
        )
        res["seconds"] = round(time.perf_counter() - t0, 1)
        result["stages"][stage] = res
        tables.extend(tabs)
        if stage == "select" and plot_path is not None and res.get("sweep"):
            from infogrowth_dev.bench.plot import plot_sweep

            plot_sweep(res, result["machine"], plot_path)
    result["machine"]["load_avg_end"] = _load()
    console = Console(markup=False, highlight=False)
    m = result["machine"]
    console.print(
        f"machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}; "
        f"commit {result['commit'].get('sha') or '?'}"
        + (" (dirty)" if result["commit"].get("dirty") else "")
    )
    for t in tables:
        rt = RichTable(title=t.title, caption=t.note)
        for c in t.columns:
            rt.add_column(c)
        for r in t.rows:
            rt.add_row(*r)
        console.print(rt)
    result["tables"] = [t.as_dict() for t in tables]
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(_markdown(result, tables))
        console.print(f"wrote {md_path}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {json_path}")


def _markdown(result: dict[str, Any], tables: list[Any]) -> str:
    m = result["machine"]
    c = result["commit"]
    head = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib')} GiB, "
        f"GPU {m['gpu'] or 'none'}; load average {m.get('load_avg')} → {m.get('load_avg_end')}; "
        f"commit `{(c.get('sha') or '?')[:10]}`{' + local changes' if c.get('dirty') else ''}; "
        f"{result['started']}.\n"
    )
    parts = [head]
    for t in tables:
        parts.append(f"**{t.title}**\n\n{t.markdown()}\n" + (f"\n_{t.note}_\n" if t.note else ""))
    return "\n".join(parts)


def _ints(spec: str | None) -> list[int]:
    if not spec or spec.strip().lower() == "none":
        return []
    return [int(float(x)) for x in spec.split(",") if x.strip()]


def _load() -> list[float] | None:
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _run(stage: str, **kw: Any) -> tuple[dict[str, Any], list[Any]]:
    if stage == "select":
        from infogrowth_dev.bench import sel

        res = sel.bench(
            n=kw["n"],
            stream=kw["stream"] or 4096,
            batch=kw["batch"],
            threads=kw["threads"],
            repeats=kw["repeats"],
            dim=kw["dim"],
            workdir=kw["workdir"],
            sizes=kw["sizes"],
            cache=sel.default_cache() if kw["cache"] else None,
        )
        return res, sel.tables(res)
    if stage == "kafka":
        from infogrowth_dev.bench import kafkabench

        res = kafkabench.bench(
            n=kw["stream"] or 10_000,
            dim=kw["dim"],
            repeats=kw["repeats"],
            workdir=kw["workdir"],
        )
        return res, kafkabench.tables(res)
    if stage == "parse":
        from infogrowth_dev.bench import parse

        res = parse.bench(n=kw["stream"] or 20_000, dim=kw["dim"], repeats=kw["repeats"])
        return res, parse.tables(res)
    if stage == "embed":
        from infogrowth_dev.bench import embedbench

        res = embedbench.bench(
            n=kw["embed_samples"] or kw["stream"] or 512,
            threads=kw["threads"],
            repeats=kw["repeats"],
            workdir=kw["workdir"],
            model=kw["embed_model"],
            batch=kw["embed_batch"],
            decodes=kw["decodes"],
            calls=kw["embed_calls"],
        )
        return res, embedbench.tables(res)
    if stage == "scale":
        from infogrowth_dev.bench import scale

        res = scale.bench(
            n=kw["stream"] or 10_000,
            dim=kw["dim"],
            repeats=kw["repeats"],
            batch=kw["batch"],
        )
        return res, scale.tables(res)
    if stage == "restore":
        from infogrowth_dev.bench import rebuild, restore

        rebuild_sizes = kw["restore_sizes"] if kw["rebuild_sizes"] is None else kw["rebuild_sizes"]
        if not kw["restore_sizes"] and not rebuild_sizes:
            raise click.UsageError("--restore-sizes and --rebuild-sizes are both 'none'")
        modes = kw["rebuild_modes"]
        if set(modes) - set(rebuild.MODES) or not modes:
            raise click.UsageError(
                f"--rebuild-modes {','.join(modes)}: choose from {rebuild.MODES}"
            )
        res = {}
        tabs: list[Any] = []
        if kw["restore_sizes"]:
            res = restore.bench(
                sizes=kw["restore_sizes"],
                dim=kw["dim"],
                repeats=kw["repeats"],
                workdir=kw["workdir"],
                spaces_n=kw["spaces_n"],
            )
            tabs += restore.tables(res)
        if rebuild_sizes:
            res["rebuild"] = rebuild.bench(
                sizes=rebuild_sizes,
                dim=kw["dim"],
                workdir=kw["workdir"],
                spaces_n=kw["spaces_n"],
                modes=modes,
            )
            tabs += rebuild.tables(res["rebuild"])
        return res, tabs
    if stage == "memory":
        from infogrowth_dev.bench import memory

        res = memory.bench(n=kw["n"], dim=kw["dim"], workdir=kw["workdir"])
        return res, memory.tables(res)
    raise click.UsageError(f"unknown stage {stage}")


__all__ = ["STAGES", "command"]
