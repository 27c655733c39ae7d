"""PromQL helpers: which metric names an expression reads, and which the service exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "start", "end"}
)
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![A-Za-z_:])\d+(\.\d+)?([eE][+-]?\d+)?(ms|[smhdwy])?\b")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels and literals removed).

    Grafana variables (``$var``, ``${var}``, ``$__rate_interval``) are dropped first.
    """
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"'(?:\\.|[^'\\])*'", "''", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "", s)
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges and subqueries
    s = _GROUPING.sub("", s)
    s = re.sub(r"\boffset\s+-?\w+", "", s)
    s = _NUMBER.sub("", s)
    names = set()
    for m in _IDENT.finditer(s):
        token = m.group(0)
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if token.lower() in _KEYWORDS:
            continue
        names.add(token)
    return names


def exported_metric_names() -> set[str]:
    """Every sample name the service's registry can expose (``infogrowth_*`` families).

    Read from the real :class:`infogrowth.metrics.Metrics` registry, so a renamed metric fails the
    alert and dashboard tests.
    """
    from infogrowth.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in Metrics(runtime=False).registry.collect():
        if not family.name.startswith("infogrowth_"):
            continue
        names.update(family.name + sfx for sfx in suffixes[family.type])
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expression) for every query of every panel, rows included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield panel.get("title", ""), target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            yield f"variable {var['name']}", match.group(1) if match else query


def load_dashboard(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def grafana_to_promql(expr: str, rate_interval: str = "1m") -> str:
    """Replace Grafana's variables by values a plain Prometheus accepts ('All' = ``.*``)."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)
