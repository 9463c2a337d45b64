"""Transport limits and stopping, end to end: a real `gpupanel serve --simulate` with one
simulated Ollama worker, talked to over raw sockets (docs/api.md, "Limits of every
connection" and "Stopping").

The timeouts are shortened for the tests through the environment
(`$GPUPANEL_IDLE_TIMEOUT_S`, `$GPUPANEL_HEADER_TIMEOUT_S`, `$GPUPANEL_BODY_TIMEOUT_S`,
`$GPUPANEL_SHUTDOWN_GRACE_S`). The
only timed assertions are the bounds the limits promise: idle and slow connections closed
within their timeout plus a margin, and the process gone within 5 s of SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, kill_simulated, wait_for

pytestmark = pytest.mark.slow

IDLE_S = 1.0
HEADER_S = 1.0
BODY_S = 1.0
MARGIN_S = 3.0
"""Slack for a loaded 2-core machine on top of a timeout (the limit itself is IDLE_S)."""
TICK_S = 0.01
"""The event loop's timers have millisecond resolution: one may fire a little early."""
MB = 1_000_000
MODEL = "qwen2.5:0.5b"


def start_panel(root: Path, **env: str) -> Panel:
    """`gpupanel serve --simulate` over a fresh simulated workstation with worker w0 (a slow
    streamer: 5 tokens/s, 400 tokens), its worker running and its model listed."""
    sim_dir = root / "sim"
    parse_spec("1x24").save(sim_dir)
    config = root / "gpupanel.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [[workers]]
            id = "w0"
            gpu = 0
            port = {free_port()}
            env = {{ GPUPANEL_SIM_PULLED = "{MODEL}", GPUPANEL_SIM_TOKENS_PER_S = "5", GPUPANEL_SIM_REPLY_TOKENS = "400" }}
            """
        )
    )
    full_env = {
        **os.environ,
        "GPUPANEL_SIM_DIR": str(sim_dir),
        "XDG_STATE_HOME": str(root / "state"),
        **env,
    }
    panel = Panel(full_env, config, free_port(), root / "serve.log").start()
    wait_for(
        lambda: (
            panel.worker("w0")["status"] == "running" and panel.worker("w0")["models_available"]
        ),
        30,
        "worker w0 running with its model",
    )
    return panel


@contextlib.contextmanager
def running(root: Path, **env: str) -> Iterator[Panel]:
    panel = start_panel(root, **env)
    try:
        yield panel
    finally:
        assert panel.proc is not None
        if panel.proc.poll() is None:
            panel.proc.kill()
            panel.proc.wait(10)
        panel.http.close()
        kill_simulated(root / "sim")


@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Panel]:
    """One control plane for the limit tests, with short idle and header timeouts."""
    root = tmp_path_factory.mktemp("limits")
    with running(
        root,
        GPUPANEL_IDLE_TIMEOUT_S=str(IDLE_S),
        GPUPANEL_HEADER_TIMEOUT_S=str(HEADER_S),
        GPUPANEL_BODY_TIMEOUT_S=str(BODY_S),
    ) as p:
        yield p


def connect(panel: Panel) -> socket.socket:
    return socket.create_connection(("127.0.0.1", panel.port), timeout=10)


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionError, TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def closed_by_server(sock: socket.socket) -> bool:
    """Has the server closed this connection (EOF or reset), without waiting?"""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def answers(panel: Panel) -> None:
    """The control plane still serves: its API and the proxy."""
    assert panel.http.get("/panel/health").status_code == 200
    r = panel.http.post(
        "/proxy/w0/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
    )
    assert r.status_code == 200 and r.json()["done"] is True


# ---- idle and slow connections -------------------------------------------------------------


def test_500_silent_connections_are_closed_by_the_idle_timeout(panel: Panel) -> None:
    socks: dict[int, tuple[socket.socket, float]] = {}
    selector = selectors.DefaultSelector()
    try:
        for _ in range(500):
            before = time.monotonic()  # the server's timer cannot start before this
            s = connect(panel)
            s.setblocking(False)
            socks[s.fileno()] = (s, before)
            selector.register(s, selectors.EVENT_READ)
        closed_after: dict[int, float] = {}
        deadline = time.monotonic() + IDLE_S + MARGIN_S + 5
        while len(closed_after) < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                s, opened = socks[key.fd]
                if closed_by_server(s):
                    closed_after[key.fd] = time.monotonic() - opened
                    selector.unregister(s)
        assert len(closed_after) == 500, f"{500 - len(closed_after)} connections still open"
        # Not before the timeout (what closes them is the idle timer), and within it plus
        # the margin.
        assert min(closed_after.values()) >= IDLE_S - TICK_S, min(closed_after.values())
        assert max(closed_after.values()) <= IDLE_S + MARGIN_S, max(closed_after.values())
    finally:
        selector.close()
        for s, _ in socks.values():
            s.close()
    answers(panel)


def test_a_kept_alive_connection_is_closed_when_idle(panel: Panel) -> None:
    with connect(panel) as s:
        asked = time.monotonic()  # the idle timer starts after the answer, so after this
        s.sendall(b"GET /panel/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):  # the whole answer (a small JSON object)
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert read_all(s, IDLE_S + MARGIN_S + 5) == b""  # then EOF, nothing more
        assert IDLE_S - TICK_S <= time.monotonic() - asked <= IDLE_S + MARGIN_S


def test_50_clients_dribbling_headers_get_408_after_the_header_timeout(panel: Panel) -> None:
    socks = [connect(panel) for _ in range(50)]
    started = time.monotonic()
    try:
        for s in socks:
            s.sendall(b"GET /panel/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        stop = threading.Event()

        def dribble() -> None:  # one more byte of the header every 0.1 s, never its end
            while not stop.wait(0.1):
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(b"a")

        dribbler = threading.Thread(target=dribble, daemon=True)
        dribbler.start()
        try:
            answers_ = [read_all(s, HEADER_S + MARGIN_S + 5) for s in socks]
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            dribbler.join()
        for data in answers_:
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), data[:200]
            assert json.loads(body)["error"]["code"] == "header_timeout"
        assert elapsed <= HEADER_S + MARGIN_S, elapsed
    finally:
        for s in socks:
            s.close()
    answers(panel)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/proxy/w0/api/generate", "/panel/apps"])
def test_a_body_that_stops_arriving_gets_408_after_the_body_timeout(
    panel: Panel, path: str
) -> None:
    with connect(panel) as s:
        started = time.monotonic()
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n".encode()
            + b'{"model": "'  # ... and nothing more
        )
        data = read_all(s, BODY_S + MARGIN_S + 5)
        elapsed = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head, data[:300]
    error = json.loads(body)["error"]
    assert error["code"] == "body_timeout" and f"{BODY_S:g} s" in error["message"]
    assert BODY_S - TICK_S <= elapsed <= BODY_S + MARGIN_S, elapsed
    assert panel.http.get("/panel/requests").json()["requests"] == []  # nothing left in flight
    answers(panel)


def test_connections_past_the_limit_are_answered_503_and_closed(tmp_path: Path) -> None:
    """With room for 20 connections, 20 held open leave the next one a 503 that names the
    limit (those within it are served); once they are gone, new ones are served again."""
    health = b"GET /panel/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with running(tmp_path, GPUPANEL_MAX_CONNECTIONS="20", GPUPANEL_IDLE_TIMEOUT_S="30") as p:
        held = [connect(p) for _ in range(20)]
        try:
            held[0].sendall(health)
            assert held[0].recv(65536).startswith(b"HTTP/1.1 200 ")
            with connect(p) as extra:  # accepted after the 20 (the backlog is in order)
                extra.sendall(health)
                data = read_all(extra, 10)
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head, data[:300]
            error = json.loads(body)["error"]
            assert error["code"] == "too_many_connections" and "at most 20" in error["message"]
        finally:
            for s in held:
                s.close()
        wait_for(lambda: p.http.get("/panel/health").status_code == 200, 10, "served again")


def test_a_body_dribbled_within_the_body_timeout_is_served(panel: Panel) -> None:
    """The body timeout is the longest wait between reads, not a deadline for the body."""
    body = json.dumps(
        {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    ).encode()
    pieces = [body[i : i + 10] for i in range(0, len(body), 10)]
    gap = BODY_S * 0.4
    assert gap * len(pieces) > BODY_S * 2  # the whole body takes longer than the timeout
    with connect(panel) as s:
        s.sendall(
            b"POST /proxy/w0/api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        for piece in pieces:
            time.sleep(gap)
            s.sendall(piece)
        data = read_all(s, 30)
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data[:300]
    assert json.loads(answer)["done"] is True


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"X-Big: " + b"a" * 40_000 + b"\r\n", 431),  # over 32 KiB of headers
        (b"".join(b"X-%d: 1\r\n" % i for i in range(101)), 431),  # over 100 fields
        (b"X-Big: " + b"a" * 1_000_000 + b"\r\n", 431),  # far over: refused before its end
        (b"X-Big: " + b"a" * 30_000 + b"\r\n", 200),  # within
        (b"".join(b"X-%d: 1\r\n" % i for i in range(95)), 200),  # within
    ],
    ids=["40KB", "101-fields", "1MB", "30KB", "95-fields"],
)
def test_header_size_and_count_limits(panel: Panel, headers: bytes, status: int) -> None:
    with connect(panel) as s:
        s.sendall(b"GET /panel/health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n")
        if status == 200:
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            return
        data = read_all(s, 10)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head, data[:300]
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    answers(panel)


# ---- large bodies -----------------------------------------------------------------------------


class PeakRss:
    """The peak RSS of a process: sampled with psutil while running, and the kernel's own
    high-water mark (VmHWM) where there is one."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            with contextlib.suppress(psutil.Error):
                self.sampled = max(self.sampled, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return max(self.sampled, int(line.split()[1]) * 1024)
        return self.sampled


def send_chunked(panel: Panel, path: str, total: int) -> tuple[int, bytes]:
    """POST a chunked body of `total` bytes to `path`, 1 MiB a chunk, reading as it sends:
    stop at the first answer. Returns the bytes sent until then and the answer's head."""
    chunk = b"x" * (1 << 20)
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent, answer = 0, b""
    with connect(panel) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        s.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        pending = memoryview(frame)
        deadline = time.monotonic() + 120
        try:
            while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
                for _, events in selector.select(timeout=1):
                    if events & selectors.EVENT_READ:
                        try:
                            data = s.recv(65536)
                        except ConnectionError:
                            data = b""
                        if not data:
                            return sent, answer or b"(closed)"
                        answer += data
                    if events & selectors.EVENT_WRITE and sent < total:
                        try:
                            n = s.send(pending)
                        except (BlockingIOError, ConnectionError):
                            continue
                        pending = pending[n:]
                        if not pending:
                            sent += len(chunk)
                            pending = memoryview(frame)
                            if sent >= total:
                                s.setblocking(True)
                                s.sendall(b"0\r\n\r\n")
                                s.setblocking(False)
                                selector.modify(s, selectors.EVENT_READ)
        finally:
            selector.close()
    return sent, answer.partition(b"\r\n\r\n")[0]


def test_a_200_mb_body_to_any_route_keeps_the_server_under_100_mb(panel: Panel) -> None:
    """Each kind of route refuses the body once it is over its limit (the proxy's 16 MiB,
    /panel's 1 MiB), answering before the client has sent much more, and the control plane's
    memory stays under 100 MB all along."""
    assert panel.proc is not None
    routes = {  # the most the client may have sent when the answer comes
        "/proxy/w0/v1/chat/completions": 32 * MB,
        "/proxy/w0/api/pull": 32 * MB,
        "/v1/chat/completions": 32 * MB,
        "/nothing/here": 16 * MB,
        "/panel/apps": 16 * MB,  # last: its limit is the FastAPI app's
    }
    seen: dict[str, tuple[int, bytes, int]] = {}
    with PeakRss(panel.proc.pid) as rss:
        for path in routes:
            sent, head = send_chunked(panel, path, 200 * MB)
            seen[path] = (sent, head.split(b"\r\n")[0], rss.peak())
    report = "; ".join(
        f"{p}: {h!r} after {s / MB:.0f} MB sent, peak RSS {m / MB:.0f} MB"
        for p, (s, h, m) in seen.items()
    )
    for path, most in routes.items():
        sent, status, _ = seen[path]
        # /nothing/here: a 404 at once, or the 413 of /panel's body limit (the FastAPI app)
        refused = (
            (b"HTTP/1.1 413 ", b"HTTP/1.1 404 ") if path == "/nothing/here" else b"HTTP/1.1 413 "
        )
        assert status.startswith(refused), report
        assert sent <= most, report
    assert rss.peak() < 100 * MB, report
    answers(panel)


# ---- nested JSON and the bare worker path, through the real server ---------------------------------


def test_deep_json_and_bare_worker_path_through_the_server(panel: Panel) -> None:
    deep = b"[" * 200_000
    r = panel.http.post("/v1/chat/completions", content=deep)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_deep"
    r = panel.http.post("/proxy/w0/v1/chat/completions", content=deep)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_deep"
    r = panel.http.post("/proxy/w0/api/chat", content=deep)
    assert r.status_code == 400
    assert r.json() == {"error": "request body nests deeper than 100 levels"}
    r = panel.http.get("/proxy/w0")
    assert r.status_code == 404 and "/proxy/w0/v1/..." in r.json()["error"]["message"]
    assert panel.http.get("/proxy/w0/").status_code == 200  # `/` of the worker: "Ollama is running"


# ---- stopping ---------------------------------------------------------------------------------


def open_events(panel: Panel) -> socket.socket:
    """A client of /panel/events that has received its first event."""
    s = connect(panel)
    s.sendall(b"GET /panel/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got = b""
    while b"event: snapshot" not in got:
        got += s.recv(65536)
    return s


def open_stream(panel: Panel) -> socket.socket:
    """A slow streamed generation through the proxy (400 tokens at 5/s), first bytes in."""
    s = connect(panel)
    body = json.dumps({"model": MODEL, "prompt": "count", "stream": True}).encode()
    s.sendall(
        b"POST /proxy/w0/api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    got = b""
    while b'"response"' not in got:
        got += s.recv(65536)
    return s


def stopped_within(proc: subprocess.Popen[bytes], limit: float) -> float:
    started = time.monotonic()
    proc.wait(timeout=limit + 10)  # how long it takes is asserted by the caller
    return time.monotonic() - started


def worker_pid(panel: Panel) -> int:
    pid = panel.worker("w0")["pid"]
    assert isinstance(pid, int)
    return pid


def test_sigterm_with_an_events_client_exits_within_5_s(tmp_path: Path) -> None:
    with running(tmp_path) as p:
        assert p.proc is not None
        worker = worker_pid(p)
        events = open_events(p)
        stream = open_stream(p)  # and a proxied stream that would run 80 s
        try:
            p.proc.send_signal(signal.SIGTERM)
            took = stopped_within(p.proc, 5)
            assert p.proc.returncode == 0
            assert took < 5, f"took {took:.1f} s"
            # Both streams were ended by the server, which had closed its listener.
            for s in (events, stream):
                read_all(s, 5)
                assert closed_by_server(s)
            with pytest.raises(OSError):
                connect(p)
        finally:
            events.close()
            stream.close()
        assert psutil.pid_exists(worker)  # workers keep running, adopted by the next start
        log = p.log.read_text()
        assert "1 event stream(s) closed" in log and "Traceback" not in log, log[-3000:]


def test_grace_period_then_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    """With a long grace period, a proxied stream keeps flowing after SIGTERM; a second
    signal (what Ctrl-C twice sends) ends it and the process at once."""
    with running(tmp_path, GPUPANEL_SHUTDOWN_GRACE_S="60") as p:
        assert p.proc is not None
        stream = open_stream(p)
        try:
            p.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert p.proc.poll() is None  # within its grace period
            stream.settimeout(5)
            assert b'"response"' in stream.recv(65536)  # still streaming
            p.proc.send_signal(signal.SIGINT)
            took = stopped_within(p.proc, 3)
            assert took < 3, f"took {took:.1f} s after the second signal"
            assert p.proc.returncode == 0
            read_all(stream, 5)
            assert closed_by_server(stream)
        finally:
            stream.close()


def test_a_stream_still_running_after_the_grace_period_is_closed(tmp_path: Path) -> None:
    with running(tmp_path, GPUPANEL_SHUTDOWN_GRACE_S="1") as p:
        assert p.proc is not None
        stream = open_stream(p)
        try:
            p.proc.send_signal(signal.SIGTERM)
            took = stopped_within(p.proc, 5)
            assert 1.0 <= took < 5, f"took {took:.1f} s"
            read_all(stream, 5)
            assert closed_by_server(stream)
        finally:
            stream.close()
        log = p.log.read_text()
        assert "closed 1 connection(s) still busy after 1 s" in log, log[-3000:]


def test_invalid_timeout_in_the_environment_is_refused(tmp_path: Path) -> None:
    """A bad value is a one-line error naming the variable, not a traceback."""
    config = tmp_path / "gpupanel.toml"
    config.write_text("")
    env = {
        **os.environ,
        "GPUPANEL_SIM_DIR": str(tmp_path / "sim"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "GPUPANEL_IDLE_TIMEOUT_S": "soon",
    }
    out = subprocess.run(
        [sys.executable, "-m", "gpupanel", "serve", "--simulate", "1x24", "--config", str(config),
         "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert "$GPUPANEL_IDLE_TIMEOUT_S must be a number of seconds" in out.stderr
    assert "Traceback" not in out.stderr
