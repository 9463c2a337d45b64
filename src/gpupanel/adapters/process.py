"""Launching and stopping worker processes, and their logs.

A worker runs in its own session (its own process group), so it outlives the control
plane and can be stopped as a group (Ollama's runner children included). Its stdout and
stderr go straight to a log file opened in append mode, so no pipe ties it to us; the log is
rotated by copy-and-truncate, which an appending writer survives.

Each worker carries gpupanel's marker in its environment (`marker_env`: the worker id and
the state directory of the control plane that launched it), so a control plane that lost
its record of a worker still recognises it as its own by the process on the worker's port
(`marked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psutil

from gpupanel.adapters.host import listening_ports, process_tree
from gpupanel.core.lifecycle import PortHolder
from gpupanel.errors import Forbidden, GpuPanelError, NotFound

_log = logging.getLogger("gpupanel.process")


WORKER_ENV = "GPUPANEL_WORKER"
"""The marker: the id of the worker a process was launched as."""
WORKER_STATE_ENV = "GPUPANEL_WORKER_STATE"
"""The marker's other half: the state directory of the control plane that launched it."""
PIN_ENV = "CUDA_VISIBLE_DEVICES"


class LaunchError(GpuPanelError):
    """A worker process could not be started."""


def marker_env(worker_id: str, state_dir: Path) -> dict[str, str]:
    """The environment variables that mark a process as worker `worker_id` of the control
    plane whose state lives in `state_dir`."""
    return {WORKER_ENV: worker_id, WORKER_STATE_ENV: str(state_dir.absolute())}


@dataclass(frozen=True, slots=True)
class ProcessHandle:
    """A process identified by pid AND start time, so a recycled pid is never mistaken for it."""

    pid: int
    create_time: float


@dataclass(frozen=True, slots=True)
class Marked:
    """A process that carries gpupanel's marker: the process gpupanel launched (`handle`),
    the worker id and state directory it was launched for, and the GPU it is pinned to
    (its CUDA_VISIBLE_DEVICES)."""

    handle: ProcessHandle
    worker: str
    state_dir: str
    gpu: str | None


def identify(pid: int) -> ProcessHandle | None:
    """The handle of a live (non-zombie) process, or None."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return ProcessHandle(pid, proc.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_alive(handle: ProcessHandle) -> bool:
    """Is the very process of `handle` still running (same pid, same start time, not a zombie)?"""
    current = identify(handle.pid)
    return current is not None and abs(current.create_time - handle.create_time) < 1.0


_children: dict[int, subprocess.Popen[bytes]] = {}


def reap() -> None:
    """Collect the exit status of our own children that ended, so none lingers as a zombie."""
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[pid]


def _open_log(log_path: Path, argv: Sequence[str]) -> BinaryIO | None:
    """The worker's log opened for appending, or None when it cannot be written (an
    unwritable state directory must not keep a worker from running)."""
    log: BinaryIO | None = None
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab", buffering=0)  # noqa: SIM115 (closed by the caller)
        log.write(f"--- gpupanel: starting {' '.join(argv)}\n".encode())
    except OSError as exc:
        if log is not None:
            log.close()
        _log.warning(
            "cannot write the log %s (%s); the worker's output is discarded", log_path, exc
        )
        return None
    return log


def spawn(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> ProcessHandle:
    """Start `argv` in a new session with `env` set over ours, output appended to `log_path`
    (discarded if the log cannot be written)."""
    exe = shutil.which(argv[0]) if os.path.sep not in argv[0] else argv[0]
    if exe is None or not os.access(exe, os.X_OK):
        raise LaunchError(f"cannot run {argv[0]!r}: not found or not executable")
    log = _open_log(log_path, argv)
    try:
        proc = subprocess.Popen(
            list(argv),
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if log is None else log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise LaunchError(f"cannot run {argv[0]!r}: {exc}") from exc
    finally:
        if log is not None:
            log.close()
    _children[proc.pid] = proc
    handle = identify(proc.pid)
    if handle is None:
        proc.wait()
        raise LaunchError(
            f"{argv[0]!r} exited at once with status {proc.returncode}; see {log_path}"
        )
    return handle


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


async def stop(handle: ProcessHandle, grace_s: float) -> str:
    """SIGTERM the process group, SIGKILL it after `grace_s`. Returns how it ended:
    'gone' (already not running), 'terminated' or 'killed'."""
    if not is_alive(handle):
        reap()
        return "gone"
    _signal_group(handle.pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while loop.time() < deadline:
        if not is_alive(handle):
            reap()  # a child of ours that just died is a zombie until collected
            return "terminated"
        await asyncio.sleep(0.05)
    _signal_group(handle.pid, signal.SIGKILL)
    for _ in range(100):
        if not is_alive(handle):
            break
        await asyncio.sleep(0.02)
    reap()
    return "killed"


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _send(procs: Sequence[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running():  # pid and start time: never a recycled pid
                proc.send_signal(sig)


async def stop_tree(handle: ProcessHandle, grace_s: float) -> list[tuple[int, str]]:
    """Stop the process of `handle` and its descendants (as they are now), and nothing else:
    not the rest of its process group. SIGTERM all of them, SIGKILL those left after
    `grace_s`. Returns (pid, how it ended) for each, the process first: 'gone' (not running),
    'terminated', 'killed', or 'still running' (not ours to signal)."""
    try:
        root = psutil.Process(handle.pid)
        if abs(root.create_time() - handle.create_time) >= 1.0:
            return [(handle.pid, "gone")]
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return [(handle.pid, "gone")]
    ended: dict[int, str] = {p.pid: "gone" for p in procs if not _running(p)}
    live = [p for p in procs if p.pid not in ended]
    _send(live, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while loop.time() < deadline and any(_running(p) for p in live):
        reap()
        await asyncio.sleep(0.05)
    ended.update({p.pid: "terminated" for p in live if not _running(p)})
    left = [p for p in live if p.pid not in ended]
    _send(left, signal.SIGKILL)
    for _ in range(100):
        reap()
        if not any(_running(p) for p in left):
            break
        await asyncio.sleep(0.02)
    ended.update({p.pid: "killed" if not _running(p) else "still running" for p in left})
    reap()
    return [(p.pid, ended[p.pid]) for p in procs]


def tail(log_path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `lines` lines of a log (reading at most `max_bytes` from its end)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-lines:]


def rotate(log_path: Path, max_bytes: int = 10 * 1024 * 1024, keep: int = 3) -> bool:
    """Copy-and-truncate `log_path` once it exceeds `max_bytes`, keeping `keep` old copies."""
    try:
        if log_path.stat().st_size <= max_bytes:
            return False
    except OSError:
        return False
    try:
        for i in range(keep - 1, 0, -1):
            older = log_path.with_name(f"{log_path.name}.{i}")
            if older.exists():
                os.replace(older, log_path.with_name(f"{log_path.name}.{i + 1}"))
        shutil.copyfile(log_path, log_path.with_name(f"{log_path.name}.1"))
        with open(log_path, "r+b") as f:
            f.truncate(0)
    except OSError as exc:  # an unwritable state directory: the next tick tries again
        _log.warning("cannot rotate the log %s: %s", log_path, exc)
        return False
    return True


def find_program(name: str, path: str | None = None) -> str | None:
    """The executable a launch of `name` would run: `name` itself when it is a path (and
    executable), else the first match on `path` (default: $PATH), as `spawn` looks it up."""
    if os.path.sep in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    return shutil.which(name, path=path)


@dataclass(frozen=True, slots=True)
class Answer:
    """What a program printed when asked something (`gpupanel doctor` asks `X --version`):
    its exit status and output (stdout, then stderr), or `problem` when it could not be run
    or did not finish in time (then `status` is None)."""

    status: int | None
    output: str = ""
    problem: str | None = None


def ask(argv: Sequence[str], timeout_s: float = 5.0, max_chars: int = 4096) -> Answer:
    """Run `argv` (stdin closed, our environment) and collect what it prints, killed after
    `timeout_s`; never raises for a program that is missing, not executable or hangs."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Answer(None, problem=f"no answer within {timeout_s:g} s")
    except OSError as exc:
        return Answer(None, problem=exc.strerror or str(exc))
    output = (done.stdout + b"\n" + done.stderr).decode(errors="replace").strip()
    return Answer(done.returncode, output[:max_chars])


