"""End-to-end helpers: a real `gpupanel serve` on loopback over a simulated workstation."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest

from tests.conftest import free_port

__all__ = ["free_port"]

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float = 20.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError, ConnectionError):
            last = check()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class Panel:
    """A `gpupanel serve` subprocess and an HTTP client for its API."""

    def __init__(self, env: dict[str, str], config: Path, port: int, log: Path) -> None:
        self.env, self.config, self.port, self.log = env, config, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60, trust_env=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> Panel:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpupanel", "serve", "--simulate", "--config", str(self.config),
                 "--port", str(self.port), *extra],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(
            lambda: self.http.get("/panel/health").status_code == 200, 30, "the panel to answer"
        )
        return self

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def shutdown(self) -> None:
        """Stop every worker through the API, then the control plane (test cleanup)."""
        with contextlib.suppress(httpx.HTTPError):
            for worker_id in self.workers():
                self.post(f"/panel/workers/{worker_id}/stop")
        self.stop()

    def workers(self) -> dict[str, dict[str, Any]]:
        return dict(self.http.get("/panel/workers").json()["workers"])

    def worker(self, worker_id: str) -> dict[str, Any]:
        return self.workers()[worker_id]

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.post(path, **kwargs)

    def settled(self) -> None:
        """Wait until no request is in flight. A client can have its whole answer (the openai
        client stops at `data: [DONE]`) a moment before the proxy sees the request end and
        counts it in metrics and usage, so counts are read only once the registry is empty."""
        wait_for(
            lambda: self.http.get("/panel/requests").json()["requests"] == [],
            10,
            "the in-flight registry to empty",
        )


def serve(directory: Path, env: dict[str, str], toml: str) -> Panel:
    """Write `toml` (dedented) as `directory`/gpupanel.toml and start `gpupanel serve` on it."""
    config = directory / "gpupanel.toml"
    config.write_text(textwrap.dedent(toml))
    return Panel(env, config, free_port(), directory / "serve.log").start()


@pytest.fixture
def panel_env(tmp_path: Path, sim_dir: Path) -> dict[str, str]:
    state = tmp_path / "state"
    return {**os.environ, "GPUPANEL_SIM_DIR": str(sim_dir), "XDG_STATE_HOME": str(state)}


def kill_simulated(sim_dir: Path) -> None:
    """Kill every process still running for this simulated workstation."""
    for proc in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            env = proc.info["environ"] or {}
            if env.get("GPUPANEL_SIM_DIR") == str(sim_dir) and proc.pid != os.getpid():
                proc.kill()


@pytest.fixture
def leftover_guard(sim_dir: Path) -> Iterator[None]:
    """After the test: kill any simulated server still running for this sim dir."""
    yield
    kill_simulated(sim_dir)
