"""Host telemetry: process trees, their CPU and memory, and who holds which TCP port.

Cheap per tick (docs/architecture.md, "Performance budgets"): process objects are kept between ticks (psutil's CPU
percent needs the previous reading); on Linux the process tree comes from
`/proc/<pid>/task/<tid>/children` and sockets from one filtered read of `/proc/net/tcp{,6}`
matched against the watched trees' file descriptors. Reading that table costs the kernel a
walk of its whole connection hash (5 ms here, more on big-memory hosts), so it is re-read
every `port_refresh_s` seconds or when the watched ports change, not every tick. psutil's per-process
`net_connections()` would parse the whole system table once per process, and `children()`
reads every process on the host; those are the fallbacks where `/proc` lacks these files.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from gpupanel.core.model import HostSample, PortStats, ProcessStats

_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess)
_LISTEN, _ESTABLISHED = "0A", "01"
_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


@dataclass(frozen=True, slots=True)
class _Socket:
    port: int
    listening: bool
    inode: int


def read_tcp_sockets(ports: set[int] | None) -> list[_Socket] | None:
    """Listening and established TCP sockets whose local port is in `ports` (all if None),
    from Linux /proc; None where /proc has no TCP tables."""
    found: list[_Socket] = []
    try:
        for table in _TCP_TABLES:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    local, state = fields[1], fields[3]
                    if state not in (_LISTEN, _ESTABLISHED):
                        continue
                    port = int(local[local.rfind(":") + 1 :], 16)
                    if ports is None or port in ports:
                        found.append(_Socket(port, state == _LISTEN, int(fields[9])))
    except FileNotFoundError:
        return found or None
    return found


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds open (empty if it is gone or not ours)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return set()
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def child_pids(pid: int) -> list[int] | None:
    """Direct children of `pid` from /proc, or None where the kernel does not provide them."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            if tid == str(pid):
                return None  # kernel without CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return out


_PortView = tuple[dict[int, int], dict[int, set[int]], dict[int, int]]


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc (psutil where /proc lacks children files)."""
    pids, frontier = [pid], [pid]
    while frontier:
        children = child_pids(frontier.pop())
        if children is None:
            try:
                return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                return [pid] if psutil.pid_exists(pid) else []
        pids += children
        frontier += children
    return pids


def listening_ports(pids: Iterable[int]) -> set[int]:
    """The TCP ports on which any of `pids` listens."""
    sockets = read_tcp_sockets(None) or []
    listen = {s.inode: s.port for s in sockets if s.listening}
    return {listen[i] for pid in pids for i in socket_inodes(pid) & listen.keys()}


def bind_error(host: str, port: int) -> OSError | None:
    """Why TCP `host:port` cannot be listened on now (EADDRINUSE: someone holds it, perhaps
    a process this user cannot see; EACCES: a port below 1024 without the privilege), or
    None when it can. The socket is bound as `gpupanel serve` binds it and closed at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def gpupanel_health(host: str, port: int, timeout_s: float = 1.0) -> dict[str, object] | None:
    """The `/panel/health` answer (`status`, `version`, `simulated`) of the gpupanel control
    plane listening on plain-HTTP `host:port`, or None when what listens there does not
    answer as gpupanel does."""
    import httpx

    name = f"[{host}]" if ":" in host else host
    try:
        reply = httpx.get(f"http://{name}:{port}/panel/health", timeout=timeout_s, trust_env=False)
        body = reply.json()
    except (httpx.HTTPError, ValueError):
        return None
    if (
        isinstance(body, dict)
        and body.get("status") == "ok"
        and isinstance(body.get("version"), str)
    ):
        return body
    return None


