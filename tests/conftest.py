"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

from infogrowth.config import NON_SETTINGS_ENV


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's INFOGROWTH_* settings."""
    for k in list(os.environ):
        if k.startswith("INFOGROWTH_") and k not in NON_SETTINGS_ENV:
            monkeypatch.delenv(k)
