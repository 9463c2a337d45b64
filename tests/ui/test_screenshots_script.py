"""scripts/screenshots.py (the README gallery), without running it: its `--help`, its pure
helpers, and the gallery it made (every capture in docs/images/, at the window size, small,
and shown by the README). Running it takes a demo and a browser: see its docstring."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "screenshots.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("screenshots", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_names_every_capture(script: ModuleType) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "1280x800" in done.stdout and "--out" in done.stdout
    for name in script.SHOTS:
        assert f"{name}.png" in done.stdout


def test_the_demo_banner_and_the_in_flight_line_are_read(script: ModuleType) -> None:
    banner = script.parse_banner(
        [
            "gpupanel 0.1 demo on a SIMULATED workstation",
            "  panel API     http://127.0.0.1:8765/panel/snapshot",
            "  OpenAI proxy  http://127.0.0.1:8765/v1   (routed by model)",
            "  worker gpu0   http://127.0.0.1:8765/proxy/gpu0/v1   GPU 0 GPU-1   pid 1",
            "  dashboard     http://127.0.0.1:17320/",
            "  temporary files /tmp/gpupanel-demo-x",
        ]
    )
    assert banner["panel"] == "http://127.0.0.1:8765"
    assert banner["dashboard"] == "http://127.0.0.1:17320/"
    assert banner["temporary files"] == "/tmp/gpupanel-demo-x"
    assert script.parse_banner(["Running for 5 s"]) == {}
    assert script.shown_in_flight("Requests in flight (3)\nchat-ui: 2 in flight") == 3
    assert script.shown_in_flight("Requests in flight none (apps name themselves...)") == 0


def test_the_gallery_is_there_small_at_the_window_size_and_in_the_readme(
    script: ModuleType,
) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## Gallery" in readme and "scripts/screenshots.py" in readme
    for name in script.SHOTS:
        path = ROOT / "docs" / "images" / f"{name}.png"
        assert path.exists(), f"{path} is missing: run python3 scripts/screenshots.py"
        assert script.png_size(path) == (script.WIDTH, script.HEIGHT)
        assert path.stat().st_size < 300 * 1024, f"{path.name} is over 300 KB"
        assert f"](docs/images/{name}.png)" in readme
    with pytest.raises(script.ScreenshotError, match="not a PNG"):
        script.png_size(SCRIPT)
