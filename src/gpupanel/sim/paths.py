"""Where the simulated workstation keeps its state (shared by the backend and fake servers)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SIM_DIR_ENV = "GPUPANEL_SIM_DIR"


def sim_dir() -> Path:
    """`$GPUPANEL_SIM_DIR`, else `$XDG_RUNTIME_DIR/gpupanel-sim`, else a per-user temp dir."""
    explicit = os.environ.get(SIM_DIR_ENV)
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "gpupanel-sim"
    return Path(tempfile.gettempdir()) / f"gpupanel-sim-{os.getuid()}"
