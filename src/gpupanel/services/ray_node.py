"""A node on another host of a Ray cluster, behind the plane's `Node` protocol
(docs/cluster.md, docs/architecture.md "Node and plane").

`RemoteNode` does on the plane's loop what `LocalNode` does in process, by calling the
node's agent (`api/agent.py`) through an `AgentLink` (in production
`gpupanel.adapters.ray_cluster.Agent`: Ray's async actor calls, with Ray's exceptions
translated). This module does not import Ray.

A node that fails does not stop the plane (docs/cluster.md, "When a node fails"): a tick
waits at most SAMPLE_WAIT_S for a node's sample and otherwise reports its last one (the call
goes on in the background; one at a time). When Ray reports the node dead, or its agent
fails or does not answer within SAMPLE_TIMEOUT_S, the node is down: its workers are
`node_lost` (routing skips them), its GPUs lost, and its sample carries one `node_down`
warning, until the agent answers again or a new agent is attached on the node that took
its place (`reattach`, tried every REATTACH_EVERY_S). When the hop to the agent fails to
connect, `reresolve` asks the agent where it serves now (an agent restarted by Ray with
`agent_port = 0` listens on a new port).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from gpupanel.adapters.runtimes.ollama import KeepAlive
from gpupanel.core.cluster import Secret
from gpupanel.core.config import PanelSettings, WorkerSpec
from gpupanel.core.lifecycle import Lifecycle, Status
from gpupanel.core.model import GpuSample
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.upstream import Upstream
from gpupanel.core.warnings import node_down
from gpupanel.core.worker import Health, WorkerState
from gpupanel.errors import GpuPanelError, Invalid, NotFound, Unavailable
from gpupanel.services.node import ModelSize

log = logging.getLogger("gpupanel.cluster")

SAMPLE_WAIT_S = 0.3
"""How long a tick waits for a node's sample before reporting its last one (the plane's
tick is 1 s: a slow or dead node must not hold up the others)."""
SAMPLE_TIMEOUT_S = 5.0
"""How long a sample may go unanswered before the node counts as down (sooner when Ray
reports it dead, or the agent's actor fails)."""
REATTACH_EVERY_S = 5.0
"""How often a down node's agent is looked for again (on the node that took its place)."""
RESOLVE_EVERY_S = 2.0
"""How often at most the agent's address is asked again after failed hops."""
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

    async def node_alive(self, timeout: float) -> bool | None:
        """Does the cluster report the agent's node alive? None: it did not say in time."""
        ...


@dataclass(frozen=True)
class Reattached:
    """A new agent for a node that was down (`api/cluster.py`): its link, address, specs."""

    agent: AgentLink
    url: str
    specs: Sequence[WorkerSpec]


Reattach = Callable[[], Awaitable[Reattached | None]]
"""Looks for the node again (by the name the config gives it) and attaches its agent; None
while no live node matches."""


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
        host: str | None = None,
        reattach: Reattach | None = None,
    ) -> None:
        self.name = name
        self.agent = agent
        self.specs = {s.id: s for s in specs}
        self.simulated = simulated
        self.url = url
        self.panel = panel
        self.token = token
        self._upstreams: dict[str, Upstream] = {}  # by worker id, for self.url
        self.host = host or urlsplit(url).hostname or name
        """The node's address, for messages."""
        self.reattach = reattach
        self.last: Snapshot | None = None
        self.down: str | None = None
        """Why the node is down (None while its agent answers)."""
        self.down_since: float | None = None
        self._asking: asyncio.Future[Any] | None = None  # the sample call in flight
        self._reattaching: asyncio.Future[None] | None = None
        self._reattached_at = 0.0
        self._resolving: asyncio.Future[None] | None = None
        self._resolved_at = 0.0

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
        """The node's sample, waiting at most SAMPLE_WAIT_S (see the module's docstring)."""
        if self._asking is None:
            self._asking = asyncio.ensure_future(
                self.agent.call("snapshot", timeout=SAMPLE_TIMEOUT_S)
            )
            # a call given up on (the node was found down meanwhile) ends unread
            self._asking.add_done_callback(lambda f: f.cancelled() or f.exception())
        asking = self._asking
        done, _ = await asyncio.wait({asking}, timeout=SAMPLE_WAIT_S)
        if not done:
            if self.down is None and await self.agent.node_alive(SAMPLE_WAIT_S) is False:
                return self._lost(f"Ray reports node {self.name} dead")
            return self._stale()
        self._asking = None
        try:
            snap: Snapshot = asking.result()
        except GpuPanelError as exc:
            return self._lost(str(exc))
        if self.down is not None:
            log.info("node %s answers again", self.name)
            self.down = self.down_since = None
            self.reresolve()  # a restarted agent may listen elsewhere now
        if any(g.host is None for g in snap.gpus):
            snap = replace(
                snap, gpus=tuple(replace(g, host=g.host or self.name) for g in snap.gpus)
            )
        self.last = snap
        return snap

    def _known(self, status: Status, lifecycle: Lifecycle, reason: str) -> tuple[WorkerState, ...]:
        """The node's workers as last sampled (as configured, before the first sample), with
        `status`, `lifecycle` and `reason` as their health's error."""
        health = Health(ok=False, error=reason)
        if self.last is not None:
            return tuple(
                replace(w, status=status, lifecycle=lifecycle, health=health, last_error=reason)
                for w in self.last.workers
            )
        return tuple(
            WorkerState(
                id=s.id,
                runtime=s.runtime,
                gpu_uuid=s.gpu,
                gpu_index=None,
                port=s.port,
                pid=None,
                status=status,
                lifecycle=lifecycle,
                pin="unverified",
                base_url="",
                health=health,
                models_expected=s.models,
                last_error=reason,
                node=self.name,
            )
            for s in self.specs.values()
        )

    def _stale(self) -> Snapshot:
        """The agent has not answered yet (for less than SAMPLE_TIMEOUT_S): its last sample
        stands, or, before the first, its workers as configured, not yet known."""
        if self.down is not None:
            return self._lost(self.down)
        if self.last is not None:
            return self.last
        workers = self._known("starting", "starting", f"no sample from node {self.name} yet")
        return Snapshot(time=time.time(), simulated=self.simulated, gpus=(), workers=workers)

    def _lost(self, reason: str) -> Snapshot:
        """The node is down: its workers `node_lost`, its GPUs lost, one `node_down`."""
        now = time.time()
        if self.down is None:
            log.warning("node %s is down: %s", self.name, reason)
            self.down_since = now
            self._asking = None  # the next tick asks afresh (a call to a dead agent fails fast)
        self.down = reason
        self._try_reattach()
        workers = self._known("node_lost", "node_lost", reason)
        last = self.last
        gpus = tuple(
            GpuSample.lost_gpu(g.uuid, g.index, simulated=g.simulated, host=self.name)
            for g in (last.gpus if last is not None else ())
        )
        warning = node_down(
            self.name, self.host, reason, [w.id for w in workers], self.down_since or now
        )
        return Snapshot(
            time=now, simulated=self.simulated, gpus=gpus, workers=workers, warnings=(warning,)
        )

    # ---- a node that comes back, an agent that moved ----------------------------------------

    def _try_reattach(self) -> None:
        """While down: look for the node again (a node that rejoined the cluster has a new
        Ray id, and needs a new agent), every REATTACH_EVERY_S, in the background."""
        if self.reattach is None or (self._reattaching and not self._reattaching.done()):
            return
        if time.monotonic() - self._reattached_at < REATTACH_EVERY_S:
            return
        self._reattached_at = time.monotonic()
        self._reattaching = asyncio.ensure_future(self._reattach(self.reattach))

    async def _reattach(self, reattach: Reattach) -> None:
        try:
            found = await reattach()
        except GpuPanelError as exc:
            log.warning("node %s: could not attach a new agent: %s", self.name, exc)
            return
        if found is None or self.down is None:
            return
        log.info("node %s is back: attached its agent at %s", self.name, found.url)
        self.agent = found.agent
        self.specs = {s.id: s for s in found.specs}
        self._moved(found.url)
        self._asking = None

    def reresolve(self) -> None:
        """The hop to the agent failed to connect: ask the agent where it serves now (in the
        background, at most every RESOLVE_EVERY_S)."""
        if self._resolving is not None and not self._resolving.done():
            return
        if time.monotonic() - self._resolved_at < RESOLVE_EVERY_S:
            return
        self._resolved_at = time.monotonic()
        self._resolving = asyncio.ensure_future(self._resolve())

    async def _resolve(self) -> None:
        try:
            info: Any = await self.agent.call("info", timeout=QUICK_TIMEOUT_S)
        except GpuPanelError as exc:
            log.info("node %s: could not ask its agent's address: %s", self.name, exc)
            return
        url = info.get("url") if isinstance(info, dict) else None
        if isinstance(url, str) and url != self.url:
            self._moved(url)

    def _moved(self, url: str) -> None:
        if url != self.url:
            log.info("the agent of node %s serves at %s now (was %s)", self.name, url, self.url)
        self.url = url
        self._upstreams.clear()

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
