"""The Python client without a control plane: its place in the layers (the widgets never
import it, importing it starts nothing heavy), the typed snapshot over a mocked HTTP API,
and the magics' status text."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import gpupanel
from gpupanel import client
from gpupanel.client import Panel, PanelError
from gpupanel.core.snapshot import Snapshot
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