def port_holder(port: int) -> PortHolder | None:
    """The process listening on TCP `port` on this host, if any (a system-wide lookup, so
    only when a launch is due, never per tick)."""
    with contextlib.suppress(psutil.AccessDenied):
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN:
                if c.pid is None:
                    return PortHolder(None, "")
                try:
                    proc = psutil.Process(c.pid)
                    command = " ".join(proc.cmdline())[:160] or proc.name()
                except psutil.Error:
                    command = ""
                return PortHolder(c.pid, command)
    return None


def marked(pid: int) -> Marked | None:
    """The gpupanel worker that process `pid` belongs to, by the marker in its environment:
    the topmost of its ancestors that carries the same marker is the process gpupanel
    launched (the listener may be a child). None when `pid` carries no marker or its
    environment cannot be read (another user's process: not ours)."""
    try:
        proc = psutil.Process(pid)
        env = proc.environ()
        worker, state_dir = env.get(WORKER_ENV), env.get(WORKER_STATE_ENV)
        if not worker or not state_dir:
            return None
        root = proc
        for parent in proc.parents():
            try:
                parent_env = parent.environ()
            except psutil.Error:
                break
            if (parent_env.get(WORKER_ENV), parent_env.get(WORKER_STATE_ENV)) != (
                worker,
                state_dir,
            ):
                break
            root, env = parent, parent_env
        return Marked(
            ProcessHandle(root.pid, root.create_time()), worker, state_dir, env.get(PIN_ENV)
        )
    except psutil.Error:
        return None


def describe(pid: int) -> tuple[ProcessHandle, str]:
    """A live process's handle and name; NotFound or Forbidden when there is none we may see."""
    try:
        proc = psutil.Process(pid)
        return ProcessHandle(pid, proc.create_time()), proc.name()
    except psutil.NoSuchProcess:
        raise NotFound(f"no process {pid}") from None
    except psutil.AccessDenied:
        raise Forbidden(f"pid {pid} belongs to another user; gpupanel cannot stop it") from None


class OsProcesses:
    """The operating system's processes, as the supervisor uses them (its fakes in tests
    implement the same methods)."""

    spawn = staticmethod(spawn)
    is_alive = staticmethod(is_alive)
    stop = staticmethod(stop)
    tail = staticmethod(tail)
    reap = staticmethod(reap)
    rotate = staticmethod(rotate)
    port_holder = staticmethod(port_holder)
    describe = staticmethod(describe)
    marked = staticmethod(marked)
    stop_tree = staticmethod(stop_tree)

    @staticmethod
    def listens(pid: int, port: int) -> bool:
        """Does the process tree of `pid` listen on `port`?"""
        return port in listening_ports(process_tree(pid))

    @staticmethod
    def tree(pid: int) -> list[int]:
        return process_tree(pid)
