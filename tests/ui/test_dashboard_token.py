"""Credentials on the client side, without a control plane (docs/security.md, "The admin
token"): `connect()` sends the token it resolves; the dashboard's kernel uses it, and neither
the page's widgets nor its messages ever contain it; `gpupanel dashboard` hands it to Voila's
kernels through the environment only, and guards its page with a token of its own.

A small HTTP server stands in for a control plane with keys on: `/panel/health` is open,
everything else needs the admin token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import ipywidgets.widgets.widget as widget_module
import pytest

from gpupanel.client import Panel, PanelError, connect
from gpupanel.dashboard.app import Dashboard
from gpupanel.launchers import voila
from gpupanel.ui.widgets import PanelWidget
from tests.ui.test_widget_units import synthetic

TOKEN = "gpt-the-admin-token-of-the-fake-panel"
WRONG = "gpt-a-token-this-panel-refuses"


class FakePanel:
    """A control plane with keys on, as far as a client can tell."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                fake.seen.append((self.path, auth))
                if self.path == "/panel/health":
                    self.answer(200, {"status": "ok"})
                elif auth != f"Bearer {TOKEN}":
                    message = "this route needs the admin token as `Authorization: Bearer <token>`"
                    error = {"message": message, "type": "invalid_request_error"}
                    self.answer(401, {"error": {**error, "code": "unauthorized"}})
                else:
                    self.answer(200, synthetic(n=2))

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def tokens(self) -> set[str | None]:
        return {auth for path, auth in self.seen if path != "/panel/health"}


@pytest.fixture
def fake() -> Iterator[FakePanel]:
    panel = FakePanel()
    panel.thread.start()
    yield panel
    panel.server.shutdown()
    panel.server.server_close()


@pytest.fixture
def no_local_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No token of this host's state directory, config or environment leaks in."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("GPUPANEL_TOKEN", raising=False)
    monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def widget_states() -> str:
    """Every live widget's state, as the page's front end would receive it."""
    states = []
    for w in list(widget_module._instances.values()):
        try:
            states.append(json.dumps(w.get_state(), default=str))
        except Exception as exc:  # a widget closed meanwhile
            states.append(repr(exc))
    return "\n".join(states)


