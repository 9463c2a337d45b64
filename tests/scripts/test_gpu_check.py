"""scripts/gpu_check.py, scripts/cuda_alloc.py and scripts/gpu_kit.py without a GPU.

The driver is stood in for at its two libraries: `fake_libcuda.c` (built here with the
system C compiler) answers the CUDA driver API calls the allocator makes through ctypes, and
`fake_driver/pynvml.py` answers NVML's, listing as compute processes what the fake libcuda
recorded. So the allocator's ctypes path and every step of the check run as they would on a
GPU machine, and the check can be made to fail (a driver that ignores CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import ctypes
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FAKE_DRIVER = HERE / "fake_driver"
GPU_CHECK = ROOT / "scripts" / "gpu_check.py"
ALLOCATOR = ROOT / "scripts" / "cuda_alloc.py"
GPU_KIT = ROOT / "scripts" / "gpu_kit.py"
GIB = 1024**3

GPU_A = "GPU-11111111-2222-3333-4444-555555555555"
GPU_B = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def libcuda(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The stand-in libcuda, built twice: with the `_v2` symbols, and with only the plain ones."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) to build the stand-in libcuda with")
    out = tmp_path_factory.mktemp("libcuda")
    built = {}
    for variant, flags in (("v2", []), ("plain", ["-DFAKE_NO_V2"])):
        path = out / f"libcuda-{variant}.so"
        subprocess.run(
            [compiler, "-shared", "-fPIC", *flags, "-o", str(path), str(HERE / "fake_libcuda.c")],
            check=True,
        )
        built[variant] = path
    return built


@pytest.fixture
def fake_env(tmp_path: Path, libcuda: dict[str, Path]) -> dict[str, str]:
    """An environment with two stand-in GPUs, NVML and libcuda; gpupanel from src/."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "FAKE_"))}
    env.update(
        FAKE_GPUS=f"{GPU_A},{GPU_B}",
        FAKE_CUDA_LEDGER=str(tmp_path / "ledger"),
        FAKE_CUDA_LOG=str(tmp_path / "calls.log"),
        GPUPANEL_LIBCUDA=str(libcuda["v2"]),
        PYTHONPATH=os.pathsep.join([str(FAKE_DRIVER), str(ROOT / "src")]),
    )
    return env


def calls(env: dict[str, str]) -> list[str]:
    return Path(env["FAKE_CUDA_LOG"]).read_text().splitlines()


