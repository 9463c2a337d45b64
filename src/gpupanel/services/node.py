"""A node: one host's GPUs and workers, behind the small protocol the plane uses.

The node owns what is bound to its host: the GPU backend and host probe (the sampler),
the supervisor and its state store, the HTTP client to its workers on loopback. It
produces the host's part of the snapshot (GPUs, host processes, worker states with their
pin verdicts) and executes worker actions. The plane (API, proxy, router, loader, warnings,
traffic) sees nodes only through `Node`; today there is one in-process `LocalNode`, and a
remote node on another host implements the same protocol (docs/architecture.md, "Node and
plane").
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, replace
from typing import Any, Protocol

import httpx

from gpupanel.adapters.gguf import read_shape
from gpupanel.adapters.runtimes.ollama import KeepAlive, OllamaRuntime
from gpupanel.adapters.state import StateStore
from gpupanel.core.config import Config, WorkerSpec
from gpupanel.core.estimate import ModelShape, ShapeError, shape_from_metadata
from gpupanel.core.gpu import GpuBackend
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.upstream import Upstream
from gpupanel.core.worker import WorkerState, attribute_processes, pin_verdict
from gpupanel.errors import GgufError, Invalid, NotFound, RuntimeRequestError, Unavailable
from gpupanel.services.sampler import Sampler
from gpupanel.services.supervisor import Managed, Supervisor


@dataclass(frozen=True, slots=True)
class ModelSize:
    """What the guard needs to know of a model: its shape and its weights in bytes."""

    shape: ModelShape
    size: int


class Node(Protocol):
    """One host as the plane sees it. Worker ids are unique across nodes."""

    name: str
    simulated: bool

    def worker_ids(self) -> Collection[str]: ...

    def spec(self, worker_id: str) -> WorkerSpec: ...

    async def sample(self) -> Snapshot:
        """The host's GPUs and its workers' states now; no traffic, and as warnings only the
        node's own conditions (e.g. `state_unwritable`), which the plane's rules keep."""
        ...

    async def start(self, worker_id: str) -> None: ...

    async def stop(self, worker_id: str) -> str: ...

    async def restart(self, worker_id: str) -> None: ...

    async def ensure(self) -> list[str]: ...

    async def stop_pid(self, pid: int, force: bool, gpu_pids: set[int]) -> str: ...

    async def model_size(self, worker_id: str, model: str | None) -> ModelSize: ...

    async def load(
        self, worker_id: str, model: str, keep_alive: KeepAlive | None, num_ctx: int | None
    ) -> dict[str, Any]: ...

    async def unload(self, worker_id: str, model: str) -> None: ...

    def pull(self, worker_id: str, model: str) -> AsyncIterator[dict[str, Any]]: ...

    async def refresh_models(self, worker_id: str) -> None: ...

    async def log(self, worker_id: str, lines: int) -> list[str]: ...

    def upstream(self, worker: WorkerState) -> Upstream:
        """Where the proxy sends `worker`'s requests: its port on loopback for this host,
        the node's agent for another (docs/architecture.md, "The path of a request")."""
        ...


def _not_found_or_failed(exc: RuntimeRequestError) -> Exception:
    """A worker's refusal that is the caller's problem (no such model, bad request) or the
    worker's (anything else)."""
    if exc.status == 404:
        return NotFound(str(exc))
    if exc.status == 400:
        return Invalid(str(exc))
    return exc


