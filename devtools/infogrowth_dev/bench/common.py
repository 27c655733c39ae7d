"""Shared pieces of the benchmarks: machine facts, repeated timings, result rows."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, GPU (if torch sees one), load and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    versions = {}
    from importlib import metadata

    for dist in (
        "numpy",
        "hnswlib",
        "torch",
        "torchvision",
        "transformers",
        "confluent-kafka",
        "pillow",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    info["versions"] = versions
    return info


def gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:
        return None
    return None


def commit() -> dict[str, Any]:
    """The git commit of the package checkout, and whether the tree has local changes; where the
    checkout has no git metadata (a copied tree, an installed package), ``$BENCH_COMMIT``."""
    root = Path(__file__).resolve().parents[3]
    out: dict[str, Any] = {"sha": None, "dirty": None}
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        out = {"sha": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        if os.environ.get("BENCH_COMMIT"):
            out = {"sha": os.environ["BENCH_COMMIT"], "dirty": None}
    return out


@dataclass
class Stat:
    """Median, min and max of repeated measurements."""

    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def as_dict(self, digits: int = 3) -> dict[str, Any]:
        if not self.values:
            return {"median": None, "min": None, "max": None, "runs": 0}
        return {
            "median": round(self.median, digits),
            "min": round(min(self.values), digits),
            "max": round(max(self.values), digits),
            "runs": len(self.values),
        }


def rate(items: int, fn: Callable[[], Any]) -> float:
    """Items per second of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return items / max(time.perf_counter() - t0, 1e-12)


def fmt(d: dict[str, Any] | None, digits: int = 0) -> str:
    """``median [min–max]`` of a Stat dict."""
    if not d or d.get("median") is None:
        return "-"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(d['median'])} [{f.format(d['min'])}–{f.format(d['max'])}]"


@dataclass
class Table:
    """A titled table of rows for the terminal and the docs."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str | None = None

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "note": self.note}

    def markdown(self) -> str:
        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def progress(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")


def threads_list(spec: str | None) -> list[int]:
    """``1,2`` → [1, 2]; default 1, 2 and the core count."""
    if spec:
        return sorted({max(1, int(x)) for x in spec.split(",") if x.strip()})
    cores = os.cpu_count() or 1
    return sorted({1, min(2, cores), cores})


def median_of(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
