"""The `gpupanel` command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpupanel.sim.ledger import Ledger
from gpupanel.sim.workstation import parse_spec


def gpupanel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupanel", *args], capture_output=True, text=True, timeout=60
    )


def has_nvidia_driver() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def test_snapshot_simulate_json_has_gpus_keyed_by_uuid() -> None:
    result = gpupanel("snapshot", "--simulate", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["simulated"] is True
    assert len(data["gpus"]) == 4
    for uuid, gpu in data["gpus"].items():
        assert uuid.startswith("GPU-") and gpu["uuid"] == uuid
        assert set(gpu) >= {
            "uuid", "index", "name", "memory", "utilization", "power_w",
            "power_limit_w", "temperature_c", "processes",
        }  # fmt: skip
        assert set(gpu["memory"]) == {"total", "used", "free"}
        assert set(gpu["utilization"]) == {"gpu", "memory"}
        assert gpu["simulated"] is True


def test_snapshot_shows_what_the_ledger_holds_on_exactly_that_gpu(sim_dir: Path) -> None:
    ws = parse_spec("2x24")
    ws.save(sim_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        Ledger(sim_dir).record({ws.gpus[1].uuid: 3 * 1024**3}, pid=holder.pid)
        data = json.loads(gpupanel("snapshot", "--simulate", "--json").stdout)
        by_uuid = data["gpus"]
        assert by_uuid[ws.gpus[1].uuid]["processes"] == [
            {"pid": holder.pid, "used_memory": 3 * 1024**3, "worker": None}
        ]
        assert by_uuid[ws.gpus[1].uuid]["memory"]["used"] == 3 * 1024**3
        assert by_uuid[ws.gpus[0].uuid]["processes"] == []
        table = gpupanel("snapshot", "--simulate").stdout
        assert "SIMULATED" in table and f"pid {holder.pid}" in table and "3.0 / 24.0 GiB" in table
    finally:
        holder.kill()
        holder.wait()
    data = json.loads(gpupanel("snapshot", "--simulate", "--json").stdout)
    assert data["gpus"][ws.gpus[1].uuid]["processes"] == []


def test_snapshot_with_a_spec_and_a_bad_spec() -> None:
    ok = gpupanel("snapshot", "--simulate", "8x80", "--json")
    assert ok.returncode == 0 and len(json.loads(ok.stdout)["gpus"]) == 8
    bad = gpupanel("snapshot", "--simulate", "nonsense")
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "'4x24'" in bad.stderr


@pytest.mark.skipif(has_nvidia_driver(), reason="this machine has an NVIDIA driver")
def test_snapshot_without_a_driver_is_one_clear_line() -> None:
    result = gpupanel("snapshot")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "no NVIDIA driver" in result.stderr and "--simulate" in result.stderr


def test_workers_table_from_a_typed_snapshot() -> None:
    from gpupanel.cli import format_workers
    from gpupanel.core.snapshot import Snapshot
    from tests.ui.test_widget_units import synthetic

    snap = Snapshot.from_json(synthetic(n=2))
    table = format_workers(snap.workers).splitlines()
    assert table[0].split() == ["ID", "RUNTIME", "STATUS", "PIN", "PID", "PORT", "GPU", "RESTARTS"]
    row = ["gpu0", "ollama", "running", "verified", "4000", "11435", "0:GPU-00000000", "0"]
    assert table[1].split() == row
    assert len(table) == 3  # no worker has a last error


def test_progress_line_and_defaults_share_one_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpupanel import cli
    from gpupanel.core.config import DEFAULT_PANEL_PORT
    from gpupanel.core.defaults import DEFAULT_DASHBOARD_PORT, DEFAULT_PANEL_URL, URL_ENV

    line = cli.progress_line({"status": "pulling", "total": 4 * 1024**3, "completed": 1024**3})
    assert line.endswith("[#######-----------------------]   1.00/4.00 GiB")
    monkeypatch.delenv(URL_ENV, raising=False)
    args = cli.build_parser().parse_args(["dashboard"])
    assert (args.port, args.url) == (DEFAULT_DASHBOARD_PORT, DEFAULT_PANEL_URL)
    assert DEFAULT_PANEL_URL.endswith(f"127.0.0.1:{DEFAULT_PANEL_PORT}")
    assert cli.build_parser().parse_args(["demo"]).port == DEFAULT_PANEL_PORT
