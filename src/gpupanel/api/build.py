"""Building a control plane from a config file (or none) and a GPU backend: one recipe for
`gpupanel serve`, `gpupanel demo` and `gpupanel.start()` in a notebook."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from gpupanel.adapters.audit import AuditLog
from gpupanel.adapters.config_file import check_files, find_config, load_config
from gpupanel.adapters.keys import KEYS_FILE, KeyRing
from gpupanel.adapters.state import StateStore
from gpupanel.adapters.token import ensure_admin_token
from gpupanel.api.app import build_app
from gpupanel.api.auth import Credentials
from gpupanel.core.config import Config, PanelSettings, place_gpus
from gpupanel.errors import ConfigError, StateError
from gpupanel.services.runtime import LOOPBACK, ControlPlane
from gpupanel.services.sampler import gpu_backend

if TYPE_CHECKING:
    from gpupanel.api.cluster import Attached

SIM_OLLAMA = (sys.executable, "-m", "gpupanel.sim.ollama")
"""How simulated workstations run `ollama serve`."""


def control_plane(
    config_file: str | None = None,
    simulate: str | None = None,
    host: str | None = None,
    port: int | None = None,
    config: Config | None = None,
    ray: str | None = None,
) -> ControlPlane:
    """A control plane (not yet running) for this host.

    `config` (already validated) wins over `config_file`; otherwise `--config`,
    `$GPUPANEL_CONFIG` or `./gpupanel.toml`, else one Ollama worker per GPU. When simulating,
    Ollama workers that name no command run the simulated Ollama. With `ray` (an address,
    or "auto"), or `[cluster] engine = "ray"`, the plane attaches to that Ray cluster and
    serves the workers of its other nodes too (docs/cluster.md); only then is Ray imported.
    """
    backend = gpu_backend(simulate)
    gpus = [g.uuid for g in backend.sample()]
    if config is None:
        config = load_config(find_config(config_file), gpus)
    loaded = config
    if simulate is not None:
        config = config.with_command("ollama", SIM_OLLAMA)
    panel = replace(config.panel, host=host or config.panel.host, port=port or config.panel.port)
    if panel.host not in LOOPBACK and panel.auth != "keys":
        # docs/security.md, "Binding beyond loopback, TLS": reachable from the network only
        # when every request must carry an API key or the admin token.
        where = "gpupanel.toml" if config.source == "<default>" else config.source
        raise ConfigError(
            f"refusing to listen on {panel.host}: beyond loopback every request must carry "
            f'credentials, and auth is "{panel.auth}"; set auth = "keys" in [panel] of '
            f"{where} and create a key per app with `gpupanel keys create NAME`, or listen on "
            "127.0.0.1 (the default)"
        )
    config = replace(config, panel=panel)
    store = StateStore(Path(panel.state_dir) if panel.state_dir else None)
    credentials = _credentials(panel, store.directory)
    attached = _attach(loaded, ray, simulate, store.directory)
    if attached is not None:
        # This host's workers: those that name no node, or name this one.
        local = place_gpus(attached.local, gpus, None)
        check_files(local)
        if simulate is not None:
            local = local.with_command("ollama", SIM_OLLAMA)
        config = replace(config, workers=local.workers)
    return ControlPlane(
        config,
        backend,
        store,
        lambda plane: build_app(plane, panel.host, credentials, AuditLog(store.directory)),
        remote=attached.remote if attached is not None else (),
        node_name=attached.local_name if attached is not None else None,
    )


def _attach(
    config: Config, ray: str | None, simulate: str | None, state_dir: Path
) -> Attached | None:
    """The plane's share of a Ray cluster when one is asked for (`--ray`, or [cluster]
    engine); None on one host, where no worker may name a node."""
    if ray is None and config.cluster.engine != "ray":
        named = next((w for w in config.workers if w.node is not None), None)
        if named is not None:
            raise ConfigError(
                f"{config.source}: worker {named.id!r}: field 'node' is {named.node!r}, a host "
                "of a Ray cluster, but gpupanel runs on one host here: run `gpupanel serve "
                '--ray`, or set engine = "ray" in [cluster] (docs/cluster.md), or remove the '
                "field"
            )
        return None
    try:
        from gpupanel.api.cluster import attach_cluster
    except ImportError as exc:
        if not (exc.name or "").split(".")[0] == "ray":
            raise
        raise ConfigError(
            "workers on several hosts need Ray, which is not installed here: "
            "pip install 'gpupanel[ray]' (docs/cluster.md)"
        ) from None
    return attach_cluster(config, simulate, ray or config.cluster.address, state_dir)


def _credentials(panel: PanelSettings, state_dir: Path) -> Credentials | None:
    """With `auth = "keys"`: the admin token (made now if the state directory has none) and
    the API keys of `state_dir`; /panel reads need the admin token beyond loopback."""
    if panel.auth != "keys":
        return None
    try:
        token = ensure_admin_token(state_dir)
    except OSError as exc:
        raise StateError(
            f"cannot write the admin token in {state_dir} ({exc.strerror or exc}): make the "
            "state directory writable, or set state_dir in gpupanel.toml's [panel]"
        ) from None
    return Credentials(
        admin_token=token,
        keys=KeyRing(state_dir / KEYS_FILE),
        panel_reads_need_admin=panel.host not in LOOPBACK,
    )
