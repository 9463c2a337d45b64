"""The supervisor: the workers that should run, against the processes that do.

It starts workers pinned to their GPU, waits until they are ready, restarts crashed ones
with backoff (and gives up on a crash loop), stops them as a process group, and on start
adopts the live workers a previous control plane recorded (pid + start time + port all
match), so a restart of the control plane restarts no worker and starts no duplicate.

All methods run on the runtime loop; per-worker locks keep a start, a stop and the tick's
automatic restart from interleaving on one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from gpupanel.adapters import process
from gpupanel.adapters.host import listening_ports, process_tree
from gpupanel.adapters.process import LaunchError, ProcessHandle
from gpupanel.adapters.runtimes.base import Models, Probe, Runtime
from gpupanel.adapters.runtimes.registry import runtime_for
from gpupanel.adapters.state import StateStore, WorkerRecord
from gpupanel.core.config import Config, WorkerSpec
from gpupanel.core.restart import RestartPolicy
from gpupanel.core.worker import Health, Status, percentile
from gpupanel.errors import GpuPanelError

log = logging.getLogger("gpupanel.supervisor")

UNHEALTHY_AFTER = 2  # consecutive failed probes
LATENCY_WINDOW = 60  # probes kept for the latency percentiles
PROBE_TIMEOUT_S = 2.0


class WorkerError(GpuPanelError):
    """An operation on a worker failed; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 409, crashed: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.crashed = crashed  # the worker's process failed (counts toward a crash loop)


@dataclass
class Managed:
    """The supervisor's mutable record of one worker (owned by the runtime loop)."""

    spec: WorkerSpec
    runtime: Runtime
    handle: ProcessHandle | None = None
    status: Status = "stopped"
    desired: bool = False
    adopted: bool = False
    restarts: int = 0
    crash_times: list[float] = field(default_factory=list)
    restart_at: float | None = None
    crash_loop: bool = False
    started_at: float | None = None
    last_error: str | None = None
    health: Health = Health()
    failed_probes: int = 0
    models: Models = Models()
    probing: bool = False
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _record_spec(spec: WorkerSpec) -> dict[str, object]:
    data = dataclasses.asdict(spec)
    data["env"] = dict(spec.env)
    return data


def _spec_from_record(data: dict[str, object]) -> WorkerSpec:
    fields = {f.name for f in dataclasses.fields(WorkerSpec)}
    kwargs = {k: v for k, v in data.items() if k in fields}
    for name in ("models", "command", "args"):
        kwargs[name] = tuple(kwargs.get(name) or ())  # type: ignore[arg-type]
    return WorkerSpec(**kwargs)  # type: ignore[arg-type]


