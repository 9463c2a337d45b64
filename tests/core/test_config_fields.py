"""The config's allowed keys and defaults come from its dataclasses, and the default
addresses and environment names are defined once (gpupanel.core.defaults)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from gpupanel.core import defaults
from gpupanel.core.config import PanelSettings, WorkerSpec, default_config, parse_config
from gpupanel.errors import ConfigError

GPUS = ["GPU-aaa", "GPU-bbb"]


def test_panel_defaults_are_the_dataclass_defaults() -> None:
    cfg = parse_config({"panel": {}}, "f.toml", GPUS)
    assert cfg.panel == PanelSettings()
    assert cfg.panel.host == defaults.LOOPBACK and cfg.panel.port == defaults.DEFAULT_PANEL_PORT
    assert defaults.DEFAULT_PANEL_URL == "http://127.0.0.1:8765"


def test_zero_config_ports_start_at_the_default_worker_port() -> None:
    ports = [w.port for w in default_config(GPUS).workers]
    assert ports == [defaults.DEFAULT_WORKER_PORT, defaults.DEFAULT_WORKER_PORT + 1]


def test_every_panel_field_is_a_known_key() -> None:
    defaults = PanelSettings()
    # as TOML gives them: lists, not tuples
    panel = {
        f.name: list(v) if isinstance(v := getattr(defaults, f.name), tuple) else v
        for f in dataclasses.fields(PanelSettings)
    }
    panel["state_dir"] = "/tmp/state"
    cfg = parse_config({"panel": panel}, "f.toml", GPUS)
    assert cfg.panel == PanelSettings(state_dir="/tmp/state")


def test_unknown_keys_name_the_known_ones_from_the_dataclasses() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"panel": {"colour": "red"}}, "f.toml", GPUS)
    known = ", ".join(sorted(f.name for f in dataclasses.fields(PanelSettings)))
    assert str(info.value) == f"f.toml: [panel]: unknown field 'colour' (known: {known})"
    with pytest.raises(ConfigError) as info:
        parse_config({"workers": [{"id": "w", "gpu": 0, "port": 11500, "x": 1}]}, "f.toml", GPUS)
    known = ", ".join(sorted(f.name for f in dataclasses.fields(WorkerSpec)))
    assert str(info.value) == f"f.toml: worker 'w': unknown field 'x' (known: {known})"


def test_every_worker_field_is_a_known_key() -> None:
    worker = {
        "id": "w",
        "runtime": "llamacpp",
        "gpu": 1,
        "port": 11500,
        "models": ["m"],
        "env": {"A": "1"},
        "command": ["llama-server"],
        "args": ["--x"],
        "model_path": "/m.gguf",
        "context": 4096,
        "parallel": 2,
        "alias": "m",
        "autostart": False,
    }
    fields = {f.name for f in dataclasses.fields(WorkerSpec)}
    assert set(worker) | {"node", "gpu_memory_utilization"} == fields
    (spec,) = parse_config({"workers": [worker]}, "f.toml", GPUS).workers
    assert spec.gpu == "GPU-bbb" and spec.autostart is False and spec.command == ("llama-server",)
    # on another node of a cluster (tests/core/test_config_cluster.py), the index waits for it
    (spec,) = parse_config({"workers": [{**worker, "node": "n2"}]}, "f.toml", GPUS).workers
    assert (spec.node, spec.gpu) == ("n2", "1")


def test_vllm_worker_fields() -> None:
    """A vLLM worker serves `model_path` or `models[0]`; gpu_memory_utilization is its own
    (docs/vllm.md)."""
    vllm = {"id": "v", "runtime": "vllm", "gpu": 0, "port": 8000}
    (spec,) = parse_config(
        {"workers": [{**vllm, "model_path": "/m/smol", "gpu_memory_utilization": 0.5}]},
        "f.toml",
        GPUS,
    ).workers
    assert (spec.model_path, spec.gpu_memory_utilization, spec.models) == ("/m/smol", 0.5, ())
    (spec,) = parse_config({"workers": [{**vllm, "models": ["org/m"]}]}, "f", GPUS).workers
    assert spec.models == ("org/m",) and spec.gpu_memory_utilization is None
    with pytest.raises(ConfigError, match="worker 'v': a vllm worker needs field 'model_path'"):
        parse_config({"workers": [vllm]}, "f.toml", GPUS)
    with pytest.raises(ConfigError, match=r"f\.toml: worker 'v': field 'gpu_memory_utilization'"):
        parse_config(
            {"workers": [{**vllm, "models": ["m"], "gpu_memory_utilization": 1.5}]}, "f.toml", GPUS
        )
    ollama = {**vllm, "runtime": "ollama", "gpu_memory_utilization": 0.5}
    with pytest.raises(ConfigError, match="'gpu_memory_utilization' is for vllm workers only"):
        parse_config({"workers": [ollama]}, "f.toml", GPUS)


@pytest.mark.parametrize(
    ("runtime", "arg", "named"),
    [
        ("llamacpp", "--host", "binds every worker to 127.0.0.1"),
        ("llamacpp", "--host=0.0.0.0", "binds every worker to 127.0.0.1"),
        ("vllm", "--host", "binds every worker to 127.0.0.1"),
        ("llamacpp", "--port", "from field 'port'"),
        ("llamacpp", "-c", "from field 'context'"),
        ("llamacpp", "--alias=x", "from field 'alias'"),
        ("vllm", "--max-model-len=4096", "from field 'context'"),
        ("vllm", "--gpu-memory-utilization", "from field 'gpu_memory_utilization'"),
    ],
)
def test_args_may_not_set_what_gpupanel_sets(runtime: str, arg: str, named: str) -> None:
    """A worker's `args` come after gpupanel's, so they would win: `--host 0.0.0.0` would
    take the worker past the proxy and its keys; `-c` past the guard's estimate."""
    worker = {"id": "w", "runtime": runtime, "gpu": 0, "port": 8000, "model_path": "/m"}
    with pytest.raises(ConfigError, match=f"worker 'w': field 'args' must not set .*{named}"):
        parse_config({"workers": [{**worker, "args": ["-t", "2", arg, "9"]}]}, "f", GPUS)
    ok = {**worker, "args": ["-t", "2", "-ngl", "20", "--dtype", "float32"]}
    assert parse_config({"workers": [ok]}, "f", GPUS).workers[0].args[-1] == "float32"
    ollama = {**worker, "runtime": "ollama", "model_path": None, "args": [arg]}
    del ollama["model_path"]
    assert parse_config({"workers": [ollama]}, "f", GPUS).workers[0].args == (arg,)


