"""The Python client of a control plane: `gpupanel.start()` and `gpupanel.connect()` give
a `Panel` (docs/api.md, "Python API").

A Panel speaks to the control plane's HTTP API, so the same calls work on the control plane
in this kernel and on one running elsewhere (`gpupanel serve`, another kernel). In-process,
snapshots are read straight from the runtime (no HTTP, no JSON round trip).

Layers: the client sits above the widgets (`Panel.show()` builds a `gpupanel.ui` panel,
which sees the Panel only as a `gpupanel.ui.source.PanelSource`) and below what uses it
(`gpupanel.cli`, `gpupanel.magics`, `gpupanel.dashboard`, `gpupanel.launchers`). The
control plane itself (`gpupanel.api`, `gpupanel.services`) is imported only by `start()`
and for types, so importing the client stays cheap.

Credentials (docs/security.md, "The admin token"): a Panel sends `Authorization: Bearer
<token>` when it has a token: the one given, else `$GPUPANEL_TOKEN`, else, for a control
plane on this host, the admin token in the state directory `gpupanel serve` uses here. A
token is never part of a URL, a message or a repr.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, overload
from urllib.parse import quote, urlsplit

import httpx

from gpupanel.core.defaults import DEFAULT_PANEL_PORT, DEFAULT_PANEL_URL, TOKEN_ENV, URL_ENV
from gpupanel.core.snapshot import Snapshot
from gpupanel.errors import ConfigError, GpuPanelError

if TYPE_CHECKING:
    from gpupanel.api.schemas import JsonBody
    from gpupanel.services.runtime import ControlPlane
    from gpupanel.ui.side import SideView
    from gpupanel.ui.widgets import PanelWidget

SNAPSHOT_TIMEOUT_S = 5.0
"""A snapshot is cheap: waiting longer means the control plane hangs (say so, retry)."""

Verify = Union[bool, str, "os.PathLike[str]", ssl.SSLContext]
"""How a Panel checks an https control plane's certificate: True (the system's trust store;
for a control plane on this host, its own `[panel] tls_cert` from the local config), a path
(a PEM file of the certificates to trust, e.g. the self-signed one), an SSLContext, or False
(no check)."""


class PanelError(GpuPanelError):
    """The control plane refused or failed a call; `status` is its HTTP status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# ---- where the control plane of this host keeps its state, and its credentials ------------


def local_config(config_file: str | None = None, strict: bool = False) -> dict[str, Any]:
    """The config `gpupanel serve` would read here (`config_file`, `$GPUPANEL_CONFIG`,
    `./gpupanel.toml`), as written, unvalidated; {} without one. A file that cannot be read
    or parsed is a ConfigError with `strict`, else counts as none."""
    from gpupanel.adapters.config_file import find_config

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    try:
        path = find_config(config_file)
        if path is None:
            return {}
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
            return data
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except ValueError as exc:  # not UTF-8, or not TOML
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ConfigError:
        if strict:
            raise
        return {}


def local_panel_settings(config_file: str | None = None, strict: bool = False) -> dict[str, Any]:
    """The `[panel]` table of `local_config`, as written, unvalidated; {} without one."""
    panel = local_config(config_file, strict).get("panel")
    return panel if isinstance(panel, dict) else {}


def local_state_dir(config_file: str | None = None, strict: bool = False) -> Path:
    """The state directory of the control plane `gpupanel serve` would run here: `[panel]
    state_dir` of the config, else `$XDG_STATE_HOME/gpupanel` (docs/api.md, `[panel]`)."""
    from gpupanel.adapters.state import default_state_dir

    named = local_panel_settings(config_file, strict).get("state_dir")
    return Path(named) if isinstance(named, str) and named else default_state_dir()


def on_this_host(url: str) -> bool:
    """Whether `url` names this host: a loopback address or `localhost`, this host's name,
    or the address the local config's `[panel] host` binds to. Only such a control plane is
    sent the admin token of the local state directory."""
    import ipaddress
    import socket

    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        if host == socket.gethostname().lower():
            return True
    configured = local_panel_settings().get("host")
    return isinstance(configured, str) and host == configured.lower()


