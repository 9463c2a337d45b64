"""The configuration (docs/api.md, "Configuration"): parsed from plain data, validated.

Pure: the caller reads the TOML file and passes the GPUs' UUIDs (in index order) so that a
worker's `gpu` may be given as an index and is resolved to its UUID here. Every error names
the source file, the worker and the field, and says what is expected.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpupanel.core.defaults import DEFAULT_PANEL_PORT, DEFAULT_WORKER_PORT, LOOPBACK
from gpupanel.core.origins import allowed_origin
from gpupanel.errors import ConfigError

# DEFAULT_*_PORT live in gpupanel.core.defaults; re-exported for existing importers.
__all__ = [
    "APP_EXPIRY_S",
    "CLUSTER_AGENTS",
    "CLUSTER_ENGINES",
    "DEFAULT_PANEL_PORT",
    "DEFAULT_WORKER_PORT",
    "ID_MAX",
    "RUNTIMES",
    "ClusterSettings",
    "Config",
    "PanelSettings",
    "WorkerSpec",
    "default_config",
    "parse_config",
    "place_gpus",
]

RUNTIMES = ("ollama", "llamacpp", "vllm")
ID_MAX = 64
"""A worker id names its log file (`logs/<id>.log`) and a segment of its URLs
(`/proxy/<id>/...`, `/panel/workers/<id>/...`), so it is short and of safe characters."""
_ID = re.compile(r"[a-z0-9_][a-z0-9_-]*")
_ID_CHARS = "lowercase letters, digits, '-' and '_', not starting with '-'"
APP_EXPIRY_S = 7 * 24 * 3600.0
"""An app registered with the panel (POST /panel/apps) and not seen for this long is forgotten."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker should be: runtime, GPU (a UUID), port and launch details.

    `command` replaces the runtime's executable (e.g. `["gpupanel", "sim", "ollama"]` for the
    simulated Ollama); `args` are appended to the runtime's own arguments. `model_path`,
    `context`, `parallel` and `alias` are for llama.cpp (and vLLM); `models` lists what is
    expected on the worker (missing ones raise a warning). `node` names the host of a Ray
    cluster that runs it (a hostname, IP or Ray node id; docs/cluster.md); None is the host
    of the control plane. On another node, `gpu` is that node's GPU: a UUID, or an index
    kept as its digits until the node resolves it (`place_gpus`).
    """

    id: str
    runtime: str
    gpu: str
    port: int
    models: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    model_path: str | None = None
    context: int | None = None
    parallel: int | None = None
    alias: str | None = None
    autostart: bool = True
    node: str | None = None
    gpu_memory_utilization: float | None = None
    """vLLM only: the share of the card's memory vLLM reserves at start
    (`--gpu-memory-utilization`; None: vLLM's default 0.9). docs/vllm.md."""


@dataclass(frozen=True, slots=True)
class PanelSettings:
    """The control plane's own settings."""

    host: str = LOOPBACK
    port: int = DEFAULT_PANEL_PORT
    state_dir: str | None = None
    near_full_percent: float = 95.0
    ready_timeout_s: float = 60.0
    stop_grace_s: float = 10.0
    restart_backoff_s: float = 1.0
    load_margin_gib: float = 0.5
    strict_loads: bool = False
    app_expiry_s: float = APP_EXPIRY_S
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed beyond the defaults (loopback on any port, the configured host,
    app://, file://, tauri://, vscode-webview://), e.g. "https://notebooks.example.org";
    a "*" in the host part matches any label ("https://*.example.org")."""
    auth: str = "off"
    """"off": anyone who can reach the port may use it (loopback, one user); "keys": the
    proxy needs an API key and /panel writes the admin token (docs/security.md)."""
    tls_cert: str | None = None
    tls_key: str | None = None
    usage_retention_days: int = 90
    """Days of usage history (`gpupanel usage`, `/panel/usage`) kept in the state dir."""


AUTH_MODES = ("off", "keys")
CLUSTER_ENGINES = ("ray",)
CLUSTER_AGENTS = ("config", "all-gpu-nodes")


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """`[cluster]`: workers on several hosts of a Ray cluster (docs/cluster.md).

    `engine` None is one host (no Ray); "ray" attaches to the cluster at `address` ("auto":
    the one `ray start` made on this machine). `agents`: which nodes get a node agent, those
    that the workers' `node` fields name ("config") or every node with GPUs
    ("all-gpu-nodes"). `agent_port` is where each agent serves its node's workers (0: a
    free port, reported to the plane); `agent_state_dir` its state directory on its host
    (None: `$XDG_STATE_HOME/gpupanel/agents/<node>` there)."""

    engine: str | None = None
    address: str = "auto"
    agents: str = "config"
    agent_port: int = 0
    agent_state_dir: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """The panel settings and the workers, as validated from `source`."""

    panel: PanelSettings
    workers: tuple[WorkerSpec, ...]
    source: str = "<default>"
    cluster: ClusterSettings = ClusterSettings()

    def with_command(self, runtime: str, command: Sequence[str]) -> Config:
        """This config with `command` as the executable of `runtime` workers that name none
        (how `--simulate` swaps `ollama serve` for the simulated Ollama)."""
        workers = tuple(
            replace(w, command=tuple(command)) if w.runtime == runtime and not w.command else w
            for w in self.workers
        )
        return replace(self, workers=workers)

    def worker(self, worker_id: str) -> WorkerSpec | None:
        """The spec of `worker_id`, if configured."""
        return next((w for w in self.workers if w.id == worker_id), None)


def default_config(gpus: Sequence[str]) -> Config:
    """Zero-config: one Ollama worker per GPU, ids `gpu0...`, ports from DEFAULT_WORKER_PORT."""
    workers = tuple(
        WorkerSpec(
            id=f"gpu{i}",
            runtime="ollama",
            gpu=uuid,
            port=DEFAULT_WORKER_PORT + i,
        )
        for i, uuid in enumerate(gpus)
    )
    return Config(panel=PanelSettings(), workers=workers)


class _Fields:
    """Typed reads of one table's fields with errors that name where the field is."""

    def __init__(self, data: Mapping[str, Any], where: str, known: Collection[str]) -> None:
        self.data = data
        self.where = where
        unknown = sorted(set(data).difference(known))
        if unknown:
            raise ConfigError(
                f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )

    def fail(self, name: str, expected: str) -> ConfigError:
        return ConfigError(
            f"{self.where}: field {name!r} must be {expected}, got {self.data[name]!r}"
        )

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.data.get(name, default)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.fail(name, "a non-empty string")
        return value

    def integer(
        self, name: str, default: int | None = None, lo: int = 1, hi: int = 2**31
    ) -> int | None:
        value = self.data.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(name, f"an integer from {lo} to {hi}")
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        """A number in [lo, hi] (so never NaN or infinite)."""
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise self.fail(name, f"a number from {_plain(lo)} to {_plain(hi)}")
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, "true or false")
        return value

    def texts(self, name: str) -> tuple[str, ...]:
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, "a list of strings")
        return tuple(value)

    def table(self, name: str) -> dict[str, str]:
        value = self.data.get(name, {})
        if not isinstance(value, dict) or not all(
            isinstance(v, (str, int, float)) for v in value.values()
        ):
            raise self.fail(name, 'a table of NAME = "value"')
        return {str(k): str(v) for k, v in value.items()}


