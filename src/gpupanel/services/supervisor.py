"""The supervisor: the workers that should run, against the processes that do.

It observes (is each worker's process alive, who holds a port) and executes (launch,
terminate); every lifecycle decision is `gpupanel.core.lifecycle`'s. It starts workers
pinned to their GPU and waits until they are ready, restarts crashed ones with backoff
(and gives up on a crash loop), waits out a port held by another process (`blocked`),
stops workers as a process group, and on start adopts the live workers a previous control
plane recorded (pid + start time + port all match), so a restart of the control plane
restarts no worker and starts no duplicate. See docs/architecture.md, "The supervisor".

All methods run on the runtime loop; per-worker locks keep a start, a stop and the tick's
automatic actions from interleaving on one worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from gpupanel.adapters.process import LaunchError, OsProcesses, ProcessHandle
from gpupanel.adapters.runtimes.base import Models, Probe, Runtime
from gpupanel.adapters.runtimes.registry import runtime_for
from gpupanel.adapters.state import StateStore, WorkerRecord
from gpupanel.core import lifecycle
from gpupanel.core.config import Config, WorkerSpec
from gpupanel.core.lifecycle import Life, PortHolder, Status
from gpupanel.core.model import from_jsonable
from gpupanel.core.restart import RestartPolicy
from gpupanel.core.worker import Health, percentile
from gpupanel.errors import (
    Conflict,
    GpuPanelError,
    NotFound,
    WorkerFailed,
    WorkerTimeout,
)

log = logging.getLogger("gpupanel.supervisor")

UNHEALTHY_AFTER = 2  # consecutive failed probes
LATENCY_WINDOW = 60  # probes kept for the latency percentiles
PROBE_TIMEOUT_S = 2.0


class Processes(Protocol):
    """What the supervisor does with processes (`OsProcesses`; a fake in unit tests)."""

    def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> ProcessHandle: ...

    def is_alive(self, handle: ProcessHandle) -> bool: ...

    async def stop(self, handle: ProcessHandle, grace_s: float) -> str: ...

    def tail(self, log_path: Path, lines: int = 20) -> list[str]: ...

    def reap(self) -> None: ...

    def rotate(self, log_path: Path) -> bool: ...

    def port_holder(self, port: int) -> PortHolder | None: ...

    def describe(self, pid: int) -> tuple[ProcessHandle, str]: ...

    def listens(self, pid: int, port: int) -> bool: ...

    def tree(self, pid: int) -> list[int]: ...


@dataclass
class Managed:
    """The supervisor's mutable record of one worker (owned by the runtime loop).

    `life` is the lifecycle (desired state included); `health` and `failed_probes` the
    probes' verdict, kept apart from it; `note` says something about the worker that is
    not a lifecycle reason (e.g. it runs as launched under an older configuration).
    """

    spec: WorkerSpec
    runtime: Runtime
    life: Life = Life()
    handle: ProcessHandle | None = None
    adopted: bool = False
    restarts: int = 0
    started_at: float | None = None
    note: str | None = None
    health: Health = Health()
    failed_probes: int = 0
    models: Models = Models()
    probing: bool = False
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def healthy(self) -> bool | None:
        """None before the first probe; False after UNHEALTHY_AFTER failed probes in a row."""
        if self.failed_probes >= UNHEALTHY_AFTER:
            return False
        return None if self.health.ok is None else True

    @property
    def status(self) -> Status:
        """The contract's worker status (derived from lifecycle and health)."""
        return lifecycle.contract_status(self.life.lifecycle, self.healthy)

    @property
    def last_error(self) -> str | None:
        return self.life.reason or self.note


def _record_spec(spec: WorkerSpec) -> dict[str, object]:
    data = dataclasses.asdict(spec)
    data["env"] = dict(spec.env)
    return data


def _spec_from_record(data: dict[str, object]) -> WorkerSpec:
    spec: WorkerSpec = from_jsonable(WorkerSpec, data)
    return spec


