"""The node agent (docs/cluster.md): gpupanel's node code on one host of a Ray cluster.

`NodeAgent` is the class of the named, detached Ray actor that the plane starts on each
node (`gpupanel.adapters.ray_cluster.create_agent`). It runs a `ControlPlane` of its own,
in a thread, for that node's workers: the same `LocalNode` as on one host (NVML, or a
simulated workstation, for that host's GPUs; the supervisor launching and adopting that
host's workers; its state store on that host's disk), and the same HTTP app, bound to the
node's address with `auth = "keys"` and the plane's **cluster token** as its admin token.
Nothing reaches that port without the token; the plane calls the agent through Ray.

Every method answers `{"ok": value}`, or `{"error": ...}` for an error of gpupanel's
(`core/cluster.error_to_wire`): the plane rebuilds it as the same kind, without Ray's
traceback. The token is a `Secret` and never appears in a repr or a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from gpupanel._version import __version__
from gpupanel.adapters.audit import AuditLog
from gpupanel.adapters.config_file import check_files
from gpupanel.adapters.keys import KEYS_FILE, KeyRing
from gpupanel.adapters.ray_cluster import node_ip
from gpupanel.adapters.state import StateStore, default_state_dir
from gpupanel.api.app import build_app
from gpupanel.api.auth import Credentials
from gpupanel.core.cluster import Secret, error_to_wire, safe_name
from gpupanel.core.config import Config, place_gpus
from gpupanel.core.gpu import GpuBackend
from gpupanel.core.snapshot import Snapshot
from gpupanel.errors import GpuPanelError, Unavailable
from gpupanel.services.node import LocalNode
from gpupanel.services.runtime import ControlPlane, bind_panel_socket
from gpupanel.services.sampler import gpu_backend

log = logging.getLogger("gpupanel.agent")
T = TypeVar("T")

SIM_OLLAMA = (sys.executable, "-m", "gpupanel.sim.ollama")
"""How a simulated node runs `ollama serve` (this host's Python, as in api/build.py)."""
_SIM_NAMESPACE = uuid.UUID("8d3a2c1e-5f4b-4c6d-9e7f-6770756e6f64")


@dataclass(frozen=True)
class AgentSpec:
    """What the plane gives an agent: its node's name in the plane and its Ray id, the
    config of its workers (each with `node` = that name; [panel] and [cluster] as the
    plane's), the cluster token, the simulated workstation's spec (None: NVML), and the
    plane's version."""

    node: str
    node_id: str
    config: Config
    token: Secret
    simulate: str | None
    version: str

    def digest(self) -> str:
        """Changes whenever the agent would run differently (a plane finding a running agent
        with another digest replaces it; its workers keep running and are adopted)."""
        token = hashlib.sha256(self.token.value.encode()).hexdigest()
        text = repr((self.node, self.node_id, self.config, self.simulate, self.version, token))
        return hashlib.sha256(text.encode()).hexdigest()


def agent_state_dir(spec: AgentSpec) -> Path:
    """The agent's state directory on its host: `[cluster] agent_state_dir`, else
    `$XDG_STATE_HOME/gpupanel/agents`, with one directory per node name."""
    base = spec.config.cluster.agent_state_dir
    root = Path(base) if base else default_state_dir() / "agents"
    return root / safe_name(spec.node)


def _backend(spec: AgentSpec) -> GpuBackend:
    """NVML, or the simulated workstation of this node's `$GPUPANEL_SIM_DIR` (the plane sets
    one per node). A new simulated workstation gets GPU UUIDs of its own node, so that
    nodes simulated from one spec do not share UUIDs."""
    if spec.simulate is None:
        return gpu_backend(None)
    from gpupanel.sim.backend import SimulatedGpuBackend
    from gpupanel.sim.paths import sim_dir
    from gpupanel.sim.workstation import Workstation, parse_spec

    directory = sim_dir()
    recorded = None if spec.simulate else Workstation.load_recorded(directory)
    if recorded is not None:
        return SimulatedGpuBackend(recorded, directory)
    made = parse_spec(spec.simulate or None)
    gpus = tuple(
        replace(g, uuid="GPU-" + str(uuid.uuid5(_SIM_NAMESPACE, f"{spec.node}/{g.uuid}")))
        for g in made.gpus
    )
    return SimulatedGpuBackend(Workstation(f"{made.name}@{spec.node}", gpus), directory)


def agent_control_plane(spec: AgentSpec, host: str) -> tuple[ControlPlane, socket.socket]:
    """The agent's control plane (not yet running) and its bound socket, on `host`."""
    backend = _backend(spec)
    gpus = [g.uuid for g in backend.sample()]
    config = place_gpus(spec.config, gpus, spec.node)
    # The files the workers name are on this host: checked here (api/build.py skips them).
    check_files(replace(config, workers=tuple(replace(w, node=None) for w in config.workers)))
    if spec.simulate is not None:
        config = config.with_command("ollama", SIM_OLLAMA)
    state_dir = agent_state_dir(spec)
    sock = bind_panel_socket(host, config.cluster.agent_port, option="[cluster] agent_port")
    try:
        port = int(sock.getsockname()[1])
        panel = replace(
            config.panel,
            host=host,
            port=port,
            state_dir=str(state_dir),
            auth="keys",
            tls_cert=None,
            tls_key=None,
        )
        config = replace(config, panel=panel)
        credentials = Credentials(
            admin_token=spec.token.value,
            keys=KeyRing(state_dir / KEYS_FILE),
            panel_reads_need_admin=True,
        )
        cp = ControlPlane(
            config,
            backend,
            StateStore(state_dir),
            lambda plane: build_app(plane, host, credentials, AuditLog(state_dir)),
            node_name=spec.node,
        )
    except BaseException:
        sock.close()
        raise
    return cp, sock


class NodeAgent:
    """The Ray actor of one node (see the module's docstring). Its methods are coroutines
    on the actor's loop; each runs the node's work on the agent's control plane loop."""

    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.digest = spec.digest()
        self.failed: str | None = None
        self.cp: ControlPlane | None = None
        try:
            cp, sock = agent_control_plane(spec, node_ip())
            cp.claim_wait_s = 15.0  # a predecessor Ray killed may still be ending
            cp.start_in_thread(sock=sock)
            self.cp = cp
            log.info("gpupanel agent of node %s serves on %s", spec.node, cp.url)
        except GpuPanelError as exc:
            self.failed = str(exc)
            log.error("the gpupanel agent of node %s cannot start: %s", spec.node, exc)

    def __repr__(self) -> str:  # Ray shows it in its logs and errors: never the token
        return f"NodeAgent({self.spec.node})"

    # ---- helpers ---------------------------------------------------------------------------

    def _running(self) -> ControlPlane:
        if self.cp is None:
            raise Unavailable(f"the gpupanel agent of node {self.spec.node!r} did not start")
        if self.cp.failed is not None:
            raise Unavailable(
                f"the gpupanel agent of node {self.spec.node!r} stopped: {self.cp.failed}"
            )
        return self.cp

    async def _on_loop(self, work: Callable[[LocalNode], Awaitable[T]]) -> T:
        """`work(node)` run on the control plane's loop (its one writer)."""
        cp = self._running()

        async def run() -> T:
            return await work(cp.node)

        try:
            return await asyncio.wrap_future(cp.submit(run()))
        except RuntimeError as exc:  # its loop has ended
            raise Unavailable(f"the gpupanel agent of node {self.spec.node!r}: {exc}") from None

    async def _answer(self, work: Callable[[LocalNode], Awaitable[Any]]) -> dict[str, Any]:
        try:
            return {"ok": await self._on_loop(work)}
        except GpuPanelError as exc:
            return {"error": error_to_wire(exc)}

    # ---- what the plane calls ----------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """Who this agent is: its digest, version, URL, workers' specs, or why it failed."""
        cp = self.cp
        return {
            "ok": {
                "digest": self.digest,
                "version": __version__,
                "pid": os.getpid(),
                "failed": self.failed,
                "url": cp.url if cp is not None else None,
                "simulated": cp.simulated if cp is not None else False,
                "specs": list(cp.config.workers) if cp is not None else [],
            }
        }

    async def snapshot(self) -> dict[str, Any]:
        """The node's sample now: its GPUs (with their host) and workers, no traffic."""

        async def sample(node: LocalNode) -> Snapshot:
            return await node.sample()

        return await self._answer(sample)

    async def start(self, worker_id: str) -> dict[str, Any]:
        return await self._answer(lambda node: node.start(worker_id))

    async def stop(self, worker_id: str) -> dict[str, Any]:
        return await self._answer(lambda node: node.stop(worker_id))

    async def restart(self, worker_id: str) -> dict[str, Any]:
        return await self._answer(lambda node: node.restart(worker_id))

    async def ensure(self) -> dict[str, Any]:
        return await self._answer(lambda node: node.ensure())

    async def model_size(self, worker_id: str, model: str | None) -> dict[str, Any]:
        return await self._answer(lambda node: node.model_size(worker_id, model))

    async def load(
        self, worker_id: str, model: str, keep_alive: Any, num_ctx: int | None
    ) -> dict[str, Any]:
        return await self._answer(lambda node: node.load(worker_id, model, keep_alive, num_ctx))

    async def unload(self, worker_id: str, model: str) -> dict[str, Any]:
        return await self._answer(lambda node: node.unload(worker_id, model))

    async def refresh_models(self, worker_id: str) -> dict[str, Any]:
        return await self._answer(lambda node: node.refresh_models(worker_id))

    async def log(self, worker_id: str, lines: int) -> dict[str, Any]:
        return await self._answer(lambda node: node.log(worker_id, lines))

    async def pull(self, worker_id: str, model: str) -> AsyncIterator[dict[str, Any]]:
        """The pull's progress lines, each as its own answer (a Ray streaming generator)."""
        try:
            cp = self._running()
            lines = cp.node.pull(worker_id, model)

            async def step() -> tuple[bool, dict[str, Any] | None]:
                try:
                    return True, await lines.__anext__()
                except StopAsyncIteration:
                    return False, None

            while True:
                more, line = await asyncio.wrap_future(cp.submit(step()))
                if not more:
                    return
                yield {"ok": line}
        except GpuPanelError as exc:
            yield {"error": error_to_wire(exc)}

    async def stop_workers(self) -> dict[str, Any]:
        """Stop every worker of this node (taking a node out of service, and tests); how
        each one's process ended."""

        async def stop_all(node: LocalNode) -> dict[str, str]:
            ids = list(node.worker_ids())
            ended = await asyncio.gather(*(node.stop(w) for w in ids))
            return dict(zip(ids, ended, strict=True))

        return await self._answer(stop_all)

    async def close(self) -> dict[str, Any]:
        """Stop the agent's control plane (its workers keep running): before the actor is
        killed, so that its state file is written."""
        cp = self.cp
        if cp is not None:
            await asyncio.to_thread(cp.join, 30.0)
        return {"ok": None}