def resolve_token(url: str, token: str | None = None) -> tuple[str | None, str]:
    """The token to send to the control plane at `url`, and where it came from (for messages; never the token itself): `token`, else
    `$GPUPANEL_TOKEN`, else the admin token stored here, for a control plane on this host."""
    if token:
        return token, "given to connect()"
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env, f"from ${TOKEN_ENV}"
    if on_this_host(url):
        from gpupanel.adapters.token import TOKEN_FILE, read_admin_token

        state_dir = local_state_dir()
        stored = read_admin_token(state_dir)
        if stored:
            return stored, f"from {state_dir / TOKEN_FILE}"
    return None, ""


def pinned_context(cert: str | os.PathLike[str]) -> ssl.SSLContext:
    """Trust exactly the certificate(s) in `cert` (a PEM file), whatever name they are for:
    how a client on this host checks its own control plane's certificate through loopback."""
    context = ssl.create_default_context(cafile=os.fspath(cert))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def resolve_verify(url: str, verify: Verify = True) -> bool | ssl.SSLContext:
    """What httpx checks an https `url`'s certificate with (see `Verify`)."""
    if isinstance(verify, (bool, ssl.SSLContext)):
        if verify is True and url.startswith("https:") and on_this_host(url):
            cert = local_panel_settings().get("tls_cert")
            if isinstance(cert, str) and cert:
                with contextlib.suppress(OSError, ssl.SSLError):
                    return pinned_context(cert)
        return verify
    try:
        context = ssl.create_default_context(cafile=os.fspath(verify))
    except (OSError, ssl.SSLError) as exc:
        raise PanelError(f"verify={os.fspath(verify)!r}: cannot load certificates: {exc}") from None
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def auth_hint(status: int, source: str) -> str:
    """What to do after a 401/403 for want of credentials (never the token itself)."""
    if source:
        return (
            f"the token {source} was refused (HTTP {status}): use the admin token of that "
            "control plane (its state directory's admin-token file), or an API key allowed "
            "to do this"
        )
    return (
        f"HTTP {status}: this control plane needs credentials: pass token=... to "
        f"gpupanel.connect(), or set ${TOKEN_ENV} (the admin token is the admin-token file in "
        "the state directory of the control plane's host)"
    )


AUTH_CODES = frozenset({"admin_only"})
"""403 codes that are about credentials (api/auth.py: an API key on an admin route); a 401
always is."""


def _body(schema: type[JsonBody], /, **fields: Any) -> dict[str, Any]:
    """A request body built by the API's own model (`gpupanel.api.schemas`), so it is
    checked here as the control plane checks it: PanelError 400 naming the field, before
    anything is sent."""
    from gpupanel.api.schemas import parse_body

    try:
        body = parse_body(schema, fields)
    except GpuPanelError as exc:
        raise PanelError(str(exc), 400) from None
    return body.model_dump(mode="json", exclude_none=True)


