"""`gpupanel doctor` run as a real subprocess (docs/doctor.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_cli import has_nvidia_driver


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder to run in: no gpupanel.toml, a state directory of its own."""
    monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def doctor(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupanel", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def config(directory: Path, panel_port: int) -> Path:
    """A config with the given panel port and one worker on a free port."""
    path = directory / "doctor.toml"
    path.write_text(
        f'[panel]\nport = {panel_port}\n[[workers]]\nid = "w0"\ngpu = 0\nport = {free_port()}\n'
    )
    return path


def lines(out: str) -> dict[str, str]:
    """Each check's line by its name (the second column)."""
    found = {}
    for line in out.splitlines()[:-1]:
        verdict, rest = line.split(None, 1)
        assert verdict in ("ok", "warn", "FAIL"), line
        found[rest.split("  ")[0]] = line
    return found


@pytest.mark.skipif(has_nvidia_driver(), reason="this machine has an NVIDIA driver")
def test_doctor_without_a_driver_fails_with_the_fix(here: Path) -> None:
    result = doctor(here)
    assert result.returncode == 1, result.stdout + result.stderr
    by_name = lines(result.stdout)
    assert by_name["driver"].startswith("FAIL")
    assert "install the NVIDIA driver" in by_name["driver"]
    assert "gpupanel doctor --simulate" in by_name["driver"]
    assert {"config", "ollama", "panel port", "state dir", "gpu processes", "voila"} <= set(by_name)
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines()[-1].endswith("FAIL") and " 0 FAIL" not in result.stdout


def test_doctor_simulated_passes(here: Path) -> None:
    result = doctor(here, "--simulate", "--config", str(config(here, free_port())))
    assert result.returncode == 0, result.stdout + result.stderr
    by_name = lines(result.stdout)
    assert by_name["driver"].startswith("ok") and "simulated" in by_name["driver"]
    assert by_name["gpu 0"].startswith("ok") and "GPU-" in by_name["gpu 0"]
    assert by_name["worker w0 port"].startswith("ok")
    assert not by_name["ollama"].startswith("FAIL")
    assert result.stdout.splitlines()[-1].endswith(" 0 FAIL")


def test_doctor_json_is_a_list_of_checks(here: Path) -> None:
    result = doctor(
        here, "--simulate", "1x24", "--json", "--config", str(config(here, free_port()))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads(result.stdout)
    assert isinstance(checks, list) and checks
    for check in checks:
        assert set(check) == {"name", "verdict", "found", "fix"}
        assert check["verdict"] in ("ok", "warn", "FAIL")
    assert [c["name"] for c in checks][:2] == ["driver", "gpu 0"]


def test_doctor_names_the_holder_of_a_held_port(here: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = doctor(here, "--simulate", "--config", str(config(here, port)))
        assert result.returncode == 1, result.stdout + result.stderr
        panel = lines(result.stdout)["panel port"]
        assert panel.startswith("FAIL")
        assert f"{port} is held by pid {os.getpid()}" in panel
        assert "fix:" in panel and "`port` in [panel]" in panel
