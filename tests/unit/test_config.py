"""Config errors fail fast and name the key."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from infogrowth.config import load_settings
from infogrowth.errors import ConfigError


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


def test_an_unseeded_precomputed_run_needs_encoder_dims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a seeded calibration the dimensions of precomputed vectors come from config, not
    from whichever sample happens to come first; a sample of other dimensions is malformed."""
    from infogrowth.kafka import run
    from infogrowth.messages import Outcome
    from infogrowth.pipeline import EmbedStage
    from infogrowth.schema import Embedded, parse_msgpack_sample

    monkeypatch.setattr(run, "read_calibration", lambda settings: None)
    with pytest.raises(ValueError, match=r"^encoder\.dims: "):
        run.build(load_settings(None), "select")
    with pytest.raises(ConfigError, match=r"encoder\.dims"):
        load_settings(None, **{"encoder.dims": {"image": 0}})
    settings = load_settings(None, **{"encoder.dims": {"text": 4, "image": 3}})
    rt = run.build(settings, "all")
    assert rt.select is not None and rt.select.dims == {"image": 3, "text": 4}
    stage = rt.loops[0].processor.stage  # type: ignore[attr-defined]
    assert isinstance(stage, EmbedStage) and stage.dims == {"image": 3, "text": 4}
    raw = [
        msgpack.packb({"id": i, "embedding": {"image": [1.0] * d, "text": [1.0] * 4}})
        for i, d in (("wide", 5), ("ok", 3))
    ]
    items = [parse_msgpack_sample(r, settings.limits, {"topic": "t"}) for r in raw]
    wide, ok = stage.process(items)
    assert isinstance(wide, Outcome) and wide.reason == "malformed" and wide.id == "wide"
    assert isinstance(ok, Embedded)