def test_environment_names() -> None:
    names = [v for k, v in vars(defaults).items() if k.endswith("_ENV")]
    assert len(names) == len(set(names))
    assert defaults.SIM_DIR_ENV == "GPUPANEL_SIM_DIR"
    assert defaults.STATE_HOME_ENV == "XDG_STATE_HOME"


def test_app_expiry_defaults_to_seven_days_and_takes_seconds() -> None:
    assert parse_config({}, "f.toml", GPUS).panel.app_expiry_s == 7 * 24 * 3600
    cfg = parse_config({"panel": {"app_expiry_s": 3600}}, "f.toml", GPUS)
    assert cfg.panel.app_expiry_s == 3600.0 and isinstance(cfg.panel.app_expiry_s, float)
    assert parse_config({"panel": {"app_expiry_s": 0.5e1}}, "f", GPUS).panel.app_expiry_s == 5


@pytest.mark.parametrize("value", [0, -1, 0.5, float("inf"), float("nan"), "7d", True, 31536001])
def test_app_expiry_must_be_a_positive_finite_number_of_seconds(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"panel": {"app_expiry_s": value}}, "f.toml", GPUS)
    assert str(info.value) == (
        f"f.toml: [panel]: field 'app_expiry_s' must be a number from 1 to 31536000, got {value!r}"
    )


def test_sharing_fields_are_validated_at_load() -> None:
    panel = parse_config(
        {"panel": {"allowed_origins": ["HTTPS://Notes.Example.org"], "auth": "keys"}},
        "f.toml",
        GPUS,
    ).panel
    assert (panel.allowed_origins, panel.auth) == (("https://notes.example.org",), "keys")
    bad = [
        ({"auth": "on"}, "field 'auth' must be \"off\""),
        ({"allowed_origins": ["https://a.org/path"]}, "an origin is scheme://host[:port]"),
        ({"allowed_origins": ["notes.example.org"]}, "an origin is scheme://host[:port]"),
        ({"allowed_origins": "https://a.org"}, "field 'allowed_origins' must be a list"),
        # what the HTTP guard would refuse at start is refused at load, naming the file
        ({"allowed_origins": ["http://a b"]}, "f.toml: [panel]: field 'allowed_origins' has "),
        ({"allowed_origins": ["http://a.org:99999"]}, "port '99999' is not 1-65535 or *"),
        ({"allowed_origins": ["https://*.a$b.org"]}, "host name with * labels"),
        ({"tls_cert": "/etc/cert.pem"}, "fields 'tls_cert' and 'tls_key' go together"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({"panel": fields}, "f.toml", GPUS)
