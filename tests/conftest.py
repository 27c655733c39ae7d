"""Shared fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's INFOGROWTH_* settings."""
    for k in list(os.environ):
        if k.startswith("INFOGROWTH_") and k != "INFOGROWTH_CACHE_DIR":
            monkeypatch.delenv(k)
