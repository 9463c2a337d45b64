"""The Python client without a control plane: its place in the layers (the widgets never
import it, importing it starts nothing heavy), the typed snapshot over a mocked HTTP API,
and the magics' status text."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import gpupanel
from gpupanel import client
from gpupanel.adapters.token import ensure_admin_token
from gpupanel.client import Panel, PanelError
from gpupanel.core.snapshot import Snapshot
from gpupanel.errors import GpuPanelError
from gpupanel.magics import status_text
from tests.ui.test_widget_units import synthetic


def imported_after(statement: str) -> set[str]:
    """The gpupanel modules a fresh interpreter has imported after `statement`."""
    code = f"import sys; {statement}; print(' '.join(m for m in sys.modules if 'gpupanel' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(out.stdout.split())


def test_the_widgets_never_import_the_client() -> None:
    modules = imported_after("import gpupanel.ui.widgets")
    assert "gpupanel.ui.source" in modules
    assert not {"gpupanel.client", "gpupanel.magics", "gpupanel.cli"} & modules


def test_importing_the_client_leaves_the_control_plane_and_widgets_alone() -> None:
    modules = imported_after("import gpupanel.client")
    assert not {m for m in modules if m.startswith(("gpupanel.api", "gpupanel.services"))}
    assert not {m for m in modules if m.startswith("gpupanel.ui")}


def test_the_package_api_is_the_client() -> None:
    assert gpupanel.Panel is client.Panel and gpupanel.PanelError is client.PanelError
    assert callable(gpupanel.start) and callable(gpupanel.connect)
    assert callable(gpupanel.load_ipython_extension)


def mocked(handler: Any) -> Panel:
    panel = Panel("http://gpupanel.test")
    panel.http.close()
    panel.http = httpx.Client(base_url=panel.url, transport=httpx.MockTransport(handler))
    return panel


@pytest.fixture
def remote() -> Iterator[Panel]:
    data = synthetic(n=2)
    panel = mocked(lambda request: httpx.Response(200, json=data))
    yield panel
    panel.shutdown()


def test_typed_snapshot_is_the_json_rebuilt(remote: Panel) -> None:
    snap = remote.typed_snapshot()
    assert isinstance(snap, Snapshot) and not remote.in_process and not remote.closed
    assert snap.to_json() == remote.snapshot()
    assert [w.id for w in snap.workers] == ["gpu0", "gpu1"]
    remote.shutdown()
    assert remote.closed


def test_an_unreadable_snapshot_is_a_panel_error() -> None:
    panel = mocked(lambda request: httpx.Response(200, json={"time": "soon"}))
    try:
        with pytest.raises(PanelError, match="cannot read"):
            panel.typed_snapshot()
    finally:
        panel.shutdown()


def test_status_text_of_a_snapshot(remote: Panel) -> None:
    text = status_text(remote.typed_snapshot())
    lines = text.splitlines()
    assert lines[0] == "gpupanel: SIMULATED 2 GPU(s)"
    assert "GPU 0 NVIDIA Test Card (simulated): 4.0/24.0 GiB, util 5 %" in lines[1]
    assert any(line.startswith("  gpu1: running, pin verified, GPU 1") for line in lines)
    assert "[warning] near_full_gpu: GPU 0 is full" in text


# ---- request bodies: built and checked by the API's own models (gpupanel.api.schemas) ----------


class Recorder:
    """A mocked control plane that records each request and answers what a route would."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if request.url.path.endswith("/pull"):
            return httpx.Response(200, content=b'{"status": "success"}\n')
        return httpx.Response(200, json={"app": {"name": "x"}, "worker": "a"})

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.seen]


@pytest.fixture
def recorded() -> Iterator[tuple[Panel, Recorder]]:
    recorder = Recorder()
    panel = mocked(recorder)
    yield panel, recorder
    panel.shutdown()


