"""Where the simulated workstation keeps its state (shared by the backend and fake servers)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gpupanel.core.defaults import RUNTIME_DIR_ENV, SIM_DIR_ENV

__all__ = ["SIM_DIR_ENV", "sim_dir"]


def sim_dir() -> Path:
    """`$GPUPANEL_SIM_DIR`, else `$XDG_RUNTIME_DIR/gpupanel-sim`, else a per-user temp dir."""
    explicit = os.environ.get(SIM_DIR_ENV)
    if explicit:
        return Path(explicit)
    runtime = os.environ.get(RUNTIME_DIR_ENV)
    if runtime:
        return Path(runtime) / "gpupanel-sim"
    return Path(tempfile.gettempdir()) / f"gpupanel-sim-{os.getuid()}"
