"""The product CLI and the tooling: runtime commands of its own, dev commands only through the
``infogrowth.commands`` entry points, and no import from the product package into the tooling."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from infogrowth import cli
from infogrowth.cli import COMMANDS_GROUP, main

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ["audit", "curate", "export", "produce", "run", "seed", "topics"]
DEV = ["bench", "chaos", "demo", "dev-broker", "eval"]


@click.command("hello")
def hello() -> None:
    """A plugin command for the tests."""
    click.echo("hello from a plugin")


NOT_A_COMMAND = object()


def _plugins(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    """Pretend the installed distributions register exactly ``targets`` (name -> object)."""
    eps = [
        importlib.metadata.EntryPoint(name=name, value=value, group=COMMANDS_GROUP)
        for name, value in targets.items()
    ]

    def entry_points(**kw: Any) -> list[importlib.metadata.EntryPoint]:
        return eps if kw.get("group") == COMMANDS_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def _listed(output: str) -> list[str]:
    lines = output.split("Commands:", 1)[1].splitlines()
    return [ln.split()[0] for ln in lines if ln.startswith("  ") and not ln.startswith("   ")]


def test_without_the_tooling_help_lists_the_runtime_commands_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _plugins(monkeypatch)
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0, res.output
    assert _listed(res.output) == RUNTIME
    for name in RUNTIME:
        sub = CliRunner().invoke(main, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
    assert CliRunner().invoke(main, ["bench"]).exit_code == 2  # "No such command"


def test_installed_tooling_adds_its_commands_through_entry_points() -> None:
    registered = {ep.name for ep in importlib.metadata.entry_points(group=COMMANDS_GROUP)}
    assert registered == set(DEV)
    res = CliRunner().invoke(main, ["--help"])
    assert _listed(res.output) == sorted(RUNTIME + DEV)
    for name in DEV:
        sub = CliRunner().invoke(main, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)


def test_a_plugin_command_is_loaded_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    _plugins(monkeypatch, hello=f"{__name__}:hello")
    assert "hello" in _listed(CliRunner().invoke(main, ["--help"]).output)
    res = CliRunner().invoke(main, ["hello"])
    assert res.exit_code == 0
    assert res.output == "hello from a plugin\n"


def test_a_plugin_cannot_replace_a_product_command(monkeypatch: pytest.MonkeyPatch) -> None:
    _plugins(monkeypatch, run=f"{__name__}:hello", export=f"{__name__}:hello")
    ctx = click.Context(main)
    assert main.get_command(ctx, "run") is cli.run
    export = main.get_command(ctx, "export")
    assert export is not None and export is not hello


def test_a_plugin_that_is_no_command_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _plugins(monkeypatch, odd=f"{__name__}:NOT_A_COMMAND")
    res = CliRunner().invoke(main, ["odd"])
    assert res.exit_code == 1
    assert "odd" in res.output and "not a click command" in res.output


def test_a_plugin_that_does_not_import_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _plugins(monkeypatch, gone="infogrowth_gone.nowhere:command")
    res = CliRunner().invoke(main, ["gone"])
    assert res.exit_code == 1
    assert "gone: cannot load infogrowth_gone.nowhere:command" in res.output


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_product_package_never_imports_the_tooling() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith("infogrowth_dev"))
        for p in (ROOT / "consumer" / "infogrowth").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _private_uses(path: Path) -> list[str]:
    """``from infogrowth... import _name`` and ``infogrowth....._name`` in one tooling file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("infogrowth."):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if any(part.startswith("_") for part in (node.module or "").split(".")):
                found.append(str(node.module))
    return found


def test_the_tooling_imports_only_public_names_of_the_product() -> None:
    offenders = {
        str(p.relative_to(ROOT)): _private_uses(p)
        for p in (ROOT / "devtools" / "infogrowth_dev").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
