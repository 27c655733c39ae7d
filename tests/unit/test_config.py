"""Config errors fail fast and name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from infogrowth.config import ConfigError, load_settings


def test_defaults_are_the_reference_parameters() -> None:
    s = load_settings(None)
    assert (s.select.k, s.index.m, s.index.ef_construction, s.index.ef) == (4, 48, 100, 32)


def test_yaml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("select:\n  k: 8\n  policy: threshold\nindex:\n  ef: 64\n")
    monkeypatch.setenv("INFOGROWTH_SELECT__K", "16")
    s = load_settings(p)
    assert s.select.k == 16 and s.select.policy == "threshold" and s.index.ef == 64


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("select:\n  kk: 3\n", "select.kk"),
        ("select:\n  k: -1\n", "select.k"),
        ("select:\n  policy: random\n", "select.policy"),
        ("index:\n  ef: 2\n", "ef"),
        ("bogus: 1\n", "bogus"),
        ("clean:\n  delta: 7\n", "clean.delta"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(p)


def test_bad_env_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFOGROWTH_SELECT__K", "many")
    with pytest.raises(ConfigError, match=r"select\.k"):
        load_settings(None)


def test_unknown_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFOGROWTH_SELEKT__K", "3")
    with pytest.raises(ConfigError, match="INFOGROWTH_SELEKT__K"):
        load_settings(None)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_settings(p)