def port_holder(port: int) -> psutil.Process | None:
    """The process listening on TCP `port` on this host, if any (a system-wide lookup)."""
    with contextlib.suppress(psutil.AccessDenied):
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN:
                if c.pid is None:
                    return None
                with contextlib.suppress(psutil.Error):
                    return psutil.Process(c.pid)
    return None


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
    ) -> None:
        self.config = config
        self.store = store
        self.client = client
        self.policy = policy or RestartPolicy(
            base_s=config.panel.restart_backoff_s, max_s=max(30.0, config.panel.restart_backoff_s)
        )
        self.clock = clock
        self.workers: dict[str, Managed] = {
            s.id: Managed(spec=s, runtime=runtimes(s.runtime), desired=s.autostart)
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

    # ---- lookup -------------------------------------------------------------------------

    def get(self, worker_id: str) -> Managed:
        """The worker `worker_id`, or a 404 WorkerError naming the known ones."""
        w = self.workers.get(worker_id)
        if w is None:
            known = ", ".join(sorted(self.workers)) or "none"
            raise WorkerError(f"no worker {worker_id!r} (workers: {known})", status=404)
        return w

    def log_path(self, worker_id: str) -> Path:
        return self.store.logs / f"{worker_id}.log"

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
            if not process.is_alive(handle):
                continue
            if rec.port not in listening_ports(process_tree(rec.pid)):
                note = f"worker {rec.id}: recorded pid {rec.pid} is alive but no longer listens on {rec.port}; not adopted"
                self.notes.append(note)
                log.warning(note)
                continue
            w = self.workers.get(rec.id)
            if w is None:  # launched under an older config: keep it visible and stoppable
                spec = _spec_from_record(rec.spec)
                w = self.workers[rec.id] = Managed(spec=spec, runtime=self._runtimes(spec.runtime))
                w.last_error = "not in the current configuration; stop it or add it back"
            elif (w.spec.port, w.spec.gpu) != (rec.port, rec.gpu_uuid):
                w.last_error = (
                    f"running as launched before (GPU {rec.gpu_uuid}, port {rec.port}); "
                    "restart it to apply the current configuration"
                )
                w.spec = _spec_from_record(rec.spec)
            w.handle, w.adopted, w.desired = handle, True, True
            w.status, w.started_at, w.restarts = "running", rec.started_at, rec.restarts
            adopted.append(rec.id)
        self.save()
        return adopted

    # ---- operations -------------------------------------------------------------------------

    async def start(self, worker_id: str) -> Managed:
        """Start a worker and wait until it is ready; a no-op if it already runs."""
        w = self.get(worker_id)
        async with w.lock:
            w.desired, w.crash_loop, w.restart_at = True, False, None
            w.crash_times.clear()
            if w.handle is not None and process.is_alive(w.handle):
                return w
            await self._launch_or_crash(w)
        return w

    async def stop(self, worker_id: str) -> str:
        """Stop a worker's process group (SIGTERM, SIGKILL after the grace period)."""
        w = self.get(worker_id)
        async with w.lock:
            w.desired, w.restart_at = False, None
            return await self._terminate(w)

    async def restart(self, worker_id: str) -> Managed:
        """Stop and start again: same GPU, same port."""
        w = self.get(worker_id)
        async with w.lock:
            w.desired, w.crash_loop, w.restart_at = True, False, None
            w.crash_times.clear()
            await self._terminate(w)
            w.restarts += 1
            await self._launch_or_crash(w)
        return w

    async def ensure(self) -> list[str]:
        """Start every autostart worker that is not running (idempotent). Returns the started ids."""
        todo = [
            w.spec.id
            for w in self.workers.values()
            if w.spec.autostart and (w.handle is None or not process.is_alive(w.handle))
        ]
        results = await asyncio.gather(*(self.start(i) for i in todo), return_exceptions=True)
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        if errors:
            raise WorkerError("; ".join(errors), status=502)
        return todo

    async def stop_pid(
        self, pid: int, force: bool = False, gpu_pids: set[int] | None = None
    ) -> str:
        """Stop by PID: a managed worker's tree stops that worker; other processes only with `force`."""
        if pid in (os.getpid(), 1) or pid <= 0:
            raise WorkerError(
                f"refusing to stop pid {pid}: it is {'this control plane' if pid == os.getpid() else 'not a worker'}"
            )
        for w in self.workers.values():
            if w.handle is not None and pid in process_tree(w.handle.pid):
                await self.stop(w.spec.id)
                return f"stopped worker {w.spec.id} (pid {w.handle.pid if w.handle else pid})"
        try:
            proc = psutil.Process(pid)
            name = proc.name()
        except psutil.NoSuchProcess:
            raise WorkerError(f"no process {pid}", status=404) from None
        except psutil.AccessDenied:
            raise WorkerError(
                f"pid {pid} belongs to another user; gpupanel cannot stop it", status=403
            ) from None
        on_gpu = gpu_pids is not None and pid in gpu_pids
        if not force:
            what = "a GPU process that no gpupanel worker owns" if on_gpu else "not a GPU worker"
            raise WorkerError(f"pid {pid} ({name}) is {what}; pass force=true to stop it anyway")
        result = await process.stop(
            ProcessHandle(pid, proc.create_time()), self.config.panel.stop_grace_s
        )
        log.warning("stopped pid %d (%s) by request with force: %s", pid, name, result)
        return f"pid {pid} ({name}) {result}"

    # ---- the tick -------------------------------------------------------------------------

    async def tick(self) -> None:
        """Notice crashes, restart with backoff, probe health, rotate logs. Never blocks on a worker."""
        process.reap()
        now = self.clock()
        for w in self.workers.values():
            if w.lock.locked():
                continue
            if w.handle is not None and not process.is_alive(w.handle):
                self._exited(w, now)
            if w.restart_at is not None and now >= w.restart_at and w.desired:
                w.restart_at = None
                self.background(self._auto_restart(w))
            if w.handle is not None and not w.probing:
                w.probing = True
                self.background(self._probe(w))
            process.rotate(self.log_path(w.spec.id))

    def _crashed(self, w: Managed, now: float, reason: str) -> None:
        """Count a crash; schedule a restart with backoff, or stop trying on a crash loop."""
        w.handle, w.status, w.health = None, "crashed", Health(ok=False, error=reason)
        w.crash_times = [t for t in w.crash_times if now - t <= self.policy.window_s] + [now]
        w.last_error = reason
        log.warning("worker %s crashed: %s", w.spec.id, reason)
        delay = self.policy.delay(w.crash_times, now)
        if delay is None:
            w.crash_loop, w.restart_at = True, None
            w.last_error = (
                f"crash loop: {len(w.crash_times)} crashes in {self.policy.window_s:.0f} s; "
                f"not restarting until asked to. Last: {reason}"
            )
        elif w.desired:
            w.restart_at = now + delay
        self.save()

    def _exited(self, w: Managed, now: float) -> None:
        tail = process.tail(self.log_path(w.spec.id), 5)
        self._crashed(
            w, now, "process exited unexpectedly" + (f"; log: {' | '.join(tail)}" if tail else "")
        )

    async def _launch_or_crash(self, w: Managed) -> None:
        try:
            await self._launch(w)
        except WorkerError as exc:
            if exc.crashed:
                self._crashed(w, self.clock(), str(exc))
            raise

    async def _auto_restart(self, w: Managed) -> None:
        async with w.lock:
            if not w.desired or (w.handle is not None and process.is_alive(w.handle)):
                return
            w.restarts += 1
            with contextlib.suppress(WorkerError):
                await self._launch_or_crash(w)

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
        if probe.ok:
            w.status = "running"
        elif w.failed_probes >= UNHEALTHY_AFTER:
            w.status = "unhealthy"

    async def refresh_models(self, w: Managed) -> None:
        """Read the worker's models now (after a load, unload or pull), not at the next probe."""
        try:
            w.models = await asyncio.wait_for(
                w.runtime.models(self.client, w.spec), PROBE_TIMEOUT_S
            )
        except (asyncio.TimeoutError, GpuPanelError) as exc:
            log.warning("worker %s: could not read its models: %s", w.spec.id, exc)

    # ---- process control ------------------------------------------------------------------

    async def _launch(self, w: Managed) -> None:
        spec = w.spec
        holder = port_holder(spec.port)
        if holder is not None:
            w.status = "stopped"
            w.last_error = (
                f"port {spec.port} is taken by pid {holder.pid} ({holder.name()}); not starting"
            )
            raise WorkerError(f"worker {spec.id}: {w.last_error}")
        launch = w.runtime.launch(spec)
        log_path = self.log_path(spec.id)
        try:
            w.handle = process.spawn(launch.argv, launch.env, log_path)
        except LaunchError as exc:
            raise WorkerError(f"worker {spec.id}: {exc}", status=502, crashed=True) from None
        w.status, w.adopted, w.started_at, w.last_error = "starting", False, self.clock(), None
        w.health, w.failed_probes, w.models = Health(), 0, Models()
        self.save()
        log.info(
            "worker %s: started pid %d on %s port %d", spec.id, w.handle.pid, spec.gpu, spec.port
        )
        await self._wait_ready(w)

    async def _wait_ready(self, w: Managed) -> None:
        assert w.handle is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.panel.ready_timeout_s
        probe = Probe(ok=False, error="not probed")
        while loop.time() < deadline:
            if not process.is_alive(w.handle):
                process.reap()
                tail = " | ".join(process.tail(self.log_path(w.spec.id), 10))
                raise WorkerError(
                    f"worker {w.spec.id} exited while starting. Last log lines: {tail}",
                    status=502,
                    crashed=True,
                )
            probe = await w.runtime.probe(self.client, w.spec)
            if probe.ok:
                w.status, w.health = "running", Health(ok=True, latency_ms=probe.latency_ms)
                return
            await asyncio.sleep(0.1)
        await self._terminate(w)
        tail = " | ".join(process.tail(self.log_path(w.spec.id), 10))
        raise WorkerError(
            f"worker {w.spec.id}: not ready within {self.config.panel.ready_timeout_s:g} s "
            f"({probe.error}); stopped it. Last log lines: {tail}",
            status=504,
            crashed=True,
        )

    async def _terminate(self, w: Managed) -> str:
        if w.handle is None:
            w.status = "stopped"
            return "gone"
        result = await process.stop(w.handle, self.config.panel.stop_grace_s)
        log.info("worker %s: pid %d %s", w.spec.id, w.handle.pid, result)
        w.handle, w.status, w.health, w.models = None, "stopped", Health(), Models()
        self.save()
        return result
