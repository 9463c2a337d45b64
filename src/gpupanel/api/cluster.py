"""Attaching the plane to a Ray cluster (docs/cluster.md): `gpupanel serve --ray`.

Places the config's workers on the cluster's nodes (`core/cluster.place`), then for each
other node finds its agent by name (a plane attached before: re-attach, nothing started
twice) or starts it, and returns the `RemoteNode`s the plane serves besides its own host.
An agent running another config or version is replaced; its workers keep running and the
new agent adopts them from its state directory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpupanel._version import __version__
from gpupanel.adapters import ray_cluster
from gpupanel.adapters.token import ensure_cluster_token
from gpupanel.api.agent import AgentSpec, NodeAgent
from gpupanel.core.cluster import Secret, match_node, place, safe_name
from gpupanel.core.config import Config
from gpupanel.core.defaults import SIM_DIR_ENV
from gpupanel.errors import ConfigError, GpuPanelError, StateError, Unavailable
from gpupanel.services.ray_node import Reattach, Reattached, RemoteNode

log = logging.getLogger("gpupanel.cluster")

START_TIMEOUT_S = 180.0
"""A new agent's first answer: Ray starts a worker process for it (and sets up its runtime
environment), then it samples its GPUs and binds its port."""
INFO_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Attached:
    """The plane's share of the cluster: its own host's config and name, the other nodes."""

    local: Config
    local_name: str
    remote: tuple[RemoteNode, ...]
    address: str


def attach_cluster(config: Config, simulate: str | None, address: str, state_dir: Path) -> Attached:
    """Attach to the Ray cluster at `address`, start or find the node agents, and return
    the remote nodes (see the module's docstring). Detaches again if anything fails."""
    local_id = ray_cluster.attach(address)
    try:
        live = ray_cluster.nodes()
        placement = place(config, live, local_id, config.cluster.agents == "all-gpu-nodes")
        addresses = {n.node_id: n.address for n in live}
        try:
            token = Secret(ensure_cluster_token(state_dir))
        except OSError as exc:
            raise StateError(
                f"cannot write the cluster token in {state_dir} ({exc.strerror or exc}): make "
                "the state directory writable, or set state_dir in gpupanel.toml's [panel]"
            ) from None
        specs = [
            AgentSpec(name, node_id, node_config, token, simulate, __version__)
            for node_id, (name, node_config) in placement.agents.items()
        ]
        remote = tuple(_agent_node(spec, config) for spec in specs)
        for spec, node in zip(specs, remote, strict=True):
            node.host = addresses.get(spec.node_id) or node.host
            node.reattach = _reattacher(spec, config)
    except BaseException:
        ray_cluster.detach()
        raise
    return Attached(placement.local, placement.local_name, remote, address)


def _env(spec: AgentSpec) -> dict[str, str]:
    """The agent's environment beyond its node's: when simulating, a workstation of its own
    under this host's simulation directory (several nodes of one machine must not share
    one)."""
    if spec.simulate is None:
        return {}
    from gpupanel.sim.paths import sim_dir

    return {SIM_DIR_ENV: str(sim_dir() / "nodes" / safe_name(spec.node))}


def _agent_node(spec: AgentSpec, config: Config) -> RemoteNode:
    agent = ray_cluster.find_agent(spec.node_id, spec.node)
    info: dict[str, Any] | None = None
    if agent is not None:
        try:
            info = agent.call_sync("info", timeout=INFO_TIMEOUT_S)
        except GpuPanelError as exc:
            log.warning("the agent of node %s does not answer (%s); replacing it", spec.node, exc)
        if info is not None and info["digest"] == spec.digest() and not info["failed"]:
            log.info("re-attached to the agent of node %s at %s", spec.node, info["url"])
        else:
            if info is not None:
                log.info(
                    "the agent of node %s runs another config or version; replacing it "
                    "(its workers keep running and are adopted)",
                    spec.node,
                )
            _retire(agent)
            info = None
    if info is None:
        agent = ray_cluster.create_agent(NodeAgent, spec.node_id, spec.node, _env(spec), spec)
        info = agent.call_sync("info", timeout=START_TIMEOUT_S)
        log.info("started the agent of node %s at %s", spec.node, info["url"])
    assert agent is not None
    if info["failed"]:
        _retire(agent)
        raise ConfigError(
            f"the gpupanel agent of node {spec.node!r} cannot start: {info['failed']}"
        )
    if info["version"] != __version__:
        _retire(agent)
        raise ConfigError(
            f"node {spec.node!r} runs gpupanel {info['version']} and this host {__version__}: "
            "install the same version on every node"
        )
    return RemoteNode(
        spec.node,
        agent,
        info["specs"],
        simulated=bool(info["simulated"]),
        url=str(info["url"]),
        panel=config.panel,
        token=spec.token,
    )


def _reattacher(spec: AgentSpec, config: Config) -> Reattach:
    """How the node of `spec`, once down, finds its agent again (docs/cluster.md, "When a node fails"):
    a live node of the cluster that its name matches (a hostname or an IP: a node that
    rejoins gets a new Ray id) gets an agent, which adopts the workers still running there.
    The same node id again is left to Ray (it restarts the agent; the sample then answers)."""
    current = spec

    def find() -> Reattached | None:
        nonlocal current
        try:
            found = match_node(current.node, ray_cluster.nodes(), f"node {current.node!r}")
        except ConfigError:
            return None  # not back (yet), or its name is ambiguous now
        if found.node_id == current.node_id:
            return None
        moved = replace(current, node_id=found.node_id)
        again = _agent_node(moved, config)
        current = moved
        return Reattached(again.agent, again.url, list(again.specs.values()))

    async def reattach() -> Reattached | None:
        return await asyncio.to_thread(find)

    return reattach


def _retire(agent: ray_cluster.Agent) -> None:
    """Stop an agent's control plane (its state file written; its workers keep running),
    then end its actor, and wait until its name is free."""
    try:
        agent.call_sync("close", timeout=INFO_TIMEOUT_S)
    except GpuPanelError as exc:
        log.info("the agent of node %s did not close (%s); killing it", agent.node, exc)
    agent.kill()
    deadline = time.monotonic() + INFO_TIMEOUT_S
    while ray_cluster.find_agent(agent.node_id, agent.node) is not None:
        if time.monotonic() > deadline:
            raise Unavailable(
                f"the old gpupanel agent of node {agent.node!r} did not end within "
                f"{INFO_TIMEOUT_S:g} s; restart Ray on that node (`ray stop`, then `ray start "
                "--address=<head>:6379`)"
            )
        time.sleep(0.2)
