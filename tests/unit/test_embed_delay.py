"""The testing aid that slows the embed stage: parsed strictly, applied once per batch."""

from __future__ import annotations

import time

import pytest

from infogrowth.calibrate import resolve_thresholds
from infogrowth.config import load_settings
from infogrowth.kafka.embed import DELAY_ENV, EmbedProcessor, delay_from_env
from infogrowth.kafka.loop import Output
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import SPACES


def test_unset_means_no_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DELAY_ENV, raising=False)
    assert delay_from_env() == 0.0
    monkeypatch.setenv(DELAY_ENV, " ")
    assert delay_from_env() == 0.0


def test_seconds_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DELAY_ENV, "0.25")
    assert delay_from_env() == 0.25


@pytest.mark.parametrize("bad", ["abc", "-1", "nan", "inf", "1s"])
def test_a_bad_value_fails_naming_the_variable(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(DELAY_ENV, bad)
    with pytest.raises(ValueError, match=DELAY_ENV):
        delay_from_env()


def test_it_is_not_mistaken_for_an_unknown_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DELAY_ENV, "0.1")
    load_settings(None)  # would raise ConfigError for an unknown INFOGROWTH_* variable


def test_every_batch_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(None)

    thresholds = resolve_thresholds(settings, SPACES, None)
    stage = EmbedStage(settings, None, None, spaces=None, dims=None)

    def elapsed(proc: EmbedProcessor) -> float:
        t0 = time.monotonic()
        proc.process([], Output(producer=None))  # type: ignore[arg-type]  # nothing produced
        return time.monotonic() - t0

    monkeypatch.setenv(DELAY_ENV, "0.3")
    slow = EmbedProcessor(settings, stage, thresholds, None, 1)
    assert elapsed(slow) >= 0.3
    monkeypatch.delenv(DELAY_ENV)
    fast = EmbedProcessor(settings, stage, thresholds, None, 1)
    assert elapsed(fast) < 0.2