def _plain(x: float) -> str:
    """`x` as people write it: 3600, 31536000, 0.05 (never 3.1536e+07)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _show_id(wid: str) -> str:
    """The id as an error quotes it: a long one is cut, so the message stays one short line."""
    return repr(wid) if len(wid) <= 40 else f"{wid[:32]!r}... ({len(wid)} characters)"


_FLAGS_FROM_FIELDS: dict[str, dict[str, str | None]] = {
    "llamacpp": {
        "--host": None, "--port": "port", "-m": "model_path", "--model": "model_path",
        "-c": "context", "--ctx-size": "context", "-np": "parallel", "--parallel": "parallel",
        "-a": "alias", "--alias": "alias",
    },
    "vllm": {
        "--host": None, "--port": "port", "--max-model-len": "context",
        "--gpu-memory-utilization": "gpu_memory_utilization", "--served-model-name": "alias",
    },
}  # fmt: skip
"""The options gpupanel passes a runtime from a worker's fields (None: from nothing, the
loopback address): set again in `args`, they would win and the worker would not be what
gpupanel estimates, reaches and shows."""


def _check_args(spec: WorkerSpec, where: str) -> None:
    flags = _FLAGS_FROM_FIELDS.get(spec.runtime, {})
    for arg in spec.args:
        field = flags.get(arg.split("=", 1)[0], "")
        if field == "":
            continue
        flag = arg.split("=", 1)[0]
        if field is None:
            raise ConfigError(
                f"{where}: field 'args' must not set {flag}: gpupanel binds every worker to "
                "127.0.0.1 so it is reached only through gpupanel's proxy (and its keys); to "
                "serve other hosts, set [panel] host (docs/security.md)"
            )
        raise ConfigError(
            f"{where}: field 'args' must not set {flag}: gpupanel sets it from field "
            f"{field!r}; set that field instead"
        )


def _check_id(wid: Any, where: str) -> str:
    if wid is None:
        raise ConfigError(f"{where}: missing field 'id' (e.g. id = \"gpu0\")")
    if not isinstance(wid, str):
        raise ConfigError(f"{where}: field 'id' must be a string, got {wid!r}")
    if len(wid) > ID_MAX:
        raise ConfigError(
            f"{where}: field 'id' is {len(wid)} characters long; at most {ID_MAX} (it names "
            "the worker's log file and its URLs): use a shorter id"
        )
    if not _ID.fullmatch(wid):
        raise ConfigError(
            f"{where}: field 'id' must be {_ID_CHARS} (it names the worker's log file and its "
            f"URLs), got {wid!r}"
        )
    return wid


def _check_auth(value: str | None, f: _Fields) -> str:
    if value not in AUTH_MODES:
        raise f.fail(
            "auth", '"off" (no keys: loopback, one user) or "keys" (API keys and an admin token)'
        )
    return value


def _check_origin(origin: str, f: _Fields) -> str:
    """An allowed-origins entry, parsed as the HTTP guard will read it (core/origins.py)."""
    try:
        allowed_origin(origin)
    except ValueError as exc:
        raise ConfigError(f"{f.where}: field 'allowed_origins' has {origin!r}: {exc}") from None
    return origin.lower()


_PANEL_FIELDS = frozenset(f.name for f in dataclasses.fields(PanelSettings))
_CLUSTER_FIELDS = frozenset(f.name for f in dataclasses.fields(ClusterSettings))
_WORKER_FIELDS = frozenset(f.name for f in dataclasses.fields(WorkerSpec))
_PANEL_DEFAULTS = PanelSettings()
_WORKER_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(WorkerSpec)
    if f.default is not dataclasses.MISSING
}


def _resolve_gpu(value: Any, gpus: Sequence[str], f: _Fields) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(gpus):
            return gpus[value]
        raise ConfigError(
            f"{f.where}: field 'gpu' is index {value}, but this host has {len(gpus)} GPU(s)"
        )
    if isinstance(value, str) and value.isdigit():
        return _resolve_gpu(int(value), gpus, f)
    if isinstance(value, str) and value.startswith("GPU-"):
        if gpus and value not in gpus:
            raise ConfigError(
                f"{f.where}: field 'gpu' is {value}, which is not on this host "
                f"(GPUs: {', '.join(gpus)})"
            )
        return value
    raise ConfigError(
        f"{f.where}: field 'gpu' must be a GPU UUID ('GPU-...') or an index, got {value!r}"
    )


def _node_gpu(value: Any, f: _Fields) -> str:
    """The `gpu` of a worker on another node: a UUID, or an index kept as its digits (that
    node resolves it, `place_gpus`)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and (value.isdigit() or value.startswith("GPU-")):
        return value
    raise ConfigError(
        f"{f.where}: field 'gpu' must be a GPU UUID ('GPU-...') or an index of that node's "
        f"GPUs, got {value!r}"
    )


