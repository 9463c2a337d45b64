"""The supervisor: the workers that should run, against the processes that do.

It observes (is each worker's process alive, who holds a port) and executes (launch,
terminate); every lifecycle decision is `gpupanel.core.lifecycle`'s. It starts workers
pinned to their GPU and waits until they are ready, restarts crashed ones with backoff
(and gives up on a crash loop), waits out a port held by another process (`blocked`),
stops workers as a process group, and on start adopts the live workers a previous control
plane recorded (pid + start time + port all match), so a restart of the control plane
restarts no worker and starts no duplicate. A worker whose record was lost is still
recognised by gpupanel's marker in the environment of the process on its port. The state
file can never take the control plane down: bad records are set aside, and while the file
cannot be written supervision goes on in memory (a `state_unwritable` warning). See
docs/architecture.md, "The supervisor".

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx

from gpupanel.adapters.process import (
    WORKER_STATE_ENV,
    LaunchError,
    Marked,
    OsProcesses,
    ProcessHandle,
    marker_env,
)
from gpupanel.adapters.runtimes.base import Models, Probe, Runtime
from gpupanel.adapters.runtimes.registry import runtime_for
from gpupanel.adapters.state import Rejected, StateStore, WorkerRecord
from gpupanel.core import lifecycle
from gpupanel.core.config import Config, WorkerSpec
from gpupanel.core.lifecycle import Life, PortHolder, Status
from gpupanel.core.restart import RestartPolicy
from gpupanel.core.warning import Warning
from gpupanel.core.warnings import state_rejected, state_unwritable
from gpupanel.core.worker import Health, percentile
from gpupanel.errors import (
    Conflict,
    GpuPanelError,
    NotFound,
    StateError,
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

    def marked(self, pid: int) -> Marked | None: ...

    async def stop_tree(self, handle: ProcessHandle, grace_s: float) -> list[tuple[int, str]]: ...


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


@dataclass(frozen=True, slots=True)
class Condition:
    """A condition of the supervisor's own machinery, shown as a warning while it lasts:
    what is wrong (`message`), since when, and the file it is about."""

    path: Path
    message: str
    since: float


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
        self.marker_dir = marker_env("", store.directory)[WORKER_STATE_ENV]
        """The state directory as this control plane's marker names it."""
        self.unwritable: Condition | None = None
        """Set while the state file cannot be written (supervision goes on in memory)."""
        self.set_aside: Condition | None = None
        """The side file holding what the last load could not trust, once written."""
        self._rejected: list[Rejected] = []  # to be set aside before the file is rewritten
        self._loading = False  # no save while the state file is being loaded

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` on the loop without waiting, keeping a reference until it ends; an
        exception it lets through is logged, never left unretrieved."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s failed", task.get_coro(), exc_info=exc)

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

    def save(self) -> bool:
        """Record every worker that has a live process. Never raises: when the state file
        cannot be written, `unwritable` says why (a `state_unwritable` warning), supervision
        goes on in memory and each tick tries again. Records rejected by the last load are
        set aside first, so the file is never rewritten before they are kept."""
        if self._loading:
            return False
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
        try:
            if self._rejected:
                self._set_aside()
            self.store.save(records)
        except StateError as exc:
            if self.unwritable is None:
                log.warning("%s; supervising the workers in memory until it can be written", exc)
                self.unwritable = Condition(self.store.path, str(exc), self.clock())
            else:
                self.unwritable = replace(self.unwritable, message=str(exc))
            return False
        if self.unwritable is not None:
            log.info("state file %s written again", self.store.path)
            self.unwritable = None
        return True

    def _set_aside(self) -> None:
        aside = self.store.set_aside(self._rejected)
        reasons = "; ".join(r.reason for r in self._rejected)
        problem = (
            f"{len(self._rejected)} record(s) of {self.store.path} could not be trusted and "
            f"were set aside in {aside} (the valid ones were adopted): {reasons}"
        )
        log.warning("%s", problem)
        self.notes.append(problem)
        self.set_aside = Condition(aside, problem, self.clock())
        self._rejected = []

    def warnings(self) -> tuple[Warning, ...]:
        """The supervisor's own conditions, as warnings for the snapshot."""
        out = []
        if self.unwritable is not None:
            u = self.unwritable
            out.append(state_unwritable(str(u.path), u.message, u.since))
        if self.set_aside is not None and self.set_aside.path.exists():
            a = self.set_aside
            out.append(state_rejected(str(a.path), a.message, a.since))
        return tuple(out)

    def adopt(self) -> list[str]:
        """Adopt the live workers recorded by a previous control plane, and configured ones
        whose record was lost but whose port is held by a process carrying this control
        plane's marker for them. Returns their ids.

        StateError (one clear line) if the state directory cannot be written now. Each
        record is checked on its own; the ones that cannot be trusted (bad fields, a pid
        already adopted, a process launched as another worker or by another gpupanel) are
        set aside with their reasons before the file is rewritten."""
        self._loading = True  # if this fails half-way, nothing rewrites the file
        self.store.check()
        loaded = self.store.load()
        if loaded.problem and loaded.aside:
            self.notes.append(loaded.problem)
            log.warning("%s", loaded.problem)
            self.set_aside = Condition(loaded.aside, loaded.problem, self.clock())
        rejected = list(loaded.rejected)
        owners: dict[int, str] = {}
        adopted = []
        for rec in loaded.records.values():
            handle = ProcessHandle(rec.pid, rec.create_time)
            if not self.procs.is_alive(handle):
                continue
            if not self.procs.listens(rec.pid, rec.port):
                note = f"worker {rec.id}: recorded pid {rec.pid} is alive but no longer listens on {rec.port}; not adopted"
                self.notes.append(note)
                log.warning(note)
                continue
            why = self._not_its_process(rec, owners)
            if why is not None:
                rejected.append(Rejected(asdict(rec), f"worker {rec.id!r}: {why}"))
                continue
            owners[rec.pid] = rec.id
            w = self.workers.get(rec.id)
            if w is None:  # launched under an older config: keep it visible and stoppable
                spec = rec.worker_spec()
                w = self.workers[rec.id] = Managed(spec=spec, runtime=self._runtimes(spec.runtime))
                w.note = "not in the current configuration; stop it or add it back"
            elif (w.spec.port, w.spec.gpu) != (rec.port, rec.gpu_uuid):
                w.note = (
                    f"running as launched before (GPU {rec.gpu_uuid}, port {rec.port}); "
                    "restart it to apply the current configuration"
                )
                w.spec = rec.worker_spec()
            w.handle, w.adopted = handle, True
            w.life = lifecycle.adopted(w.life)
            w.started_at, w.restarts = rec.started_at, rec.restarts
            adopted.append(rec.id)
        # Configured workers with no record: is their port held by one of ours?
        for w in self.workers.values():
            if w.handle is None and self._recognise(w):
                adopted.append(w.spec.id)
        self._rejected = rejected
        self._loading = False
        self.save()
        return adopted

    def _not_its_process(self, rec: WorkerRecord, owners: Mapping[int, str]) -> str | None:
        """Why the live process `rec` names is not that worker, if it is not."""
        m = self.procs.marked(rec.pid)
        if m is not None and m.state_dir != self.marker_dir:
            return f"pid {rec.pid} is a worker of another gpupanel (state directory {m.state_dir})"
        if m is not None and m.worker != rec.id:
            return f"pid {rec.pid} was launched as worker {m.worker!r}"
        if rec.pid in owners:
            return (
                f"pid {rec.pid} is already adopted as worker {owners[rec.pid]!r} "
                "(one process is never two workers)"
            )
        return None

    def _recognise(self, w: Managed, holder: PortHolder | None = None) -> bool:
        """Adopt the process holding `w`'s port (looked up unless given) if it carries this
        control plane's marker for `w`: its record was lost, it is still ours. A process
        pinned to another GPU than configured runs "as launched before", like an adopted
        record. Never a process that another worker already has."""
        holder = holder or self.procs.port_holder(w.spec.port)
        if holder is None or holder.pid is None:
            return False
        m = self.procs.marked(holder.pid)
        if m is None or (m.worker, m.state_dir) != (w.spec.id, self.marker_dir) or not m.gpu:
            return False
        if any(
            o.handle is not None and o.handle.pid == m.handle.pid for o in self.workers.values()
        ):
            return False
        spec = w.spec
        w.handle, w.adopted, w.note = m.handle, True, None
        w.life = lifecycle.adopted(w.life)
        w.started_at = m.handle.create_time
        w.health, w.failed_probes, w.models = Health(), 0, Models()
        if m.gpu != spec.gpu:
            w.spec = replace(spec, gpu=m.gpu)
            w.note = (
                f"running as launched before (GPU {m.gpu}, port {spec.port}); "
                "restart it to apply the current configuration"
            )
        log.warning(
            "worker %s: pid %d on port %d carries this control plane's marker for it: "
            "adopted (its record was lost)",
            spec.id,
            m.handle.pid,
            spec.port,
        )
        self.save()
        return True

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
        tree = set(self.procs.tree(pid))
        if os.getpid() in tree:
            raise Conflict(f"refusing to stop pid {pid} ({name}): this control plane runs under it")
        for w in self.workers.values():
            if w.handle is not None and w.handle.pid in tree:
                raise Conflict(
                    f"refusing to stop pid {pid} ({name}): worker {w.spec.id} runs under it; "
                    f"stop the worker (POST /panel/workers/{w.spec.id}/stop) first"
                )
        # The process and its descendants (a runtime's server and the runners holding its
        # GPU memory), never the rest of its process group; the reply names every pid.
        ended = await self.procs.stop_tree(handle, self.config.panel.stop_grace_s)
        (_, result), children = ended[0], ended[1:]
        reply = f"pid {pid} ({name}) {result}"
        if children:
            reply += "; with it its child processes " + ", ".join(
                f"{child} ({how})" for child, how in children
            )
        log.warning("stopped by request with force: %s", reply)
        return reply

    # ---- the tick -------------------------------------------------------------------------

    async def tick(self) -> None:
        """Observe every worker and carry out what the reconcile function decides; probe
        health, rotate logs. Never blocks on a worker: actions run in the background."""
        self.procs.reap()
        now = self.clock()
        if self.unwritable is not None:  # try again: the directory may be writable again
            self.save()
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
            except Exception as exc:  # a bug or an OS surprise: a failed launch, retried
                log.exception("worker %s: the launch failed", w.spec.id)
                if w.handle is not None and self.procs.is_alive(w.handle):
                    await self.procs.stop(w.handle, self.config.panel.stop_grace_s)
                self._failed(w, f"the launch failed: {exc!r}")

    async def _auto_terminate(self, w: Managed) -> None:
        async with w.lock:
            if not w.life.wanted:
                try:
                    await self._terminate(w)
                except Exception as exc:  # the next tick tries again
                    log.exception("worker %s: the stop failed", w.spec.id)
                    w.note = f"could not stop it: {exc!r}"

    async def _probe(self, w: Managed) -> None:
        try:
            probe = await asyncio.wait_for(w.runtime.probe(self.client, w.spec), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            probe = Probe(ok=False, error=f"no answer within {PROBE_TIMEOUT_S:g} s")
        except Exception as exc:  # a runtime should answer Probe(ok=False); count it as one
            log.exception("worker %s: the probe failed", w.spec.id)
            probe = Probe(ok=False, error=f"the probe failed: {exc!r}")
        try:
            models = (
                await asyncio.wait_for(w.runtime.models(self.client, w.spec), PROBE_TIMEOUT_S)
                if probe.ok
                else w.models
            )
        except (asyncio.TimeoutError, GpuPanelError):
            models = w.models
        except Exception:
            log.exception("worker %s: reading its models failed", w.spec.id)
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
            if self._recognise(w, holder):  # our own worker, whose record was lost
                return
            w.life = lifecycle.blocked(w.life, holder, spec.port, self.clock(), self.policy)
            log.warning("worker %s: %s", spec.id, w.life.reason)
            raise Conflict(f"worker {spec.id}: {w.life.reason}")
        launch = w.runtime.launch(spec)
        env = {**launch.env, **marker_env(spec.id, self.store.directory)}
        try:
            w.handle = self.procs.spawn(launch.argv, env, self.log_path(spec.id))
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
