"""`gpupanel doctor`'s checks, each verdict on a stand-in machine (docs/doctor.md).

Fakes stay below the adapter boundary: a stand-in `pynvml` module, a PATH folder of tiny
scripts that print a version, ports held by real sockets and processes, real folders (one
that cannot be written), a real simulated workstation and its ledger.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pynvml
import pytest

from gpupanel.adapters.nvml import NvmlBackend
from gpupanel.adapters.process import WORKER_ENV, WORKER_STATE_ENV
from gpupanel.adapters.state import StateStore, WorkerRecord
from gpupanel.core.config import Config, PanelSettings, WorkerSpec
from gpupanel.services import doctor
from gpupanel.services.doctor import FAIL, OK, WARN, Check, GpuView
from gpupanel.sim.backend import SimulatedGpuBackend
from gpupanel.sim.ledger import Ledger
from tests.adapters.test_nvml import UUID0, UUID1, FakeNvml, two_gpus
from tests.conftest import free_port

GIB = 1024**3


class VersionedNvml(FakeNvml):
    """The stand-in driver, with the system calls that report its versions."""

    def nvmlSystemGetDriverVersion(self) -> bytes:
        self._check_open()
        return b"550.54.15"

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._check_open()
        return "12.550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check_open()
        return 12040


def by_name(checks: list[Check], name: str) -> Check:
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, f"{name!r} in {[c.name for c in checks]}"
    return found[0]


# ---- the driver and the GPUs -----------------------------------------------------------------


def test_a_driver_is_ok_with_its_versions_and_each_gpu_is_a_line() -> None:
    nv = VersionedNvml(*two_gpus().gpus)
    view = doctor.read_gpus(NvmlBackend(nv))
    driver = doctor.check_driver(view)
    assert driver.verdict == OK and driver.fix is None
    assert driver.found == "NVIDIA driver 550.54.15, NVML 12.550.54.15, CUDA 12.4"
    gpus = doctor.check_gpus(view)
    assert [(c.name, c.verdict) for c in gpus] == [("gpu 0", OK), ("gpu 1", OK)]
    assert UUID0 in gpus[0].found and "RTX 6000 Ada" in gpus[0].found
    assert UUID1 in gpus[1].found and "24.0 GiB" in gpus[1].found
    assert not nv.open  # the backend was closed after reading


def test_a_driver_without_version_calls_still_passes() -> None:
    view = doctor.read_gpus(NvmlBackend(two_gpus()))  # no nvmlSystem* calls at all
    driver = doctor.check_driver(view)
    assert driver.verdict == OK and "version unknown" in driver.found


def test_no_driver_fails_with_the_fix_and_the_gpu_line_too() -> None:
    nv = FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound())
    view = doctor.read_gpus(NvmlBackend(nv))
    driver = doctor.check_driver(view)
    assert driver.verdict == FAIL
    assert "no NVIDIA driver" in driver.found
    assert driver.fix is not None
    assert "install the NVIDIA driver" in driver.fix and "--simulate" in driver.fix
    [gpus] = doctor.check_gpus(view)
    assert gpus.verdict == FAIL and "no driver" in gpus.found


def test_nvml_that_does_not_start_fails_with_a_reboot_fix() -> None:
    nv = FakeNvml(init_error=pynvml.NVMLError_Unknown())
    driver = doctor.check_driver(doctor.read_gpus(NvmlBackend(nv)))
    assert driver.verdict == FAIL and "NVML failed to start" in driver.found
    assert driver.fix is not None and "reboot" in driver.fix


def test_a_lost_gpu_fails_and_no_gpu_at_all_fails() -> None:
    nv = two_gpus()
    backend = NvmlBackend(nv)
    backend.sample()  # seen once, then lost
    nv.gpus[1].lost = True
    checks = doctor.check_gpus(doctor.read_gpus(backend))
    assert [c.verdict for c in checks] == [OK, FAIL]
    assert UUID1 in checks[1].found and "LOST" in checks[1].found
    assert checks[1].fix is not None and "dmesg" in checks[1].fix

    [none] = doctor.check_gpus(doctor.read_gpus(NvmlBackend(FakeNvml())))
    assert none.verdict == FAIL and "sees no GPU" in none.found


def test_the_simulated_workstation_passes_and_says_so(sim_dir: Path) -> None:
    view = doctor.read_gpus(SimulatedGpuBackend.from_spec("2x24", directory=sim_dir))
    driver = doctor.check_driver(view)
    assert driver.verdict == OK and "simulated" in driver.found and str(sim_dir) in driver.found
    gpus = doctor.check_gpus(view)
    assert [c.verdict for c in gpus] == [OK, OK]
    assert all("simulated" in c.found and "GPU-" in c.found for c in gpus)


# ---- the config ------------------------------------------------------------------------------


@pytest.fixture
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without gpupanel.toml, and no $GPUPANEL_CONFIG."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
    return tmp_path


def test_no_config_file_is_the_default(no_config: Path) -> None:
    config, check = doctor.read_config(None, [UUID0, UUID1])
    assert check.verdict == OK and "the defaults" in check.found and "gpu0, gpu1" in check.found
    assert [w.id for w in config.workers] == ["gpu0", "gpu1"]


def test_a_config_file_is_named_with_its_workers(no_config: Path) -> None:
    (no_config / "gpupanel.toml").write_text(
        '[panel]\nport = 9100\n[[workers]]\nid = "big"\ngpu = 0\nport = 9101\n'
    )
    config, check = doctor.read_config(None, [UUID0])
    assert check.verdict == OK and "gpupanel.toml: 1 worker(s) (big)" in check.found
    assert config.panel.port == 9100


def test_a_bad_config_fails_and_the_defaults_stand_in(no_config: Path) -> None:
    (no_config / "gpupanel.toml").write_text('[[workers]]\nid = "a"\ngpu = 3\nport = 9101\n')
    config, check = doctor.read_config(None, [UUID0])
    assert check.verdict == FAIL
    assert "field 'gpu' is index 3" in check.found and "defaults" in check.found
    assert check.fix is not None and "docs/api.md" in check.fix
    assert config.workers == () and config.panel.port == 8765


# ---- the runtimes' programs ------------------------------------------------------------------


def script(directory: Path, name: str, body: str) -> Path:
    """An executable shell script `name` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def ollama_config(*workers: WorkerSpec) -> Config:
    return Config(panel=PanelSettings(), workers=workers)


