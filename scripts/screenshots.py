#!/usr/bin/env python3
"""Regenerate the README's gallery: the dashboard of `gpupanel demo`, in Chromium.

    python3 scripts/screenshots.py [--out docs/images]

It runs `python -m gpupanel demo` (a simulated 4-GPU workstation, one fake Ollama worker per
GPU, traffic from three apps through the proxy, the Voila dashboard; its files in a temporary
directory), opens the dashboard in Debian's headless Chromium through Playwright (never a
browser that Playwright downloads; the flags of tests/ui/conftest.py) in one 1280x800
window, and captures, into `--out` (overwriting what is there):

- `overview.png`: the first screen, every GPU row and the selected worker's controls;
- `worker.png`: a worker's detail, its GPU's row selected and its log open;
- `guard.png`: the load guard refusing a model too big for the GPU, with its numbers;
- `in-flight.png`: the requests in flight through the proxy, per app;
- `usage.png`: the usage section opened: requests and tokens per app.

Voila scrolls an inner box, not the window, so each capture scrolls its element into view
and takes the window (never `full_page`). Everything it started (the demo and with it the
workers and the dashboard, the browser) is stopped before it exits, also on failure.
Exit status: 0 when every capture was written, 1 otherwise (with the reason).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
WIDTH, HEIGHT = 1280, 800
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
"""The flags of the tests' browser (tests/ui/conftest.py)."""
SHOTS = ("overview", "worker", "guard", "in-flight", "usage")
"""The captures, in order: `<name>.png` each."""
WIDGETS_TIMEOUT_MS = 120_000  # a Voila kernel and the widgets take 20-40 s on 2 cores
DETAIL_GPU = 2
"""The worker shown in detail: gpu2, which the demo's `rag-batch` app keeps busy."""
HISTORY_S = 20
"""Seconds of chart history before the first capture."""
GUARD_GPU, GUARD_MODEL = 0, "qwen2.5:32b"
"""A model on the demo's disk that does not fit next to what GPU 0 (24 GiB) holds."""


class ScreenshotError(Exception):
    """Why a capture could not be made (one line)."""


def parse_banner(lines: Iterable[str]) -> dict[str, str]:
    """The demo's banner: its URLs by name (`panel API`, `OpenAI proxy`, `dashboard`) and
    `temporary files`; `panel` is the control plane's base URL."""
    found: dict[str, str] = {}
    for line in lines:
        if m := re.match(r"\s+(panel API|OpenAI proxy|dashboard|temporary files)\s+(\S+)", line):
            found[m[1]] = m[2]
    if "panel API" in found:
        found["panel"] = found["panel API"].removesuffix("/panel/snapshot")
    return found


def png_size(path: Path) -> tuple[int, int]:
    """A PNG's width and height, from its header."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ScreenshotError(f"{path} is not a PNG")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy; ScreenshotError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if result := check():
                return result
        if time.monotonic() > deadline:
            raise ScreenshotError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def shown_in_flight(text: str) -> int:
    """The count in the panel's "Requests in flight (N)" line (0 when there is none)."""
    m = re.search(r"Requests in flight \((\d+)\)", text)
    return int(m[1]) if m else 0


def wait_in_flight(page: Page, prefer_s: float = 30.0, timeout: float = 120.0) -> None:
    """Wait until the panel shows two requests in flight (one will do after `prefer_s`):
    what is on the screen, not what the API said a moment ago."""
    started = time.monotonic()
    requests = page.locator(".gpupanel-requests")

    def enough() -> bool:
        shown = shown_in_flight(requests.inner_text())
        return shown >= 2 or (shown >= 1 and time.monotonic() - started > prefer_s)

    wait_until(enough, timeout, "requests in flight shown in the panel")


