"""Default addresses and the names of the environment variables: one definition each.

Everything else (the config's defaults, the client's default URL, the simulator's knobs,
the launchers' environment) refers to these names instead of repeating the literals.
"""

from __future__ import annotations

LOOPBACK = "127.0.0.1"
"""Where the control plane and its workers listen unless told otherwise."""
DEFAULT_PANEL_PORT = 8765
DEFAULT_PANEL_URL = f"http://{LOOPBACK}:{DEFAULT_PANEL_PORT}"
DEFAULT_DASHBOARD_PORT = 17320
DEFAULT_WORKER_PORT = 11435
"""The first zero-config worker's port (the next GPUs get the next ports)."""

# The control plane's own environment.
URL_ENV = "GPUPANEL_URL"
CONFIG_ENV = "GPUPANEL_CONFIG"
TOKEN_ENV = "GPUPANEL_TOKEN"
"""The admin token for clients of a control plane (docs/security.md, "The admin token")."""
SIMULATE_ENV = "GPUPANEL_SIMULATE"
STATE_HOME_ENV = "XDG_STATE_HOME"
RUNTIME_DIR_ENV = "XDG_RUNTIME_DIR"
# the panel port's connection limits (docs/api.md, "Limits of every connection")
IDLE_TIMEOUT_ENV = "GPUPANEL_IDLE_TIMEOUT_S"
HEADER_TIMEOUT_ENV = "GPUPANEL_HEADER_TIMEOUT_S"
BODY_TIMEOUT_ENV = "GPUPANEL_BODY_TIMEOUT_S"
MAX_CONNECTIONS_ENV = "GPUPANEL_MAX_CONNECTIONS"
SHUTDOWN_GRACE_ENV = "GPUPANEL_SHUTDOWN_GRACE_S"

# The simulated workstation and its fake Ollama (documented in `gpupanel.sim.ollama`).
SIM_DIR_ENV = "GPUPANEL_SIM_DIR"
SIM_CATALOGUE_ENV = "GPUPANEL_SIM_CATALOGUE"
SIM_PULLED_ENV = "GPUPANEL_SIM_PULLED"
SIM_TOKENS_PER_S_ENV = "GPUPANEL_SIM_TOKENS_PER_S"
SIM_REPLY_TOKENS_ENV = "GPUPANEL_SIM_REPLY_TOKENS"
SIM_PULL_SPEED_ENV = "GPUPANEL_SIM_PULL_SPEED"
SIM_LOAD_SPEED_ENV = "GPUPANEL_SIM_LOAD_SPEED"
SIM_OLLAMA_VERSION_ENV = "GPUPANEL_SIM_OLLAMA_VERSION"
SIM_FAULTS_ENV = "GPUPANEL_SIM_FAULTS"