def test_a_program_on_path_is_ok_with_its_version(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    exe = script(
        bin_dir,
        "ollama",
        'echo "Warning: could not connect to a running Ollama instance" >&2\n'
        'echo "Warning: client version is 0.5.7" >&2',
    )
    spec = WorkerSpec(id="a", runtime="ollama", gpu=UUID0, port=11435)
    checks = doctor.check_runtimes(ollama_config(spec), False, path=str(bin_dir))
    ollama = by_name(checks, "ollama")
    assert ollama.verdict == OK and ollama.fix is None
    assert ollama.found == f"{exe}: client version is 0.5.7"


def test_a_missing_program_a_worker_needs_fails_else_it_is_a_note(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = WorkerSpec(id="a", runtime="ollama", gpu=UUID0, port=11435)
    checks = doctor.check_runtimes(ollama_config(spec), False, path=str(empty))
    ollama, vllm = by_name(checks, "ollama"), by_name(checks, "vllm")
    assert ollama.verdict == FAIL and "not found on PATH (needed by worker a)" in ollama.found
    assert ollama.fix is not None and "https://ollama.com/download" in ollama.fix
    assert "`command`" in ollama.fix
    assert vllm.verdict == WARN and "no configured worker uses it" in vllm.found
    assert vllm.fix is not None and "pip install vllm" in vllm.fix


def test_simulating_ollama_is_not_needed(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = WorkerSpec(id="a", runtime="ollama", gpu=UUID0, port=11435)
    ollama = by_name(doctor.check_runtimes(ollama_config(spec), True, path=str(empty)), "ollama")
    assert ollama.verdict == WARN
    assert "not needed with --simulate" in ollama.found and "worker a" in ollama.found


def test_a_workers_command_wins_over_path(tmp_path: Path) -> None:
    on_path = script(tmp_path / "bin", "vllm", "echo 0.6.3")
    own = script(tmp_path / "opt", "my-vllm", "echo 'INFO starting'\necho 0.7.1")
    spec = WorkerSpec(id="v", runtime="vllm", gpu=UUID0, port=8000, command=(str(own),))
    checks = doctor.check_runtimes(ollama_config(spec), False, path=str(on_path.parent))
    mine = by_name(checks, "vllm (worker v)")
    assert mine.verdict == OK and mine.found == f"{own}: 0.7.1"
    assert not [c for c in checks if c.name == "vllm"]  # PATH's vllm is nobody's

    gone = replace(spec, command=(str(tmp_path / "nowhere" / "vllm"),))
    missing = by_name(doctor.check_runtimes(ollama_config(gone), False, path=""), "vllm (worker v)")
    assert missing.verdict == FAIL and "not found or not executable" in missing.found
    assert missing.fix is not None and "fix the first item of `command` of worker v" in missing.fix


def test_a_program_that_hangs_or_fails_to_answer(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    script(bin_dir, "ollama", "exec sleep 30")
    script(bin_dir, "vllm", "echo 'no such option' >&2\nexit 3")
    spec = WorkerSpec(id="a", runtime="ollama", gpu=UUID0, port=11435)
    start = time.monotonic()
    checks = doctor.check_runtimes(ollama_config(spec), False, path=str(bin_dir), timeout_s=0.5)
    assert time.monotonic() - start < 10
    ollama, vllm = by_name(checks, "ollama"), by_name(checks, "vllm")
    assert ollama.verdict == FAIL and "no answer within 0.5 s" in ollama.found
    assert vllm.verdict == WARN and "exited with status 3" in vllm.found
    assert "no such option" in vllm.found


@pytest.mark.parametrize(
    ("output", "line"),
    [
        ("ollama version is 0.5.7", "ollama version is 0.5.7"),
        (
            "ggml_cuda_init: found 1 CUDA devices\nversion: 4567 (abc123)\nbuilt with cc",
            "version: 4567 (abc123)",
        ),
        ("INFO 01-01 12:00 logging\n0.6.3", "0.6.3"),
        ("", "(no version printed)"),
    ],
)
def test_version_line_picks_the_version(output: str, line: str) -> None:
    assert doctor.version_line(output) == line


# ---- ports -----------------------------------------------------------------------------------


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A port held by this very test process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_a_free_port_is_ok(tmp_path: Path) -> None:
    port = free_port()
    check = doctor.check_port("panel port", "127.0.0.1", port, tmp_path, "pick another")
    assert check.verdict == OK and check.found == f"{port} is free"


def test_a_held_port_names_the_pid_and_process(tmp_path: Path, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    check = doctor.check_port("panel port", "127.0.0.1", port, tmp_path, "pick another")
    assert check.verdict == FAIL
    name = psutil.Process().name()
    assert f"held by pid {os.getpid()} ({name}" in check.found
    assert check.fix == "stop it; or pick another"


def test_an_address_that_is_not_this_hosts_fails(tmp_path: Path) -> None:
    check = doctor.check_port("panel port", "192.0.2.1", free_port(), tmp_path, "set host")
    assert check.verdict == FAIL and "cannot listen on 192.0.2.1" in check.found


@pytest.fixture
def marked_listener(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """A process listening on a port with the marker of worker `w` of state dir `state`."""
    state = tmp_path / "state"
    port = free_port()
    code = (
        "import socket, sys, time\n"
        f"s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(60)"
    )
    env = {**os.environ, WORKER_ENV: "w", WORKER_STATE_ENV: str(state.absolute())}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        yield child.pid, port, state
    finally:
        child.kill()
        child.wait()


def test_a_port_held_by_its_own_worker_is_ok(marked_listener: tuple[int, int, Path]) -> None:
    pid, port, state = marked_listener
    mine = doctor.check_port("worker w port", "127.0.0.1", port, state, "other", worker="w")
    assert mine.verdict == OK and f"gpupanel worker 'w' itself, pid {pid}" in mine.found

    other = doctor.check_port("worker x port", "127.0.0.1", port, state, "other", worker="x")
    assert other.verdict == FAIL and f"gpupanel worker 'w', pid {pid}" in other.found
    assert other.fix is not None and "gpupanel workers stop w" in other.fix

    elsewhere = state.parent / "another-state"
    foreign = doctor.check_port("worker w port", "127.0.0.1", port, elsewhere, "o", worker="w")
    assert foreign.verdict == FAIL and str(state.absolute()) in foreign.found


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "version": "9.9.9", "simulated": True}).encode()
        self.send_response(200 if self.path == "/panel/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_port_held_by_a_gpupanel_control_plane(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        panel = doctor.check_port("panel port", "127.0.0.1", port, tmp_path, "other")
        assert panel.verdict == OK
        assert "gpupanel control plane (version 9.9.9)" in panel.found
        assert f"pid {os.getpid()}" in panel.found
        worker = doctor.check_port("worker a port", "127.0.0.1", port, tmp_path, "o", worker="a")
        assert worker.verdict == FAIL and "gpupanel control plane" in worker.found
    finally:
        server.shutdown()
        server.server_close()


def test_ports_of_the_panel_and_each_worker(tmp_path: Path, listening: socket.socket) -> None:
    held = listening.getsockname()[1]
    workers = (
        WorkerSpec(id="a", runtime="ollama", gpu=UUID0, port=free_port()),
        WorkerSpec(id="b", runtime="ollama", gpu=UUID1, port=held),
    )
    config = Config(panel=PanelSettings(port=free_port()), workers=workers, source="x.toml")
    checks = doctor.check_ports(config, tmp_path)
    assert [(c.name, c.verdict) for c in checks] == [
        ("panel port", OK),
        ("worker a port", OK),
        ("worker b port", FAIL),
    ]
    assert checks[2].fix is not None and "worker 'b' another `port` in x.toml" in checks[2].fix


# ---- the state directory ---------------------------------------------------------------------


def test_a_writable_state_dir_is_ok_and_made_if_missing(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "gpupanel"
    check = doctor.check_state_dir(directory)
    assert check.verdict == OK and f"{directory} is writable" in check.found
    assert directory.is_dir()


def test_a_state_dir_in_use_names_its_control_plane(tmp_path: Path) -> None:
    plane = StateStore(tmp_path)
    plane.claim("http://127.0.0.1:8765")
    try:
        check = doctor.check_state_dir(tmp_path)
    finally:
        plane.release()
    assert check.verdict == OK
    assert check.found.endswith(
        f"; in use by the control plane of pid {os.getpid()}, serving http://127.0.0.1:8765)"
    )


def test_a_state_dir_under_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    directory = tmp_path / "file" / "gpupanel"
    check = doctor.check_state_dir(directory)
    assert check.verdict == FAIL
    assert check.found == f"{directory} cannot be written (Not a directory)"
    assert check.fix is not None and "state_dir" in check.fix and "XDG_STATE_HOME" in check.fix


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_state_dir_fails(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        check = doctor.check_state_dir(directory)
    finally:
        directory.chmod(0o755)
    assert check.verdict == FAIL and "Permission denied" in check.found


# ---- the GPUs' processes ---------------------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def simulated_view(sim_dir: Path, pid: int) -> GpuView:
    backend = SimulatedGpuBackend.from_spec("2x24", directory=sim_dir)
    Ledger(sim_dir).record({backend.workstation.gpus[1].uuid: 3 * GIB}, pid=pid)
    return doctor.read_gpus(backend)


def test_a_gpu_process_gpupanel_did_not_start_is_named(
    sim_dir: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    view = simulated_view(sim_dir, sleeper.pid)
    check = doctor.check_gpu_processes(view, StateStore(tmp_path / "state"))
    assert check.verdict == WARN
    assert f"pid {sleeper.pid} (python" in check.found and "3.0 GiB on GPU 1" in check.found
    assert check.fix is not None and "stop" in check.fix


def test_a_recorded_workers_gpu_process_is_managed(
    sim_dir: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    view = simulated_view(sim_dir, sleeper.pid)
    store = StateStore(tmp_path / "state")
    uuid = view.gpus[1].uuid
    spec = {"id": "a", "runtime": "ollama", "gpu": uuid, "port": 11435}
    record = WorkerRecord(
        id="a",
        pid=sleeper.pid,
        create_time=psutil.Process(sleeper.pid).create_time(),
        port=11435,
        gpu_uuid=uuid,
        runtime="ollama",
        log_path=str(tmp_path / "a.log"),
        started_at=time.time(),
        spec=spec,
    )
    store.save({"a": record})
    check = doctor.check_gpu_processes(view, store)
    assert check.verdict == OK and "all of gpupanel workers" in check.found


def test_a_marked_gpu_process_is_managed(sim_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, WORKER_ENV: "a", WORKER_STATE_ENV: str(tmp_path / "elsewhere")}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        view = simulated_view(sim_dir, child.pid)
        check = doctor.check_gpu_processes(view, StateStore(tmp_path / "state"))
    finally:
        child.kill()
        child.wait()
    assert check.verdict == OK and check.found == "1 on the GPUs, all of gpupanel workers"


def test_gpu_processes_without_telemetry_or_without_any(sim_dir: Path, tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    no_driver = doctor.read_gpus(
        NvmlBackend(FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound()))
    )
    assert doctor.check_gpu_processes(no_driver, store).verdict == WARN
    idle = doctor.read_gpus(SimulatedGpuBackend.from_spec("1x24", directory=sim_dir))
    check = doctor.check_gpu_processes(idle, store)
    assert check.verdict == OK and check.found == "no compute process on any GPU"


# ---- Jupyter ---------------------------------------------------------------------------------


def test_jupyter_packages_and_their_extensions(tmp_path: Path) -> None:
    with_ext, without = tmp_path / "with", tmp_path / "without"
    (with_ext / "@jupyter-widgets" / "jupyterlab-manager").mkdir(parents=True)
    (with_ext / "@jupyter-widgets" / "jupyterlab-manager" / "package.json").write_text("{}")
    without.mkdir()
    packages = [
        ("ipywidgets", "@jupyter-widgets/jupyterlab-manager"),
        ("json", None),
        ("gpupanel_no_such_package", "nothing"),
    ]
    ok_widgets, ok_plain, missing = doctor.check_jupyter([without, with_ext], packages)
    assert ok_widgets.verdict == OK and str(with_ext) in ok_widgets.found
    assert ok_plain.verdict == OK and ok_plain.name == "json"
    assert missing.verdict == WARN and missing.fix == "pip install 'gpupanel[jupyter]'"

    [no_ext] = doctor.check_jupyter([without], packages[:1])
    assert no_ext.verdict == WARN
    assert "@jupyter-widgets/jupyterlab-manager is not in" in no_ext.found
    assert no_ext.fix is not None and "gpupanel[jupyter]" in no_ext.fix


def test_labextension_dirs_start_with_this_environment() -> None:
    dirs = doctor.labextension_dirs()
    assert dirs[0] == Path(sys.prefix) / "share" / "jupyter" / "labextensions"


# ---- all of them -----------------------------------------------------------------------------


@pytest.fixture
def machine(no_config: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config with free ports and its own state directory, in a folder of its own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(no_config / "xdg"))
    (no_config / "gpupanel.toml").write_text(
        f'[panel]\nport = {free_port()}\nstate_dir = "{no_config / "state"}"\n'
        f'[[workers]]\nid = "a"\ngpu = 0\nport = {free_port()}\n'
    )
    return no_config


def test_run_checks_simulated_passes(machine: Path) -> None:
    checks = doctor.run_checks("2x24", path=str(machine))
    assert not doctor.failed(checks), [c for c in checks if c.verdict == FAIL]
    names = [c.name for c in checks]
    assert names[:4] == ["driver", "gpu 0", "gpu 1", "config"]
    assert {"ollama", "panel port", "worker a port", "state dir", "gpu processes"} <= set(names)
    assert by_name(checks, "state dir").found.startswith(str(machine / "state"))


def test_run_checks_without_a_driver_fails(machine: Path) -> None:
    nv = FakeNvml(init_error=pynvml.NVMLError_DriverNotLoaded())
    checks = doctor.run_checks(backend=NvmlBackend(nv), path=str(machine))
    assert doctor.failed(checks)
    assert [c.name for c in checks if c.verdict == FAIL][:2] == ["driver", "gpus"]
    assert all(c.verdict in (OK, WARN, FAIL) for c in checks)
    assert all(c.fix for c in checks if c.verdict == FAIL)


def test_check_to_json() -> None:
    check = Check("x", WARN, "found", "fix it")
    assert check.to_json() == {"name": "x", "verdict": "warn", "found": "found", "fix": "fix it"}


def test_the_state_dir_check_leaves_an_unreadable_state_file_alone(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "workers.json").write_text("{not json")
    check = doctor.check_state_dir(directory)
    assert check.verdict == OK and "0 worker(s) recorded" in check.found
    assert (directory / "workers.json").read_text() == "{not json"  # not moved aside
    assert sorted(p.name for p in directory.iterdir()) == ["logs", "workers.json"]
