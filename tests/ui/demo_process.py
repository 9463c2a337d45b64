"""A `gpupanel demo` subprocess for tests: start it, read its banner, find what it started,
and make sure nothing of it is left afterwards."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.e2e.conftest import kill_simulated


class DemoProcess:
    """`python -m gpupanel demo ARGS` with its output collected line by line."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.args = args
        self.env = {**os.environ, "TMPDIR": str(tmp)}  # its temp dirs land in `tmp`
        self.env.pop("GPUPANEL_SIM_DIR", None)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc: subprocess.Popen[str] | None = None
        self.banner: dict[str, str] = {}
        self.workers: dict[str, str] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)

    def start(self) -> DemoProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupanel", "demo", *self.args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_banner(self, timeout: float = 90.0) -> dict[str, str]:
        """Read until the 'Running' line; the banner's URLs by name."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no demo banner after {timeout} s: {self.output}") from None
            if line is None:
                raise AssertionError(f"the demo ended before its banner: {self.output}")
            self.lines.append(line)
            if m := re.match(r"\s+(panel API|OpenAI proxy|dashboard)\s+(\S+)", line):
                self.banner[m[1]] = m[2]
            if m := re.match(r"\s+worker (\S+)\s+(\S+)", line):
                self.workers[m[1]] = m[2]
            if m := re.match(r"\s+temporary files (\S+)", line):
                self.banner["temporary files"] = m[1]
            if line.startswith("Running"):
                return self.banner

    @property
    def output(self) -> str:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "\n".join(self.lines)

    @property
    def url(self) -> str:
        return self.banner["panel API"].removesuffix("/panel/snapshot")

    @property
    def sim_dir(self) -> Path:
        return Path(self.banner["temporary files"]) / "sim"

    def snapshot(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/panel/snapshot", timeout=10, trust_env=False).json())

    def started_pids(self) -> set[int]:
        """Workers, their runners, and (when running) Voila and its kernels."""
        snap = self.snapshot()
        pids = {w["pid"] for w in snap["workers"].values() if w["pid"]}
        pids |= {p["pid"] for g in snap["gpus"].values() for p in g["processes"]}
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            pids |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        return pids

    def wait(self, timeout: float) -> int:
        """Wait for the demo to end (and its last output to be read); its exit status."""
        assert self.proc is not None
        status = self.proc.wait(timeout)
        self._reader.join(10)
        return status

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a service manager would stop it; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def cleanup(self) -> None:
        """Kill whatever is left (only used when a test failed half-way)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if "temporary files" in self.banner:
            kill_simulated(self.sim_dir)


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (zombies count as gone)."""
    left = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
    return left


def simulated_processes(sim_dir: Path) -> list[int]:
    """Processes still running for the simulated workstation in `sim_dir`."""
    found = []
    for proc in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            if (proc.info["environ"] or {}).get("GPUPANEL_SIM_DIR") == str(sim_dir):
                found.append(proc.pid)
    return found
