"""Fakes for the supervisor's unit tests: processes in an in-memory table, a scripted
runtime, and a clock moved by hand. Nothing here starts a process or opens a socket."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gpupanel.adapters.process import (
    PIN_ENV,
    WORKER_ENV,
    WORKER_STATE_ENV,
    LaunchError,
    Marked,
    ProcessHandle,
)
from gpupanel.adapters.runtimes.base import Launch, Models, Probe
from gpupanel.adapters.state import StateStore
from gpupanel.core.config import Config, PanelSettings, WorkerSpec
from gpupanel.core.lifecycle import PortHolder
from gpupanel.core.restart import RestartPolicy
from gpupanel.errors import NotFound
from gpupanel.services.supervisor import Supervisor

GPU_A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
GPU_B = "GPU-bbbbbbbb-1111-1111-1111-111111111111"


class FakeClock:
    """`time.time` for the supervisor: advanced by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class FakeProc:
    pid: int
    create_time: float
    name: str
    alive: bool = True
    children: list[int] = field(default_factory=list)
    ports: set[int] = field(default_factory=set)
    env: dict[str, str] = field(default_factory=dict)


class FakeProcesses:
    """The `Processes` protocol over a table of fake pids.

    A worker is recognized by its log file's stem (the supervisor's `logs/<id>.log`):
    `fail_spawn[id]` makes spawn raise LaunchError, `exit_on_start` makes the spawned
    process dead at once, `logs[id]` are the lines `tail` returns, `holders[port]` is the
    PortHolder of a taken port (a spawned worker's port is held by it while it lives; a
    process's `env`, inherited by its children, carries gpupanel's marker)."""

    def __init__(self) -> None:
        self.table: dict[int, FakeProc] = {}
        self._pids = itertools.count(5000)
        self.spawned: list[tuple[str, tuple[str, ...], dict[str, str], int]] = []
        self.stopped: list[tuple[int, float]] = []
        self.fail_spawn: dict[str, str] = {}
        self.exit_on_start: set[str] = set()
        self.logs: dict[str, list[str]] = {}
        self.holders: dict[int, PortHolder] = {}
        self.reaped = 0
        self.rotated: list[Path] = []

    # ---- the test's side --------------------------------------------------------------

    def add(
        self,
        name: str,
        ports: Sequence[int] = (),
        children: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> FakeProc:
        """A process not started by the supervisor (a stranger, or a recorded worker)."""
        pid = next(self._pids)
        proc = self.table[pid] = FakeProc(
            pid, float(pid) / 10, name, ports=set(ports), env=dict(env or {})
        )
        for _ in range(children):
            child = self.add(f"{name}-runner", env=env)
            proc.children.append(child.pid)
        return proc

    def parent(self, pid: int) -> FakeProc | None:
        return next((p for p in self.table.values() if pid in p.children), None)

    def kill(self, pid: int) -> None:
        """kill -9."""
        self.table[pid].alive = False

    def live(self) -> list[int]:
        return sorted(p.pid for p in self.table.values() if p.alive)

    # ---- the Processes protocol -------------------------------------------------------

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> ProcessHandle:
        wid = log_path.stem
        if wid in self.fail_spawn:
            raise LaunchError(self.fail_spawn[wid])
        proc = self.add(wid, ports=[int(env["PORT"])] if "PORT" in env else [], children=1, env=env)
        proc.alive = wid not in self.exit_on_start
        self.spawned.append((wid, tuple(argv), dict(env), proc.pid))
        return ProcessHandle(proc.pid, proc.create_time)

    def is_alive(self, handle: ProcessHandle) -> bool:
        proc = self.table.get(handle.pid)
        return proc is not None and proc.alive and proc.create_time == handle.create_time

    async def stop(self, handle: ProcessHandle, grace_s: float) -> str:
        self.stopped.append((handle.pid, grace_s))
        await asyncio.sleep(0)  # a real stop awaits; let other tasks run meanwhile
        proc = self.table.get(handle.pid)
        if proc is None or not proc.alive:
            return "gone"
        proc.alive = False
        for child in proc.children:
            self.table[child].alive = False
        return "terminated"

    def tail(self, log_path: Path, lines: int = 20) -> list[str]:
        return self.logs.get(log_path.stem, [])[-lines:]

    def reap(self) -> None:
        self.reaped += 1

    def rotate(self, log_path: Path) -> bool:
        self.rotated.append(log_path)
        return False

    def port_holder(self, port: int) -> PortHolder | None:
        if port in self.holders:
            return self.holders[port]
        for proc in self.table.values():
            if proc.alive and port in proc.ports:
                return PortHolder(proc.pid, proc.name)
        return None

    def marked(self, pid: int) -> Marked | None:
        proc = self.table.get(pid)
        if proc is None or not proc.alive:
            return None
        mark = (proc.env.get(WORKER_ENV), proc.env.get(WORKER_STATE_ENV))
        if not all(mark):
            return None
        root = proc
        while (up := self.parent(root.pid)) is not None and (
            up.env.get(WORKER_ENV),
            up.env.get(WORKER_STATE_ENV),
        ) == mark:
            root = up
        wid, state_dir = mark
        assert wid is not None and state_dir is not None
        handle = ProcessHandle(root.pid, root.create_time)
        return Marked(handle, wid, state_dir, root.env.get(PIN_ENV))

    async def stop_tree(self, handle: ProcessHandle, grace_s: float) -> list[tuple[int, str]]:
        self.stopped.append((handle.pid, grace_s))
        await asyncio.sleep(0)
        if not self.is_alive(handle):
            return [(handle.pid, "gone")]
        ended = [(pid, "terminated") for pid in self.tree(handle.pid)]
        for pid, _ in ended:
            self.table[pid].alive = False
        return ended

    def describe(self, pid: int) -> tuple[ProcessHandle, str]:
        proc = self.table.get(pid)
        if proc is None or not proc.alive:
            raise NotFound(f"no process {pid}")
        return ProcessHandle(pid, proc.create_time), proc.name

    def listens(self, pid: int, port: int) -> bool:
        return any(port in self.table[p].ports for p in self.tree(pid))

    def tree(self, pid: int) -> list[int]:
        proc = self.table.get(pid)
        if proc is None or not proc.alive:
            return []
        return [pid] + [p for c in proc.children for p in self.tree(c)]


class FakeRuntime:
    """A runtime whose probes and models are scripted per worker id.

    `probes[id]` is a queue of results (the last one repeats); `slow` makes probe and/or
    models hang (the supervisor's timeout decides); `models_error[id]` makes models raise,
    `probe_error[id]` the probe and `launch_error[id]` the launch (bugs, not answers)."""

    name = "ollama"

    def __init__(self) -> None:
        self.probes: dict[str, deque[Probe]] = {}
        self.models_of: dict[str, Models] = {}
        self.models_error: dict[str, Exception] = {}
        self.probe_error: dict[str, Exception] = {}
        self.launch_error: dict[str, Exception] = {}
        self.slow_probe: set[str] = set()
        self.slow_models: set[str] = set()
        self.probed: list[str] = []

    def script(self, wid: str, *probes: Probe) -> None:
        self.probes[wid] = deque(probes)

    def launch(self, spec: WorkerSpec) -> Launch:
        if spec.id in self.launch_error:
            raise self.launch_error[spec.id]
        return Launch(
            argv=("fake-serve", spec.id, str(spec.port)),
            env={"CUDA_VISIBLE_DEVICES": spec.gpu, "PORT": str(spec.port)},
        )

    def base_url(self, spec: WorkerSpec) -> str:
        return f"http://127.0.0.1:{spec.port}"

    async def probe(self, client: httpx.AsyncClient, spec: WorkerSpec) -> Probe:
        self.probed.append(spec.id)
        if spec.id in self.probe_error:
            raise self.probe_error[spec.id]
        if spec.id in self.slow_probe:
            await asyncio.sleep(3600)
        queue = self.probes.get(spec.id)
        if not queue:
            return Probe(ok=True, latency_ms=5.0)
        return queue.popleft() if len(queue) > 1 else queue[0]

    async def models(self, client: httpx.AsyncClient, spec: WorkerSpec) -> Models:
        if spec.id in self.slow_models:
            await asyncio.sleep(3600)
        if spec.id in self.models_error:
            raise self.models_error[spec.id]
        return self.models_of.get(spec.id, Models())


def worker(wid: str, gpu: str = GPU_A, port: int = 21000, **kw: object) -> WorkerSpec:
    return WorkerSpec(id=wid, runtime="ollama", gpu=gpu, port=port, **kw)  # type: ignore[arg-type]


def config(*workers: WorkerSpec, **panel: float) -> Config:
    settings = {"ready_timeout_s": 0.3, "restart_backoff_s": 1.0, "stop_grace_s": 0.5, **panel}
    return Config(panel=PanelSettings(**settings), workers=workers, source="test.toml")


POLICY = RestartPolicy(base_s=1.0, max_s=8.0, window_s=60.0, max_crashes=3)


@dataclass
class Rig:
    """A supervisor over the fakes, and the fakes."""

    procs: FakeProcesses
    runtime: FakeRuntime
    clock: FakeClock
    store: StateStore
    client: httpx.AsyncClient
    make: Callable[..., Supervisor]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    procs, runtime, clock = FakeProcesses(), FakeRuntime(), FakeClock()
    store = StateStore(tmp_path / "state")
    async with httpx.AsyncClient() as client:

        def make(
            *workers: WorkerSpec, policy: RestartPolicy | None = POLICY, **kw: float
        ) -> Supervisor:
            cfg = config(*(workers or (worker("a"),)), **kw)
            return Supervisor(
                cfg,
                store,
                client,
                policy=policy,
                runtimes=lambda name: runtime,
                clock=clock,
                processes=procs,
            )

        yield Rig(procs, runtime, clock, store, client, make)