def place_gpus(config: Config, gpus: Sequence[str], node: str | None) -> Config:
    """`config` with only the workers of `node` (None: the control plane's host, whose
    workers name no node), each one's `gpu` resolved against that host's GPUs (UUIDs, in
    index order): an index becomes the UUID, a UUID must be there. ConfigError naming the
    worker and the field otherwise."""
    placed = []
    for w in config.workers:
        if w.node != node:
            continue
        where = f"{config.source}: worker {_show_id(w.id)}"
        host = "this host" if node is None else f"node {node!r}"
        if w.gpu.isdigit():
            if int(w.gpu) >= len(gpus):
                raise ConfigError(
                    f"{where}: field 'gpu' is index {w.gpu}, but {host} has {len(gpus)} GPU(s); "
                    "use an index below that, or the GPU's UUID"
                )
            w = replace(w, gpu=gpus[int(w.gpu)])
        elif gpus and w.gpu not in gpus:
            raise ConfigError(
                f"{where}: field 'gpu' is {w.gpu}, which is not on {host} (GPUs: {', '.join(gpus)})"
            )
        placed.append(w)
    return replace(config, workers=tuple(placed))


def _parse_cluster(data: Any, source: str) -> ClusterSettings:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [cluster] must be a table")
    c = _Fields(data, f"{source}: [cluster]", _CLUSTER_FIELDS)
    d = ClusterSettings()
    engine = c.text("engine", d.engine)
    if engine is not None and engine not in CLUSTER_ENGINES:
        raise c.fail("engine", '"ray" (the only cluster engine: docs/cluster.md), or left out')
    agents = c.text("agents", d.agents)
    if agents not in CLUSTER_AGENTS:
        raise c.fail(
            "agents",
            '"config" (the nodes that workers name in their field \'node\') or "all-gpu-nodes"',
        )
    return ClusterSettings(
        engine=engine,
        address=c.text("address", d.address) or d.address,
        agents=agents,
        agent_port=c.integer("agent_port", d.agent_port, 0, 65535) or 0,
        agent_state_dir=c.text("agent_state_dir", d.agent_state_dir),
    )


