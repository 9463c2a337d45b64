"""gpupanel: a local multi-GPU control plane.

Pinned model-server workers, one OpenAI-compatible proxy, live telemetry, Jupyter panels.

    import gpupanel
    panel = gpupanel.start(simulate=True)   # or gpupanel.connect("http://127.0.0.1:8765")
    panel.show()

In Jupyter: `%load_ext gpupanel`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpupanel._version import __version__

if TYPE_CHECKING:
    from gpupanel.client import Panel


def start(
    config: str | None = None, simulate: bool | str = False, port: int | None = None
) -> Panel:
    """Start the control plane in this process (or attach to the one on the port)."""
    from gpupanel.client import start as _start

    return _start(config=config, simulate=simulate, port=port)


def connect(
    url: str | None = None, wait_s: float = 0.0, token: str | None = None, verify: Any = True
) -> Panel:
    """A Panel on a running control plane (default `$GPUPANEL_URL`, else 127.0.0.1:8765).
    `token`: the admin token or an API key (else `$GPUPANEL_TOKEN`, or this host's stored
    admin token); `verify`: an https control plane's certificate check (True, a PEM path,
    an SSLContext, or False)."""
    from gpupanel.client import connect as _connect

    return _connect(url=url, wait_s=wait_s, token=token, verify=verify)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext gpupanel`."""
    from gpupanel.magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """`%unload_ext gpupanel` / `%reload_ext gpupanel`."""
    from gpupanel.magics import unload_ipython_extension as _unload

    _unload(ipython)


def __getattr__(name: str) -> Any:
    if name in ("Panel", "PanelError"):
        from gpupanel import client

        return getattr(client, name)
    raise AttributeError(f"module 'gpupanel' has no attribute {name!r}")


__all__ = [
    "Panel",
    "PanelError",
    "__version__",
    "connect",
    "load_ipython_extension",
    "start",
    "unload_ipython_extension",
]
