"""How the simulated Ollama server reads its environment, the way `ollama serve` does.

Pure functions over a mapping of environment variables, so every quirk is unit-tested:
`OLLAMA_HOST` (bare host, `host:port`, `:port`, a scheme that changes the default port),
Go duration strings for keep-alive, `CUDA_VISIBLE_DEVICES` (UUIDs, UUID prefixes or
indexes; enumeration stops at the first unknown item, as CUDA does), `OLLAMA_ORIGINS`
(checked as Ollama's CORS library checks it at start), and the simulator's own
`GPUPANEL_SIM_*` knobs and fault switches (documented in `gpupanel.sim.ollama`).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpupanel.core.defaults import (
    LOOPBACK,
    SIM_CATALOGUE_ENV,
    SIM_FAULTS_ENV,
    SIM_LOAD_SPEED_ENV,
    SIM_OLLAMA_VERSION_ENV,
    SIM_PULL_SPEED_ENV,
    SIM_PULLED_ENV,
    SIM_REPLY_TOKENS_ENV,
    SIM_TOKENS_PER_S_ENV,
)
from gpupanel.core.units import parse_go_duration
from gpupanel.errors import ConfigError
from gpupanel.sim.workstation import SimGpu, Workstation

DEFAULT_PORT = 11434
DEFAULT_KEEP_ALIVE = 300.0
FOREVER = math.inf
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def env_var(env: Mapping[str, str], key: str) -> str:
    """A variable as Ollama's `envconfig.Var` reads it: trimmed of spaces and of quotes."""
    return env.get(key, "").strip().strip("\"'")


def parse_host(value: str) -> tuple[str, str, int]:
    """`OLLAMA_HOST` as `ollama serve` reads it: (scheme, bind host, port).

    An empty host (`:8080`) means every interface, as Go's listener does. An unparsable port
    falls back to the default one (11434, or 80/443 when a scheme is given).
    """
    value = value.strip().strip("\"'")
    scheme, sep, hostport = value.partition("://")
    default_port = DEFAULT_PORT
    if not sep:
        scheme, hostport = "http", value
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    hostport = hostport.partition("/")[0]
    host, port_text = _split_host_port(hostport)
    if port_text is None:
        host, port_text = LOOPBACK, str(default_port)
        bare = hostport.strip("[]")
        if bare:
            try:
                host = str(ipaddress.ip_address(bare))
            except ValueError:
                host = hostport
    try:
        port = int(port_text)
    except ValueError:
        port = default_port
    if not 0 <= port <= 65535:
        port = default_port
    return scheme, host, port


def _split_host_port(hostport: str) -> tuple[str, str | None]:
    """Go's `net.SplitHostPort`: port None when `hostport` has no (unambiguous) port."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or not hostport[end + 1 :].startswith(":"):
            return hostport, None
        return hostport[1:end], hostport[end + 2 :]
    if hostport.count(":") != 1:
        return hostport, None
    host, _, port = hostport.partition(":")
    return host, port


ORIGIN_SCHEMES = (
    "http://",
    "https://",
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)
"""What an origin without a `*` must start with (gin-contrib/cors with browser extensions)."""


def parse_origins(value: str) -> tuple[str, ...]:
    """`OLLAMA_ORIGINS` as `ollama serve` takes it: comma-separated extra origins, each kept
    as written. Ollama's CORS library refuses to start (a panic) on an origin that has no
    `*` and no allowed scheme (an empty item included) or more than one `*`: a ConfigError
    here, with its message."""
    if not value:
        return ()
    origins = tuple(value.split(","))
    for origin in origins:
        if "*" not in origin and not origin.startswith(ORIGIN_SCHEMES):
            raise ConfigError(
                f"OLLAMA_ORIGINS: {origin!r}: bad origin: origins must contain '*' or include "
                + ",".join(ORIGIN_SCHEMES)
            )
        if origin.count("*") > 1:
            raise ConfigError(f"OLLAMA_ORIGINS: {origin!r}: only one * is allowed")
    return origins


def parse_keep_alive(value: Any) -> float:
    """A request's `keep_alive` in seconds: a number is seconds, a string a Go duration.

    Negative means forever (`math.inf`), 0 unloads at once. Unlike Ollama, a string that is a
    bare number ("-1", "300") is accepted as seconds, as `OLLAMA_KEEP_ALIVE` accepts it.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError:
            try:
                seconds = float(value)
            except ValueError:
                raise ValueError(f'time: invalid duration "{value}"') from None
    else:
        seconds = float(value)
    return FOREVER if seconds < 0 else seconds


