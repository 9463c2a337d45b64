"""The panel in a real JupyterLab (issue 15, item 3): Playwright driving Debian's Chromium.

A JupyterLab server on loopback (its own token, root directory, config, data, runtime and
workspace directories) opens a notebook whose first cell is `%load_ext gpupanel`: the
magic starts the control plane in the kernel, on a simulated 2 x 24 GiB workstation with a
worker per GPU (`$GPUPANEL_SIMULATE`, `$GPUPANEL_CONFIG`). The test runs the cells, waits
for the panel's widgets (not the page load), selects GPU 1's row, clicks restart on its
worker and sees the pid change through the API. The second cell shows the panel again in
JupyterLab's right sidebar (`panel.show(area="right")`, with the `sidecar` package).

Everything it starts is stopped in `finally`: the workers (through the API), JupyterLab and
its kernel (`/api/shutdown`, then signals), and any simulated process left. Screenshots go to
test-artifacts/. Without /usr/bin/chromium (or playwright) the test skips, unless
GPUPANEL_REQUIRE_BROWSER=1 (set by CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from gpupanel.sim.workstation import parse_spec
from tests.conftest import free_port
from tests.e2e.conftest import kill_simulated, wait_for
from tests.ui.conftest import ARTIFACTS
from tests.ui.demo_process import alive, simulated_processes
from tests.ui.test_dashboard_browser import new_page

pytestmark = pytest.mark.slow

WIDGETS_TIMEOUT_MS = 120_000  # a kernel start, the control plane and the widgets, on 2 cores


def notebook(url: str) -> dict[str, Any]:
    """The notebook the test opens: the magic, then the panel in the right sidebar."""
    cells = [
        "%load_ext gpupanel",
        f"import gpupanel\n\nside = gpupanel.connect({url!r}).show(area='right')\nside",
    ]
    return {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": f"cell{i}", "metadata": {},
             "outputs": [], "source": source}
            for i, source in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                           "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }  # fmt: skip


def stop_server(lab: subprocess.Popen[str], base: str, token: str) -> None:
    """Shut JupyterLab down (its kernels with it); signals if it does not go."""
    children = []
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(lab.pid).children(recursive=True)
    if lab.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                f"{base}/api/shutdown",
                headers={"Authorization": f"token {token}"},
                timeout=10,
                trust_env=False,
            )
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            lab.terminate()
            try:
                lab.wait(10)
            except subprocess.TimeoutExpired:
                lab.kill()
                lab.wait(10)
    for child in children:  # a kernel that outlived the server
        with contextlib.suppress(psutil.Error):
            child.kill()


@pytest.mark.timeout(360)
def test_load_ext_in_jupyterlab_renders_the_panel_and_restart_works(
    browser: Any, tmp_path: Path, sim_dir: Path
) -> None:
    from playwright.sync_api import expect

    started = time.monotonic()
    parse_spec("2x24").save(sim_dir)
    port, lab_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "gpupanel.toml"
    config.write_text(
        f"[panel]\nport = {port}\n"
        + "".join(
            f'\n[[workers]]\nid = "gpu{i}"\ngpu = {i}\nport = {free_port()}\n' for i in (0, 1)
        )
    )
    root = tmp_path / "notebooks"
    root.mkdir()
    (root / "panel.ipynb").write_text(json.dumps(notebook(url)))
    jupyter = tmp_path / "jupyter"
    env = {
        **os.environ,
        "GPUPANEL_SIM_DIR": str(sim_dir),
        "GPUPANEL_SIMULATE": "1",
        "GPUPANEL_CONFIG": str(config),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
        "JUPYTER_DATA_DIR": str(jupyter / "data"),
        "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
        "IPYTHONDIR": str(jupyter / "ipython"),
    }
    for name in ("GPUPANEL_URL", "GPUPANEL_TOKEN", "JUPYTER_TOKEN"):
        env.pop(name, None)
    token = secrets.token_hex(16)
    base = f"http://127.0.0.1:{lab_port}"
    log = tmp_path / "jupyterlab.log"
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
         f"--port={lab_port}", "--port-retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--ServerApp.terminals_enabled=False",
         "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run the cells
         "--LabApp.extension_manager=readonly",  # offline: no PyPI lookups
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         f"--LabApp.workspaces_dir={jupyter / 'workspaces'}",
         f"--LabApp.user_settings_dir={jupyter / 'settings'}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    http = httpx.Client(base_url=url, timeout=60, trust_env=False)
    page = None
    try:
        wait_for(
            lambda: httpx.get(f"{base}/api/status", params={"token": token}, trust_env=False)
            .status_code == 200,
            60,
            "JupyterLab answering",
        )  # fmt: skip
        assert httpx.get(f"{base}/api/status", trust_env=False).status_code == 403  # no token
        lab_up = time.monotonic()

        page = new_page(browser, 1400, 1000)
        page.goto(f"{base}/lab/tree/panel.ipynb?token={token}")
        page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
            " && window.jupyterapp.shell.currentWidget.sessionContext"
            " && window.jupyterapp.shell.currentWidget.sessionContext.session",
            timeout=WIDGETS_TIMEOUT_MS,
        )
        page.evaluate(
            "() => window.jupyterapp.shell.currentWidget.sessionContext.ready"
            ".then(() => window.jupyterapp.commands.execute('notebook:run-all-cells'))"
        )
        cell = page.locator(".jp-Notebook .jp-Cell").first
        panel = cell.locator(".gpupanel-panel")
        expect(panel).to_have_count(1, timeout=WIDGETS_TIMEOUT_MS)
        rows = panel.locator(".gpupanel-gpu")
        expect(rows).to_have_count(2, timeout=60_000)
        expect(panel.locator(".gpupanel-simulated")).to_be_visible()
        shown = time.monotonic()
        workers = http.get("/panel/workers").json()["workers"]
        assert sorted(workers) == ["gpu0", "gpu1"]
        assert all(w["status"] == "running" for w in workers.values()), workers
        expect(panel).to_contain_text("in this kernel")  # the magic started it here

        row = panel.locator(".gpupanel-gpu-1")
        row.click()
        expect(row).to_have_class(re.compile("gpupanel-selected"))
        restart = panel.locator(".gpupanel-restart-gpu1")
        expect(restart).to_be_visible()
        before = workers["gpu1"]["pid"]
        expect(panel.locator(".gpupanel-worker-gpu1")).to_contain_text(f"pid {before}")
        restart.click()

        def restarted() -> int | None:
            w = http.get("/panel/workers").json()["workers"]["gpu1"]
            return w["pid"] if w["pid"] not in (None, before) and w["status"] == "running" else None

        after = wait_for(restarted, 60, "gpu1 running with a new pid after the click")
        expect(panel.locator(".gpupanel-worker-gpu1")).to_contain_text(
            f"pid {after}", timeout=30_000
        )
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-panel.png"))

        # The second cell: the same control plane's panel in the right sidebar.
        side = page.locator("#jp-right-stack .gpupanel-panel")
        expect(side).to_have_count(1, timeout=60_000)
        expect(side.locator(".gpupanel-gpu")).to_have_count(2, timeout=60_000)
        expect(side.locator(".gpupanel-worker-gpu1")).to_contain_text(f"pid {after}")
        expect(page.locator(".jp-Notebook .jp-Cell").nth(1)).to_contain_text(
            "in the JupyterLab side area 'right'"
        )
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-sidecar.png"))

        # Stopped cleanly: the workers through the API, then JupyterLab with its kernel.
        started_pids = {c.pid for c in psutil.Process(lab.pid).children(recursive=True)}
        assert started_pids, "no kernel under JupyterLab"
        page.close()
        page = None
        for worker_id in ("gpu0", "gpu1"):
            stopped = http.post(f"/panel/workers/{worker_id}/stop").json()["worker"]
            assert stopped["status"] == "stopped", stopped
        stop_server(lab, base, token)
        assert lab.returncode == 0
        assert not alive(started_pids), f"left running: {alive(started_pids)}"
        assert not simulated_processes(sim_dir)
        print(
            f"JupyterLab up in {lab_up - started:.1f} s, the panel shown "
            f"{shown - lab_up:.1f} s after opening the notebook, "
            f"{time.monotonic() - started:.1f} s in all"
        )
    except BaseException:
        print("JupyterLab's log, last lines:\n" + "\n".join(log.read_text().splitlines()[-40:]))
        raise
    finally:
        if page is not None:
            page.close()
        with contextlib.suppress(httpx.HTTPError):
            for worker_id in ("gpu0", "gpu1"):
                http.post(f"/panel/workers/{worker_id}/stop")
        http.close()
        stop_server(lab, base, token)
        kill_simulated(sim_dir)
