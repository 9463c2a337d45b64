"""Shared fixtures: every test gets its own simulated-workstation directory."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def sim_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh `$GPUPANEL_SIM_DIR` for this test, so simulated GPUs never leak between tests."""
    path = tmp_path_factory.mktemp("sim")
    monkeypatch.setenv("GPUPANEL_SIM_DIR", str(path))
    return path
