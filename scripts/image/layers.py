"""Print an image's layers with their uncompressed sizes, as a Markdown table.

    python3 scripts/image/layers.py IMAGE [--storage GRAPHROOT]

Reads the image's history from ``buildah inspect`` and each layer's size from the
containers-storage layer index (``<graphroot>/<driver>-layers/layers.json``); stdlib only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any


def layer_rows(image: dict[str, Any], sizes: dict[str, int]) -> list[tuple[int, str]]:
    """(size in bytes, instruction) per non-empty layer, bottom first."""
    oci = image["OCIv1"]
    diff_ids = list(oci["rootfs"]["diff_ids"])
    history = [h for h in oci.get("history", []) if not h.get("empty_layer")]
    if len(history) != len(diff_ids):
        history = [{"created_by": "?"}] * len(diff_ids)
    rows = []
    for diff_id, h in zip(diff_ids, history, strict=True):
        if diff_id not in sizes:
            raise SystemExit(f"layer {diff_id} is not in the storage's layer index")
        rows.append((sizes[diff_id], _instruction(str(h.get("created_by", "?")))))
    return rows


def _instruction(created_by: str) -> str:
    """Docker-style history text as the Dockerfile line: ``RUN ...``, ``COPY ...``."""
    text = " ".join(created_by.split())
    text = re.sub(r"^\|\d+ (\S+=\S* )*", "", text)  # build arguments in effect for a RUN
    if text.startswith("/bin/sh -c #(nop) "):
        text = text.removeprefix("/bin/sh -c #(nop) ")
    elif text.startswith("/bin/sh -c "):
        text = "RUN " + text.removeprefix("/bin/sh -c ")
    return text if len(text) <= 90 else text[:87] + "..."


def storage_sizes(graphroot: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for index in graphroot.glob("*-layers/layers.json"):
        for layer in json.loads(index.read_text()):
            if layer.get("diff-digest") and "diff-size" in layer:
                sizes[layer["diff-digest"]] = int(layer["diff-size"])
    return sizes


def graphroot() -> Path:
    out = subprocess.run(["buildah", "info"], capture_output=True, text=True, check=True).stdout
    return Path(json.loads(out)["store"]["GraphRoot"])


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "kB") else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("--storage", type=Path, help="graphroot (default: `buildah info`'s)")
    args = ap.parse_args(argv)
    res = subprocess.run(
        ["buildah", "inspect", "--type", "image", args.image], capture_output=True, text=True
    )
    if res.returncode != 0:
        print(f"no image {args.image}: {res.stderr.strip()}", file=sys.stderr)
        return 1
    rows = layer_rows(json.loads(res.stdout), storage_sizes(args.storage or graphroot()))
    print("| # | size | created by |\n|---|---:|---|")
    for i, (size, what) in enumerate(rows, 1):
        print(f"| {i} | {human(size)} | `{what.replace('|', '¦')}` |")
    print(f"| | **{human(sum(s for s, _ in rows))}** | total, uncompressed |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
