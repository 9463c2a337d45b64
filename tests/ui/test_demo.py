"""`gpupanel demo` as a user runs it: the banner, four running workers, traffic through the
proxy, and nothing left behind when it ends."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import wait_for
from tests.ui.demo_process import DemoProcess, alive, simulated_processes

pytestmark = pytest.mark.slow

APPS = {"chat-ui", "rag-batch", "notebook"}


@pytest.mark.timeout(240)
def test_demo_runs_workers_and_traffic_then_leaves_nothing(tmp_path: Path) -> None:
    port = free_port()
    duration = 15
    demo = DemoProcess(
        ["--duration", str(duration), "--no-dashboard", "--port", str(port)], tmp_path
    ).start()
    try:
        banner = demo.wait_banner()
        assert banner["panel API"] == f"http://127.0.0.1:{port}/panel/snapshot"
        assert banner["OpenAI proxy"] == f"http://127.0.0.1:{port}/v1"
        assert demo.workers == {
            f"gpu{i}": f"http://127.0.0.1:{port}/proxy/gpu{i}/v1" for i in range(4)
        }
        assert "SIMULATED" in demo.output and "dashboard" not in banner
        root = Path(banner["temporary files"])
        assert root.parent == tmp_path and root.is_dir()
        ready = time.monotonic()

        snap = demo.snapshot()
        assert snap["simulated"] is True and len(snap["gpus"]) == 4
        workers = snap["workers"]
        assert sorted(workers) == ["gpu0", "gpu1", "gpu2", "gpu3"]
        assert all(w["status"] == "running" and w["models_loaded"] for w in workers.values())
        assert len({w["gpu_uuid"] for w in workers.values()}) == 4  # one worker per GPU

        # The traffic generator: requests in flight and the three apps, within a few seconds.
        seen_requests: list[dict[str, object]] = []

        def traffic() -> bool:
            snap = demo.snapshot()
            seen_requests.extend(snap["requests"])
            served = {a["name"] for a in snap["apps"] if a["requests"] > 0}
            return bool(seen_requests) and served >= APPS

        wait_for(traffic, 15, "requests in flight and all three apps")
        assert {r["app"] for r in seen_requests} <= APPS
        assert time.monotonic() - ready < duration, "the checks outlived --duration"
        pids = demo.started_pids()
        assert len(pids) >= 8  # 4 workers and 4 runners (one loaded model each)

        assert demo.wait(duration + 60) == 0
        assert "gpupanel demo stopped" in demo.output
        assert not alive(pids), f"left running: {alive(pids)}\n{demo.output}"
        assert not simulated_processes(demo.sim_dir)
        assert not root.exists() and not list(tmp_path.glob("gpupanel-demo-*"))
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/panel/health", timeout=2, trust_env=False)
    finally:
        demo.cleanup()


@pytest.mark.timeout(60)
def test_demo_on_a_busy_port_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        demo = DemoProcess(["--no-dashboard", "--port", str(port)], tmp_path).start()
        try:
            assert demo.wait(45) == 1
            out = demo.output
            assert f"port {port} on 127.0.0.1 is already in use" in out and "--port" in out
            assert "Traceback" not in out
            assert not list(tmp_path.glob("gpupanel-demo-*"))
        finally:
            demo.cleanup()
