"""The dashboard app and the demo's pieces without a browser: waiting for a control plane,
the Voila command line, `gpupanel dashboard` without Voila, the demo's workers and the
traffic generator's back-off."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import ipywidgets as widgets
import pytest

from gpupanel import cli
from gpupanel.client import Panel, PanelError
from gpupanel.dashboard.app import Dashboard, waiting_message
from gpupanel.errors import GpuPanelError
from gpupanel.launchers import voila
from gpupanel.launchers.demo import PULLED, demo_config
from gpupanel.launchers.demo_traffic import Caller, TrafficGenerator
from gpupanel.sim.workstation import parse_spec
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


class FlakyConnect:
    """A `connect` that fails `failures` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[str] = []

    def __call__(self, url: str) -> Panel:
        self.calls.append(url)
        if len(self.calls) <= self.failures:
            raise PanelError(f"no gpupanel control plane answers at {url}")
        return Panel(url)


def test_dashboard_says_what_it_waits_for_then_attaches() -> None:
    connect = FlakyConnect(failures=2)
    shown = widgets.Label("the panel")
    board = Dashboard("http://127.0.0.1:9/", retry_s=0.05, connect=connect, show=lambda p: shown)
    assert board.url == "http://127.0.0.1:9"
    board.start()
    try:
        message = board.message.value
        assert "No gpupanel control plane answers at http://127.0.0.1:9" in message
        for hint in ("gpupanel serve", "gpupanel demo", "GPUPANEL_URL", "every 0.05 s"):
            assert hint in message
        deadline = time.monotonic() + 10
        while board.root.children != (shown,) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert board.root.children == (shown,)
        assert board.panel is not None and len(connect.calls) == 3
        assert (
            board.root.has_class("gpupanel-dashboard") if hasattr(board.root, "has_class") else True
        )
    finally:
        board.close()
        if board.panel is not None:
            board.panel.http.close()


def test_dashboard_attaches_at_once_and_reads_the_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUPANEL_URL", "http://127.0.0.1:4321")
    connect = FlakyConnect(failures=0)
    board = Dashboard(connect=connect, show=lambda p: widgets.Label("ok")).start()
    assert connect.calls == ["http://127.0.0.1:4321"] and board._thread is None
    assert board.panel is not None
    board.panel.http.close()


def test_dashboard_shows_a_failing_panel_as_text() -> None:
    def broken(panel: Panel) -> widgets.Widget:
        raise RuntimeError("boom")

    board = Dashboard("http://x:1", connect=FlakyConnect(0), show=broken)
    assert board.try_attach() is True
    assert "the panel failed" in board.message.value and "RuntimeError: boom" in board.message.value


def test_waiting_message_escapes_html() -> None:
    text = waiting_message("http://h/<b>", 3, 2.0, "it's <broken>")
    assert "&lt;b&gt;" in text and "&lt;broken&gt;" in text and "attempt 3" in text


def test_dashboard_notebook_is_tiny_and_shipped() -> None:
    path = voila.notebook_path()
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) == 1 and "dashboard()" in "".join(code[0]["source"])
    assert all(c.get("outputs", []) == [] for c in nb["cells"])
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    link = ROOT / "notebooks" / "dashboard.ipynb"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == (ROOT / "src/gpupanel/dashboard/dashboard.ipynb").resolve()


def test_voila_command_listens_on_loopback_and_culls_kernels() -> None:
    cmd = voila.voila_command(17999)
    assert cmd[1:3] == ["-m", "voila"] and cmd[3].endswith("dashboard.ipynb")
    for flag in (
        "--port=17999",
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        "--Voila.port_retries=0",
        "--MappingKernelManager.cull_connected=False",
        "--MappingKernelManager.untracked_message_types=comm_msg",
    ):
        assert flag in cmd
    assert any(c.startswith("--MappingKernelManager.cull_idle_timeout=") for c in cmd)


def test_busy_dashboard_port_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(GpuPanelError, match=f"port {port} on 127.0.0.1 is already") as err:
            voila.check_port_free(port, "--dashboard-port")
        assert "pick another port with --dashboard-port" in str(err.value)


def test_gpupanel_dashboard_without_voila_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(voila, "voila_available", lambda: False)
    assert cli.main(["dashboard", "--port", "17999"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'gpupanel[jupyter]'" in err


def test_demo_and_dashboard_options_parse() -> None:
    args = cli.build_parser().parse_args(
        ["demo", "--port", "9000", "--dashboard-port", "9001", "--no-dashboard", "--duration", "5"]
    )
    assert (args.port, args.dashboard_port, args.no_dashboard, args.duration) == (
        9000, 9001, True, 5.0,
    )  # fmt: skip
    args = cli.build_parser().parse_args(["demo"])
    assert (args.port, args.dashboard_port, args.no_dashboard, args.duration) == (
        8765, 17320, False, None,
    )  # fmt: skip
    args = cli.build_parser().parse_args(["dashboard", "--url", "http://127.0.0.1:1"])
    assert (args.port, args.url) == (17320, "http://127.0.0.1:1")


def test_demo_config_pins_one_worker_per_gpu_on_free_ports(tmp_path: Path) -> None:
    workstation = parse_spec(None)
    config = demo_config(workstation, 8765, tmp_path, {17320})
    assert [w.id for w in config.workers] == ["gpu0", "gpu1", "gpu2", "gpu3"]
    assert [w.gpu for w in config.workers] == [g.uuid for g in workstation.gpus]
    ports = {w.port for w in config.workers}
    assert len(ports) == 4 and not ports & {8765, 17320}
    assert config.panel.state_dir == str(tmp_path) and config.panel.port == 8765
    env = config.workers[0].env
    assert env["GPUPANEL_SIM_PULLED"] == ",".join(PULLED)
    assert env["GPUPANEL_SIM_TOKENS_PER_S"] == "40"


@pytest.mark.timeout(30)
def test_traffic_generator_backs_off_on_errors_and_never_spins() -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    traffic = TrafficGenerator((Caller("chat-ui", dead, ("m",), pause_s=(0.0, 0.0)),)).start()
    try:
        time.sleep(3.0)
    finally:
        traffic.stop()
    stats = traffic.stats["chat-ui"]
    assert stats.ok == 0 and 1 <= stats.failed <= 2  # first try, then 2 s of back-off
    assert stats.last_error and "Connection" in stats.last_error
