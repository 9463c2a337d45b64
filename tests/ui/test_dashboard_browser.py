"""The Voila dashboard in a real browser (issue 7's "done when"): Playwright driving Debian's
Chromium, never a downloaded browser.

1. A running `gpupanel demo`: open its dashboard, wait for the widgets (not the page load),
   find each GPU and worker, select a GPU's row, click restart on its worker and see its pid
   change through the API; open the usage section and see the demo's apps in it.
2. `gpupanel dashboard` with no control plane yet: the page says which URL it tries, then
   attaches by itself once `gpupanel serve` answers there.
3. Issue 15's overview: `gpupanel serve --simulate 8x80` in a 1280x800 window: all eight GPU
   rows and the selected worker's restart button lie inside the first viewport (bounding
   boxes, no scrolling); restart changes the worker's pid; a pull's bar goes to 100 %.

Screenshots go to test-artifacts/. Without /usr/bin/chromium (or the playwright package) the
tests skip, unless GPUPANEL_REQUIRE_BROWSER=1 (set by CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpupanel.core.defaults import SIM_PULL_SPEED_ENV
from tests.conftest import free_port
from tests.e2e.conftest import kill_simulated, wait_for
from tests.ui.conftest import ARTIFACTS
from tests.ui.demo_process import DemoProcess, alive, simulated_processes

pytestmark = pytest.mark.slow

WIDGETS_TIMEOUT_MS = 120_000  # a Voila kernel start plus the widgets take 20-40 s on 2 cores


def new_page(browser: Any, width: int = 1400, height: int = 1000) -> Any:
    """A page that may only reach loopback (Voila's lab template links a CDN stylesheet for
    icons; offline it would only fail slowly, so refuse it at once)."""
    page = browser.new_page(viewport={"width": width, "height": height})

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
            expect(gpus.filter(has_text=uuid[:12])).to_have_count(1)  # the short UUID
        expect(page.locator(".gpupanel-worker")).to_have_count(4)  # shown: the selected GPU's
        for worker_id, worker in snap["workers"].items():
            row = page.locator(f".gpupanel-worker-{worker_id}")
            expect(row).to_contain_text(worker_id)
            expect(row).to_contain_text("running")
            expect(row).to_contain_text(str(worker["pid"]))
        page.screenshot(path=str(ARTIFACTS / "dashboard-demo.png"), full_page=True)

        before = snap["workers"]["gpu1"]["pid"]
        page.locator(".gpupanel-gpu-1").click()  # select GPU 1: its worker's controls show
        expect(page.locator(".gpupanel-gpu-1")).to_have_class(re.compile("gpupanel-selected"))
        restart = page.locator(".gpupanel-restart-gpu1")
        expect(restart).to_be_visible()
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

        # The usage section, closed (its view not even built) until a click opens it: bars
        # and a table of the demo's apps, whose traffic has been flowing since the start.
        section = page.locator(".gpupanel-usage-section")
        expect(section).to_contain_text("Usage:")
        expect(section.locator(".gpupanel-usage")).to_have_count(0)
        section.get_by_text("Usage:").first.click()
        expect(section.locator(".gpupanel-usage-chart")).to_have_count(2, timeout=30_000)
        expect(section.locator(".gpupanel-usage-table")).to_contain_text("chat-ui", timeout=60_000)
        expect(
            section.locator(".gpupanel-usage-chart").first.locator("rect.bar")
        ).not_to_have_count(0)

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


SCROLLED_JS = (
    "Math.max(window.scrollY, ...Array.from(document.querySelectorAll('*'), e => e.scrollTop))"
)
"""How far anything on the page is scrolled (Voila scrolls an inner box, not the window)."""


def inside(box: dict[str, float] | None, width: int, height: int) -> bool:
    """Is a bounding box wholly inside a width x height viewport (not scrolled)?"""
    return (
        box is not None
        and box["x"] >= 0
        and box["y"] >= 0
        and box["x"] + box["width"] <= width
        and box["y"] + box["height"] <= height
    )


@pytest.mark.timeout(420)
def test_overview_of_eight_gpus_fits_1280x800_with_the_selected_workers_controls(
    browser: Any, tmp_path: Path, sim_dir: Path
) -> None:
    from playwright.sync_api import expect

    width, height = 1280, 800
    port, dashboard_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "gpupanel.toml"
    config.write_text(
        "".join(
            f'[[workers]]\nid = "gpu{i}"\ngpu = {i}\nport = {free_port()}\n\n' for i in range(8)
        )
    )
    env = {
        **os.environ,
        "GPUPANEL_SIM_DIR": str(sim_dir),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        SIM_PULL_SPEED_ENV: "100MB",  # smollm2:135m (271 MB) pulls in ~3 s: the bar moves
    }
    env.pop("GPUPANEL_CONFIG", None)
    serve = subprocess.Popen(
        [sys.executable, "-m", "gpupanel", "serve", "--simulate", "8x80", "--config", str(config),
         "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "gpupanel", "dashboard", "--port", str(dashboard_port), "--url", url],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    http = httpx.Client(base_url=url, timeout=60, trust_env=False)
    page = None
    try:
        workers = wait_for(
            lambda: (
                ws
                if len(ws := http.get("/panel/workers").json()["workers"]) == 8
                and all(w["status"] == "running" for w in ws.values())
                else None
            ),
            60,
            "eight running workers",
        )
        snap = http.get("/panel/snapshot").json()
        assert dashboard.stdout is not None
        assert dashboard.stdout.readline().startswith("gpupanel dashboard:")

        started = time.monotonic()
        page = new_page(browser, width, height)
        page.goto(f"http://127.0.0.1:{dashboard_port}/")
        rows = page.locator(".gpupanel-gpu")
        expect(rows).to_have_count(8, timeout=WIDGETS_TIMEOUT_MS)
        expect(page.locator(".gpupanel-simulated")).to_be_visible()
        for uuid, gpu in snap["gpus"].items():
            row = page.locator(f".gpupanel-gpu-{gpu['index']}")
            expect(row).to_contain_text(uuid[:12])
            expect(row).to_contain_text(f"gpu{gpu['index']} running")
        print(f"overview shown {time.monotonic() - started:.1f} s after the page was opened")

        # Select GPU 5 (a row, not the first): its worker's controls, above the fold.
        page.locator(".gpupanel-gpu-5").click()
        expect(page.locator(".gpupanel-gpu-5")).to_have_class(re.compile("gpupanel-selected"))
        restart = page.locator(".gpupanel-restart-gpu5")
        expect(restart).to_be_visible()
        assert page.evaluate(SCROLLED_JS) == 0  # the first screen, as a user sees it
        for i in range(8):
            box = page.locator(f".gpupanel-gpu-{i}").bounding_box()
            assert inside(box, width, height), f"GPU {i}'s row is not in the first screen: {box}"
        for name in ("start", "stop", "restart", "log"):
            box = page.locator(f".gpupanel-{name}-gpu5").bounding_box()
            assert inside(box, width, height), f"gpu5's {name} button is below the fold: {box}"
        for hook in (".gpupanel-pull-button", ".gpupanel-load-button"):
            assert inside(page.locator(hook).bounding_box(), width, height), hook
        page.screenshot(path=str(ARTIFACTS / "overview-8x80-1280x800.png"))

        before = workers["gpu5"]["pid"]
        restart.click()

        def restarted() -> int | None:
            w = http.get("/panel/workers").json()["workers"]["gpu5"]
            return w["pid"] if w["pid"] not in (None, before) and w["status"] == "running" else None

        after = wait_for(restarted, 60, "gpu5 running with a new pid after the click")
        expect(page.locator(".gpupanel-worker-gpu5")).to_contain_text(
            f"pid {after}", timeout=30_000
        )
        assert page.evaluate(SCROLLED_JS) == 0

        # A pull from the panel: the bar in the page goes up to 100 %.
        model = "smollm2:135m"
        page.locator(".gpupanel-load-form input[placeholder^='e.g.']").fill(model)
        page.locator(".gpupanel-pull-button").click()
        bar = page.locator(".gpupanel-pull-progress .progress-bar")
        widths: list[float] = []
        deadline = time.monotonic() + 60
        while not widths or widths[-1] < 100.0:
            assert time.monotonic() < deadline, f"the pull's bar stopped at {widths}"
            with contextlib.suppress(ValueError):
                widths.append(float(bar.evaluate("e => e.style.width").rstrip("%") or 0))
            page.wait_for_timeout(100)
        assert widths == sorted(widths), f"the bar went back: {widths}"
        assert [w for w in widths if 0 < w < 99], f"no step between 0 and 100 %: {widths}"
        expect(page.locator(".gpupanel-pull-status")).to_contain_text("success")
        assert model in http.get("/panel/workers").json()["workers"]["gpu5"]["models_available"]
        page.screenshot(path=str(ARTIFACTS / "overview-8x80-pulled.png"))

        for worker_id in workers:
            http.post(f"/panel/workers/{worker_id}/stop")
        page.close()
        page = None
        dashboard.send_signal(signal.SIGINT)
        assert dashboard.wait(30) == 0
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        if page is not None:
            page.close()
        http.close()
        for proc in (serve, dashboard):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        kill_simulated(sim_dir)
