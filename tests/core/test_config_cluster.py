"""`[cluster]` and `[[workers]] node` (docs/cluster.md): parsed, validated, placed on nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpupanel.adapters.config_file import load_config
from gpupanel.core.config import ClusterSettings, parse_config, place_gpus
from gpupanel.errors import ConfigError

GPUS = ["GPU-aaa", "GPU-bbb"]


def _worker(wid: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"id": wid, "runtime": "ollama", "gpu": 0, "port": port, **extra}


def test_no_cluster_section_is_one_host() -> None:
    cfg = parse_config({"workers": [_worker("a", 9001)]}, "f.toml", GPUS)
    assert cfg.cluster == ClusterSettings()
    assert cfg.cluster.engine is None
    assert cfg.workers[0].node is None and cfg.workers[0].gpu == "GPU-aaa"


def test_cluster_section_is_read() -> None:
    data = {
        "cluster": {
            "engine": "ray",
            "address": "10.0.0.1:6379",
            "agents": "all-gpu-nodes",
            "agent_port": 8800,
            "agent_state_dir": "/srv/gpupanel",
        }
    }
    cfg = parse_config(data, "f.toml", GPUS)
    assert cfg.cluster == ClusterSettings(
        "ray", "10.0.0.1:6379", "all-gpu-nodes", 8800, "/srv/gpupanel"
    )


def test_cluster_defaults() -> None:
    cfg = parse_config({"cluster": {"engine": "ray"}}, "f.toml", GPUS)
    assert (cfg.cluster.address, cfg.cluster.agents, cfg.cluster.agent_port) == (
        "auto",
        "config",
        0,
    )


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ({"engine": "dask"}, "f.toml: [cluster]: field 'engine' must be \"ray\""),
        ({"agents": "some"}, "f.toml: [cluster]: field 'agents' must be \"config\""),
        ({"agent_port": 70000}, "f.toml: [cluster]: field 'agent_port' must be an integer from 0"),
        (
            {"adress": "auto"},
            "f.toml: [cluster]: unknown field 'adress' (known: address, agent_port",
        ),
        ({"address": ""}, "f.toml: [cluster]: field 'address' must be a non-empty string"),
    ],
)
def test_cluster_errors_name_file_section_and_field(cluster: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"cluster": cluster}, "f.toml", GPUS)
    assert str(err.value).startswith(message), str(err.value)


def test_cluster_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"f.toml: \[cluster\] must be a table"):
        parse_config({"cluster": "ray"}, "f.toml", GPUS)


def test_unknown_sections_list_cluster_among_the_known() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown section 'clusters' \(known: panel, workers, cluster\)"
    ):
        parse_config({"clusters": {}}, "f.toml", GPUS)


def test_a_worker_on_another_node_keeps_its_gpu_index_for_that_node() -> None:
    workers = [
        _worker("a", 9001),
        _worker("b", 9001, node="node-b", gpu=3),  # same port, other host: fine
        _worker("c", 9002, node="node-b", gpu="GPU-ccc"),  # a UUID this host does not have
    ]
    cfg = parse_config({"workers": workers}, "f.toml", GPUS)
    b, c = cfg.workers[1], cfg.workers[2]
    assert (b.node, b.gpu) == ("node-b", "3")
    assert (c.node, c.gpu) == ("node-b", "GPU-ccc")


def test_ports_are_unique_per_node() -> None:
    workers = [_worker("b", 9001, node="node-b"), _worker("c", 9001, node="node-b")]
    with pytest.raises(ConfigError) as err:
        parse_config({"workers": workers}, "f.toml", GPUS)
    assert str(err.value) == (
        "f.toml: worker 'c': field 'port' 9001 is already used by the panel or another worker "
        "on node 'node-b'"
    )


def test_the_panel_port_is_free_on_other_nodes() -> None:
    cfg = parse_config({"workers": [_worker("b", 8765, node="node-b")]}, "f.toml", GPUS)
    assert cfg.workers[0].port == 8765


def test_worker_ids_are_unique_across_nodes() -> None:
    workers = [_worker("a", 9001, node="node-a"), _worker("a", 9002, node="node-b")]
    with pytest.raises(ConfigError, match="worker 'a': field 'id' is used by another worker"):
        parse_config({"workers": workers}, "f.toml", GPUS)


@pytest.mark.parametrize("gpu", [-1, "gpu0", True, 1.5])
def test_a_remote_gpu_must_be_an_index_or_uuid(gpu: Any) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"workers": [_worker("b", 9001, node="n", gpu=gpu)]}, "f.toml", GPUS)
    assert str(err.value).startswith(
        "f.toml: worker 'b': field 'gpu' must be a GPU UUID ('GPU-...') or an index of that node's"
    )


def test_node_must_be_a_non_empty_string() -> None:
    with pytest.raises(ConfigError, match="worker 'b': field 'node' must be a non-empty string"):
        parse_config({"workers": [_worker("b", 9001, node="")]}, "f.toml", GPUS)


def test_place_gpus_keeps_one_nodes_workers_and_resolves_indexes() -> None:
    workers = [
        _worker("a", 9001),
        _worker("b", 9001, node="node-b", gpu=1),
        _worker("c", 9002, node="node-c"),
    ]
    cfg = parse_config({"workers": workers}, "f.toml", GPUS)
    on_b = place_gpus(cfg, ["GPU-b0", "GPU-b1"], "node-b")
    assert [(w.id, w.gpu) for w in on_b.workers] == [("b", "GPU-b1")]
    here = place_gpus(cfg, GPUS, None)
    assert [(w.id, w.gpu) for w in here.workers] == [("a", "GPU-aaa")]


def test_place_gpus_names_the_worker_and_node_when_the_gpu_is_not_there() -> None:
    cfg = parse_config(
        {
            "workers": [
                _worker("b", 9001, node="node-b", gpu=2),
                _worker("c", 9002, node="x", gpu="GPU-zz"),
            ]
        },
        "f.toml",
        GPUS,
    )
    with pytest.raises(ConfigError) as err:
        place_gpus(cfg, ["GPU-b0"], "node-b")
    assert str(err.value) == (
        "f.toml: worker 'b': field 'gpu' is index 2, but node 'node-b' has 1 GPU(s); use an "
        "index below that, or the GPU's UUID"
    )
    with pytest.raises(
        ConfigError, match=r"field 'gpu' is GPU-zz, which is not on node 'x' \(GPUs: GPU-x0\)"
    ):
        place_gpus(cfg, ["GPU-x0"], "x")


def test_files_of_workers_on_other_nodes_are_not_checked_here(tmp_path: Path) -> None:
    toml = tmp_path / "gpupanel.toml"
    toml.write_text(
        '[cluster]\nengine = "ray"\n\n[[workers]]\nid = "far"\nruntime = "llamacpp"\n'
        'gpu = 0\nport = 9001\nnode = "node-b"\nmodel_path = "/only/on/node-b/model.gguf"\n'
        'command = ["/only/on/node-b/llama-server"]\n'
    )
    cfg = load_config(toml, GPUS)
    assert cfg.workers[0].model_path == "/only/on/node-b/model.gguf"
    # the same worker on this host: its files are checked
    toml.write_text(toml.read_text().replace('node = "node-b"\n', ""))
    with pytest.raises(ConfigError, match="field 'command' names '/only/on/node-b/llama-server'"):
        load_config(toml, GPUS)
