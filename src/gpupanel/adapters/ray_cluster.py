"""Ray, behind gpupanel's own types (docs/cluster.md): attaching to a running cluster, its
nodes, the node agents (named, detached actors placed on their node), and calls to them.

The only module that imports `ray`, and only `gpupanel serve --ray` imports it (ray is the
optional extra `gpupanel[ray]`). Ray's exceptions become gpupanel.errors types here: an
agent that cannot be reached (its actor dead or restarting, its node gone, no answer in
time) is `Unavailable`; an error of gpupanel's that the agent answered is rebuilt as the
same kind (`core/cluster.error_from_wire`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gpupanel.core.cluster import ClusterNode, agent_name, error_from_wire
from gpupanel.errors import GpuPanelError, Unavailable

NAMESPACE = "gpupanel"
"""The Ray namespace of the plane and its agents (named actors are found within it)."""
MAX_RESTARTS = 1000
"""How often Ray restarts a crashed agent (it then adopts its node's workers)."""
AGENT_ENV = {
    # Ray kills the direct children of a worker process when it exits (docs.ray.io, "Lifetimes
    # of a User-Spawn Process"); gpupanel's workers must outlive their agent, as they outlive
    # the control plane on one host, to be adopted by the next one.
    "RAY_kill_child_processes_on_worker_exit": "0",
}

log = logging.getLogger("gpupanel.cluster")


CONNECT_TIMEOUT_S = 5.0


def _reachable(address: str) -> None:
    """Unavailable at once when nothing answers at a HOST:PORT address (Ray itself keeps
    trying for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", or a form Ray reads itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise Unavailable(
            f"cannot attach to the Ray cluster at {address}: {exc.strerror or exc}; start "
            "its head with `ray start --head` there, or check the address (the head's "
            "HOST:6379, as `ray start --head` printed it)"
        ) from None


def attach(address: str) -> str:
    """Connect this process to the Ray cluster at `address` ("auto": the one `ray start`
    made on this machine) in gpupanel's namespace; returns the id of this process's node."""
    _reachable(address)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Unavailable(
            f"cannot attach to the Ray cluster at {address}: {first}; start one with "
            "`ray start --head` on this machine (docs/cluster.md), or give its address "
            "(`gpupanel serve --ray HOST:6379`, or [cluster] address)"
        ) from None
    return str(ray.get_runtime_context().get_node_id())


def detach() -> None:
    """Disconnect from the cluster (the agents and their workers keep running)."""
    ray.shutdown()


def nodes() -> list[ClusterNode]:
    """The live nodes of the cluster."""
    return [
        ClusterNode(
            node_id=str(n["NodeID"]),
            hostname=str(n.get("NodeManagerHostname", "")),
            address=str(n.get("NodeManagerAddress", "")),
            gpus=float(n.get("Resources", {}).get("GPU", 0.0)),
            resources=dict(n.get("Resources", {})),
        )
        for n in ray.nodes()  # type: ignore[no-untyped-call]
        if n.get("Alive")
    ]


ALIVE_TTL_S = 0.5
"""How long one read of the cluster's live nodes serves every agent's `node_alive`."""
_alive: tuple[float, frozenset[str]] | None = None


def _alive_ids() -> frozenset[str]:
    return frozenset(
        str(n["NodeID"])
        for n in ray.nodes()  # type: ignore[no-untyped-call]
        if n.get("Alive")
    )


async def alive_node_ids(timeout: float) -> frozenset[str] | None:
    """The ids of the nodes Ray reports alive (read at most every ALIVE_TTL_S, in a thread:
    a read of the GCS); None when Ray did not answer within `timeout` s."""
    global _alive
    now = time.monotonic()
    if _alive is not None and now - _alive[0] < ALIVE_TTL_S:
        return _alive[1]
    try:
        ids = await asyncio.wait_for(asyncio.to_thread(_alive_ids), timeout)
    except (asyncio.TimeoutError, ray.exceptions.RayError, ConnectionError) as exc:
        log.debug("could not read the cluster's nodes: %s", _reason(exc))
        return None
    _alive = (time.monotonic(), ids)
    return ids


def node_ip() -> str:
    """The address of the node this process runs on, as the cluster reaches it."""
    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Agent:
    """One node agent's actor: calls with a timeout, Ray's exceptions translated, and the
    agent's answers unwrapped (`{"ok": value}` or `{"error": ...}`, see api/agent.py)."""

    def __init__(self, handle: Any, node: str, node_id: str) -> None:
        self.handle = handle
        self.node = node
        self.node_id = node_id

    def _unavailable(self, exc: BaseException, what: str) -> Unavailable:
        return Unavailable(
            f"the gpupanel agent of node {self.node!r} did not answer {what}: {_reason(exc)}; "
            "check that the node is up (`ray status`)"
        )

    def _unwrap(self, answer: Any, what: str) -> Any:
        if isinstance(answer, Mapping) and "ok" in answer:
            return answer["ok"]
        if isinstance(answer, Mapping) and isinstance(answer.get("error"), Mapping):
            raise error_from_wire(answer["error"])
        raise GpuPanelError(f"the agent of node {self.node!r} answered {what} with {answer!r}")

    def _failed(self, exc: ray.exceptions.RayTaskError, what: str) -> GpuPanelError:
        cause = exc.cause if exc.cause is not None else exc
        return GpuPanelError(
            f"the gpupanel agent of node {self.node!r} failed at {what}: "
            f"{type(cause).__name__}: {_reason(cause)} (its log: `ray logs actor --id "
            f"{self.actor_id()}`)"
        )

    async def node_alive(self, timeout: float) -> bool | None:
        """Does Ray report this agent's node alive? None: Ray did not say in time."""
        ids = await alive_node_ids(timeout)
        return None if ids is None else self.node_id in ids

    def actor_id(self) -> str:
        try:
            return str(self.handle._actor_id.hex())
        except AttributeError:  # pragma: no cover (Ray's private attribute moved)
            return agent_name(self.node_id)

    @contextlib.contextmanager
    def _translated(self, method: str, timeout: float, silent: str) -> Iterator[None]:
        """Ray's exceptions of a call to the agent as gpupanel's (`silent`: what a timeout
        means, e.g. "did not answer")."""
        try:
            yield
        except (asyncio.TimeoutError, ray.exceptions.GetTimeoutError):
            raise Unavailable(
                f"the gpupanel agent of node {self.node!r} {silent} {method} within "
                f"{timeout:g} s; check that the node is up (`ray status`)"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            raise self._failed(exc, method) from None
        except ray.exceptions.RayError as exc:
            raise self._unavailable(exc, method) from None

    async def call(self, method: str, *args: Any, timeout: float) -> Any:
        """`method(*args)` on the agent, awaited on this loop for at most `timeout` s."""
        with self._translated(method, timeout, "did not answer"):
            ref = getattr(self.handle, method).remote(*args)
            answer = await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
        return self._unwrap(answer, method)

    def call_sync(self, method: str, *args: Any, timeout: float) -> Any:
        """`call` for code that runs before the loop (building the plane)."""
        with self._translated(method, timeout, "did not answer"):
            answer = ray.get(getattr(self.handle, method).remote(*args), timeout=timeout)
        return self._unwrap(answer, method)

    async def stream(self, method: str, *args: Any, timeout: float) -> AsyncIterator[Any]:
        """The items of the agent's generator `method(*args)`, each within `timeout` s."""
        with self._translated(method, timeout, "sent nothing for"):
            refs = getattr(self.handle, method).options(num_returns="streaming").remote(*args)
            while True:
                try:
                    ref = await asyncio.wait_for(refs.__anext__(), timeout)
                except StopAsyncIteration:
                    return
                answer = await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
                yield self._unwrap(answer, method)

    def kill(self) -> None:
        """End the actor for good (no restart); its workers keep running."""
        try:
            ray.kill(self.handle, no_restart=True)
        except ray.exceptions.RayError as exc:
            log.warning("could not kill the agent of node %s: %s", self.node, _reason(exc))


def find_agent(node_id: str, node: str) -> Agent | None:
    """The agent already running on `node_id` (a plane attached before), if any."""
    try:
        handle = ray.get_actor(agent_name(node_id), namespace=NAMESPACE)
    except ValueError:
        return None
    return Agent(handle, node, node_id)


def create_agent(
    actor_class: type, node_id: str, node: str, env: Mapping[str, str], *args: Any
) -> Agent:
    """Start the agent of `node_id`: a named, detached actor placed on that node (node
    affinity, not soft), restarted by Ray when it crashes, with `env` in its environment."""
    remote: Any = ray.remote(actor_class)
    options: dict[str, Any] = {
        "name": agent_name(node_id),
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "num_cpus": 0,
        "max_restarts": MAX_RESTARTS,
        "max_task_retries": 0,
        "max_concurrency": 100,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
        "runtime_env": {"env_vars": {**AGENT_ENV, **env}},
    }
    deadline = time.monotonic() + 30
    while True:
        try:
            handle = remote.options(**options).remote(*args)
            return Agent(handle, node, node_id)
        except ValueError as exc:  # the name of an agent being killed is not free yet
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"cannot start the gpupanel agent of node {node!r}: {_reason(exc)}"
                ) from None
            time.sleep(0.2)
