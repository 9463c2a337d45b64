"""Launching and stopping worker processes, and their logs.

A worker runs in its own session (its own process group), so it outlives the control
plane and can be stopped as a group (Ollama's runner children included). Its stdout and
stderr go straight to a log file opened in append mode, so no pipe ties it to us; the log is
rotated by copy-and-truncate, which an appending writer survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from gpupanel.adapters.host import listening_ports, process_tree
from gpupanel.core.lifecycle import PortHolder
from gpupanel.errors import Forbidden, GpuPanelError, NotFound


class LaunchError(GpuPanelError):
    """A worker process could not be started."""


@dataclass(frozen=True, slots=True)
class ProcessHandle:
    """A process identified by pid AND start time, so a recycled pid is never mistaken for it."""

    pid: int
    create_time: float


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


def spawn(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> ProcessHandle:
    """Start `argv` in a new session with `env` set over ours, output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which(argv[0]) if os.path.sep not in argv[0] else argv[0]
    if exe is None or not os.access(exe, os.X_OK):
        raise LaunchError(f"cannot run {argv[0]!r}: not found or not executable")
    with open(log_path, "ab", buffering=0) as log:
        log.write(f"--- gpupanel: starting {' '.join(argv)}\n".encode())
        try:
            proc = subprocess.Popen(
                list(argv),
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise LaunchError(f"cannot run {argv[0]!r}: {exc}") from exc
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
    for i in range(keep - 1, 0, -1):
        older = log_path.with_name(f"{log_path.name}.{i}")
        if older.exists():
            os.replace(older, log_path.with_name(f"{log_path.name}.{i + 1}"))
    shutil.copyfile(log_path, log_path.with_name(f"{log_path.name}.1"))
    with open(log_path, "r+b") as f:
        f.truncate(0)
    return True


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

    @staticmethod
    def listens(pid: int, port: int) -> bool:
        """Does the process tree of `pid` listen on `port`?"""
        return port in listening_ports(process_tree(pid))

    @staticmethod
    def tree(pid: int) -> list[int]:
        return process_tree(pid)
