"""Placing workers on a cluster's nodes, node names, the token, errors across the wire
(core/cluster.py; docs/cluster.md)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from gpupanel.core.cluster import (
    ClusterNode,
    Secret,
    agent_name,
    error_from_wire,
    error_to_wire,
    match_node,
    place,
    safe_name,
)
from gpupanel.core.config import parse_config
from gpupanel.errors import (
    ConfigError,
    Conflict,
    GpuPanelError,
    NotFound,
    RuntimeRequestError,
    TooLarge,
    Unavailable,
)

HEAD = ClusterNode("aa11" * 14, "head", "10.0.0.1", gpus=2)
B = ClusterNode("bb22" * 14, "gpu-b", "10.0.0.2", gpus=4)
C = ClusterNode("cc33" * 14, "gpu-c", "10.0.0.3", gpus=0)
NODES = [HEAD, B, C]


def _config(*workers: dict[str, Any], agents: str = "config") -> Any:
    items = [{"runtime": "ollama", "gpu": 0, **w} for w in workers]
    data = {"cluster": {"engine": "ray", "agents": agents}, "workers": items}
    return parse_config(data, "g.toml", ["GPU-h0", "GPU-h1"])


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("bb22" * 14, B),  # the Ray node id
        ("BB22BB", B),  # a unique prefix of 6 or more, any case
        ("gpu-c", C),  # the hostname
        ("GPU-C", C),
        ("10.0.0.1", HEAD),  # the IP
    ],
)
def test_match_node_by_id_prefix_hostname_or_ip(value: str, found: ClusterNode) -> None:
    assert match_node(value, NODES, "g.toml: worker 'w'") == found


def test_match_node_names_the_nodes_when_there_is_none() -> None:
    with pytest.raises(ConfigError) as err:
        match_node("gpu-z", NODES, "g.toml: worker 'w'")
    message = str(err.value)
    assert message.startswith(
        "g.toml: worker 'w': field 'node' is 'gpu-z', which is no live node of the Ray cluster "
        "(nodes: head 10.0.0.1 id aa11aa11aa11; gpu-b 10.0.0.2 id bb22bb22bb22;"
    )
    assert "`ray start --address=<head>:6379`" in message


def test_match_node_refuses_a_name_shared_by_several_nodes() -> None:
    twins = [ClusterNode("d" * 56, "vm", "10.0.0.9"), ClusterNode("e" * 56, "vm", "10.0.0.9")]
    for value in ("vm", "10.0.0.9"):
        with pytest.raises(ConfigError) as err:
            match_node(value, twins, "g.toml: worker 'w'")
        assert f"field 'node' is {value!r}, which names 2 nodes of the Ray cluster" in str(
            err.value
        )
        assert "use the Ray node id (`ray list nodes`)" in str(err.value)
    # a short prefix is not taken as an id
    with pytest.raises(ConfigError, match="no live node"):
        match_node("ddd", twins, "g.toml: worker 'w'")


def test_place_splits_workers_by_node_and_names_nodes_as_the_config_does() -> None:
    config = _config(
        {"id": "here", "port": 9001},
        {"id": "b1", "port": 9001, "node": "gpu-b", "gpu": 1},
        {"id": "b2", "port": 9002, "node": "10.0.0.2"},  # the same node by its IP
        {"id": "h2", "port": 9002, "node": "head"},  # the plane's own host, by name
    )
    placed = place(config, NODES, HEAD.node_id, all_gpu_nodes=False)
    assert placed.local_name == "head"
    assert [(w.id, w.node, w.gpu) for w in placed.local.workers] == [
        ("here", None, "GPU-h0"),
        ("h2", None, "0"),  # resolved against this host's GPUs by the caller (place_gpus)
    ]
    assert list(placed.agents) == [B.node_id]
    name, on_b = placed.agents[B.node_id]
    assert name == "gpu-b"
    assert [(w.id, w.node, w.gpu) for w in on_b.workers] == [
        ("b1", "gpu-b", "1"),
        ("b2", "gpu-b", "0"),
    ]
    assert on_b.cluster == config.cluster and on_b.panel == config.panel


def test_all_gpu_nodes_gives_every_node_with_gpus_an_agent() -> None:
    placed = place(
        _config({"id": "here", "port": 9001}, agents="all-gpu-nodes"), NODES, HEAD.node_id, True
    )
    assert {nid: (name, c.workers) for nid, (name, c) in placed.agents.items()} == {
        B.node_id: ("gpu-b", ())  # C has no GPU; the head is the plane's own
    }


def test_hosts_with_one_hostname_are_told_apart_by_their_ids() -> None:
    # `ray.cluster_utils.Cluster` on one machine: every node is "vm" at one IP
    nodes = [ClusterNode("1" * 56, "vm", "10.0.0.5", 1), ClusterNode("2" * 56, "vm", "10.0.0.5", 1)]
    placed = place(_config({"id": "a", "port": 9001}), nodes, "1" * 56, all_gpu_nodes=True)
    assert placed.local_name == "vm-11111111"
    assert [name for name, _ in placed.agents.values()] == ["vm-22222222"]


def test_a_config_name_that_collides_with_the_plane_host_name_is_made_unique() -> None:
    nodes = [ClusterNode("1" * 56, "head", "10.0.0.5"), ClusterNode("2" * 56, "b", "10.0.0.6")]
    config = _config({"id": "a", "port": 9001, "node": "2222222"})
    placed = place(config, nodes, "1" * 56, all_gpu_nodes=False)
    assert placed.local_name == "head"
    assert [name for name, _ in placed.agents.values()] == ["2222222"]
    # a worker naming node "head" while the plane's host is also called "head"
    nodes = [ClusterNode("1" * 56, "x", "10.0.0.5"), ClusterNode("2" * 56, "head", "10.0.0.6")]
    config = _config(
        {"id": "a", "port": 9001, "node": "head"}, {"id": "b", "port": 9002, "node": "x"}
    )
    placed = place(config, nodes, "1" * 56, all_gpu_nodes=False)
    assert placed.local_name == "x" and [n for n, _ in placed.agents.values()] == ["head"]


def test_agent_and_directory_names() -> None:
    assert agent_name("abc") == "gpupanel-agent-abc"
    assert safe_name("gpu-b.example.org") == "gpu-b.example.org"
    assert safe_name("fe80::1/x") == "fe80__1_x"
    assert safe_name("..") == "node"


def test_a_secret_never_shows_itself_and_survives_pickling() -> None:
    secret = Secret("gpc-very-secret")
    assert "very" not in repr(secret) and "very" not in str(secret) and "very" not in f"{secret}"
    assert "very" not in repr([secret, {"token": secret}])
    copy = pickle.loads(pickle.dumps(secret))
    assert copy.value == "gpc-very-secret" and copy == secret and hash(copy) == hash(secret)
    assert copy != Secret("other")


@pytest.mark.parametrize(
    "exc",
    [
        NotFound("no worker 'x'"),
        Conflict("does not fit", "load_refused"),
        TooLarge("too big"),
        Unavailable("stopped"),
        GpuPanelError("odd"),
    ],
)
def test_errors_cross_the_wire_as_the_same_kind(exc: GpuPanelError) -> None:
    back = error_from_wire(error_to_wire(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and back.code == exc.code


def test_a_workers_refusal_keeps_its_status_and_unknown_kinds_stay_errors() -> None:
    back = error_from_wire(error_to_wire(RuntimeRequestError("worker w: 404", 404)))
    assert isinstance(back, RuntimeRequestError) and back.status == 404
    odd = error_from_wire({"kind": "SystemExit", "message": "m", "code": None})
    assert type(odd) is GpuPanelError and str(odd) == "m"