def ledger(env: dict[str, str]) -> list[tuple[int, str, int]]:
    path = Path(env["FAKE_CUDA_LEDGER"])
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(p), u, int(n)) for p, u, n in (line.split() for line in lines)]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def allocator(fake_env: dict[str, str]) -> Iterator[list[subprocess.Popen[str]]]:
    """Started allocators; any left running are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_allocator(
    started: list[subprocess.Popen[str]], env: dict[str, str], visible: str, *args: str
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, str(ALLOCATOR), *args],
        env=dict(env, CUDA_VISIBLE_DEVICES=visible),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


# ---- the allocator -----------------------------------------------------------------------


def test_allocator_allocates_1_gib_through_the_v2_symbols_and_frees_it_when_released(
    fake_env: dict[str, str], allocator: list[subprocess.Popen[str]]
) -> None:
    proc, info = start_allocator(allocator, fake_env, GPU_B[:8], "--listen")
    assert info["status"] == "ready"
    assert (info["devices"], info["uuid"], info["bytes"]) == (1, GPU_B, GIB)
    assert info["pid"] == proc.pid and isinstance(info["port"], int)
    assert info["symbols"]["cuCtxCreate_v2"] == "cuCtxCreate_v2"
    assert info["symbols"]["cuMemAlloc_v2"] == "cuMemAlloc_v2"
    assert calls(fake_env) == [
        "cuInit 0",
        "cuDeviceGetCount",
        "cuDeviceGet 0",
        "cuCtxCreate_v2 flags=0 dev=0",
        f"cuMemAlloc_v2 {GIB}",
        f"cuMemsetD8_v2 0 {GIB}",
        "cuCtxSynchronize",
    ]
    held = ledger(fake_env)
    assert {(p, u) for p, u, _ in held} == {(proc.pid, GPU_B)}
    assert sum(n for *_, n in held) > GIB  # the buffer and the context
    assert proc.poll() is None, "it holds the memory until its standard input closes"

    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(10) == 0
    assert calls(fake_env)[-2:] == ["cuMemFree_v2", "cuCtxDestroy_v2"]
    assert sum(n for *_, n in ledger(fake_env)) == 0


def test_allocator_uses_the_plain_symbols_where_the_driver_has_no_v2(
    fake_env: dict[str, str], libcuda: dict[str, Path], allocator: list[subprocess.Popen[str]]
) -> None:
    env = dict(fake_env, GPUPANEL_LIBCUDA=str(libcuda["plain"]))
    proc, info = start_allocator(allocator, env, "1", "--mib", "64")
    assert (info["status"], info["uuid"], info["bytes"]) == ("ready", GPU_B, 64 * 1024**2)
    assert info["symbols"]["cuCtxCreate_v2"] == "cuCtxCreate"
    assert info["symbols"]["cuMemAlloc_v2"] == "cuMemAlloc"
    assert info["symbols"]["cuDeviceGetUuid_v2"] == "cuDeviceGetUuid"
    assert "cuCtxCreate flags=0 dev=0" in calls(env)
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(10) == 0
    assert calls(env)[-2:] == ["cuMemFree", "cuCtxDestroy"]


def test_allocator_sees_no_device_when_pinned_to_a_uuid_no_gpu_has(
    fake_env: dict[str, str], allocator: list[subprocess.Popen[str]]
) -> None:
    proc, info = start_allocator(allocator, fake_env, "GPU-00000000-dead-beef-0000-000000000000")
    assert info["status"] == "no_device"
    assert info["error"] == "CUDA_ERROR_NO_DEVICE"
    assert proc.wait(10) == 0
    assert calls(fake_env) == ["cuInit 0"]
    assert ledger(fake_env) == []


def test_allocator_says_when_there_is_no_libcuda(
    fake_env: dict[str, str], tmp_path: Path, allocator: list[subprocess.Popen[str]]
) -> None:
    env = dict(fake_env, GPUPANEL_LIBCUDA=str(tmp_path / "libcuda.so.1"))
    proc, info = start_allocator(allocator, env, GPU_A)
    assert info["status"] == "no_library"
    assert "libcuda.so.1" in info["error"]
    assert proc.wait(10) == 3


def test_allocator_dies_with_its_parent(
    fake_env: dict[str, str], allocator: list[subprocess.Popen[str]]
) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"c = subprocess.Popen([sys.executable, {str(ALLOCATOR)!r}], stdin=subprocess.PIPE, "
            "stdout=subprocess.PIPE, text=True)\n"
            "print(c.stdout.readline(), end='', flush=True)\n"
            "time.sleep(60)\n",
        ],
        env=dict(fake_env, CUDA_VISIBLE_DEVICES=GPU_A),
        stdout=subprocess.PIPE,
        text=True,
    )
    allocator.append(parent)
    assert parent.stdout is not None
    info = json.loads(parent.stdout.readline())
    assert info["status"] == "ready"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while not gone(info["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(info["pid"]), "the allocator outlived the process that started it"


# ---- the check against the stand-in driver ------------------------------------------------


def run_check(
    env: dict[str, str], tmp_path: Path, *command: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = tmp_path / "report.json"
    cmd = list(command) or [sys.executable, str(GPU_CHECK)]
    result = subprocess.run(
        [*cmd, "--rounds", "20", "--json", str(report)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.stderr == "", result.stderr
    return result, json.loads(report.read_text())


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in report["checks"] if c["name"] == name)
    return found


def test_check_passes_on_two_gpus_and_leaves_nothing_behind(
    fake_env: dict[str, str], tmp_path: Path
) -> None:
    result, report = run_check(fake_env, tmp_path)
    assert result.returncode == 0, result.stdout
    assert statuses(report) == {
        "nvml": "PASS",
        f"pinned:{GPU_A}": "PASS",
        f"verdict:{GPU_A}": "PASS",
        f"pinned:{GPU_B}": "PASS",
        f"verdict:{GPU_B}": "PASS",
        "no_device": "PASS",
        "wrong_gpu": "PASS",
        "cli_snapshot": "PASS",
        "snapshot_cpu": "PASS",
        "nvml_latency": "PASS",
        "cleanup": "PASS",
        "duration": "PASS",
    }
    assert report["verdict"] == "pass" and report["exit_code"] == 0
    assert [g["uuid"] for g in report["gpus"]] == [GPU_A, GPU_B]
    lines = result.stdout.splitlines()
    assert lines[-1] == report["summary"] and lines[-1].startswith("PASS: 12 checks passed")
    assert sum(line.startswith("PASS: ") for line in lines) == 13  # 12 checks and the verdict

    # the verdicts are gpupanel's, on where NVML saw each child
    assert check(report, f"verdict:{GPU_B}")["figures"]["verdict"] == "verified"
    pinned = check(report, f"pinned:{GPU_B}")["figures"]
    assert (pinned["how"], pinned["on"]) == ("by pid", [GPU_B])
    assert GIB < pinned["memory"] < 2 * GIB
    wrong = check(report, "wrong_gpu")["figures"]
    assert (wrong["verdict"], wrong["seen"]) == ("wrong_gpu", [GPU_B])
    assert wrong["child"]["visible"] == "1"
    # the card is the CLI's, with both children in it
    card = check(report, "cli_snapshot")["figures"]
    assert card["how"] == "python3 -m gpupanel.cli snapshot"
    assert GPU_A in card["output"] and f"pid {pinned['pid']} " in card["output"]
    cpu = check(report, "snapshot_cpu")["figures"]
    assert (cpu["gpus"], cpu["workers"], cpu["rounds"]) == (2, 2, 20)
    assert (
        "nvmlDeviceGetComputeRunningProcesses" in check(report, "nvml_latency")["figures"]["calls"]
    )

    # every child allocated through libcuda, freed, and is gone
    pids = {p for p, *_ in ledger(fake_env)}
    assert len(pids) == 3  # pinned to A, pinned to B, pinned by index (the ghost allocated nothing)
    assert sum(n for *_, n in ledger(fake_env)) == 0
    assert all(gone(p) for p in pids)


def test_check_on_one_gpu_whose_nvml_reports_other_pids(
    fake_env: dict[str, str], tmp_path: Path
) -> None:
    """One GPU: no wrong_gpu check (a skip, not a failure); and NVML reporting the host's
    pids, as inside a container: the child is recognised as the one new process."""
    env = dict(fake_env, FAKE_GPUS=GPU_A, FAKE_NVML_PID_OFFSET="100000")
    result, report = run_check(env, tmp_path)
    assert result.returncode == 0, result.stdout
    assert statuses(report)["wrong_gpu"] == "SKIP"
    assert statuses(report)["no_device"] == "PASS"
    assert statuses(report)[f"verdict:{GPU_A}"] == "PASS"
    pinned = check(report, f"pinned:{GPU_A}")["figures"]
    assert pinned["how"].startswith("as the only new process")
    assert "SKIP: wrong_gpu needs two GPUs" in result.stdout


def test_check_fails_where_the_driver_ignores_the_pin(
    fake_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(fake_env, FAKE_CUDA_IGNORE_VISIBLE="1")
    result, report = run_check(env, tmp_path)
    assert result.returncode == 1, result.stdout
    got = statuses(report)
    assert got[f"pinned:{GPU_B}"] == "FAIL"
    assert got[f"verdict:{GPU_B}"] == "FAIL"
    assert check(report, f"verdict:{GPU_B}")["figures"]["verdict"] == "wrong_gpu"
    assert got["no_device"] == "FAIL"
    assert got["wrong_gpu"] == "FAIL"
    assert got["cleanup"] == "PASS"
    assert report["verdict"] == "fail"
    assert result.stdout.splitlines()[-1].startswith("FAIL: 5 of 12 checks failed")
    assert all(gone(p) for p, *_ in ledger(env))


def test_check_without_a_driver_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    """The real nvidia-ml-py, on a machine without NVIDIA's libraries."""
    if driver_present():
        pytest.skip("an NVIDIA driver is installed here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "FAKE_"))}
    env["PYTHONPATH"] = str(ROOT / "src")
    result, report = run_check(env, tmp_path)
    assert result.returncode == 2
    assert result.stdout.splitlines() == [report["summary"]]
    assert report["summary"].startswith("no NVIDIA GPU here: no NVIDIA driver found")
    assert (report["verdict"], report["exit_code"], report["checks"]) == ("no_gpu", 2, [])


# ---- the kit -------------------------------------------------------------------------------


def test_kit_requirements_are_the_projects() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    kit = runpy.run_path(str(GPU_KIT))["REQUIREMENTS"]
    assert list(kit) == [d for d in dependencies if d.startswith(("nvidia-ml-py", "psutil"))]


@pytest.mark.slow
def test_kit_runs_the_check_with_a_plain_python(tmp_path: Path, libcuda: dict[str, Path]) -> None:
    """Built by one command (pip from the registry), under 64 MiB; then a Python with nothing
    installed runs the check from it in an empty environment: without a driver, one line and
    exit 2; with the stand-in driver, every check, `gpupanel snapshot` included."""
    kit = tmp_path / "kit"
    subprocess.run([sys.executable, str(GPU_KIT), "--out", str(kit)], check=True, timeout=300)
    manifest = json.loads((kit / "KIT.json").read_text())
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    assert size < 64 * 1024**2
    assert set(manifest["packages"]) == {"nvidia_ml_py", "psutil"}
    assert all(".abi3." in name for name in manifest["psutil_library"])
    assert (kit / "src" / "gpupanel" / "cli.py").is_file()
    assert (kit / "scripts" / "gpu_check.py").read_text() == GPU_CHECK.read_text()

    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = str(bare / "bin" / "python3")
    probe = "import importlib.util as u; print([m for m in ('gpupanel', 'psutil', 'pynvml', 'httpx') if u.find_spec(m)])"
    assert (
        subprocess.run(
            ["env", "-i", python, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "[]"
    ), "the bare Python should have nothing installed"

    if not driver_present():
        # the documented command, from the repository's root
        result = subprocess.run(
            ["env", "-i", f"PYTHONPATH={kit}:src", python, "scripts/gpu_check.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = result.stdout.splitlines()
        assert line.startswith("no NVIDIA GPU here: no NVIDIA driver found (NVML: ")
        assert result.stderr == ""

    # the kit alone, with the stand-in driver in front of it
    fake = [
        f"FAKE_GPUS={GPU_A},{GPU_B}",
        f"FAKE_CUDA_LEDGER={tmp_path / 'ledger'}",
        f"GPUPANEL_LIBCUDA={libcuda['v2']}",
        f"PYTHONPATH={FAKE_DRIVER}:{kit}:{kit / 'src'}",
    ]
    result, report = run_check(
        dict(os.environ),
        tmp_path,
        "env",
        "-i",
        *fake,
        python,
        str(kit / "scripts" / "gpu_check.py"),
    )
    assert result.returncode == 0, result.stdout
    assert report["environment"]["gpupanel"] == str(kit / "src" / "gpupanel")
    assert report["environment"]["executable"] == python
    assert set(statuses(report).values()) == {"PASS"}
    # the plain command line, with nothing but the kit: no web stack imported for a snapshot
    assert check(report, "cli_snapshot")["figures"]["how"] == "python3 -m gpupanel.cli snapshot"
