"""HostProbe against real processes and real sockets on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from gpupanel.adapters.host import HostProbe

# A parent process whose CHILD listens on a port: like `ollama serve` and its runner.
TREE = textwrap.dedent(
    """
    import socket, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", '''
    import socket, sys, time
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
    print(s.getsockname()[1], flush=True)
    conns = []
    while True:
        c, _ = s.accept(); conns.append(c)
    '''], stdout=subprocess.PIPE, text=True)
    print(child.pid, child.stdout.readline().strip(), flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child_pid, port = map(int, proc.stdout.readline().split())
    yield proc, child_pid, port
    proc.kill()
    proc.wait()
    subprocess.run(["kill", "-9", str(child_pid)], check=False)


def test_tree_stats_listener_and_established_connections(
    tree: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, child_pid, port = tree
    probe = HostProbe()
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        sample = probe.sample(pids=[proc.pid], ports=[port])
        stats = sample.processes[proc.pid]
        assert stats.alive
        assert set(stats.tree_pids) == {proc.pid, child_pid}
        assert stats.listening_ports == (port,)
        assert stats.rss is not None and stats.rss > 0
        assert sample.ports[port].listener_pid == proc.pid
        assert sample.ports[port].established == 2
    finally:
        for c in clients:
            c.close()


def test_port_held_by_an_unwatched_process_is_found_by_the_system_scan(
    tree: tuple[subprocess.Popen[str], int, int],
) -> None:
    _, child_pid, port = tree
    sample = HostProbe().sample(pids=[], ports=[port])
    assert sample.ports[port].listener_pid == child_pid


def test_dead_pid_and_free_port() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    sample = HostProbe().sample(pids=[dead.pid], ports=[free_port])
    assert not sample.processes[dead.pid].alive
    assert sample.ports[free_port].listener_pid is None
    assert sample.ports[free_port].established == 0
    assert sample.memory_total and sample.memory_used