def env_keep_alive(text: str) -> float:
    """`OLLAMA_KEEP_ALIVE`: a Go duration or whole seconds; unparsable keeps the default 5m."""
    if not text:
        return DEFAULT_KEEP_ALIVE
    try:
        seconds = parse_go_duration(text)
    except ValueError:
        try:
            seconds = float(int(text))
        except ValueError:
            return DEFAULT_KEEP_ALIVE
    return FOREVER if seconds < 0 else seconds


def parse_size(text: str) -> float:
    """A byte count or rate such as `500000000`, `200MB`, `1.5G` (decimal units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (expected e.g. 200MB or 1.5GB)")
    power: int = " kmgt".index((m[2] or " ").lower())
    return float(m[1]) * 1000.0**power


def resolve_visible(workstation: Workstation, value: str | None) -> tuple[SimGpu, ...]:
    """The GPUs `CUDA_VISIBLE_DEVICES` exposes, in its order.

    Unset means all. Items are indexes, UUIDs or unique UUID prefixes; like CUDA, the list
    stops at the first item that names no device (so "-1" or "" hide every GPU).
    """
    if value is None:
        return workstation.gpus
    out: list[SimGpu] = []
    for item in value.split(","):
        item = item.strip()
        gpu = workstation.resolve(item) if item else None
        if gpu is None and item.startswith("GPU-"):
            matches = [g for g in workstation.gpus if g.uuid.startswith(item)]
            gpu = matches[0] if len(matches) == 1 else None
        if gpu is None:
            break
        if gpu not in out:
            out.append(gpu)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault switches from `GPUPANEL_SIM_FAULTS` (see `gpupanel.sim.ollama`)."""

    ignore_cuda_visible_devices: bool = False
    slow_start: float = 0.0
    crash_after: int = 0
    hang_mid_stream: bool = False
    refuse_models: frozenset[str] = frozenset()
    exit_on_start: bool = False
    spill: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Faults:
        """Parse `name[=value],...`; an unknown switch or a bad value is a ConfigError."""
        values: dict[str, Any] = {}
        refuse: set[str] = set()
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            name, has_value, value = (s.strip() for s in item.partition("="))
            where = f"{SIM_FAULTS_ENV}: {item!r}"
            try:
                if name in ("ignore_cuda_visible_devices", "hang_mid_stream", "exit_on_start"):
                    if has_value:
                        raise ValueError("takes no value")
                    values[name] = True
                elif name == "slow_start":
                    values[name] = float(value)
                    if values[name] < 0:
                        raise ValueError("must be >= 0 seconds")
                elif name == "crash_after":
                    values[name] = int(value)
                    if values[name] < 1:
                        raise ValueError("must be >= 1 (the Nth generation request)")
                elif name == "refuse_model":
                    if not value:
                        raise ValueError("needs a model name")
                    refuse.add(value.lower())
                elif name == "spill":
                    values[name] = float(value) if has_value else 0.5
                    if not 0 < values[name] <= 1:
                        raise ValueError("must be a fraction in (0, 1]")
                else:
                    raise ValueError(
                        "unknown switch; known: ignore_cuda_visible_devices, slow_start=S, "
                        "crash_after=N, hang_mid_stream, refuse_model=NAME, exit_on_start, "
                        "spill[=FRACTION]"
                    )
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return cls(refuse_models=frozenset(refuse), **values)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the simulated server takes from its environment."""

    scheme: str = "http"
    host: str = LOOPBACK
    port: int = DEFAULT_PORT
    sim_dir: Path = Path(".")
    models_dir: Path = Path(".")
    keep_alive: float = DEFAULT_KEEP_ALIVE
    num_parallel: int = 1
    max_loaded_models: int = 0
    max_queue: int = 512
    context_length: int = 0
    kv_cache_type: str = "f16"
    gpu_overhead: int = 0
    sched_spread: bool = False
    cuda_visible_devices: str | None = None
    origins: tuple[str, ...] = ()
    """`OLLAMA_ORIGINS`: browser origins allowed beyond Ollama's defaults."""
    catalogue_path: str | None = None
    pulled: tuple[str, ...] = ()
    tokens_per_s: float = 200.0
    reply_tokens: int = 32
    pull_bytes_per_s: float = 50e9
    load_bytes_per_s: float = 100e9
    version: str = "0.33.0+sim"
    faults: Faults = field(default_factory=Faults)

    @property
    def address(self) -> str:
        """`host:port` as the server logs it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_DEFAULTS = Settings()


def _uint(env: Mapping[str, str], key: str, default: int) -> int:
    text = env_var(env, key)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        return default  # Ollama logs a warning and keeps the default
    return value if value >= 0 else default


def _positive(env: Mapping[str, str], key: str, default: float, *, size: bool = False) -> float:
    text = env_var(env, key)
    if not text:
        return default
    try:
        value = parse_size(text) if size else float(text)
    except ValueError as exc:
        raise ConfigError(f"{key}={text!r}: {exc}") from None
    if value <= 0:
        raise ConfigError(f"{key}={text!r}: must be a positive number")
    return value


def settings_from_env(env: Mapping[str, str], sim_dir: Path) -> Settings:
    """Read the OLLAMA_*, CUDA_VISIBLE_DEVICES and GPUPANEL_SIM_* variables."""
    scheme, host, port = parse_host(env_var(env, "OLLAMA_HOST"))
    models = env_var(env, "OLLAMA_MODELS")
    kv_type = env_var(env, "OLLAMA_KV_CACHE_TYPE").lower()
    pulled = tuple(p.strip() for p in env.get(SIM_PULLED_ENV, "").split(",") if p.strip())
    d = _DEFAULTS
    return Settings(
        scheme=scheme,
        host=host,
        port=port,
        sim_dir=sim_dir,
        models_dir=Path(models).expanduser() if models else sim_dir / "ollama-models",
        keep_alive=env_keep_alive(env_var(env, "OLLAMA_KEEP_ALIVE")),
        num_parallel=max(1, _uint(env, "OLLAMA_NUM_PARALLEL", d.num_parallel)),
        max_loaded_models=_uint(env, "OLLAMA_MAX_LOADED_MODELS", d.max_loaded_models),
        max_queue=max(1, _uint(env, "OLLAMA_MAX_QUEUE", d.max_queue)),
        context_length=_uint(env, "OLLAMA_CONTEXT_LENGTH", d.context_length),
        kv_cache_type=kv_type if kv_type in KV_CACHE_TYPES else d.kv_cache_type,
        gpu_overhead=_uint(env, "OLLAMA_GPU_OVERHEAD", d.gpu_overhead),
        sched_spread=env_var(env, "OLLAMA_SCHED_SPREAD").lower() in ("1", "true", "yes", "on"),
        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        origins=parse_origins(env_var(env, "OLLAMA_ORIGINS")),
        catalogue_path=env_var(env, SIM_CATALOGUE_ENV) or None,
        pulled=pulled,
        tokens_per_s=_positive(env, SIM_TOKENS_PER_S_ENV, d.tokens_per_s),
        reply_tokens=int(_positive(env, SIM_REPLY_TOKENS_ENV, d.reply_tokens)),
        pull_bytes_per_s=_positive(env, SIM_PULL_SPEED_ENV, d.pull_bytes_per_s, size=True),
        load_bytes_per_s=_positive(env, SIM_LOAD_SPEED_ENV, d.load_bytes_per_s, size=True),
        version=env_var(env, SIM_OLLAMA_VERSION_ENV) or d.version,
        faults=Faults.parse(env.get(SIM_FAULTS_ENV, "")),
    )