class Demo:
    """`python -m gpupanel demo` on free ports, its output read line by line."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()

    def start(self, port: int, dashboard_port: int) -> dict[str, str]:
        """Start it and wait for its banner (the 'Running' line); the banner's URLs."""
        env = {**os.environ, "TMPDIR": str(self.tmp)}  # its temporary files land in `tmp`
        for name in ("GPUPANEL_SIM_DIR", "GPUPANEL_CONFIG", "GPUPANEL_URL"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupanel", "demo", "--port", str(port),
             "--dashboard-port", str(dashboard_port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 180
        while True:
            try:
                line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise ScreenshotError("the demo printed no banner in 180 s") from None
            if line is None:
                raise ScreenshotError("the demo ended early:\n" + "\n".join(self.lines[-20:]))
            self.lines.append(line)
            if line.startswith("Running"):
                banner = parse_banner(self.lines)
                if "panel" not in banner or "dashboard" not in banner:
                    raise ScreenshotError("the demo's banner names no panel API or dashboard")
                return banner

    def output(self) -> list[str]:
        """Every line the demo printed so far."""
        with contextlib.suppress(queue.Empty):
            while True:
                line = self._queue.get_nowait()
                if line is not None:
                    self.lines.append(line)
        return self.lines

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def stop(self) -> None:
        """SIGTERM (the demo stops its traffic, dashboard and workers), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# ---- the captures -------------------------------------------------------------------------


def scroll_to(locator: Locator, block: str = "start") -> None:
    """Scroll the element into view (Voila scrolls an inner box, not the window)."""
    locator.evaluate(f"e => e.scrollIntoView({{block: '{block}'}})")
    locator.page.wait_for_timeout(300)


def capture(page: Page, out: Path, name: str, written: list[Path]) -> None:
    path = out / f"{name}.png"
    page.screenshot(path=str(path))  # the window: WIDTH x HEIGHT
    written.append(path)
    print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def shoot(page: Page, http: httpx.Client, dashboard: str, out: Path) -> list[Path]:
    """Open the dashboard and make every capture of SHOTS; the files written."""
    from playwright.sync_api import expect

    written: list[Path] = []
    snap = http.get("/panel/snapshot").json()
    page.goto(dashboard)
    rows = page.locator(".gpupanel-gpu")
    expect(rows).to_have_count(len(snap["gpus"]), timeout=WIDGETS_TIMEOUT_MS)
    expect(page.locator(".gpupanel-simulated")).to_be_visible()
    expect(page.locator(".gpupanel-worker-gpu0")).to_contain_text("running", timeout=30_000)
    # The overview with the traffic in it, once the charts have some history: wait for
    # requests in flight on two GPUs.
    page.wait_for_timeout(HISTORY_S * 1000)
    wait_in_flight(page)
    capture(page, out, "overview", written)

    # A worker's detail: its GPU's row selected, its log open.
    page.locator(f".gpupanel-gpu-{DETAIL_GPU}").click()
    page.locator(f".gpupanel-log-gpu{DETAIL_GPU}").click()
    log = page.locator(".gpupanel-log")
    expect(log).to_be_visible(timeout=30_000)
    expect(log).to_contain_text(f"gpu{DETAIL_GPU}", timeout=30_000)
    scroll_to(page.locator(".gpupanel-panel"))  # the selected row, the controls, the log
    capture(page, out, "worker", written)
    page.locator(f".gpupanel-log-gpu{DETAIL_GPU}").click()  # close the log again
    expect(log).to_be_hidden(timeout=30_000)

    # The guard: a model that does not fit GPU 0, estimated before the click, then refused.
    scroll_to(page.locator(".gpupanel-panel"))
    page.locator(f".gpupanel-gpu-{GUARD_GPU}").click()
    form = page.locator(".gpupanel-load-form")
    expect(form.locator("select")).to_have_value(f"gpu{GUARD_GPU}", timeout=30_000)
    form.locator("input[placeholder^='e.g.']").fill(GUARD_MODEL)
    verdict = page.locator(".gpupanel-estimate")
    expect(verdict).to_contain_text("does not fit", timeout=30_000)
    page.locator(".gpupanel-load-button").click()
    expect(page.locator(".gpupanel-status")).to_contain_text("not sent", timeout=30_000)
    capture(page, out, "guard", written)

    # The requests in flight, per app.
    requests = page.locator(".gpupanel-requests")
    scroll_to(requests, "center")
    wait_in_flight(page)
    capture(page, out, "in-flight", written)

    # The usage section, opened: requests and tokens per app.
    section = page.locator(".gpupanel-usage-section")
    scroll_to(section, "end")
    section.get_by_text("Usage:").first.click()
    view = page.locator(".gpupanel-usage")
    expect(view.locator(".gpupanel-usage-table")).to_contain_text("chat-ui", timeout=60_000)
    page.wait_for_timeout(1000)  # the bars' transition
    scroll_to(section, "end")
    capture(page, out, "usage", written)
    return written


def run(out: Path, chromium: Path) -> list[Path]:
    """The whole run: demo, browser, captures, and everything stopped again."""
    from playwright.sync_api import sync_playwright

    if not chromium.exists():
        raise ScreenshotError(f"{chromium} is missing (apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    port, dashboard_port = free_ports(2)
    with tempfile.TemporaryDirectory(prefix="gpupanel-screenshots-") as tmp:
        demo = Demo(Path(tmp))
        try:
            print("starting gpupanel demo...")
            banner = demo.start(port, dashboard_port)
            print(f"  dashboard {banner['dashboard']}")
            with (
                httpx.Client(base_url=banner["panel"], timeout=60, trust_env=False) as http,
                sync_playwright() as p,
            ):
                browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
                    # Only loopback: Voila's template links a CDN stylesheet that offline
                    # would only fail slowly.
                    page.route(
                        "**/*",
                        lambda route: (
                            route.continue_()
                            if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1"))
                            else route.abort()
                        ),
                    )
                    return shoot(page, http, banner["dashboard"], out)
                finally:
                    browser.close()
        except ScreenshotError as exc:
            raise ScreenshotError(
                f"{exc}\nthe demo's last lines:\n" + "\n".join(demo.output()[-15:])
            ) from None
        finally:
            demo.stop()
            time.sleep(0.2)  # its last lines
            print("\n".join(f"  demo: {line}" for line in demo.output() if "traffic:" in line))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate the README gallery (docs/images/*.png) from `gpupanel demo`'s "
        f"dashboard in headless Chromium at {WIDTH}x{HEIGHT}.",
        epilog=f"Captures: {', '.join(f'{s}.png' for s in SHOTS)}.",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the PNGs go ({OUT})")
    parser.add_argument("--chromium", type=Path, default=CHROMIUM, help=f"({CHROMIUM})")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        from playwright.sync_api import Error as PlaywrightError
    except ImportError as exc:
        print(f"screenshots: {exc}; pip install -e '.[test]' (Playwright, Voila)")
        return 1
    try:
        written = run(args.out, args.chromium)
    except (ScreenshotError, AssertionError, PlaywrightError) as exc:
        print(f"screenshots: {str(exc).strip() or type(exc).__name__}")
        return 1
    for path in written:
        width, height = png_size(path)
        print(f"{path.name}: {width}x{height}, {path.stat().st_size // 1024} KiB")
    print(f"{len(written)} screenshots in {time.monotonic() - started:.0f} s")
    return 0 if [p.stem for p in written] == list(SHOTS) else 1


if __name__ == "__main__":
    sys.exit(main())
