"""Serving the dashboard notebook with Voila, as a child process (`gpupanel dashboard`, and
the dashboard of `gpupanel demo`).

Voila starts a fresh kernel per page view; that kernel runs `dashboard.ipynb`, which attaches
to the control plane named by `$GPUPANEL_URL` (set here, inherited by the kernels). Kernels
go when their tab closes (Voila's front end asks for it) or, when a browser vanishes without
saying so, when the culler finds them unwatched and quiet.

Credentials (docs/security.md, "The admin token"): when the control plane needs them, the
token reaches the kernels through `$GPUPANEL_TOKEN` in Voila's environment, never a command
line, a URL or the page. The page itself then needs a token of its own, a new one per run
(Voila's, from `$JUPYTER_TOKEN`): only who was given the dashboard's URL can use the
kernels that act with the control plane's token.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import IO

import psutil

from gpupanel.client import answers, resolve_token
from gpupanel.core.defaults import CONFIG_ENV, TOKEN_ENV, URL_ENV
from gpupanel.errors import ConfigError, GpuPanelError

INSTALL_HINT = "pip install 'gpupanel[jupyter]'"

PAGE_TOKEN_ENV = "JUPYTER_TOKEN"
"""Where Voila's server (jupyter_server) reads the token its pages need."""
CULL_IDLE_S = 120
"""A kernel with no tab attached is shut down after this long without activity."""

# jupyter_server counts every kernel message not listed here as activity. The widget panel
# sends comm messages every second from its binder thread, so without adding the comm
# messages a kernel whose tab vanished would look busy forever and never be culled.
_UNTRACKED_MESSAGES = (
    "comm_info_request", "comm_info_reply", "kernel_info_request", "kernel_info_reply",
    "shutdown_request", "shutdown_reply", "interrupt_request", "interrupt_reply",
    "debug_request", "debug_reply", "stream", "display_data", "update_display_data",
    "execute_input", "execute_result", "error", "status", "clear_output", "debug_event",
    "input_request", "input_reply", "comm_msg", "comm_open", "comm_close",
)  # fmt: skip


class DashboardError(GpuPanelError):
    """The dashboard cannot be served (Voila missing, port busy, Voila exited)."""


def notebook_path() -> Path:
    """The dashboard notebook shipped inside the package (`gpupanel/dashboard/`)."""
    return Path(str(resources.files("gpupanel.dashboard").joinpath("dashboard.ipynb")))


def voila_available() -> bool:
    """True when Voila is installed in this Python (the `jupyter` extra)."""
    return importlib.util.find_spec("voila") is not None


def voila_command(
    port: int, notebook: Path | None = None, log_level: str = "WARN", page_token: bool = False
) -> list[str]:
    """The command line that serves `notebook` (default: the dashboard) on 127.0.0.1:`port`;
    with `page_token`, pages need the token of `$JUPYTER_TOKEN` (never on the command line)."""
    cmd = [
        sys.executable, "-m", "voila", str(notebook or notebook_path()),
        f"--port={port}", "--no-browser", "--Voila.ip=127.0.0.1", "--Voila.port_retries=0",
        f"--Voila.log_level={log_level}",
        f"--MappingKernelManager.cull_idle_timeout={CULL_IDLE_S}",
        "--MappingKernelManager.cull_interval=30",
        "--MappingKernelManager.cull_connected=False",
    ]  # fmt: skip
    cmd += [f"--MappingKernelManager.untracked_message_types={m}" for m in _UNTRACKED_MESSAGES]
    if page_token:
        cmd.append("--token")  # Voila.auto_token: jupyter_server's token, from $JUPYTER_TOKEN
    return cmd


def check_port_free(port: int, option: str = "--port") -> None:
    """Raise a GpuPanelError naming the port and the fix (`option`) when 127.0.0.1:`port`
    is taken."""
    from gpupanel.services.runtime import bind_panel_socket  # the control plane's, lazily

    bind_panel_socket("127.0.0.1", port, option).close()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class VoilaServer:
    """A Voila child process serving the dashboard, attached to the control plane at `url`.

    With `token` (the control plane's admin token or an API key), the kernels get it in
    `$GPUPANEL_TOKEN`, and the page needs a token of its own (`page_token`, in `address`)."""

    def __init__(
        self,
        port: int,
        url: str,
        env: Mapping[str, str] | None = None,
        output: IO[bytes] | int | None = None,
        log_level: str = "WARN",
        token: str | None = None,
    ) -> None:
        self.port = port
        self.url = url
        self.env = dict(os.environ if env is None else env)
        self.output = output
        self.log_level = log_level
        self.token = token
        self.page_token = secrets.token_urlsafe(24) if token else None
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<VoilaServer port {self.port} for {self.url}>"  # no token, ever

    @property
    def address(self) -> str:
        """What to open in a browser (with the page's token when it needs one)."""
        query = f"?token={self.page_token}" if self.page_token else ""
        return f"http://127.0.0.1:{self.port}/{query}"

    def start(self, ready_timeout: float = 60.0, port_option: str = "--port") -> VoilaServer:
        """Start Voila and return once it listens (DashboardError if it cannot)."""
        if not voila_available():
            raise DashboardError(f"the dashboard needs Voila: {INSTALL_HINT}")
        check_port_free(self.port, port_option)
        env = {**self.env, URL_ENV: self.url}
        if self.token and self.page_token:
            env |= {TOKEN_ENV: self.token, PAGE_TOKEN_ENV: self.page_token}
        self.proc = subprocess.Popen(
            voila_command(self.port, log_level=self.log_level, page_token=bool(self.page_token)),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT if self.output is not None else None,
            start_new_session=True,  # Ctrl-C in the terminal reaches us; we stop Voila in order
        )
        deadline = time.monotonic() + ready_timeout
        while not _listening(self.port):
            if self.proc.poll() is not None:
                raise DashboardError(f"Voila exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise DashboardError(
                    f"Voila did not listen on port {self.port} within {ready_timeout:g} s"
                )
            time.sleep(0.2)
        return self

    def wait(self) -> int:
        """Wait for Voila to exit; its exit status."""
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM Voila (it shuts its kernels down), then kill whatever of it is left."""
        if self.proc is None:
            return
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _gone, alive = psutil.wait_procs(tree, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self.proc = None


def kernel_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the dashboard's kernels: this one, with `$GPUPANEL_CONFIG` naming
    the config found here (their working directory is the notebook's, so `./gpupanel.toml`
    would not be found there): they read the state directory and the certificate of this
    host's control plane from it, as a client started here does."""
    from gpupanel.adapters.config_file import find_config

    env = dict(os.environ if env is None else env)
    with contextlib.suppress(ConfigError):
        found = find_config()
        if found is not None:
            env[CONFIG_ENV] = str(found.resolve())
    return env


def serve_dashboard(port: int, url: str) -> int:
    """`gpupanel dashboard`: serve until Ctrl-C or SIGTERM; the exit status."""
    token, source = resolve_token(url)
    server = VoilaServer(port, url, kernel_env(), token=token)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if server.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                server.proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        if stopping:
            return 0
        print(f"gpupanel dashboard: {server.address}  (control plane: {url})", flush=True)
        if token:
            print(
                f"  its kernels use the token {source}; the page needs the token in its URL "
                "(a new one each run), so only who has this URL can use them",
                flush=True,
            )
        if not answers(url):
            print(
                f"  nothing answers at {url} yet: the page says how to start a control plane "
                "and attaches once one runs",
                flush=True,
            )
        print("Ctrl-C stops the dashboard.", flush=True)
        status = server.wait()
        return 0 if stopping else status
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