class Panel:
    """A handle on one control plane: telemetry, worker control, model loading."""

    def __init__(
        self,
        url: str,
        plane: ControlPlane | None = None,
        timeout: float = 600.0,
        token: str | None = None,
        verify: Verify = True,
        token_source: str = "",
    ) -> None:
        self.url = url.rstrip("/")
        self.plane = plane
        self._token_source = (token_source or "given to Panel()") if token else ""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            trust_env=False,
            headers=headers,
            verify=resolve_verify(self.url, verify),
        )

    def __repr__(self) -> str:
        where = "in this process" if self.plane else "remote"
        return f"<gpupanel.Panel {self.url} ({where})>"

    @property
    def in_process(self) -> bool:
        """True when the control plane runs in this process (this kernel)."""
        return self.plane is not None

    @property
    def closed(self) -> bool:
        """True once `shutdown()` ran: nothing answers through this Panel any more."""
        return self.http.is_closed

    # ---- HTTP --------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise PanelError(
                f"no gpupanel control plane answers at {self.url} ({exc}); start one with "
                "`gpupanel serve` or gpupanel.start()"
            ) from None
        try:
            body = response.json()
        except ValueError:
            if response.status_code in (401, 403):
                raise self._refused(response.status_code, f"{self.url}{path} refused") from None
            raise PanelError(
                f"{self.url}{path} answered {response.status_code} without JSON",
                response.status_code,
            ) from None
        if response.status_code >= 400:
            raise self._error(response.status_code, body)
        return body

    def _error(self, status: int, body: Any) -> PanelError:
        """The PanelError of an error answer (`{"error": {"message", "code"}}`)."""
        error = body.get("error") if isinstance(body, Mapping) else None
        message = error.get("message") if isinstance(error, Mapping) else str(error or body)
        code = error.get("code") if isinstance(error, Mapping) else None
        if status == 401 or (status == 403 and code in AUTH_CODES):
            return self._refused(status, str(message))
        return PanelError(str(message), status)

    def _refused(self, status: int, message: str) -> PanelError:
        return PanelError(
            f"{message.rstrip('. ')}; {auth_hint(status, self._token_source)}", status
        )

    # ---- telemetry -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The latest snapshot (docs/api.md shapes): gpus, workers, warnings, requests, apps."""
        if self.plane is not None:
            return self.plane.snapshot.to_json()
        return dict(self._call("GET", "/panel/snapshot", timeout=SNAPSHOT_TIMEOUT_S))

    def typed_snapshot(self) -> Snapshot:
        """The latest snapshot as typed values (`gpupanel.core.snapshot.Snapshot`): the
        runtime's own in-process, else rebuilt from the JSON form."""
        if self.plane is not None:
            return self.plane.snapshot
        data = self.snapshot()
        try:
            return Snapshot.from_json(data)
        except (TypeError, ValueError) as exc:
            raise PanelError(f"{self.url} sent a snapshot this client cannot read: {exc}") from None

    @property
    def workers(self) -> dict[str, dict[str, Any]]:
        """Workers by id."""
        return dict(self.snapshot()["workers"])

    def warnings(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/panel/warnings")["warnings"])

    def requests(self) -> list[dict[str, Any]]:
        """Requests in flight through the proxy right now."""
        return list(self._call("GET", "/panel/requests")["requests"])

    def apps(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/panel/apps")["apps"])

    def usage(self, since: str = "7d", by: str = "app", until: str | None = None) -> dict[str, Any]:
        """Usage history over a period (docs/api.md, "Usage history"): requests, errors,
        tokens and GPU-seconds per app, model or worker (`by`), and per hour. `since` and
        `until`: a span back from now ("30m", "24h", "7d"), "now", or epoch seconds."""
        params = {"since": since, "by": by, **({"until": until} if until is not None else {})}
        return dict(self._call("GET", "/panel/usage", params=params))

    def base_url(self, worker_id: str) -> str:
        """The OpenAI base URL of a worker through the proxy (what an app's `base_url` is)."""
        if worker_id not in self.workers:
            raise PanelError(
                f"no worker {worker_id!r} (workers: {', '.join(self.workers) or 'none'})", 404
            )
        return f"{self.url}/proxy/{worker_id}/v1"

    @property
    def v1(self) -> str:
        """The one OpenAI base URL for all workers, routed by model."""
        return f"{self.url}/v1"

    # ---- control -------------------------------------------------------------------------

    def start(self, worker_id: str) -> dict[str, Any]:
        """Start a worker (waits until it is ready)."""
        return dict(self._call("POST", f"/panel/workers/{worker_id}/start")["worker"])

    def stop(self, worker_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/panel/workers/{worker_id}/stop")["worker"])

    def restart(self, worker_id: str) -> dict[str, Any]:
        """Stop and start again, same GPU and port."""
        return dict(self._call("POST", f"/panel/workers/{worker_id}/restart")["worker"])

    def ensure(self) -> list[str]:
        """Start every worker that should run and does not; returns the ids started."""
        return list(self._call("POST", "/panel/workers/ensure")["started"])

    def estimate(
        self,
        worker: str,
        model: str | None = None,
        num_ctx: int | None = None,
        parallel: int | None = None,
        kv_cache_type: str | None = None,
        exclusive: bool = False,
    ) -> dict[str, Any]:
        """The VRAM a load would take on `worker`'s GPU, and whether it fits (with
        `exclusive`, counting the memory its other models would free)."""
        params = {
            "worker": worker,
            "model": model,
            "num_ctx": num_ctx,
            "parallel": parallel,
            "kv_cache_type": kv_cache_type,
            "exclusive": "true" if exclusive else None,
        }
        query = {k: v for k, v in params.items() if v is not None}
        return dict(self._call("GET", "/panel/estimate", params=query)["estimate"])

    def load(
        self,
        worker_id: str,
        model: str,
        keep_alive: str | float | None = None,
        num_ctx: int | None = None,
        exclusive: bool = False,
        force: bool = False,
    ) -> dict[str, Any]:
        """Load a model behind the VRAM guard (PanelError 409 with the numbers if it won't fit).
        `keep_alive`: seconds, or a duration such as "30m"; negative keeps it forever."""
        from gpupanel.api.schemas import LoadBody

        body = _body(
            LoadBody,
            model=model,
            keep_alive=keep_alive,
            num_ctx=num_ctx,
            exclusive=exclusive,
            force=force,
        )
        return dict(self._call("POST", f"/panel/workers/{worker_id}/load", json=body))

    def unload(self, worker_id: str, model: str) -> dict[str, Any]:
        from gpupanel.api.schemas import UnloadBody

        body = _body(UnloadBody, model=model)
        return dict(self._call("POST", f"/panel/workers/{worker_id}/unload", json=body))

    def pull(
        self, worker_id: str, model: str, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Pull a model onto a worker; `progress` gets each progress line. Returns the last."""
        last: dict[str, Any] = {}
        for line in self.pull_lines(worker_id, model):
            last = line
            if progress is not None:
                progress(line)
        return last

    def pull_lines(self, worker_id: str, model: str) -> Iterator[dict[str, Any]]:
        """The progress lines of a pull as they stream."""
        from gpupanel.api.schemas import PullBody

        body = _body(PullBody, model=model)
        try:
            with self.http.stream("POST", f"/panel/workers/{worker_id}/pull", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        answer = r.json()
                    except ValueError:
                        answer = {"error": {"message": r.text}}
                    raise self._error(r.status_code, answer)
                for raw in r.iter_lines():
                    if raw:
                        line = json.loads(raw)
                        if "error" in line:
                            raise PanelError(str(line["error"]))
                        yield line
        except httpx.TransportError as exc:
            raise PanelError(f"pull from {self.url} failed: {exc}") from None

    def log(self, worker_id: str, lines: int = 50) -> list[str]:
        """The last `lines` lines (1-10000) of a worker's log."""
        path = f"/panel/workers/{quote(worker_id, safe='')}/log"
        answer = self._call("GET", path, params={"lines": lines}, timeout=SNAPSHOT_TIMEOUT_S)
        return [str(line) for line in answer["lines"]]

    def stop_process(self, pid: int, force: bool = False) -> str:
        """Stop a process by pid: one in a worker's process tree stops that worker; any other
        (an unmanaged GPU process) only with `force`. The control plane's result line."""
        from gpupanel.api.schemas import StopProcessBody

        body = _body(StopProcessBody, force=force)
        return str(self._call("POST", f"/panel/processes/{int(pid)}/stop", json=body)["result"])

    def register_app(
        self, name: str, owner: str | None = None, workers: list[str] | None = None
    ) -> dict[str, Any]:
        """Register an app (what `X-GPUPanel-App: name` identifies) and the workers it owns."""
        from gpupanel.api.schemas import AppRegistration

        body = _body(AppRegistration, name=name, owner=owner, workers=workers or [])
        return dict(self._call("POST", "/panel/apps", json=body)["app"])

    def delete_app(self, name: str) -> dict[str, Any]:
        """Forget an app: its registration, its workers and its totals. Returns the app as
        it was (PanelError 404 if there is none)."""
        path = "/panel/apps/" + quote(name, safe="")
        return dict(self._call("DELETE", path)["app"])

    # ---- display and lifetime ----------------------------------------------------------------

    @overload
    def show(self, area: None = None) -> PanelWidget: ...
    @overload
    def show(self, area: str) -> SideView: ...
    def show(self, area: str | None = None) -> PanelWidget | SideView:
        """The live widget panel (ipywidgets + bqplot). `area="right"` (or "split-right",
        ... `gpupanel.ui.side.AREAS`): show it in a JupyterLab side area instead, with the
        `sidecar` package (a clear GpuPanelError without it); returns a handle whose
        `close()` closes it."""
        from gpupanel.ui.widgets import PanelWidget

        if area is None:
            return PanelWidget(self)
        from gpupanel.ui.side import SideView, check_area, sidecar_class

        check_area(area)
        sidecar_class()  # the messages before a binder starts for nothing
        return SideView(PanelWidget(self), area)

    def shutdown(self) -> None:
        """Stop the control plane running in this process (workers keep running)."""
        if self.plane is not None:
            self.plane.join(timeout=30)
            _running.pop(self.url, None)
            self.plane = None
        self.http.close()


_running: dict[str, Panel] = {}


def _health(panel: Panel) -> tuple[int | None, Any, str]:
    """`/panel/health` through `panel`: its status (200 only when it says ok) and JSON body,
    or None and why (for a message) when nothing answers as gpupanel does."""
    try:
        r = panel.http.get("/panel/health", timeout=2.0)
        body = r.json()
        if r.status_code != 200 or (isinstance(body, dict) and body.get("status") == "ok"):
            return r.status_code, body, ""
    except httpx.HTTPError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return (
                None,
                None,
                (
                    f" (its TLS certificate is not trusted here: {exc}; pass verify= the "
                    "certificate's PEM file to gpupanel.connect())"
                ),
            )
    except ValueError:
        pass
    return None, None, ""


def answers(url: str, token: str | None = None, verify: Verify = True) -> bool:
    """Does a gpupanel control plane answer at `url`: healthy, or refusing this caller for
    want of credentials (401/403, which `connect` then explains)?"""
    probe = Panel(url, token=token, verify=verify)
    try:
        return _health(probe)[0] in (200, 401, 403)
    finally:
        probe.http.close()


def connect(
    url: str | None = None,
    wait_s: float = 0.0,
    token: str | None = None,
    verify: Verify = True,
) -> Panel:
    """A Panel on the control plane at `url` (default `$GPUPANEL_URL`, else 127.0.0.1:8765),
    waiting up to `wait_s` for it to answer. `token`: the admin token or an API key (else
    `$GPUPANEL_TOKEN`, or for a control plane on this host its stored admin token);
    `verify`: how to check an https control plane's certificate (see `Verify`)."""
    import time

    url = (url or os.environ.get(URL_ENV) or DEFAULT_PANEL_URL).rstrip("/")
    token, source = resolve_token(url, token)
    panel = Panel(url, token=token, verify=verify, token_source=source)
    deadline = time.monotonic() + wait_s
    while True:
        status, body, why = _health(panel)
        if status == 200:
            return panel
        if status is not None and status >= 400 and isinstance(body, dict) and "error" in body:
            panel.http.close()
            raise panel._error(status, body)  # gpupanel answered, and refused
        if time.monotonic() >= deadline:
            panel.http.close()
            raise PanelError(
                f"no gpupanel control plane answers at {url}{why}; start one with "
                "`gpupanel serve` (or gpupanel.start() in a notebook)"
            )
        time.sleep(0.5)


def start(
    config: str | None = None,
    simulate: bool | str = False,
    port: int | None = None,
) -> Panel:
    """Start the control plane in a background thread of this process, or attach to the one
    already serving the port. `simulate=True` (or a spec such as "2x24,2x48") uses a
    simulated workstation; `config` is a gpupanel.toml path."""
    from gpupanel.adapters.state import default_state_dir
    from gpupanel.adapters.token import TOKEN_FILE, ensure_admin_token, read_admin_token
    from gpupanel.api.build import control_plane
    from gpupanel.services.runtime import PanelPortBusy

    spec = None if simulate is False else ("" if simulate is True else str(simulate))
    wanted = port or DEFAULT_PANEL_PORT
    for running in _running.values():
        if running.plane is not None and running.plane.config.panel.port == wanted:
            return running
    plane = control_plane(config, spec, port=port)
    settings = plane.config.panel
    state_dir = Path(settings.state_dir) if settings.state_dir else default_state_dir()
    verify: Verify = pinned_context(settings.tls_cert) if settings.tls_cert else True
    try:
        if settings.auth == "keys":
            token: str | None = ensure_admin_token(state_dir)
        else:
            token = read_admin_token(state_dir)  # the owner of the port may have keys on
    except OSError as exc:
        raise GpuPanelError(
            f"cannot store the admin token in {state_dir}: {exc.strerror or exc}"
        ) from None
    source = f"from {state_dir / TOKEN_FILE}" if token else ""
    token, source = (token, source) if token else resolve_token(plane.url)
    try:
        plane.start_in_thread()
    except PanelPortBusy:
        if answers(plane.url, token, verify):  # one owner per host: attach to it
            return Panel(plane.url, token=token, verify=verify, token_source=source)
        raise
    panel = _running[plane.url] = Panel(
        plane.url, plane, token=token, verify=verify, token_source=source
    )
    return panel


@atexit.register
def _stop_all() -> None:
    """At interpreter exit (a kernel shutting down): stop in-process control planes cleanly
    so the state file is saved; workers keep running and the next start adopts them."""
    for panel in list(_running.values()):
        panel.shutdown()
