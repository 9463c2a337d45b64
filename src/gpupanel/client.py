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
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from gpupanel.core.defaults import DEFAULT_PANEL_PORT, DEFAULT_PANEL_URL, LOOPBACK, URL_ENV
from gpupanel.core.snapshot import Snapshot
from gpupanel.errors import GpuPanelError

if TYPE_CHECKING:
    from gpupanel.api.schemas import JsonBody
    from gpupanel.services.runtime import ControlPlane
    from gpupanel.ui.widgets import PanelWidget

SNAPSHOT_TIMEOUT_S = 5.0
"""A snapshot is cheap: waiting longer means the control plane hangs (say so, retry)."""


class PanelError(GpuPanelError):
    """The control plane refused or failed a call; `status` is its HTTP status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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

    def __init__(self, url: str, plane: ControlPlane | None = None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.plane = plane
        self.http = httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)

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
            raise PanelError(
                f"{self.url}{path} answered {response.status_code} without JSON",
                response.status_code,
            ) from None
        if response.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else str(error or body)
            raise PanelError(str(message), response.status_code)
        return body

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
                    error = r.json().get("error", {})
                    raise PanelError(
                        error.get("message", r.text) if isinstance(error, dict) else str(error),
                        r.status_code,
                    )
                for raw in r.iter_lines():
                    if raw:
                        line = json.loads(raw)
                        if "error" in line:
                            raise PanelError(str(line["error"]))
                        yield line
        except httpx.TransportError as exc:
            raise PanelError(f"pull from {self.url} failed: {exc}") from None

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

    def show(self) -> PanelWidget:
        """The live widget panel (ipywidgets + bqplot)."""
        from gpupanel.ui.widgets import PanelWidget

        return PanelWidget(self)

    def shutdown(self) -> None:
        """Stop the control plane running in this process (workers keep running)."""
        if self.plane is not None:
            self.plane.join(timeout=30)
            _running.pop(self.url, None)
            self.plane = None
        self.http.close()


_running: dict[str, Panel] = {}


def answers(url: str) -> bool:
    """Does a healthy gpupanel control plane answer at `url`?"""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        r = httpx.get(f"{url}/panel/health", timeout=2.0, trust_env=False)
        return r.status_code == 200 and r.json().get("status") == "ok"
    return False


def connect(url: str | None = None, wait_s: float = 0.0) -> Panel:
    """A Panel on the control plane at `url` (default `$GPUPANEL_URL`, else 127.0.0.1:8765)."""
    import time

    url = (url or os.environ.get(URL_ENV) or DEFAULT_PANEL_URL).rstrip("/")
    deadline = time.monotonic() + wait_s
    while not answers(url):
        if time.monotonic() >= deadline:
            raise PanelError(
                f"no gpupanel control plane answers at {url}; start one with `gpupanel serve` "
                "(or gpupanel.start() in a notebook)"
            )
        time.sleep(0.5)
    return Panel(url)


def start(
    config: str | None = None,
    simulate: bool | str = False,
    port: int | None = None,
) -> Panel:
    """Start the control plane in a background thread of this process, or attach to the one
    already serving the port. `simulate=True` (or a spec such as "2x24,2x48") uses a
    simulated workstation; `config` is a gpupanel.toml path."""
    from gpupanel.api.build import control_plane
    from gpupanel.services.runtime import PanelPortBusy

    spec = None if simulate is False else ("" if simulate is True else str(simulate))
    url = f"http://{LOOPBACK}:{port or DEFAULT_PANEL_PORT}"
    if url in _running and _running[url].plane is not None:
        return _running[url]
    plane = control_plane(config, spec, port=port)
    try:
        plane.start_in_thread()
    except PanelPortBusy:
        if answers(plane.url):
            return Panel(plane.url)  # one owner per host: attach to it
        raise
    panel = _running[plane.url] = Panel(plane.url, plane)
    return panel


@atexit.register
def _stop_all() -> None:
    """At interpreter exit (a kernel shutting down): stop in-process control planes cleanly
    so the state file is saved; workers keep running and the next start adopts them."""
    for panel in list(_running.values()):
        panel.shutdown()
