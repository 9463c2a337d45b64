"""`gpupanel demo`: the whole thing on a simulated 4-GPU workstation.

A control plane on the panel port, one simulated Ollama worker pinned per GPU with a few
models pulled and one loaded through the guard, a gentle traffic generator through the proxy
(the real `openai` client), and the Voila dashboard. Everything lives in a fresh temporary
directory (simulated GPUs, worker state, model store), so the demo never touches the user's
real gpupanel state, and everything it started is stopped and removed when it ends (Ctrl-C,
SIGTERM or `--duration`). Unlike `gpupanel serve`, the demo owns its workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

import psutil

from gpupanel._version import __version__
from gpupanel.api.build import control_plane
from gpupanel.client import Panel, PanelError
from gpupanel.core.config import DEFAULT_PANEL_PORT, Config, PanelSettings, WorkerSpec
from gpupanel.core.defaults import (
    DEFAULT_DASHBOARD_PORT,
    SIM_PULLED_ENV,
    SIM_REPLY_TOKENS_ENV,
    SIM_TOKENS_PER_S_ENV,
)
from gpupanel.core.units import gib
from gpupanel.errors import GpuPanelError
from gpupanel.launchers.demo_traffic import Caller, TrafficGenerator
from gpupanel.launchers.voila import (
    INSTALL_HINT,
    VoilaServer,
    check_port_free,
)
from gpupanel.services.runtime import ControlPlane
from gpupanel.sim.paths import SIM_DIR_ENV
from gpupanel.sim.workstation import Workstation, parse_spec

log = logging.getLogger("gpupanel.demo")

TOKENS_PER_S = 40
"""A human reading speed, so streams last a few seconds and the in-flight view has company."""

PULLED = (
    "llama3.1:8b", "llama3.2:3b", "qwen2.5:7b", "qwen2.5:32b", "gemma3:27b", "mistral:7b",
    "nomic-embed-text",
)  # fmt: skip
"""Models already on every worker's (shared, simulated) disk."""

LOADED = ("llama3.1:8b", "qwen2.5:7b", "qwen2.5:32b", "gemma3:27b")
"""The model loaded on worker gpu<i>, through the VRAM guard (24, 24, 48, 48 GiB cards)."""

NUM_CTX = 8192
"""The context length of the demo's models (guarded loads and the workers' default alike)."""

APPS = (
    ("chat-ui", "support team", ()),
    ("rag-batch", "search team", ("gpu2",)),
    ("notebook", "ana", ("gpu3",)),
)
"""The demo's apps: name, owner, the workers they own (registered, so the panel shows owners)."""


@dataclass(frozen=True)
class DemoOptions:
    """What `gpupanel demo` was asked for."""

    port: int = DEFAULT_PANEL_PORT
    dashboard_port: int = DEFAULT_DASHBOARD_PORT
    dashboard: bool = True
    duration: float | None = None
    traffic: bool = True


