"""Workers on several hosts (docs/cluster.md): which node runs which worker, the names the
plane gives nodes, the cluster token, and how an agent's errors cross the wire.

Pure: the nodes come in as `ClusterNode` values (read from Ray by
`gpupanel.adapters.ray_cluster`), so placement is decided and tested without a cluster.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpupanel import errors
from gpupanel.core.config import Config
from gpupanel.errors import ConfigError, GpuPanelError

AGENT_PREFIX = "gpupanel-agent-"
"""Each node agent is the Ray actor named AGENT_PREFIX + the node's Ray id."""
_PREFIX_MIN = 6
"""A node id may be abbreviated to a unique prefix of at least this many characters."""


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One node of the cluster, as Ray reports it."""

    node_id: str
    hostname: str
    address: str
    gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.hostname} {self.address} id {self.node_id[:12]}"


def agent_name(node_id: str) -> str:
    """The Ray actor name of the agent on `node_id`."""
    return AGENT_PREFIX + node_id


def safe_name(name: str) -> str:
    """`name` as one path segment (an agent's state directory is named after its node)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "node"


class Secret:
    """A string that never shows itself: not in a repr, a log line or an error message
    (the cluster token crosses Ray as an actor's constructor argument)."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __getstate__(self) -> str:
        return self.value

    def __setstate__(self, state: str) -> None:
        self.value = state


def match_node(value: str, nodes: Sequence[ClusterNode], where: str) -> ClusterNode:
    """The node a worker's `node` field names: its Ray node id (or a unique prefix of at
    least 6 characters), else its hostname (any case), else its IP address. ConfigError,
    naming `where` (file and worker), when no node or several match."""
    wanted = value.strip().lower()
    by_id = [n for n in nodes if n.node_id.lower() == wanted]
    if not by_id and len(wanted) >= _PREFIX_MIN:
        by_id = [n for n in nodes if n.node_id.lower().startswith(wanted)]
    for found in (
        by_id,
        [n for n in nodes if n.hostname.lower() == wanted],
        [n for n in nodes if n.address == value.strip()],
    ):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            ids = ", ".join(n.node_id[:12] for n in found)
            raise ConfigError(
                f"{where}: field 'node' is {value!r}, which names {len(found)} nodes of the "
                f"Ray cluster (ids {ids}); use the Ray node id (`ray list nodes`)"
            )
    known = "; ".join(n.describe() for n in nodes) or "none"
    raise ConfigError(
        f"{where}: field 'node' is {value!r}, which is no live node of the Ray cluster "
        f"(nodes: {known}); start Ray there (`ray start --address=<head>:6379`) or fix the "
        "name (a hostname, an IP or a Ray node id)"
    )


@dataclass(frozen=True, slots=True)
class Placement:
    """Where every worker runs: the plane's host, or an agent per other node.

    `local` is the config of the plane's host (its workers with `node` None);
    `agents` maps each agent's node id to its name and the config it is given (that node's
    workers, each with `node` set to the name); `local_name` names the plane's host."""

    local: Config
    local_name: str
    agents: Mapping[str, tuple[str, Config]]


def place(
    config: Config, nodes: Sequence[ClusterNode], local_id: str, all_gpu_nodes: bool
) -> Placement:
    """Place the workers of `config` on the cluster's `nodes` (`local_id` is the node the
    plane runs on). A node is named as the first worker that names it does, else by its
    hostname (with its id's start where hostnames repeat). With `all_gpu_nodes`, every node
    with GPUs gets an agent, whether or not a worker names it."""
    chosen: dict[str, str] = {}  # node id -> the name its first worker gave it
    owner: dict[str, str] = {}  # worker id -> node id
    for w in config.workers:
        if w.node is None:
            owner[w.id] = local_id
            continue
        node = match_node(w.node, nodes, f"{config.source}: worker {w.id!r}")
        chosen.setdefault(node.node_id, w.node)
        owner[w.id] = node.node_id
    if all_gpu_nodes:
        for n in nodes:
            if n.gpus > 0 and n.node_id not in chosen and n.node_id != local_id:
                chosen[n.node_id] = _host_name(n, nodes)
    local_node = next((n for n in nodes if n.node_id == local_id), None)
    local_name = chosen.pop(local_id, None) or (
        _host_name(local_node, nodes) if local_node else "local"
    )
    names = {local_name}
    for node_id, name in list(chosen.items()):
        if name in names:  # two spellings of hosts that collide: keep names unique
            chosen[node_id] = name = f"{name}-{node_id[:8]}"
        names.add(name)

    def workers_of(node_id: str, name: str | None) -> Config:
        mine = tuple(replace(w, node=name) for w in config.workers if owner[w.id] == node_id)
        return replace(config, workers=mine)

    return Placement(
        local=workers_of(local_id, None),
        local_name=local_name,
        agents={nid: (name, workers_of(nid, name)) for nid, name in chosen.items()},
    )


def _host_name(node: ClusterNode, nodes: Sequence[ClusterNode]) -> str:
    same = sum(1 for n in nodes if n.hostname == node.hostname)
    return node.hostname if same == 1 else f"{node.hostname}-{node.node_id[:8]}"


# ---- errors across the wire ----------------------------------------------------------------

_KINDS: dict[str, type[GpuPanelError]] = {
    cls.__name__: cls
    for cls in (
        errors.GpuPanelError,
        errors.ConfigError,
        errors.StateError,
        errors.NotFound,
        errors.Invalid,
        errors.TooLarge,
        errors.Conflict,
        errors.Forbidden,
        errors.Unavailable,
        errors.WorkerFailed,
        errors.WorkerTimeout,
    )
}


def error_to_wire(exc: GpuPanelError) -> dict[str, Any]:
    """What an agent answers for an error of gpupanel's (plain data: it crosses Ray)."""
    return {
        "kind": type(exc).__name__,
        "message": str(exc),
        "code": exc.code,
        "status": getattr(exc, "status", None),
    }


def error_from_wire(data: Mapping[str, Any]) -> GpuPanelError:
    """The error an agent answered, as the same kind here (an unknown kind is a
    GpuPanelError); a worker's refusal keeps the status it answered with."""
    kind, message = str(data.get("kind")), str(data.get("message", ""))
    if kind == errors.RuntimeRequestError.__name__:
        status = data.get("status")
        return errors.RuntimeRequestError(message, status if isinstance(status, int) else None)
    code = data.get("code")
    return _KINDS.get(kind, GpuPanelError)(message, code if isinstance(code, str) else None)
