"""`gpupanel workers | load | pull` against a running `gpupanel serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import free_port, serve, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("leftover_guard")]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupanel", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_controls_workers_and_models(
    tmp_path: Path, panel_env: dict[str, str], sim_dir: Path
) -> None:
    parse_spec("1x24").save(sim_dir)
    panel = serve(
        tmp_path,
        panel_env,
        f"""
        [[workers]]
        id = "solo"
        gpu = 0
        port = {free_port()}
        env = {{ GPUPANEL_SIM_PULLED = "llama3.1:70b" }}
        """,
    )
    env = {**panel_env, "GPUPANEL_URL": panel.url}
    try:
        wait_for(lambda: panel.worker("solo")["status"] == "running", 30, "solo running")
        listing = cli("workers", env=env)
        assert listing.returncode == 0 and "solo" in listing.stdout and "running" in listing.stdout

        too_big = cli("load", "solo", "llama3.1:70b", "--dry-run", env=env)
        assert (
            too_big.returncode == 1
            and "does NOT fit" in too_big.stdout
            and "free 24.00 GiB" in too_big.stdout
        )
        refused = cli("load", "solo", "llama3.1:70b", env=env)
        assert (
            refused.returncode == 1
            and refused.stderr.count("\n") == 1
            and "refusing to load" in refused.stderr
        )

        pulled = cli("pull", "solo", "llama3.2:1b", env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert "llama3.2:1b is on worker solo" in pulled.stdout and "success" in pulled.stderr
        loaded = cli(
            "load", "solo", "llama3.2:1b", "--num-ctx", "4096", "--keep-alive", "5m", env=env
        )
        assert loaded.returncode == 0 and "loaded llama3.2:1b on solo" in loaded.stdout
        assert [m["name"] for m in panel.worker("solo")["models_loaded"]] == ["llama3.2:1b"]

        # /panel/events: server-sent events, one snapshot per tick.
        times = []
        with panel.http.stream("GET", "/panel/events", timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    snap = json.loads(line[6:])
                    assert snap["workers"]["solo"]["status"] == "running"
                    times.append(snap["time"])
                    if len(times) == 3:
                        break
        assert times == sorted(times) and times[2] > times[0]

        stopped = cli("workers", "stop", "--all", env=env)
        assert stopped.returncode == 0 and "solo: stop done (status stopped" in stopped.stdout
        nobody = cli("workers", "--url", f"http://127.0.0.1:{free_port()}", env=env)
        assert nobody.returncode == 1 and "no gpupanel control plane answers" in nobody.stderr
    finally:
        panel.shutdown()