def test_request_bodies_are_the_api_models(recorded: tuple[Panel, Recorder]) -> None:
    panel, recorder = recorded
    panel.load("a", "llama3.1:8b")
    panel.load("a", "m", keep_alive="300", num_ctx=8192, exclusive=True, force=True)
    panel.load("a", "m", keep_alive="30m")
    panel.unload("a", "m")
    panel.pull("a", "m")
    panel.register_app("team-a", workers=["a"])
    panel.delete_app("team/a")
    assert recorder.bodies() == [
        {"model": "llama3.1:8b", "exclusive": False, "force": False},
        # A bare number of seconds goes as a number: Ollama takes a string only as a duration.
        {"model": "m", "keep_alive": 300, "num_ctx": 8192, "exclusive": True, "force": True},
        {"model": "m", "keep_alive": "30m", "exclusive": False, "force": False},
        {"model": "m"},
        {"model": "m"},
        {"name": "team-a", "workers": ["a"]},
        None,
    ]
    assert [(r.method, r.url.raw_path.decode()) for r in recorder.seen][-2:] == [
        ("POST", "/panel/apps"),
        ("DELETE", "/panel/apps/team%2Fa"),
    ]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.load("a", "m", keep_alive="bogus"), "field 'keep_alive' must be seconds"),
        (lambda p: p.load("a", "m", keep_alive=float("nan")), "field 'keep_alive' must be"),
        (lambda p: p.load("a", "m", num_ctx=0), "field 'num_ctx' must be a positive integer"),
        (lambda p: p.load("a", ""), "field 'model' is required: the model to load"),
        (lambda p: p.unload("a", ""), "field 'model' is required: the model to unload"),
        (lambda p: p.pull("a", ""), "field 'model' is required: the model to pull"),
        (lambda p: p.register_app("has space"), "field 'name' is required: 1-64 of"),
    ],
)
def test_bad_bodies_are_refused_before_anything_is_sent(
    recorded: tuple[Panel, Recorder], call: Any, message: str
) -> None:
    panel, recorder = recorded
    with pytest.raises(PanelError, match=re.escape(message)) as raised:
        call(panel)
    assert raised.value.status == 400
    assert recorder.seen == []


# ---- credentials (docs/security.md, "The admin token") -----------------------------------------