class LocalNode:
    """This host: sampler + supervisor, run on the control plane's loop. `host` (in a
    cluster: the node's name) is set on each GPU of its samples (docs/cluster.md)."""

    def __init__(
        self,
        config: Config,
        backend: GpuBackend,
        store: StateStore,
        name: str = "local",
        host: str | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.config = config
        self.backend = backend
        self.store = store
        self.sampler = Sampler(backend)
        self.simulated = backend.simulated
        self._supervisor: Supervisor | None = None
        self._client: httpx.AsyncClient | None = None
        self._upstreams: dict[int, Upstream] = {}  # by port: one per worker, made once

    # ---- life -------------------------------------------------------------------------------

    async def open(self) -> list[str]:
        """Start serving on the running loop: adopt recorded workers. Returns their ids.
        StateError (one line) if the state directory cannot be written."""
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False)
        self._supervisor = Supervisor(self.config, self.store, self._client)
        return self._supervisor.adopt()

    async def close(self) -> None:
        """Record the workers and release the backend (workers keep running)."""
        if self._supervisor is not None:
            self._supervisor.save()
        if self._client is not None:
            await self._client.aclose()
        self.sampler.close()

    def upstream(self, worker: WorkerState) -> Upstream:
        """A worker of this host: its port on loopback."""
        up = self._upstreams.get(worker.port)
        if up is None:
            up = self._upstreams[worker.port] = Upstream.loopback(worker.port)
        return up

    @property
    def supervisor(self) -> Supervisor:
        if self._supervisor is None:
            raise Unavailable("the control plane is not running")
        return self._supervisor

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise Unavailable("the control plane is not running")
        return self._client

    async def tick(self) -> None:
        await self.supervisor.tick()

    # ---- the protocol -------------------------------------------------------------------------

    def worker_ids(self) -> Collection[str]:
        return self.supervisor.workers.keys()

    def spec(self, worker_id: str) -> WorkerSpec:
        return self.supervisor.get(worker_id).spec

    async def sample(self) -> Snapshot:
        """The host's snapshot; its `warnings` are the node's own conditions (the state
        file's), to which the plane adds those its rules find."""
        managed = list(self.supervisor.workers.values())
        pids = [w.handle.pid for w in managed if w.handle]
        ports = [w.spec.port for w in managed]
        raw = await asyncio.to_thread(self.sampler.snapshot, pids, ports)
        trees: dict[str, tuple[int, ...]] = {}
        for w in managed:
            stats = raw.host.processes.get(w.handle.pid) if (raw.host and w.handle) else None
            trees[w.spec.id] = stats.tree_pids if stats else ()
        workers = tuple(self._state(w, trees[w.spec.id], raw) for w in managed)
        gpus = attribute_processes(raw.gpus, trees)
        if self.host is not None:
            gpus = tuple(replace(g, host=self.host) for g in gpus)
        return replace(
            raw,
            gpus=gpus,
            workers=workers,
            warnings=self.supervisor.warnings(),
        )

    def _state(self, w: Managed, tree: tuple[int, ...], raw: Snapshot) -> WorkerState:
        spec = w.spec
        pin, seen = pin_verdict(spec.gpu, set(tree), raw.gpus)
        gpu = raw.gpu(spec.gpu)
        return WorkerState(
            id=spec.id,
            runtime=spec.runtime,
            gpu_uuid=spec.gpu,
            gpu_index=gpu.index if gpu else None,
            port=spec.port,
            pid=w.handle.pid if w.handle else None,
            status=w.status,
            lifecycle=w.life.lifecycle,
            pin=pin if w.handle else "unverified",
            base_url="",
            health=w.health,
            models_available=w.models.available,
            models_loaded=w.models.loaded,
            models_expected=spec.models,
            restarts=w.restarts,
            crash_loop=w.life.lifecycle == "crash_loop",
            pin_gpus=seen,
            adopted=w.adopted,
            started_at=w.started_at if w.handle else None,
            last_error=w.last_error,
            log_path=str(self.supervisor.log_path(spec.id)),
            retry_at=w.life.retry_at,
            blocked_by=w.life.blocked_by,
            node=self.name,
        )

    async def start(self, worker_id: str) -> None:
        await self.supervisor.start(worker_id)

    async def stop(self, worker_id: str) -> str:
        return await self.supervisor.stop(worker_id)

    async def restart(self, worker_id: str) -> None:
        await self.supervisor.restart(worker_id)

    async def ensure(self) -> list[str]:
        return await self.supervisor.ensure()

    async def stop_pid(self, pid: int, force: bool, gpu_pids: set[int]) -> str:
        return await self.supervisor.stop_pid(pid, force=force, gpu_pids=gpu_pids)

    async def log(self, worker_id: str, lines: int) -> list[str]:
        return self.supervisor.log_tail(worker_id, lines)

    async def refresh_models(self, worker_id: str) -> None:
        await self.supervisor.refresh_models(worker_id)

    # ---- models -------------------------------------------------------------------------------

    def _ollama(self, worker_id: str) -> tuple[Managed, OllamaRuntime]:
        w = self.supervisor.get(worker_id)
        if not isinstance(w.runtime, OllamaRuntime):
            raise Invalid(
                f"worker {worker_id} runs {w.spec.runtime}, which loads its model at start "
                "(model_path in the config); loading on request needs an Ollama worker"
            )
        if w.handle is None or w.life.lifecycle != "running":
            raise Unavailable(f"worker {worker_id} is {w.status}: start it first")
        return w, w.runtime

    async def model_size(self, worker_id: str, model: str | None) -> ModelSize:
        """The shape and size of `model` on the worker; for a llama.cpp worker, of its
        configured GGUF file (read from its header on this host)."""
        spec = self.spec(worker_id)
        if spec.runtime == "llamacpp":
            path = spec.model_path or ""
            try:
                return ModelSize(read_shape(path), os.path.getsize(path))
            except (GgufError, OSError) as exc:
                raise Invalid(f"worker {worker_id}: cannot estimate: {exc}") from None
        if not model:
            raise Invalid("query parameter 'model' is required for an Ollama worker")
        w, runtime = self._ollama(worker_id)
        try:
            facts = await runtime.describe(self.client, w.spec, model)
        except RuntimeRequestError as exc:
            raise _not_found_or_failed(exc) from None
        try:
            return ModelSize(shape_from_metadata(facts.model_info), facts.size or 0)
        except ShapeError as exc:
            raise Invalid(f"worker {worker_id}: cannot estimate {model}: {exc}") from None

    async def load(
        self, worker_id: str, model: str, keep_alive: KeepAlive | None, num_ctx: int | None
    ) -> dict[str, Any]:
        w, runtime = self._ollama(worker_id)
        try:
            answer = await runtime.load(
                self.client, w.spec, model, keep_alive=keep_alive, num_ctx=num_ctx
            )
        except RuntimeRequestError as exc:
            raise _not_found_or_failed(exc) from None
        await self.refresh_models(worker_id)
        return answer

    async def unload(self, worker_id: str, model: str) -> None:
        w, runtime = self._ollama(worker_id)
        try:
            await runtime.unload(self.client, w.spec, model)
        except RuntimeRequestError as exc:
            raise _not_found_or_failed(exc) from None
        await self.refresh_models(worker_id)

    async def pull(self, worker_id: str, model: str) -> AsyncIterator[dict[str, Any]]:
        w, runtime = self._ollama(worker_id)
        try:
            async for line in runtime.pull(self.client, w.spec, model):
                yield line
        except RuntimeRequestError as exc:
            raise _not_found_or_failed(exc) from None
        await self.refresh_models(worker_id)
