"""A node on another host of a Ray cluster, behind the plane's `Node` protocol
(docs/cluster.md, docs/architecture.md "Node and plane").

`RemoteNode` does on the plane's loop what `LocalNode` does in process, by calling the
node's agent (`api/agent.py`) through an `AgentLink` (in production
`gpupanel.adapters.ray_cluster.Agent`: Ray's async actor calls, with Ray's exceptions
translated). This module does not import Ray.

An agent that does not answer a sample (its node down, its actor restarting) does not stop
the plane: the node's GPUs are reported lost and its workers unhealthy, with the reason,
until it answers again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from gpupanel.adapters.runtimes.ollama import KeepAlive
from gpupanel.core.cluster import Secret
from gpupanel.core.config import PanelSettings, WorkerSpec
from gpupanel.core.model import GpuSample
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.upstream import Upstream
from gpupanel.core.worker import Health, WorkerState
from gpupanel.errors import Invalid, NotFound, Unavailable
from gpupanel.services.node import ModelSize

log = logging.getLogger("gpupanel.cluster")

SAMPLE_TIMEOUT_S = 5.0
"""How long a tick waits for a node's sample before reporting the node unreachable."""
QUICK_TIMEOUT_S = 60.0
"""For calls that do not wait for a worker: model facts, unload, a log, a model list."""
LOAD_TIMEOUT_S = 900.0
"""For a model load (reading the weights of a large model into GPU memory takes minutes)."""
PULL_STEP_TIMEOUT_S = 600.0
"""The longest a pull may go without a progress line."""


class AgentLink(Protocol):
    """How the plane calls one node's agent (`adapters/ray_cluster.Agent`)."""

    node: str

    async def call(self, method: str, *args: Any, timeout: float) -> Any: ...

    def stream(self, method: str, *args: Any, timeout: float) -> AsyncIterator[Any]: ...