def test_connect_sends_the_token_and_a_refusal_says_how_to_pass_one(
    fake: FakePanel, no_local_token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    panel = connect(fake.url)  # /panel/health is open: connecting needs no token
    with pytest.raises(PanelError) as err:
        panel.snapshot()
    assert err.value.status == 401
    for hint in ("token=", "$GPUPANEL_TOKEN", "admin-token"):
        assert hint in str(err.value)
    panel.shutdown()

    panel = connect(fake.url, token=TOKEN)
    assert len(panel.snapshot()["gpus"]) == 2
    assert TOKEN not in repr(panel) and TOKEN not in panel.url
    panel.shutdown()

    monkeypatch.setenv("GPUPANEL_TOKEN", WRONG)
    panel = connect(fake.url)
    with pytest.raises(PanelError) as err:
        panel.restart("gpu0")
    assert "the token from $GPUPANEL_TOKEN was refused (HTTP 401)" in str(err.value)
    assert WRONG not in str(err.value)
    panel.shutdown()
    assert fake.tokens() == {None, f"Bearer {TOKEN}", f"Bearer {WRONG}"}


def test_the_dashboard_kernel_uses_the_token_and_the_page_never_shows_it(
    fake: FakePanel, no_local_token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUPANEL_URL", fake.url)
    monkeypatch.setenv("GPUPANEL_TOKEN", TOKEN)  # what `gpupanel dashboard` gives its kernels
    views: list[PanelWidget] = []

    def show(panel: Panel) -> PanelWidget:
        views.append(PanelWidget(panel, autostart=False))
        return views[-1]

    board = Dashboard(show=show).start()
    try:
        assert board.panel is not None and board._thread is None
        views[0].refresh()
        assert fake.tokens() == {f"Bearer {TOKEN}"}
        states = widget_states()
        assert "gpupanel-worker" in states and "GPU-00000000" in states  # the panel is there
        assert TOKEN not in states
    finally:
        board.close()
        for view in views:
            view.close()
        if board.panel is not None:
            board.panel.shutdown()


def test_a_refused_dashboard_says_so_without_the_token(
    fake: FakePanel, no_local_token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUPANEL_TOKEN", WRONG)
    views: list[PanelWidget] = []

    def show(panel: Panel) -> PanelWidget:
        views.append(PanelWidget(panel, autostart=False))
        return views[-1]

    board = Dashboard(fake.url, show=show).start()
    try:
        views[0].refresh()
        assert "was refused (HTTP 401)" in views[0].error.value
        assert fake.tokens() == {f"Bearer {WRONG}"}
        assert WRONG not in widget_states()
    finally:
        board.close()
        for view in views:
            view.close()
        if board.panel is not None:
            board.panel.shutdown()


class FakeVoila:
    """What `subprocess.Popen` would have started: its command line and environment."""

    started: list[FakeVoila] = []  # noqa: RUF012

    def __init__(self, cmd: list[str], env: dict[str, str], **kwargs: Any) -> None:
        self.cmd, self.env, self.returncode = cmd, env, 0
        FakeVoila.started.append(self)

    def poll(self) -> int | None:
        return None

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def send_signal(self, signum: int) -> None:
        pass

    pid = 2**22 + 1  # no such process


def test_gpupanel_dashboard_hands_the_token_to_the_kernels_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(voila.subprocess, "Popen", FakeVoila)
    monkeypatch.setattr(voila, "check_port_free", lambda port, option="--port": None)
    monkeypatch.setattr(voila, "_listening", lambda port: True)
    monkeypatch.setattr(voila, "voila_available", lambda: True)
    monkeypatch.setattr(voila, "answers", lambda url: True)
    (tmp_path / "gpupanel.toml").write_text(f'[panel]\nstate_dir = "{tmp_path / "mine"}"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUPANEL_TOKEN", raising=False)
    monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "admin-token").write_text(TOKEN + "\n")
    FakeVoila.started.clear()

    assert voila.serve_dashboard(17999, "http://127.0.0.1:8765") == 0
    [proc] = FakeVoila.started
    out = capsys.readouterr().out
    assert TOKEN not in out and TOKEN not in " ".join(proc.cmd)
    assert proc.env["GPUPANEL_TOKEN"] == TOKEN  # the kernels' environment
    assert proc.env["GPUPANEL_CONFIG"] == str(tmp_path / "gpupanel.toml")
    page_token = proc.env["JUPYTER_TOKEN"]
    assert len(page_token) >= 32 and page_token != TOKEN and "--token" in proc.cmd
    assert f"gpupanel dashboard: http://127.0.0.1:17999/?token={page_token}" in out
    assert f"its kernels use the token from {tmp_path / 'mine' / 'admin-token'}" in out

    # Without a token (a control plane without keys), the page needs none either, as before.
    (tmp_path / "mine" / "admin-token").unlink()
    FakeVoila.started.clear()
    assert voila.serve_dashboard(17999, "http://127.0.0.1:8765") == 0
    [proc] = FakeVoila.started
    assert "--token" not in proc.cmd and "JUPYTER_TOKEN" not in proc.env
    assert "GPUPANEL_TOKEN" not in proc.env
    assert "gpupanel dashboard: http://127.0.0.1:17999/  " in capsys.readouterr().out


# ---- in a real browser -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dashboard_of_a_control_plane_with_keys_in_a_browser(
    browser: Any, tmp_path: Path, sim_dir: Path
) -> None:
    """`gpupanel serve` with keys and `gpupanel dashboard`, both run in the directory of their
    gpupanel.toml: the dashboard finds the admin token by itself, its page needs the page
    token printed in its URL, and neither the page nor its widgets ever contain the admin
    token."""
    from playwright.sync_api import expect

    from gpupanel.adapters.token import read_admin_token
    from gpupanel.sim.workstation import parse_spec
    from tests.conftest import free_port
    from tests.e2e.conftest import kill_simulated, wait_for
    from tests.ui.test_dashboard_browser import WIDGETS_TIMEOUT_MS, new_page

    parse_spec("1x24").save(sim_dir)
    (tmp_path / "gpupanel.toml").write_text('[panel]\nauth = "keys"\n')
    port, dashboard_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("GPUPANEL_TOKEN", None)
    env.pop("GPUPANEL_CONFIG", None)
    serve = subprocess.Popen(
        [sys.executable, "-m", "gpupanel", "serve", "--simulate", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    dashboard: subprocess.Popen[str] | None = None
    page = None
    try:
        wait_for(lambda: httpx.get(f"{url}/panel/health", trust_env=False).is_success, 30, "serve")
        token = read_admin_token(tmp_path / "state" / "gpupanel")
        assert token is not None
        dashboard = subprocess.Popen(
            [sys.executable, "-m", "gpupanel", "dashboard", "--port", str(dashboard_port),
             "--url", url],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert dashboard.stdout is not None
        first = dashboard.stdout.readline()
        prefix = f"gpupanel dashboard: http://127.0.0.1:{dashboard_port}/?token="
        assert first.startswith(prefix) and token not in first, first
        address = first.split()[2]
        assert token not in dashboard.stdout.readline()  # where the kernels' token comes from

        plain = httpx.get(f"http://127.0.0.1:{dashboard_port}/", trust_env=False)
        assert plain.status_code in (302, 403) or "login" in str(plain.url)  # not the page
        served = httpx.get(address, trust_env=False, follow_redirects=True)
        assert served.status_code == 200 and token not in served.text

        page = new_page(browser)
        page.goto(address)
        page.wait_for_selector(".gpupanel-gpu", timeout=WIDGETS_TIMEOUT_MS)
        expect(page.locator(".gpupanel-worker")).to_have_count(1, timeout=30_000)
        expect(page.locator(".gpupanel-worker-gpu0")).to_contain_text("running", timeout=60_000)
        assert token not in page.content()
        assert token not in page.evaluate("() => document.documentElement.outerHTML")
        page.close()
        page = None
        admin = {"Authorization": f"Bearer {token}"}
        httpx.post(f"{url}/panel/workers/gpu0/stop", headers=admin, timeout=60, trust_env=False)
    finally:
        if page is not None:
            page.close()
        if dashboard is not None:
            dashboard.send_signal(signal.SIGINT)
            dashboard.wait(30)
        serve.terminate()
        serve.wait(30)
        kill_simulated(sim_dir)