def parse_config(data: Mapping[str, Any], source: str, gpus: Sequence[str]) -> Config:
    """Validate `data` (the parsed TOML of `source`) against this host's GPUs (a worker on
    another node is checked against its node's GPUs there: `place_gpus`)."""
    unknown = sorted(set(data) - {"panel", "workers", "cluster"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown section {unknown[0]!r} (known: panel, workers, cluster)"
        )
    cluster = _parse_cluster(data.get("cluster", {}), source)
    panel_data = data.get("panel", {})
    if not isinstance(panel_data, dict):
        raise ConfigError(f"{source}: [panel] must be a table")
    p = _Fields(panel_data, f"{source}: [panel]", _PANEL_FIELDS)
    d = _PANEL_DEFAULTS
    panel = PanelSettings(
        host=p.text("host", d.host) or d.host,
        port=p.integer("port", d.port, 1, 65535) or d.port,
        state_dir=p.text("state_dir", d.state_dir),
        near_full_percent=p.number("near_full_percent", d.near_full_percent, 1, 100),
        ready_timeout_s=p.number("ready_timeout_s", d.ready_timeout_s, 1, 3600),
        stop_grace_s=p.number("stop_grace_s", d.stop_grace_s, 0, 600),
        restart_backoff_s=p.number("restart_backoff_s", d.restart_backoff_s, 0.05, 600),
        load_margin_gib=p.number("load_margin_gib", d.load_margin_gib, 0, 1024),
        strict_loads=p.flag("strict_loads", d.strict_loads),
        app_expiry_s=p.number("app_expiry_s", d.app_expiry_s, 1, 365 * 24 * 3600),
        allowed_origins=tuple(_check_origin(o, p) for o in p.texts("allowed_origins")),
        auth=_check_auth(p.text("auth", d.auth), p),
        tls_cert=p.text("tls_cert", d.tls_cert),
        tls_key=p.text("tls_key", d.tls_key),
        usage_retention_days=p.integer("usage_retention_days", d.usage_retention_days, 1, 36500)
        or d.usage_retention_days,
    )
    if (panel.tls_cert is None) != (panel.tls_key is None):
        raise ConfigError(
            f"{source}: [panel]: fields 'tls_cert' and 'tls_key' go together: give both "
            "(the certificate chain and its private key, PEM files) or neither"
        )
    raw_workers = data.get("workers")
    if raw_workers is None:
        return Config(
            panel=panel, workers=default_config(gpus).workers, source=source, cluster=cluster
        )
    if not isinstance(raw_workers, list):
        raise ConfigError(f"{source}: 'workers' must be an array of tables ([[workers]])")
    workers: list[WorkerSpec] = []
    for i, item in enumerate(raw_workers):
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: workers[{i}] must be a table")
        raw_id = item.get("id")
        where = (
            f"{source}: worker {_show_id(raw_id)}"
            if isinstance(raw_id, str)
            else f"{source}: workers[{i}]"
        )
        f = _Fields(item, where, _WORKER_FIELDS)
        wid = _check_id(raw_id, where)
        if any(w.id == wid for w in workers):
            raise ConfigError(f"{where}: field 'id' is used by another worker; ids must be unique")
        runtime = f.text("runtime", "ollama")
        if runtime not in RUNTIMES:
            raise ConfigError(
                f"{where}: field 'runtime' must be one of {', '.join(RUNTIMES)}, got {runtime!r}"
            )
        if "gpu" not in item:
            raise ConfigError(f"{where}: missing field 'gpu' (a GPU UUID or an index)")
        port = f.integer("port", None, 1, 65535)
        if port is None:
            raise ConfigError(f"{where}: missing field 'port'")
        node = f.text("node")
        # Ports are per host: workers on other nodes may use the same one.
        if (port == panel.port and node is None) or any(
            w.port == port and w.node == node for w in workers
        ):
            raise ConfigError(
                f"{where}: field 'port' {port} is already used by the panel or another worker"
                + ("" if node is None else f" on node {node!r}")
            )
        spec = WorkerSpec(
            id=wid,
            runtime=runtime,
            gpu=_resolve_gpu(item["gpu"], gpus, f) if node is None else _node_gpu(item["gpu"], f),
            port=port,
            models=f.texts("models"),
            env=f.table("env"),
            command=f.texts("command"),
            args=f.texts("args"),
            model_path=f.text("model_path"),
            context=f.integer("context"),
            parallel=f.integer("parallel", None, 1, 1024),
            alias=f.text("alias"),
            autostart=f.flag("autostart", _WORKER_DEFAULTS["autostart"]),
            node=node,
            gpu_memory_utilization=(
                f.number("gpu_memory_utilization", 0.9, 0.01, 1.0)
                if item.get("gpu_memory_utilization") is not None
                else None
            ),
        )
        for name, field_name in (("CUDA_VISIBLE_DEVICES", "gpu"), ("OLLAMA_HOST", "port")):
            if name in spec.env:
                raise ConfigError(
                    f"{where}: field 'env' must not set {name}: gpupanel sets it from field "
                    f"{field_name!r} so the worker stays pinned and reachable"
                )
        _check_args(spec, where)
        if runtime == "llamacpp" and spec.model_path is None:
            raise ConfigError(f"{where}: a llamacpp worker needs field 'model_path' (a .gguf file)")
        if runtime == "vllm" and not spec.models and spec.model_path is None:
            raise ConfigError(
                f"{where}: a vllm worker needs field 'model_path' (a local model folder) or "
                "'models' (the one model it serves, e.g. a Hugging Face name)"
            )
        if runtime != "vllm" and spec.gpu_memory_utilization is not None:
            raise ConfigError(
                f"{where}: field 'gpu_memory_utilization' is for vllm workers only; "
                f"remove it from this {runtime} worker"
            )
        workers.append(spec)
    return Config(panel=panel, workers=tuple(workers), source=source, cluster=cluster)
