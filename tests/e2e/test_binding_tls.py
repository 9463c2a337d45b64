"""Binding beyond loopback, TLS and the audit log, end to end (docs/security.md): a real
`gpupanel serve` over a simulated workstation.

- Beyond loopback without keys, `serve` exits 1 with one line that says why and how.
- With keys and the admin token it serves on every interface, and every request without
  credentials is refused, from loopback or from this host's network address alike; this
  host's CLI and Python client use the stored admin token by themselves; workers stay on
  loopback; the token is in no log line, snapshot or error message.
- With `tls_cert`/`tls_key` it serves HTTPS (a self-signed certificate made here with
  `openssl`), still with the limits of every connection; the Python client checks the
  certificate (`verify=`), or pins this host's own when the local config names it.
- TLS files are checked when the config is read (fast, not marked slow).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

import gpupanel
from gpupanel.adapters.audit import AUDIT_FILE
from gpupanel.adapters.config_file import load_config
from gpupanel.adapters.token import read_admin_token
from gpupanel.client import PanelError
from gpupanel.errors import ConfigError
from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import free_port, kill_simulated, wait_for

slow = pytest.mark.slow


# ---- certificates ------------------------------------------------------------------------------


def make_cert(directory: Path, name: str = "panel", encrypted: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (EC P-256: fast)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cmd = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
    ]  # fmt: skip
    cmd += ["-passout", "pass:secret"] if encrypted else ["-nodes"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return cert, key


def config_file(directory: Path, toml: str) -> Path:
    path = directory / "gpupanel.toml"
    path.write_text(textwrap.dedent(toml))
    return path


def test_tls_files_are_checked_when_the_config_is_read(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    _, other_key = make_cert(tmp_path, "other")
    _, locked_key = make_cert(tmp_path, "locked", encrypted=True)

    def load(tls_cert: Path | str, tls_key: Path | str) -> None:
        toml = f'[panel]\ntls_cert = "{tls_cert}"\ntls_key = "{tls_key}"\n'
        load_config(config_file(tmp_path, toml), ["GPU-0"])

    load(cert, key)  # both fine: nothing to say
    cases = [
        (tmp_path / "nope.pem", key, "field 'tls_cert' is", "which does not exist"),
        (cert, tmp_path, "field 'tls_key' is", "which is a directory"),
        (cert, other_key, "cannot serve TLS", "the private key in 'tls_key' is not the cert"),
        (key, cert, "cannot serve TLS", "'tls_cert' is not a PEM certificate"),
        (cert, cert, "cannot serve TLS", "'tls_key' is not the PEM private key"),
        (cert, locked_key, "cannot serve TLS", "the private key is encrypted"),  # no prompt
    ]
    for tls_cert, tls_key, what, fix in cases:
        with pytest.raises(ConfigError) as err:
            load(tls_cert, tls_key)
        message = str(err.value)
        assert (
            message.startswith(f"{tmp_path / 'gpupanel.toml'}: [panel]: ") and "\n" not in message
        )
        assert what in message and fix in message, message
        assert "BEGIN" not in message  # never the content of a key


# ---- a gpupanel serve of our own -----------------------------------------------------------------


class Serve:
    """`gpupanel serve` with extra arguments, its output in a file."""

    def __init__(self, directory: Path, env: dict[str, str], config: Path, *extra: str) -> None:
        self.port = free_port()
        self.log = directory / "serve.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpupanel", "serve", "--simulate", "--config", str(config),
                 "--port", str(self.port), *extra],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=directory,
            )  # fmt: skip

    def wait(self, url: str, verify: bool | ssl.SSLContext = True) -> Serve:
        with httpx.Client(trust_env=False, verify=verify, timeout=5) as http:
            wait_for(
                lambda: (
                    self.proc.poll() is None and http.get(f"{url}/panel/health").status_code == 200
                ),
                30,
                f"the panel to answer at {url}\n{self.output()}",
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def workstation(sim_dir: Path) -> Iterator[Path]:
    parse_spec("1x24").save(sim_dir)
    yield sim_dir
    kill_simulated(sim_dir)


def non_loopback_address() -> str | None:
    """An IPv4 address of this host's that is not loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    return None