class Supervisor:
    """Keeps the configured workers running, pinned, and recorded."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        client: httpx.AsyncClient,
        policy: RestartPolicy | None = None,
        runtimes: Callable[[str], Runtime] = runtime_for,
        clock: Callable[[], float] = time.time,
        processes: Processes | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.client = client
        self.policy = policy or RestartPolicy(
            base_s=config.panel.restart_backoff_s, max_s=max(30.0, config.panel.restart_backoff_s)
        )
        self.clock = clock
        self.procs: Processes = processes or OsProcesses()
        self.workers: dict[str, Managed] = {
            s.id: Managed(spec=s, runtime=runtimes(s.runtime), life=Life(wanted=s.autostart))
            for s in config.workers
        }
        self._runtimes = runtimes
        self._tasks: set[asyncio.Task[None]] = set()
        self.notes: list[str] = []

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` on the loop without waiting, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the background work started so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---- lookup -------------------------------------------------------------------------

    def get(self, worker_id: str) -> Managed:
        """The worker `worker_id`, or NotFound naming the known ones."""
        w = self.workers.get(worker_id)
        if w is None:
            known = ", ".join(sorted(self.workers)) or "none"
            raise NotFound(f"no worker {worker_id!r} (workers: {known})")
        return w

    def log_path(self, worker_id: str) -> Path:
        return self.store.logs / f"{worker_id}.log"

    def log_tail(self, worker_id: str, lines: int) -> list[str]:
        """The last `lines` lines of a worker's log."""
        self.get(worker_id)
        return self.procs.tail(self.log_path(worker_id), lines)

    def alive(self, w: Managed) -> bool:
        return w.handle is not None and self.procs.is_alive(w.handle)

    # ---- state file and adoption ----------------------------------------------------------

    def save(self) -> None:
        """Record every worker that has a live process."""
        records = {
            w.spec.id: WorkerRecord(
                id=w.spec.id,
                pid=w.handle.pid,
                create_time=w.handle.create_time,
                port=w.spec.port,
                gpu_uuid=w.spec.gpu,
                runtime=w.spec.runtime,
                log_path=str(self.log_path(w.spec.id)),
                started_at=w.started_at or self.clock(),
                restarts=w.restarts,
                spec=_record_spec(w.spec),
            )
            for w in self.workers.values()
            if w.handle is not None
        }
        self.store.save(records)

    def adopt(self) -> list[str]:
        """Adopt the live workers recorded by a previous control plane. Returns their ids."""
        records, problem = self.store.load()
        if problem:
            self.notes.append(problem)
            log.warning(problem)
        adopted = []
        for rec in records.values():
            handle = ProcessHandle(rec.pid, rec.create_time)
            if not self.procs.is_alive(handle):
                continue
            if not self.procs.listens(rec.pid, rec.port):
                note = f"worker {rec.id}: recorded pid {rec.pid} is alive but no longer listens on {rec.port}; not adopted"
                self.notes.append(note)
                log.warning(note)
                continue
            w = self.workers.get(rec.id)
            if w is None:  # launched under an older config: keep it visible and stoppable
                spec = _spec_from_record(rec.spec)
                w = self.workers[rec.id] = Managed(spec=spec, runtime=self._runtimes(spec.runtime))
                w.note = "not in the current configuration; stop it or add it back"
            elif (w.spec.port, w.spec.gpu) != (rec.port, rec.gpu_uuid):
                w.note = (
                    f"running as launched before (GPU {rec.gpu_uuid}, port {rec.port}); "
                    "restart it to apply the current configuration"
                )
                w.spec = _spec_from_record(rec.spec)
            w.handle, w.adopted = handle, True
            w.life = lifecycle.ready(Life(wanted=True))
            w.started_at, w.restarts = rec.started_at, rec.restarts
            adopted.append(rec.id)
        self.save()
        return adopted

    # ---- operations -------------------------------------------------------------------------

    async def start(self, worker_id: str) -> Managed:
        """Start a worker and wait until it is ready; a no-op if it already runs.

        Conflict if its port is taken (it is then `blocked` and retried by itself),
        WorkerFailed / WorkerTimeout if it exits or is not ready in time."""
        w = self.get(worker_id)
        w.life = lifecycle.want(w.life, True)
        async with w.lock:
            if not self.alive(w):
                await self._launch(w)
        return w

    async def stop(self, worker_id: str) -> str:
        """Stop a worker's process group (SIGTERM, SIGKILL after the grace period)."""
        w = self.get(worker_id)
        w.life = lifecycle.want(w.life, False)
        async with w.lock:
            return await self._terminate(w)

    async def restart(self, worker_id: str) -> Managed:
        """Stop and start again: same GPU, same port."""
        w = self.get(worker_id)
        w.life = lifecycle.want(w.life, True)
        async with w.lock:
            await self._terminate(w)
            w.restarts += 1
            await self._launch(w)
        return w

    async def ensure(self) -> list[str]:
        """Start every autostart worker that is not running (idempotent). Returns the ids it
        started; WorkerFailed naming each failure if any did not start."""
        todo = [w.spec.id for w in self.workers.values() if w.spec.autostart and not self.alive(w)]
        results = await asyncio.gather(*(self.start(i) for i in todo), return_exceptions=True)
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        if errors:
            raise WorkerFailed("; ".join(errors))
        return todo

    async def stop_pid(
        self, pid: int, force: bool = False, gpu_pids: set[int] | None = None
    ) -> str:
        """Stop by PID: a managed worker's tree stops that worker; other processes only with `force`."""
        if pid in (os.getpid(), 1) or pid <= 0:
            what = "this control plane" if pid == os.getpid() else "not a worker"
            raise Conflict(f"refusing to stop pid {pid}: it is {what}")
        for w in self.workers.values():
            if w.handle is not None and pid in self.procs.tree(w.handle.pid):
                root = w.handle.pid
                await self.stop(w.spec.id)
                return f"stopped worker {w.spec.id} (pid {root})"
        handle, name = self.procs.describe(pid)
        on_gpu = gpu_pids is not None and pid in gpu_pids
        if not force:
            what = "a GPU process that no gpupanel worker owns" if on_gpu else "not a GPU worker"
            raise Conflict(f"pid {pid} ({name}) is {what}; pass force=true to stop it anyway")
        result = await self.procs.stop(handle, self.config.panel.stop_grace_s)
        log.warning("stopped pid %d (%s) by request with force: %s", pid, name, result)
        return f"pid {pid} ({name}) {result}"

    # ---- the tick -------------------------------------------------------------------------

    async def tick(self) -> None:
        """Observe every worker and carry out what the reconcile function decides; probe
        health, rotate logs. Never blocks on a worker: actions run in the background."""
        self.procs.reap()
        now = self.clock()
        for w in self.workers.values():
            if w.lock.locked():
                continue
            alive = self.alive(w)
            if w.handle is not None and not alive:
                self._exited(w, now)
            was = w.life.lifecycle
            step = lifecycle.reconcile(w.life, alive, now, self.policy)
            w.life = step.life
            if step.action == "launch":
                self.background(self._auto_launch(w, restart=was == "backoff"))
            elif step.action == "terminate":
                self.background(self._auto_terminate(w))
            if w.handle is not None and not w.probing:
                w.probing = True
                self.background(self._probe(w))
            self.procs.rotate(self.log_path(w.spec.id))

    def _exited(self, w: Managed, now: float) -> None:
        """The worker's process is gone without being asked to go."""
        tail = self.procs.tail(self.log_path(w.spec.id), 5)
        reason = "process exited unexpectedly" + (f"; log: {' | '.join(tail)}" if tail else "")
        w.handle, w.health, w.models = None, Health(ok=False, error=reason), Models()
        w.life = lifecycle.crashed(w.life, reason, now, self.policy)
        log.warning("worker %s crashed: %s", w.spec.id, reason)
        self.save()

    async def _auto_launch(self, w: Managed, restart: bool) -> None:
        async with w.lock:
            if not w.life.wanted or self.alive(w):
                return
            if restart:
                w.restarts += 1
            try:
                await self._launch(w)
            except GpuPanelError as exc:  # recorded in the lifecycle; the next tick goes on
                log.info("worker %s: %s", w.spec.id, exc)

    async def _auto_terminate(self, w: Managed) -> None:
        async with w.lock:
            if not w.life.wanted:
                await self._terminate(w)

    async def _probe(self, w: Managed) -> None:
        try:
            probe = await asyncio.wait_for(w.runtime.probe(self.client, w.spec), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            probe = Probe(ok=False, error=f"no answer within {PROBE_TIMEOUT_S:g} s")
        try:
            models = (
                await asyncio.wait_for(w.runtime.models(self.client, w.spec), PROBE_TIMEOUT_S)
                if probe.ok
                else w.models
            )
        except (asyncio.TimeoutError, GpuPanelError):
            models = w.models
        finally:
            w.probing = False
        if w.lock.locked() or w.handle is None:
            return
        if probe.ok and probe.latency_ms is not None:
            w.latencies.append(probe.latency_ms)
        window = list(w.latencies)
        w.health = Health(
            ok=probe.ok,
            latency_ms=probe.latency_ms,
            error=probe.error,
            latency_p50_ms=percentile(window, 50),
            latency_p95_ms=percentile(window, 95),
        )
        w.models = models
        w.failed_probes = 0 if probe.ok else w.failed_probes + 1

    async def refresh_models(self, worker_id: str) -> None:
        """Read the worker's models now (after a load, unload or pull), not at the next probe."""
        w = self.get(worker_id)
        if w.handle is None:
            return
        try:
            w.models = await asyncio.wait_for(
                w.runtime.models(self.client, w.spec), PROBE_TIMEOUT_S
            )
        except (asyncio.TimeoutError, GpuPanelError) as exc:
            log.warning("worker %s: could not read its models: %s", w.spec.id, exc)

    # ---- process control ------------------------------------------------------------------

    async def _launch(self, w: Managed) -> None:
        """Spawn the worker and wait until it is ready (the caller holds its lock)."""
        # A fresh launch applies the current configuration (an adopted worker may carry
        # the spec it was launched with under an older one); unconfigured ones keep theirs.
        spec = w.spec = self.config.worker(w.spec.id) or w.spec
        holder = self.procs.port_holder(spec.port)
        if holder is not None:
            w.life = lifecycle.blocked(w.life, holder, spec.port, self.clock(), self.policy)
            log.warning("worker %s: %s", spec.id, w.life.reason)
            raise Conflict(f"worker {spec.id}: {w.life.reason}")
        launch = w.runtime.launch(spec)
        try:
            w.handle = self.procs.spawn(launch.argv, launch.env, self.log_path(spec.id))
        except LaunchError as exc:
            self._failed(w, str(exc))
            raise WorkerFailed(f"worker {spec.id}: {exc}") from None
        w.life = lifecycle.starting(w.life)
        w.adopted, w.started_at, w.note = False, self.clock(), None
        w.health, w.failed_probes, w.models = Health(), 0, Models()
        self.save()
        log.info(
            "worker %s: started pid %d on %s port %d", spec.id, w.handle.pid, spec.gpu, spec.port
        )
        await self._wait_ready(w)

    def _failed(self, w: Managed, reason: str) -> None:
        """A launch failed: count it as a crash (backoff, or a crash loop)."""
        w.handle, w.health = None, Health(ok=False, error=reason)
        w.life = lifecycle.crashed(w.life, reason, self.clock(), self.policy)
        log.warning("worker %s: %s", w.spec.id, w.life.reason)
        self.save()

    async def _wait_ready(self, w: Managed) -> None:
        assert w.handle is not None
        loop = asyncio.get_running_loop()
        timeout = self.config.panel.ready_timeout_s
        deadline = loop.time() + timeout
        probe = Probe(ok=False, error="not probed")
        while loop.time() < deadline:
            if not self.procs.is_alive(w.handle):
                self.procs.reap()
                tail = " | ".join(self.procs.tail(self.log_path(w.spec.id), 10))
                message = f"worker {w.spec.id} exited while starting. Last log lines: {tail}"
                self._failed(w, message)
                raise WorkerFailed(message)
            probe = await w.runtime.probe(self.client, w.spec)
            if probe.ok:
                w.life = lifecycle.ready(w.life)
                w.health = Health(ok=True, latency_ms=probe.latency_ms)
                return
            await asyncio.sleep(0.1)
        await self.procs.stop(w.handle, self.config.panel.stop_grace_s)
        tail = " | ".join(self.procs.tail(self.log_path(w.spec.id), 10))
        message = (
            f"worker {w.spec.id}: not ready within {timeout:g} s ({probe.error}); "
            f"stopped it. Last log lines: {tail}"
        )
        self._failed(w, message)
        raise WorkerTimeout(message)

    async def _terminate(self, w: Managed) -> str:
        if w.handle is None:
            w.life = lifecycle.stopped(w.life)
            return "gone"
        result = await self.procs.stop(w.handle, self.config.panel.stop_grace_s)
        log.info("worker %s: pid %d %s", w.spec.id, w.handle.pid, result)
        w.handle, w.health, w.models = None, Health(), Models()
        w.life = lifecycle.stopped(w.life)
        self.save()
        return result
