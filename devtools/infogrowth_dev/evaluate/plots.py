"""Two small charts drawn with Pillow (no plotting library needed): lines with error bars, and
overlaid step histograms."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 900, 540
LEFT, RIGHT, TOP, BOTTOM = 90, 230, 50, 60
COLOURS = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (127, 127, 127),
]


@dataclass
class Series:
    name: str
    x: Sequence[float]
    y: Sequence[float]
    err: Sequence[float] | None = None
    dashed: bool = False


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = (lo // step) * step
    out = []
    v = start
    while v <= hi + 1e-12:
        if v >= lo - 1e-12:
            out.append(round(v, 10))
        v += step
    return out


class _Canvas:
    def __init__(
        self, title: str, xlabel: str, ylabel: str, xr: tuple[float, float], yr: tuple[float, float]
    ) -> None:
        self.img = Image.new("RGB", (W, H), "white")
        self.d = ImageDraw.Draw(self.img)
        self.xr, self.yr = xr, yr
        self.f = _font(14)
        self.fs = _font(12)
        tf = _font(17)
        self.d.text(((W - self.d.textlength(title, font=tf)) / 2, 14), title, fill="black", font=tf)
        x0, y0, x1, y1 = LEFT, TOP, W - RIGHT, H - BOTTOM
        self.d.rectangle((x0, y0, x1, y1), outline="black")
        for t in _ticks(*xr):
            px = self.px(t)
            self.d.line((px, y1, px, y1 + 5), fill="black")
            self.d.line((px, y0, px, y1), fill=(235, 235, 235))
            label = f"{t:g}"
            width = self.d.textlength(label, font=self.fs)
            self.d.text((px - width / 2, y1 + 8), label, fill="black", font=self.fs)
        for t in _ticks(*yr):
            py = self.py(t)
            self.d.line((x0 - 5, py, x0, py), fill="black")
            self.d.line((x0, py, x1, py), fill=(235, 235, 235))
            label = f"{t:g}"
            width = self.d.textlength(label, font=self.fs)
            self.d.text((x0 - 9 - width, py - 7), label, fill="black", font=self.fs)
        self.d.rectangle((x0, y0, x1, y1), outline="black")
        xw = self.d.textlength(xlabel, font=self.f)
        self.d.text(((x0 + x1 - xw) / 2, H - 28), xlabel, fill="black", font=self.f)
        yw = int(self.d.textlength(ylabel, font=self.f)) + 4
        ybox = Image.new("RGBA", (yw, 20), (255, 255, 255, 0))
        ImageDraw.Draw(ybox).text((0, 0), ylabel, fill="black", font=self.f)
        rot = ybox.rotate(90, expand=True)
        self.img.paste(rot, (6, (y0 + y1) // 2 - rot.height // 2), rot)
        self.legend_y = TOP + 5

    def px(self, x: float) -> float:
        lo, hi = self.xr
        return LEFT + (x - lo) / (hi - lo) * (W - RIGHT - LEFT)

    def py(self, y: float) -> float:
        lo, hi = self.yr
        return H - BOTTOM - (y - lo) / (hi - lo) * (H - BOTTOM - TOP)

    def legend(self, name: str, colour: tuple[int, int, int], dashed: bool = False) -> None:
        x = W - RIGHT + 12
        y = self.legend_y
        if dashed:
            for s in range(0, 24, 8):
                self.d.line((x + s, y + 8, x + s + 4, y + 8), fill=colour, width=3)
        else:
            self.d.line((x, y + 8, x + 24, y + 8), fill=colour, width=3)
        self.d.text((x + 30, y), name, fill="black", font=self.fs)
        self.legend_y += 20

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.img.save(path, format="PNG", optimize=True)


def _dashed(
    d: ImageDraw.ImageDraw,
    a: tuple[float, float],
    b: tuple[float, float],
    colour: tuple[int, int, int],
) -> None:
    n = max(int(((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5 / 6), 1)
    for i in range(0, n, 2):
        t0, t1 = i / n, min((i + 1) / n, 1.0)
        d.line(
            (
                a[0] + (b[0] - a[0]) * t0,
                a[1] + (b[1] - a[1]) * t0,
                a[0] + (b[0] - a[0]) * t1,
                a[1] + (b[1] - a[1]) * t1,
            ),
            fill=colour,
            width=2,
        )


def line_chart(path: Path, title: str, xlabel: str, ylabel: str, series: Sequence[Series]) -> None:
    xs = [x for s in series for x in s.x]
    lows = [y - (e or 0) for s in series for y, e in zip(s.y, s.err or [0] * len(s.y), strict=True)]
    highs = [
        y + (e or 0) for s in series for y, e in zip(s.y, s.err or [0] * len(s.y), strict=True)
    ]
    pad_y = (max(highs) - min(lows)) * 0.08 or 0.01
    pad_x = (max(xs) - min(xs)) * 0.05 or 0.05
    c = _Canvas(
        title,
        xlabel,
        ylabel,
        (min(xs) - pad_x, max(xs) + pad_x),
        (min(lows) - pad_y, max(highs) + pad_y),
    )
    for i, s in enumerate(series):
        col = COLOURS[i % len(COLOURS)]
        pts = [(c.px(x), c.py(y)) for x, y in zip(s.x, s.y, strict=True)]
        for a, b in itertools.pairwise(pts):
            if s.dashed:
                _dashed(c.d, a, b, col)
            else:
                c.d.line((*a, *b), fill=col, width=2)
        for j, (px, py) in enumerate(pts):
            c.d.ellipse((px - 4, py - 4, px + 4, py + 4), fill=col)
            if s.err:
                e = s.err[j]
                top, bot = c.py(s.y[j] + e), c.py(s.y[j] - e)
                c.d.line((px, top, px, bot), fill=col, width=1)
                c.d.line((px - 4, top, px + 4, top), fill=col)
                c.d.line((px - 4, bot, px + 4, bot), fill=col)
        c.legend(s.name, col, s.dashed)
    c.save(path)


def step_histogram(
    path: Path,
    title: str,
    xlabel: str,
    edges: Sequence[float],
    groups: dict[str, Sequence[float]],
) -> None:
    """One step line per group (its share of the group per bin) over shared bin ``edges``."""
    dens: dict[str, list[float]] = {}
    for name, counts in groups.items():
        total = float(sum(counts)) or 1.0
        dens[name] = [v / total for v in counts]
    ymax = max((max(v) for v in dens.values() if v), default=1.0)
    c = _Canvas(title, xlabel, "share of group", (edges[0], edges[-1]), (0.0, ymax * 1.08))
    for i, (name, vals) in enumerate(dens.items()):
        col = COLOURS[i % len(COLOURS)]
        prev = c.py(0.0)
        for j, v in enumerate(vals):
            x0, x1, y = c.px(edges[j]), c.px(edges[j + 1]), c.py(v)
            c.d.line((x0, prev, x0, y), fill=col, width=2)
            c.d.line((x0, y, x1, y), fill=col, width=2)
            prev = y
        c.d.line((c.px(edges[-1]), prev, c.px(edges[-1]), c.py(0.0)), fill=col, width=2)
        c.legend(f"{name} (n={int(sum(groups[name]))})", col)
    c.save(path)