@slow
def test_beyond_loopback_without_keys_serve_refuses_in_one_line(
    tmp_path: Path, panel_env: dict[str, str], workstation: Path
) -> None:
    for extra, toml in [
        (("--host", "0.0.0.0"), "[panel]\n"),
        ((), '[panel]\nhost = "0.0.0.0"\nauth = "off"\n'),
    ]:
        config = config_file(tmp_path, toml)
        port = free_port()
        done = subprocess.run(
            [sys.executable, "-m", "gpupanel", "serve", "--simulate", "--config", str(config),
             "--port", str(port), *extra],
            env=panel_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("gpupanel: refusing to listen on 0.0.0.0: ")
        for how in ('auth = "keys"', "[panel]", "gpupanel keys create", "127.0.0.1"):
            assert how in done.stderr
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing was bound


@slow
def test_beyond_loopback_with_keys_every_request_needs_credentials(
    tmp_path: Path, panel_env: dict[str, str], workstation: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_port = free_port()
    config = config_file(
        tmp_path,
        f"""
        [panel]
        auth = "keys"

        [[workers]]
        id = "solo"
        gpu = 0
        port = {worker_port}
        """,
    )
    serve = Serve(tmp_path, panel_env, config, "--host", "0.0.0.0")
    url = f"http://127.0.0.1:{serve.port}"
    state = Path(panel_env["XDG_STATE_HOME"]) / "gpupanel"
    try:
        serve.wait(url)
        token = read_admin_token(state)
        assert token is not None
        assert stat.S_IMODE(os.stat(state / "admin-token").st_mode) == 0o600
        admin = {"Authorization": f"Bearer {token}"}

        # From loopback and from this host's network address: no credentials, no answer.
        sources = [("127.0.0.1", "loopback")]
        address = non_loopback_address()
        if address is not None:
            sources.append((address, "network"))
        refused = []
        for source, _kind in sources:
            with httpx.Client(base_url=f"http://{source}:{serve.port}", trust_env=False) as http:
                host = {"Host": f"127.0.0.1:{serve.port}"}  # past the Host check, to the keys
                assert http.get("/panel/health", headers=host).status_code == 200  # open
                for method, path in [
                    ("GET", "/panel/snapshot"),
                    ("GET", "/panel/workers"),
                    ("POST", "/panel/workers/solo/restart"),
                    ("POST", "/panel/workers/ensure"),
                    ("GET", "/v1/models"),
                    ("POST", "/proxy/solo/api/pull"),
                    ("GET", "/proxy/solo/v1/models"),
                ]:
                    for extra in ({}, {"Authorization": "Bearer gpt-not-the-token"}):
                        r = http.request(method, path, headers={**host, **extra})
                        assert r.status_code == 401, (source, method, path, r.text)
                        assert token not in r.text
                        refused.append(r.status_code)
                r = http.get("/panel/snapshot", headers={**host, **admin})
                assert r.status_code == 200 and token not in r.text
        assert len(refused) == 14 * len(sources)

        # Where it listens: the panel on every interface, the worker on loopback only.
        serving = psutil.Process(serve.proc.pid).net_connections(kind="tcp")
        assert {c.laddr.ip for c in serving if c.status == psutil.CONN_LISTEN} == {"0.0.0.0"}
        pid = wait_for(
            lambda: httpx.get(f"{url}/panel/workers", headers=admin, trust_env=False).json()[
                "workers"
            ]["solo"]["pid"],
            30,
            "the worker's pid",
        )
        worker_listens = wait_for(
            lambda: {
                c.laddr.ip
                for c in psutil.Process(pid).net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            },
            30,
            "the worker to listen",
        )
        assert worker_listens == {"127.0.0.1"}

        # This host's Python client and CLI find the admin token themselves.
        monkeypatch.setenv("XDG_STATE_HOME", panel_env["XDG_STATE_HOME"])
        monkeypatch.delenv("GPUPANEL_TOKEN", raising=False)
        monkeypatch.chdir(tmp_path / "..")  # no gpupanel.toml here
        panel = gpupanel.connect(url)
        wait_for(lambda: panel.workers["solo"]["status"] == "running", 30, "solo running")
        assert panel.restart("solo")["status"] == "running"
        assert token not in str(panel.snapshot())
        panel.shutdown()
        env = {**panel_env, "GPUPANEL_URL": url}
        env.pop("GPUPANEL_TOKEN", None)
        listing = subprocess.run(
            [sys.executable, "-m", "gpupanel", "workers"],
            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path / "..",
        )  # fmt: skip
        assert listing.returncode == 0 and "solo" in listing.stdout, listing.stderr
        elsewhere = {**env, "XDG_STATE_HOME": str(tmp_path / "another-state")}
        denied = subprocess.run(
            [sys.executable, "-m", "gpupanel", "workers"],
            env=elsewhere, capture_output=True, text=True, timeout=60, cwd=tmp_path / "..",
        )  # fmt: skip
        assert denied.returncode == 1 and denied.stderr.count("\n") == 1
        assert "$GPUPANEL_TOKEN" in denied.stderr and token not in denied.stderr
        with pytest.raises(PanelError) as err:
            gpupanel.connect(url, token="gpt-wrong").snapshot()
        assert err.value.status == 401 and "given to connect() was refused" in str(err.value)

        # Said once at start: where the token is, never the token.
        with httpx.Client(base_url=url, headers=admin, trust_env=False) as http:
            assert http.post("/panel/workers/solo/stop").status_code == 200
        assert serve.stop() == 0
        output = serve.output()
        assert token not in output
        assert f"admin token  in {state / 'admin-token'}" in output
        assert f"listening  on every interface, port {serve.port}" in output
        assert "warning    no TLS" in output
        assert output.count("admin token  in") == 1
        audit = state / AUDIT_FILE
        if audit.exists():  # (written once the audit layer is wired in)
            assert token not in audit.read_text()
    finally:
        serve.stop()


@slow
def test_control_actions_reach_the_audit_log(
    tmp_path: Path, panel_env: dict[str, str], workstation: Path
) -> None:
    """With keys the caller is who the token names (the admin token: `admin`); `gpupanel
    audit` prints the tail."""
    config = config_file(
        tmp_path,
        f"""
        [panel]
        auth = "keys"

        [[workers]]
        id = "solo"
        gpu = 0
        port = {free_port()}
        autostart = false
        """,
    )
    serve = Serve(tmp_path, panel_env, config)
    url = f"http://127.0.0.1:{serve.port}"
    state = Path(panel_env["XDG_STATE_HOME"]) / "gpupanel"
    try:
        serve.wait(url)
        token = read_admin_token(state)
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, trust_env=False, timeout=60
        ) as http:
            assert http.post("/panel/workers/solo/start").status_code == 200
            assert http.post("/panel/workers/nope/stop").status_code == 404
            assert http.post("/panel/workers/solo/stop").status_code == 200
        with httpx.Client(base_url=url, trust_env=False) as anonymous:
            assert anonymous.post("/panel/workers/solo/start").status_code == 401
    finally:
        assert serve.stop() == 0
    audit = state / AUDIT_FILE
    assert stat.S_IMODE(os.stat(audit).st_mode) == 0o600
    assert token is not None and token not in audit.read_text()
    shown = subprocess.run(
        [sys.executable, "-m", "gpupanel", "audit", "--config", str(config)],
        env=panel_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert [line.split()[2:] for line in shown.stdout.splitlines()] == [
        ["admin", "start", "solo", "ok"],
        ["admin", "stop", "nope", "error", "404"],
        ["admin", "stop", "solo", "ok"],
    ]


# ---- TLS -----------------------------------------------------------------------------------------


def tls_connection(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


@slow
def test_tls_serves_https_with_the_limits_of_every_connection(
    tmp_path: Path, panel_env: dict[str, str], workstation: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = make_cert(tmp_path)
    config = config_file(
        tmp_path,
        f"""
        [panel]
        tls_cert = "{cert.name}"
        tls_key = "{key.name}"

        [[workers]]
        id = "solo"
        gpu = 0
        port = {free_port()}
        autostart = false
        """,
    )
    env = {**panel_env, "GPUPANEL_IDLE_TIMEOUT_S": "1"}
    serve = Serve(tmp_path, env, config)  # runs in tmp_path: the paths are relative to it
    url = f"https://127.0.0.1:{serve.port}"
    trusted = ssl.create_default_context(cafile=str(cert))
    try:
        serve.wait(url, verify=trusted)
        monkeypatch.chdir(tmp_path / "..")  # no gpupanel.toml naming the certificate here
        monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
        panel = gpupanel.connect(url, verify=str(cert))
        snap = panel.snapshot()
        assert snap["simulated"] is True and len(snap["gpus"]) == 1
        assert snap["workers"]["solo"]["base_url"] == f"{url}/proxy/solo/v1"
        panel.shutdown()
        with pytest.raises(PanelError, match="its TLS certificate is not trusted here"):
            gpupanel.connect(url)  # the system's trust store does not know a self-signed one
        with pytest.raises(PanelError, match="no gpupanel control plane answers"):
            gpupanel.connect(f"http://127.0.0.1:{serve.port}")  # no plain HTTP on that port

        # On this host, with the config that names the certificate: pinned, nothing to pass.
        monkeypatch.chdir(tmp_path)
        panel = gpupanel.connect(f"https://localhost:{serve.port}")
        assert panel.workers["solo"]["status"] == "stopped"
        panel.shutdown()

        # The connection limits hold under TLS: 431 for a head too large, idle ones closed.
        with tls_connection(serve.port, trusted) as conn:
            conn.sendall(
                b"GET /panel/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + b"X-Pad: " + b"a" * 40_000 + b"\r\n\r\n"
            )  # fmt: skip
            assert conn.recv(4096).startswith(b"HTTP/1.1 431 ")
        with tls_connection(serve.port, trusted) as conn:
            started = time.monotonic()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                assert conn.recv(1) == b""  # closed by the server, not by our timeout
            assert time.monotonic() - started < 5
    finally:
        assert serve.stop() == 0
    output = serve.output()
    assert f"panel API  {url}/panel/snapshot" in output
    assert "Traceback" not in output


# ---- in process: gpupanel.start() and the magics -------------------------------------------------


@slow
def test_start_and_the_magics_know_the_admin_token(
    tmp_path: Path,
    panel_env: dict[str, str],
    workstation: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In process, `gpupanel.start()` made the token and uses it; attached to a `gpupanel
    serve` of this host (the magics), it reads the token of the same state directory."""
    from IPython.core.interactiveshell import InteractiveShell

    state = tmp_path / "state"
    config = config_file(
        tmp_path,
        f"""
        [panel]
        auth = "keys"
        state_dir = "{state}"

        [[workers]]
        id = "solo"
        gpu = 0
        port = {free_port()}
        autostart = false
        """,
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUPANEL_TOKEN", raising=False)
    monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
    panel = gpupanel.start(config=str(config), simulate=True, port=free_port())
    try:
        token = read_admin_token(state)
        assert panel.in_process and token is not None
        assert panel.start("solo")["status"] == "running"  # over HTTP, with the token
        with httpx.Client(base_url=panel.url, trust_env=False) as anonymous:
            assert anonymous.post("/panel/workers/solo/stop").status_code == 401
        assert panel.stop("solo")["status"] == "stopped"
    finally:
        panel.shutdown()

    serve = Serve(tmp_path, panel_env, config)
    shell = InteractiveShell.instance()
    shell.config.GpuPanelMagics.simulate = True
    shell.config.GpuPanelMagics.port = serve.port
    shell.config.GpuPanelMagics.config_file = str(config)
    shell.config.GpuPanelMagics.show_on_load = False
    try:
        serve.wait(f"http://127.0.0.1:{serve.port}")
        shell.run_line_magic("load_ext", "gpupanel")  # attaches: `serve` owns the port
        shell.run_line_magic("gpupanel", "start solo")
        shell.run_line_magic("gpupanel", "stop solo")
        out = capsys.readouterr().out
        assert "solo: running" in out and "solo: stopped" in out, out
        assert token not in out
    finally:
        shell.run_line_magic("unload_ext", "gpupanel")
        shell.config.GpuPanelMagics.pop("config_file", None)  # the shell is shared by tests
        assert serve.stop() == 0
