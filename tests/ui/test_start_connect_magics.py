"""`gpupanel.start()` / `gpupanel.connect()` and the `%gpupanel` magics, on a real in-process
control plane over a simulated workstation."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

import gpupanel
from gpupanel.client import Panel, PanelError
from gpupanel.sim.workstation import parse_spec
from tests.conftest import free_port
from tests.e2e.conftest import kill_simulated, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def workstation(sim_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    parse_spec("2x24").save(sim_dir)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    yield sim_dir
    kill_simulated(sim_dir)


def running(panel: Panel) -> dict[str, dict[str, object]] | None:
    workers = panel.workers
    return workers if workers and all(w["status"] == "running" for w in workers.values()) else None


def test_start_in_process_then_connect_and_attach(workstation: Path) -> None:
    port = free_port()
    panel = gpupanel.start(simulate=True, port=port)
    try:
        assert panel.in_process and repr(panel).endswith("(in this process)>")
        assert gpupanel.start(simulate=True, port=port) is panel  # started once per port
        workers = wait_for(lambda: running(panel), 30, "zero-config workers running")
        assert sorted(workers) == ["gpu0", "gpu1"]
        snap = panel.snapshot()
        assert snap["simulated"] is True and len(snap["gpus"]) == 2
        assert panel.base_url("gpu1") == f"http://127.0.0.1:{port}/proxy/gpu1/v1"

        remote = gpupanel.connect(f"http://127.0.0.1:{port}")
        assert not remote.in_process
        assert {w: v["pid"] for w, v in remote.workers.items()} == {
            w: v["pid"] for w, v in panel.workers.items()
        }
        with pytest.raises(PanelError) as err:
            remote.start("nope")
        assert err.value.status == 404 and "no worker 'nope'" in str(err.value)
        with pytest.raises(PanelError, match="no gpupanel control plane answers"):
            gpupanel.connect(f"http://127.0.0.1:{free_port()}")
    finally:
        for wid in panel.workers:
            panel.stop(wid)
        panel.shutdown()


def test_start_attaches_to_a_control_plane_another_process_owns(workstation: Path) -> None:
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "gpupanel", "serve", "--simulate", "--port", str(port)],
        env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        remote = gpupanel.connect(f"http://127.0.0.1:{port}", wait_s=30)
        wait_for(lambda: running(remote), 30, "workers of the other process")
        attached = gpupanel.start(simulate=True, port=port)
        assert not attached.in_process  # one owner per host: it attached instead
        assert attached.workers.keys() == remote.workers.keys()
        for wid in remote.workers:
            remote.stop(wid)
    finally:
        serve.terminate()
        serve.wait(30)


def test_magics_load_status_control_and_reload(
    workstation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    shell = InteractiveShell.instance()
    shell.config.GpuPanelMagics.simulate = True
    shell.config.GpuPanelMagics.port = port
    shell.config.GpuPanelMagics.show_on_load = False
    try:
        shell.run_line_magic("load_ext", "gpupanel")
        panel = gpupanel.connect(f"http://127.0.0.1:{port}")
        before = wait_for(lambda: running(panel), 30, "workers running")
        shell.run_line_magic("gpupanel", "status")
        out = capsys.readouterr().out
        assert "SIMULATED 2 GPU(s)" in out and "gpu0: running" in out
        shell.run_line_magic("gpupanel", "restart gpu0")
        assert "gpu0: running" in capsys.readouterr().out
        assert panel.workers["gpu0"]["pid"] != before["gpu0"]["pid"]
        shell.run_line_magic("gpupanel", "load gpu1 qwen2.5:0.5b --num-ctx 2048")
        assert "not found" in capsys.readouterr().out  # not pulled: a clear one-line error
        shell.run_line_magic("gpupanel", "frobnicate")
        assert "usage:" in capsys.readouterr().out

        pids = {w: v["pid"] for w, v in panel.workers.items()}
        shell.run_line_magic("reload_ext", "gpupanel")  # stops the in-kernel plane, starts anew
        again = wait_for(lambda: running(panel), 30, "workers after reload")
        assert {w: v["pid"] for w, v in again.items()} == pids  # adopted, not restarted
        assert all(v["adopted"] for v in again.values())
    finally:
        panel = gpupanel.connect(f"http://127.0.0.1:{port}")
        for wid in panel.workers:
            panel.stop(wid)
        shell.run_line_magic("unload_ext", "gpupanel")
    with pytest.raises(PanelError):
        gpupanel.connect(f"http://127.0.0.1:{port}")  # nothing left half-running