class RemoteNode:
    """One other host, as the plane sees it: its workers' specs (read from its agent at
    attach) and every operation and sample through the agent. `url` is where the agent
    serves its node's workers, behind the cluster `token` (the proxy's hop: `upstream`)."""

    def __init__(
        self,
        name: str,
        agent: AgentLink,
        specs: Sequence[WorkerSpec],
        simulated: bool,
        url: str,
        panel: PanelSettings,
        token: Secret | None = None,
    ) -> None:
        self.name = name
        self.agent = agent
        self.specs = {s.id: s for s in specs}
        self.simulated = simulated
        self.url = url
        self.panel = panel
        self.token = token
        self._upstreams: dict[str, Upstream] = {}  # by worker id, for self.url
        self.last: Snapshot | None = None
        self.down: str | None = None
        """Why the agent did not answer the last sample (None while it answers)."""

    # ---- workers ------------------------------------------------------------------------------

    def worker_ids(self) -> Collection[str]:
        return self.specs.keys()

    def spec(self, worker_id: str) -> WorkerSpec:
        spec = self.specs.get(worker_id)
        if spec is None:
            raise NotFound(f"no worker {worker_id!r} on node {self.name!r}")
        return spec

    def upstream(self, worker: WorkerState) -> Upstream:
        """A worker of this node, through its agent: the agent's address and port, the
        target under the agent's `/proxy/{id}`, the cluster token as `Authorization`."""
        up = self._upstreams.get(worker.id)
        if up is None:
            where = urlsplit(self.url)
            if where.hostname is None or where.port is None:
                raise Unavailable(
                    f"the agent of node {self.name!r} gave no usable address ({self.url!r}): "
                    "restart `gpupanel serve --ray` to re-attach"
                )
            token = self.token.value if self.token is not None else ""
            up = Upstream.agent(where.hostname, where.port, worker.id, token, self.name)
            self._upstreams[worker.id] = up
        return up

    # ---- the snapshot -------------------------------------------------------------------------

    async def sample(self) -> Snapshot:
        try:
            snap: Snapshot = await self.agent.call("snapshot", timeout=SAMPLE_TIMEOUT_S)
        except Unavailable as exc:
            return self._unreachable(str(exc))
        if self.down is not None:
            log.info("node %s answers again", self.name)
            self.down = None
        if any(g.host is None for g in snap.gpus):
            snap = replace(
                snap, gpus=tuple(replace(g, host=g.host or self.name) for g in snap.gpus)
            )
        self.last = snap
        return snap

    def _unreachable(self, reason: str) -> Snapshot:
        """What is known of the node while its agent does not answer: its GPUs as lost and
        its workers unhealthy, with the reason."""
        if self.down is None:
            log.warning("node %s: %s", self.name, reason)
        self.down = reason
        health = Health(ok=False, error=reason)
        last = self.last
        if last is None:
            workers = tuple(
                WorkerState(
                    id=s.id,
                    runtime=s.runtime,
                    gpu_uuid=s.gpu,
                    gpu_index=None,
                    port=s.port,
                    pid=None,
                    status="unhealthy",
                    pin="unverified",
                    base_url="",
                    health=health,
                    models_expected=s.models,
                    last_error=reason,
                    node=self.name,
                )
                for s in self.specs.values()
            )
            return Snapshot(time=time.time(), simulated=self.simulated, gpus=(), workers=workers)
        gpus = tuple(
            GpuSample.lost_gpu(g.uuid, g.index, simulated=g.simulated, host=self.name)
            for g in last.gpus
        )
        workers = tuple(
            replace(w, status="unhealthy", health=health, last_error=reason) for w in last.workers
        )
        return Snapshot(time=time.time(), simulated=last.simulated, gpus=gpus, workers=workers)

    # ---- operations ---------------------------------------------------------------------------

    def _waits_s(self, starts: int = 1) -> float:
        """How long an operation that stops and starts a worker may take on the agent."""
        return starts * (self.panel.ready_timeout_s + self.panel.stop_grace_s) + 30.0

    async def start(self, worker_id: str) -> None:
        await self.agent.call("start", worker_id, timeout=self._waits_s())

    async def stop(self, worker_id: str) -> str:
        result: str = await self.agent.call("stop", worker_id, timeout=self._waits_s())
        return result

    async def restart(self, worker_id: str) -> None:
        await self.agent.call("restart", worker_id, timeout=self._waits_s(2))

    async def ensure(self) -> list[str]:
        started: list[str] = await self.agent.call("ensure", timeout=self._waits_s(2))
        return started

    async def stop_pid(self, pid: int, force: bool, gpu_pids: set[int]) -> str:
        raise Invalid(
            f"pid {pid} names a process of the plane's host, not of node {self.name!r}: stop "
            "its worker by id (`gpupanel workers stop ID`)"
        )

    async def model_size(self, worker_id: str, model: str | None) -> ModelSize:
        size: ModelSize = await self.agent.call(
            "model_size", worker_id, model, timeout=QUICK_TIMEOUT_S
        )
        return size

    async def load(
        self, worker_id: str, model: str, keep_alive: KeepAlive | None, num_ctx: int | None
    ) -> dict[str, Any]:
        answer: dict[str, Any] = await self.agent.call(
            "load", worker_id, model, keep_alive, num_ctx, timeout=LOAD_TIMEOUT_S
        )
        return answer

    async def unload(self, worker_id: str, model: str) -> None:
        await self.agent.call("unload", worker_id, model, timeout=QUICK_TIMEOUT_S)

    async def pull(self, worker_id: str, model: str) -> AsyncIterator[dict[str, Any]]:
        async for line in self.agent.stream("pull", worker_id, model, timeout=PULL_STEP_TIMEOUT_S):
            yield line

    async def refresh_models(self, worker_id: str) -> None:
        await self.agent.call("refresh_models", worker_id, timeout=QUICK_TIMEOUT_S)

    async def log(self, worker_id: str, lines: int) -> list[str]:
        tail: list[str] = await self.agent.call("log", worker_id, lines, timeout=QUICK_TIMEOUT_S)
        return tail