class HostProbe:
    """Samples the processes and ports the control plane watches. One instance per sampler."""

    def __init__(
        self, port_refresh_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self.port_refresh_s = port_refresh_s
        self._clock = clock
        self._ports: tuple[float, object, _PortView] | None = None
        psutil.cpu_percent(interval=None)

    def _process(self, pid: int, *, root: bool = False) -> psutil.Process | None:
        """A cached psutil process; roots are re-checked for pid reuse (children are listed
        afresh from /proc every tick, so a recycled child pid cannot linger in a tree)."""
        proc = self._procs.get(pid)
        if proc is not None and (not root or proc.is_running()):
            return proc
        try:
            proc = psutil.Process(pid)
        except _GONE:
            self._procs.pop(pid, None)
            return None
        except psutil.AccessDenied:
            return None
        proc.cpu_percent(interval=None)  # primes the counter; the first reading is 0
        self._procs[pid] = proc
        return proc

    def tree(self, pid: int) -> list[int]:
        """`pid` and all its descendants (empty if `pid` is gone)."""
        return process_tree(pid) if self._process(pid, root=True) is not None else []

    def _tree_stats(self, pid: int, tree: list[int], listening: tuple[int, ...]) -> ProcessStats:
        cpu, rss, alive = 0.0, 0, []
        for p in tree:
            proc = self._process(p)
            if proc is None:
                continue
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(interval=None)
                    rss += proc.memory_info().rss
            except (*_GONE, psutil.AccessDenied):
                continue
            alive.append(p)
        root = self._procs.get(pid)
        return ProcessStats(
            pid=pid,
            alive=root is not None and pid in alive,
            cpu_percent=round(cpu, 1),
            rss=rss,
            tree_pids=tuple(alive),
            listening_ports=listening,
            create_time=root.create_time() if root is not None else None,
        )

    def sample(self, pids: Iterable[int] = (), ports: Iterable[int] = ()) -> HostSample:
        """Host CPU/memory, stats of each pid's process tree, and listener/established per port.

        A port is attributed to the watched tree holding its listening socket; a port no
        watched tree holds is looked up in the system table (the costly path, taken only then).
        Established counts and listeners may be up to `port_refresh_s` old.
        """
        wanted = set(ports)
        trees = {pid: self.tree(pid) for pid in pids}
        key = (frozenset(wanted), frozenset(trees))
        now = self._clock()
        if (
            self._ports is None
            or self._ports[1] != key
            or now - self._ports[0] >= self.port_refresh_s
        ):
            self._ports = (now, key, self._port_view(wanted, trees))
        listeners, tree_listening, established = self._ports[2]
        processes = {
            pid: self._tree_stats(pid, tree, tuple(sorted(tree_listening.get(pid, ()))))
            if tree
            else ProcessStats(pid=pid, alive=False)
            for pid, tree in trees.items()
        }
        seen = {p for tree in trees.values() for p in tree}
        self._procs = {p: proc for p, proc in self._procs.items() if p in seen}
        memory = psutil.virtual_memory()
        return HostSample(
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_total=memory.total,
            memory_used=memory.total - memory.available,
            processes=processes,
            ports={
                p: PortStats(port=p, listener_pid=listeners.get(p), established=established[p])
                for p in sorted(wanted)
            },
        )

    def _port_view(self, wanted: set[int], trees: dict[int, list[int]]) -> _PortView:
        """Listener (watched root pid, else any pid) and established count of each wanted port."""
        listeners: dict[int, int] = {}
        tree_listening: dict[int, set[int]] = {pid: set() for pid in trees}
        established = dict.fromkeys(wanted, 0)
        sockets = read_tcp_sockets(wanted) if wanted else []
        if sockets is None:
            self._scan_psutil(wanted, trees, listeners, tree_listening, established)
            held = wanted
        else:
            held = {s.port for s in sockets if s.listening}
            listen_inodes = {s.inode: s.port for s in sockets if s.listening}
            for s in sockets:
                if not s.listening:
                    established[s.port] += 1
            for pid, tree in trees.items():
                for p in tree:
                    for inode in socket_inodes(p) & listen_inodes.keys():
                        listeners[listen_inodes[inode]] = pid
                        tree_listening[pid].add(listen_inodes[inode])
        strangers = (wanted & held) - listeners.keys()  # listened on, by no watched tree
        if strangers:
            self._scan_system(strangers, listeners)
        return listeners, tree_listening, established

    def _scan_psutil(
        self,
        wanted: set[int],
        trees: dict[int, list[int]],
        listeners: dict[int, int],
        tree_listening: dict[int, set[int]],
        established: dict[int, int],
    ) -> None:
        """Where /proc/net/tcp is missing: psutil's per-process connections."""
        for pid, tree in trees.items():
            for p in tree:
                proc = self._process(p)
                try:
                    conns = proc.net_connections("tcp") if proc else []
                except (*_GONE, psutil.AccessDenied):
                    continue
                for c in conns:
                    if not c.laddr or c.laddr.port not in wanted:
                        continue
                    if c.status == psutil.CONN_LISTEN:
                        listeners[c.laddr.port] = pid
                        tree_listening[pid].add(c.laddr.port)
                    elif c.status == psutil.CONN_ESTABLISHED:
                        established[c.laddr.port] += 1

    @staticmethod
    def _scan_system(ports: set[int], listeners: dict[int, int]) -> None:
        """Find the listeners of ports no watched process holds, in the system table."""
        try:
            conns = psutil.net_connections(kind="tcp")
        except psutil.AccessDenied:
            return
        for c in conns:
            if c.laddr and c.laddr.port in ports and c.status == psutil.CONN_LISTEN and c.pid:
                listeners[c.laddr.port] = c.pid
