"""The throughput-vs-index-size plot of the select stage and raw hnswlib (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_sweep(res: dict[str, Any], machine: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["sweep"]
    xs = [r["n"] for r in rows]
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(7, 5.6), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    for key, label, style in (
        ("select_samples_per_s", "select stage", "o-"),
        ("raw_samples_per_s", "raw hnswlib (same calls)", "s--"),
    ):
        med = [r[key]["median"] for r in rows]
        lo = [r[key]["median"] - r[key]["min"] for r in rows]
        hi = [r[key]["max"] - r[key]["median"] for r in rows]
        ax.errorbar(xs, med, yerr=[lo, hi], fmt=style, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_ylabel("samples / s (median, min–max)")
    ratio = [r["ratio_vs_raw"]["median"] for r in rows]
    r_lo = [r["ratio_vs_raw"]["median"] - r["ratio_vs_raw"]["min"] for r in rows]
    r_hi = [r["ratio_vs_raw"]["max"] - r["ratio_vs_raw"]["median"] for r in rows]
    ax2.errorbar(xs, ratio, yerr=[r_lo, r_hi], fmt="o-", color="black", capsize=3)
    ax2.axhline(0.85, color="red", linestyle=":", label="target 0.85")
    ax2.set_ylim(0.6, 1.1)
    ax2.set_ylabel("select / raw")
    ax2.set_xlabel("items in the index")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(loc="lower right", fontsize=7)
    p = res["params"]
    threads = rows[0]["threads"] if rows else "?"
    ax.set_title(
        f"select vs raw hnswlib: {p['spaces']}×{p['dim']}-d, M={p['m']}, "
        f"ef_c={p['ef_construction']}, ef={p['ef']}, k={p['k']}, batch {p['batch']}, "
        f"{threads} threads",
        fontsize=8,
    )
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.text(
        0.01, 0.01, f"{machine.get('cpu')}, {machine.get('cores')} cores", fontsize=7, alpha=0.7
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