def _free_ports(count: int, exclude: set[int]) -> list[int]:
    """`count` distinct free loopback ports, none of them in `exclude`."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
            port = sock.getsockname()[1]
            if port not in exclude:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def demo_config(workstation: Workstation, port: int, state_dir: Path, exclude: set[int]) -> Config:
    """One simulated Ollama worker pinned per GPU (ids gpu0...), on free ports, with PULLED
    on disk and a human token rate."""
    env = {
        SIM_PULLED_ENV: ",".join(PULLED),
        SIM_TOKENS_PER_S_ENV: str(TOKENS_PER_S),
        SIM_REPLY_TOKENS_ENV: "200",
        "OLLAMA_NOPRUNE": "1",  # the workers share one models directory
        "OLLAMA_KEEP_ALIVE": "-1",
        # The traffic's requests name no context length; the same default as the guarded
        # loads keeps them from reloading the models.
        "OLLAMA_CONTEXT_LENGTH": str(NUM_CTX),
    }
    ports = _free_ports(len(workstation.gpus), exclude | {port})
    workers = tuple(
        WorkerSpec(id=f"gpu{g.index}", runtime="ollama", gpu=g.uuid, port=p, env=env)
        for g, p in zip(workstation.gpus, ports, strict=True)
    )
    panel = PanelSettings(port=port, state_dir=str(state_dir))
    return Config(panel=panel, workers=workers, source="<gpupanel demo>")


def traffic_callers(url: str) -> tuple[Caller, ...]:
    """The apps' request patterns: a chat UI on the routed `/v1`, a RAG batch job and a
    notebook on their own workers."""
    return (
        Caller("chat-ui", f"{url}/v1", (LOADED[0], LOADED[1]), (1.0, 4.0), (60, 200)),
        # A batch job that does not ask for token counts: its usage shows answer chunks.
        Caller(
            "rag-batch",
            f"{url}/proxy/gpu2/v1",
            (LOADED[2],),
            (2.0, 6.0),
            (100, 200),
            include_usage=False,
        ),
        Caller("notebook", f"{url}/proxy/gpu3/v1", (LOADED[3],), (4.0, 10.0), (30, 120)),
    )


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the demo (its workers inherit them), restore after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kill_leftovers(sim_dir: Path) -> list[int]:
    """Kill any process still running for this demo's simulated workstation (a worker or a
    runner that did not stop); the pids killed."""
    killed = []
    for proc in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            env = proc.info["environ"] or {}
            if env.get(SIM_DIR_ENV) == str(sim_dir) and proc.pid != os.getpid():
                proc.kill()
                killed.append(proc.pid)
    return killed


class Demo:
    """The demo's pieces, started in order by `start()` and stopped in reverse by `close()`."""

    def __init__(self, options: DemoOptions, out: TextIO = sys.stdout) -> None:
        self.options = options
        self.out = out
        self.stopping = threading.Event()
        self.root = Path(tempfile.mkdtemp(prefix="gpupanel-demo-"))
        self.sim_dir = self.root / "sim"
        self.state_dir = self.root / "state"
        self.workstation = parse_spec(None)
        self.plane: ControlPlane | None = None
        self.panel: Panel | None = None
        self.traffic: TrafficGenerator | None = None
        self.voila: VoilaServer | None = None

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ---- starting ------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything; GpuPanelError with a clear message when something cannot."""
        opts = self.options
        if opts.dashboard:
            check_port_free(opts.dashboard_port, "--dashboard-port (or --no-dashboard)")
        self.say(
            f"gpupanel demo: starting a simulated {len(self.workstation.gpus)}-GPU workstation..."
        )
        self.workstation.save(self.sim_dir)
        config = demo_config(
            self.workstation, opts.port, self.state_dir, {opts.port, opts.dashboard_port}
        )
        self.plane = control_plane(config=config, simulate="")
        self.plane.start_in_thread()  # PanelPortBusy (a GpuPanelError) names the port and --port
        self.panel = Panel(self.plane.url, self.plane)
        self._wait_running(config)
        self._load_models()
        for name, owner, workers in APPS:
            self.panel.register_app(name, owner, list(workers))
        if opts.traffic and not self.stopping.is_set():
            try:
                self.traffic = TrafficGenerator(traffic_callers(self.plane.url)).start()
            except ImportError:
                self.say(
                    "  (no traffic: the demo's apps need the openai package, pip install openai)"
                )
        if opts.dashboard and not self.stopping.is_set():
            self.voila = VoilaServer(opts.dashboard_port, self.plane.url, log_level="ERROR")
            self.voila.start(port_option="--dashboard-port (or --no-dashboard)")

    def _wait_running(self, config: Config, timeout: float = 60.0) -> None:
        assert self.panel is not None
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set():
            workers = self.panel.workers
            if len(workers) == len(config.workers) and all(
                w["status"] == "running" and w["models_available"] for w in workers.values()
            ):
                return
            if time.monotonic() > deadline:
                problems = "; ".join(
                    f"{w['id']} {w['status']}"
                    + (f" ({w['last_error']})" if w.get("last_error") else "")
                    for w in workers.values()
                )
                raise GpuPanelError(f"the demo's workers did not all start: {problems}")
            self.stopping.wait(0.2)

    def _load_models(self) -> None:
        assert self.panel is not None
        for i, model in enumerate(LOADED):
            if self.stopping.is_set():
                return
            try:
                self.panel.load(f"gpu{i}", model, keep_alive=-1, num_ctx=NUM_CTX)
            except PanelError as exc:
                self.say(f"  warning: could not load {model} on gpu{i}: {exc}")

    # ---- telling ------------------------------------------------------------------------

    def describe(self) -> None:
        """The banner: what is simulated, and every URL."""
        assert self.plane is not None and self.panel is not None
        url = self.plane.url
        sizes = ", ".join(gib(g.memory_total, digits=0) for g in self.workstation.gpus)
        self.say(f"gpupanel {__version__} demo on a SIMULATED workstation")
        self.say(
            f"  simulated: {len(self.workstation.gpus)} GPUs ({sizes}), one fake Ollama worker "
            f"per GPU, its models and its replies ({TOKENS_PER_S} tokens/s); no real GPU or model"
        )
        self.say(f"  panel API     {url}/panel/snapshot")
        self.say(f"  OpenAI proxy  {url}/v1   (routed by model)")
        workers = self.panel.workers
        for spec in self.plane.config.workers:
            w = workers.get(spec.id, {})
            loaded = ", ".join(m["name"] for m in w.get("models_loaded", ())) or "-"
            self.say(
                f"  worker {spec.id}   {url}/proxy/{spec.id}/v1   GPU {w.get('gpu_index')} {spec.gpu}   "
                f"pid {w.get('pid')}   loaded: {loaded}"
            )
        if self.voila is not None:
            self.say(f"  dashboard     {self.voila.address}")
        elif self.options.dashboard:
            self.say("  dashboard     not started")
        if self.traffic is not None:
            apps = ", ".join(
                f"{c.app} -> {c.base_url.removeprefix(url)}" for c in self.traffic.callers
            )
            self.say(f"  traffic       {apps} (openai client, streamed)")
        self.say(f"  temporary files {self.root}")
        until = f" for {self.options.duration:g} s" if self.options.duration is not None else ""
        self.say(
            f"Running{until}; Ctrl-C stops the demo: traffic, dashboard, workers and control "
            "plane, and removes its temporary files."
        )

    # ---- stopping ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything the demo started, newest first, and remove its files."""
        self.stopping.set()
        if self.traffic is not None:
            self.traffic.stop()
        if self.voila is not None:
            self.voila.stop()
        if self.panel is not None and self.plane is not None:
            for spec in self.plane.config.workers:
                with contextlib.suppress(GpuPanelError):
                    self.panel.stop(spec.id)
            self.panel.shutdown()
        elif self.plane is not None:
            self.plane.join(timeout=30)
        killed = _kill_leftovers(self.sim_dir)
        if killed:
            log.warning("killed leftover simulated processes: %s", killed)
        shutil.rmtree(self.root, ignore_errors=True)


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo until Ctrl-C, SIGTERM or `options.duration`; the exit status."""
    if options.dashboard:
        from gpupanel.launchers.voila import voila_available

        if not voila_available():
            raise GpuPanelError(
                f"the demo's dashboard needs Voila: {INSTALL_HINT} (or run with --no-dashboard)"
            )
    demo = Demo(options, out)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not demo.stopping.is_set():
            print("stopping the demo...", file=out, flush=True)
        demo.stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    env = {SIM_DIR_ENV: str(demo.sim_dir), "XDG_STATE_HOME": str(demo.root / "xdg-state")}
    try:
        with _environment(env):
            try:
                demo.start()
                if not demo.stopping.is_set():
                    demo.describe()
                    demo.stopping.wait(options.duration)
            finally:
                demo.close()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if demo.traffic is not None:
        done = ", ".join(
            f"{app} {s.ok} ok" + (f" / {s.failed} failed" if s.failed else "")
            for app, s in demo.traffic.stats.items()
        )
        print(f"traffic: {done}", file=out, flush=True)
    print("gpupanel demo stopped; everything it started is gone.", file=out, flush=True)
    return 0
