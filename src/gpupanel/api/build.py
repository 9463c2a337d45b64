"""Building a control plane from a config file (or none) and a GPU backend: one recipe for
`gpupanel serve`, `gpupanel demo` and `gpupanel.start()` in a notebook."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from gpupanel.adapters.config_file import find_config, load_config
from gpupanel.adapters.state import StateStore
from gpupanel.api.app import build_app
from gpupanel.core.config import Config
from gpupanel.errors import GpuPanelError
from gpupanel.services.runtime import LOOPBACK, ControlPlane
from gpupanel.services.sampler import gpu_backend

SIM_OLLAMA = (sys.executable, "-m", "gpupanel.sim.ollama")
"""How simulated workstations run `ollama serve`."""


def control_plane(
    config_file: str | None = None,
    simulate: str | None = None,
    host: str | None = None,
    port: int | None = None,
    config: Config | None = None,
) -> ControlPlane:
    """A control plane (not yet running) for this host.

    `config` (already validated) wins over `config_file`; otherwise `--config`,
    `$GPUPANEL_CONFIG` or `./gpupanel.toml`, else one Ollama worker per GPU. When simulating,
    Ollama workers that name no command run the simulated Ollama.
    """
    backend = gpu_backend(simulate)
    gpus = [g.uuid for g in backend.sample()]
    if config is None:
        config = load_config(find_config(config_file), gpus)
    if simulate is not None:
        config = config.with_command("ollama", SIM_OLLAMA)
    panel = replace(config.panel, host=host or config.panel.host, port=port or config.panel.port)
    if panel.host not in LOOPBACK:
        raise GpuPanelError(
            f"refusing to listen on {panel.host}: beyond loopback the panel needs API keys, "
            "which this version does not have yet; use 127.0.0.1 (the default)"
        )
    config = replace(config, panel=panel)
    store = StateStore(Path(panel.state_dir) if panel.state_dir else None)
    return ControlPlane(config, backend, store, lambda plane: build_app(plane, panel.host))
