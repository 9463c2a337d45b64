"""The Voila dashboard in a real browser (issue 7's "done when"): Playwright driving Debian's
Chromium, never a downloaded browser.

1. A running `gpupanel demo`: open its dashboard, wait for the widgets (not the page load),
   find each GPU and worker, click restart on a worker and see its pid change through the API.
2. `gpupanel dashboard` with no control plane yet: the page says which URL it tries, then
   attaches by itself once `gpupanel serve` answers there.

Screenshots go to test-artifacts/. Without /usr/bin/chromium (or the playwright package) the
tests skip, unless GPUPANEL_REQUIRE_BROWSER=1 (set by CI) makes that a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import kill_simulated, wait_for
from tests.ui.conftest import ARTIFACTS
from tests.ui.demo_process import DemoProcess, alive, simulated_processes

pytestmark = pytest.mark.slow

WIDGETS_TIMEOUT_MS = 120_000  # a Voila kernel start plus the widgets take 20-40 s on 2 cores


def new_page(browser: Any) -> Any:
    """A page that may only reach loopback (Voila's lab template links a CDN stylesheet for
    icons; offline it would only fail slowly, so refuse it at once)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})

    def only_loopback(route: Any) -> None:
        if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1")):
            route.continue_()
        else:
            route.abort()

    page.route("**/*", only_loopback)
    return page


@pytest.mark.timeout(360)
def test_dashboard_of_a_running_demo_shows_gpus_workers_and_restarts_one(
    browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    port, dashboard_port = free_port(), free_port()
    demo = DemoProcess(
        ["--port", str(port), "--dashboard-port", str(dashboard_port)], tmp_path
    ).start()
    page = None
    try:
        banner = demo.wait_banner(120)
        assert banner["dashboard"] == f"http://127.0.0.1:{dashboard_port}/"
        snap = demo.snapshot()
        http = httpx.Client(base_url=demo.url, timeout=60, trust_env=False)

        page = new_page(browser)
        page.goto(banner["dashboard"])
        page.wait_for_selector(".gpupanel-gpu", timeout=WIDGETS_TIMEOUT_MS)
        expect(page.locator(".gpupanel-panel")).to_have_count(1)
        expect(page.locator(".gpupanel-simulated")).to_be_visible()
        expect(page.locator(".gpupanel-warnings")).to_have_count(1)
        gpus = page.locator(".gpupanel-gpu")
        expect(gpus).to_have_count(len(snap["gpus"]), timeout=30_000)
        for uuid in snap["gpus"]:
            expect(gpus.filter(has_text=uuid)).to_have_count(1)
        expect(page.locator(".gpupanel-worker")).to_have_count(4)
        for worker_id, worker in snap["workers"].items():
            row = page.locator(f".gpupanel-worker-{worker_id}")
            expect(row).to_contain_text(worker_id)
            expect(row).to_contain_text("running")
            expect(row).to_contain_text(str(worker["pid"]))
        page.screenshot(path=str(ARTIFACTS / "dashboard-demo.png"), full_page=True)

        before = snap["workers"]["gpu1"]["pid"]
        restart = page.locator(".gpupanel-restart-gpu1")
        expect(restart).to_have_text("restart")
        restart.click()

        def restarted() -> int | None:
            w = http.get("/panel/workers").json()["workers"]["gpu1"]
            return w["pid"] if w["pid"] not in (None, before) and w["status"] == "running" else None

        after = wait_for(restarted, 60, "gpu1 running with a new pid after the click")
        row = page.locator(".gpupanel-worker-gpu1")
        expect(row).to_contain_text(str(after), timeout=30_000)
        expect(row).to_contain_text("running")
        page.screenshot(path=str(ARTIFACTS / "dashboard-demo-restarted.png"), full_page=True)

        pids = demo.started_pids()  # workers, runners, Voila and this page's kernel
        page.close()
        page = None
        assert demo.terminate() == 0
        assert not alive(pids), f"left running: {alive(pids)}\n{demo.output}"
        assert not simulated_processes(demo.sim_dir)
        assert not list(tmp_path.glob("gpupanel-demo-*"))
    finally:
        if page is not None:
            page.close()
        demo.cleanup()


@pytest.mark.timeout(300)
def test_dashboard_waits_for_a_control_plane_then_attaches(
    browser: Any, tmp_path: Path, sim_dir: Path
) -> None:
    from playwright.sync_api import expect

    from gpupanel.sim.workstation import parse_spec

    parse_spec("2x24").save(sim_dir)
    port, dashboard_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "gpupanel", "dashboard", "--port", str(dashboard_port), "--url", url],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    serve: subprocess.Popen[bytes] | None = None
    page = None
    try:
        assert dashboard.stdout is not None
        first = dashboard.stdout.readline()
        assert first.startswith(f"gpupanel dashboard: http://127.0.0.1:{dashboard_port}/"), first
        page = new_page(browser)
        page.goto(f"http://127.0.0.1:{dashboard_port}/")
        waiting = page.locator(".gpupanel-dashboard")
        expect(waiting).to_contain_text(
            f"No gpupanel control plane answers at {url}", timeout=WIDGETS_TIMEOUT_MS
        )
        expect(waiting).to_contain_text("gpupanel serve")
        page.screenshot(path=str(ARTIFACTS / "dashboard-waiting.png"), full_page=True)

        serve = subprocess.Popen(
            [sys.executable, "-m", "gpupanel", "serve", "--simulate", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        expect(page.locator(".gpupanel-gpu")).to_have_count(2, timeout=60_000)
        expect(page.locator(".gpupanel-worker")).to_have_count(2, timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard-attached.png"), full_page=True)

        for worker_id in ("gpu0", "gpu1"):
            httpx.post(f"{url}/panel/workers/{worker_id}/stop", timeout=60, trust_env=False)
        page.close()
        page = None
        dashboard.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert dashboard.wait(30) == 0
    finally:
        if page is not None:
            page.close()
        for proc in (serve, dashboard):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        kill_simulated(sim_dir)