SECRET = "gpt-never-shown-anywhere"


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without gpupanel.toml and a state directory of its own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("GPUPANEL_TOKEN", raising=False)
    monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_token_comes_from_the_argument_the_environment_or_this_hosts_state(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = "http://127.0.0.1:8765"
    assert client.resolve_token(local) == (None, "")
    stored = ensure_admin_token(here / "xdg" / "gpupanel")
    assert client.resolve_token(local) == (stored, f"from {here / 'xdg/gpupanel/admin-token'}")
    assert client.resolve_token("http://localhost:1")[0] == stored
    assert client.resolve_token(f"http://{socket.gethostname()}:8765")[0] == stored
    # The stored admin token is never sent to another host.
    assert client.resolve_token("http://gpu-box.example.org:8765") == (None, "")
    assert client.resolve_token("https://10.9.8.7:8765") == (None, "")
    monkeypatch.setenv("GPUPANEL_TOKEN", "from-env")
    assert client.resolve_token(local) == ("from-env", "from $GPUPANEL_TOKEN")
    assert client.resolve_token("http://gpu-box.example.org") == (
        "from-env",
        "from $GPUPANEL_TOKEN",
    )
    assert client.resolve_token(local, "given") == ("given", "given to connect()")


def test_the_state_directory_and_host_are_those_of_the_local_config(here: Path) -> None:
    (here / "gpupanel.toml").write_text('[panel]\nstate_dir = "mine"\nhost = "10.9.8.7"\n')
    assert client.local_state_dir() == Path("mine")
    token = ensure_admin_token(Path("mine"))
    assert client.resolve_token("https://10.9.8.7:8765")[0] == token  # the address it binds
    assert client.resolve_token("http://[::1]:8765")[0] == token
    (here / "gpupanel.toml").write_text("[panel\n")  # unreadable: as if there were none
    assert client.local_state_dir() == here / "xdg" / "gpupanel"
    with pytest.raises(GpuPanelError, match=re.escape("gpupanel.toml: not valid TOML: Expected")):
        client.local_state_dir(strict=True)


def authed(handler: Any, token: str | None, source: str = "") -> Panel:
    """A Panel with a token on a mocked control plane (the token's header kept)."""
    panel = Panel("http://gpupanel.test", token=token, token_source=source)
    headers = panel.http.headers
    panel.http.close()
    transport = httpx.MockTransport(handler)
    panel.http = httpx.Client(base_url=panel.url, transport=transport, headers=headers)
    return panel


def refusing(status: int, code: str | None) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        error = {"message": "refused here.", "type": "x", "code": code}
        return httpx.Response(status, json={"error": error})

    return handler


def test_a_refusal_for_credentials_says_how_to_pass_them_and_never_shows_the_token() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return refusing(401, "unauthorized")(request)

    panel = authed(handler, None)
    with pytest.raises(PanelError) as err:
        panel.workers  # noqa: B018
    assert err.value.status == 401 and seen == [None]
    assert str(err.value).startswith("refused here; HTTP 401: this control plane needs")
    assert "token=... to gpupanel.connect(), or set $GPUPANEL_TOKEN" in str(err.value)

    panel = authed(handler, SECRET, "from $GPUPANEL_TOKEN")
    with pytest.raises(PanelError) as err:
        panel.restart("a")
    assert seen[-1] == f"Bearer {SECRET}"
    assert "the token from $GPUPANEL_TOKEN was refused (HTTP 401)" in str(err.value)
    with pytest.raises(PanelError) as err:
        list(panel.pull_lines("a", "m"))
    assert err.value.status == 401 and "was refused" in str(err.value)
    assert SECRET not in str(err.value) and SECRET not in repr(panel)

    panel = authed(refusing(403, "admin_only"), SECRET, "given to connect()")
    with pytest.raises(
        PanelError, match=re.escape("the token given to connect() was refused (HTTP 403)")
    ):
        panel.ensure()
    panel = authed(refusing(403, "host_not_allowed"), SECRET)
    with pytest.raises(PanelError) as err:
        panel.ensure()
    assert str(err.value) == "refused here."  # not about credentials: no hint


def test_an_https_control_plane_is_checked_with_the_certificate_given(tmp_path: Path) -> None:
    with pytest.raises(PanelError, match=r"verify='.*missing.pem': cannot load certificates"):
        Panel("https://127.0.0.1:1", verify=tmp_path / "missing.pem")
    assert Panel("https://127.0.0.1:1", verify=False).http is not None


def test_log_and_stop_process_speak_the_panel_routes() -> None:
    seen: list[tuple[str, str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.url.query.decode(), request.content))
        if request.url.path.endswith("/log"):
            return httpx.Response(200, json={"worker": "gpu0", "lines": ["a", "b"]})
        if request.url.path == "/panel/processes/4242/stop":
            return httpx.Response(200, json={"result": "pid 4242 (python) terminated"})
        return httpx.Response(409, json={"error": {"message": "not a worker", "code": "x"}})

    panel = mocked(handler)
    try:
        assert panel.log("gpu0", 7) == ["a", "b"]
        assert panel.stop_process(4242, force=True) == "pid 4242 (python) terminated"
        with pytest.raises(PanelError, match="not a worker") as refused:
            panel.stop_process(4243)
        assert refused.value.status == 409
    finally:
        panel.shutdown()
    assert seen[0][:3] == ("GET", "/panel/workers/gpu0/log", "lines=7")
    assert seen[1][:2] == ("POST", "/panel/processes/4242/stop")
    assert json.loads(seen[1][3]) == {"force": True} and json.loads(seen[2][3]) == {"force": False}
