"""What the proxy adds: a direct call vs gpupanel's routes vs LiteLLM, on one fast upstream.

One run starts `gpupanel serve --simulate` with one Ollama-runtime worker that is the fast
fake model server of benchmarks/upstream.py, and (when given) LiteLLM's proxy pointed at the
same upstream. Then, in each round and interleaved across the paths (the order rotates
between rounds so machine noise hits all of them alike), it measures:

- latency: sequential non-streamed chat completions, p50 and p99 (after a warm-up);
- req/s with 32 concurrent clients for a fixed time;
- streaming capacity: chunks/s received with 64 concurrent streams that the upstream sends
  as fast as it can, as a fraction of direct;
- 64 streams starting together at 50 tokens/s each: time to first chunk (median and the last
  of the 64) and, once all run, the delay of every chunk from the upstream's write to the
  client's read (upstream and client share the host's monotonic clock);
- the CPU per request of the proxy's process(es) during the req/s test;
- then the RSS of the gpupanel serve process (not its worker) and of LiteLLM's process tree.

Other processes' CPU use is watched during every measurement, which is taken again when they
used more than `--max-other` of a core (2 cores are easily disturbed).

Figures are medians over rounds; "added" is the per-round difference to direct, then the
median. Before measuring, each path is checked to answer the expected JSON and SSE (and,
through gpupanel, to name the worker in `X-GPUPanel-Worker`); during the runs every answer
must be a 200 with the expected body, so a broken proxy fails instead of scoring well.
Budgets (docs/architecture.md, "Performance budgets") are judged for gpupanel's two routes; exit status 1 if one is
missed.

    python benchmarks/proxy.py [--rounds 3] [--litellm PATH | $LITELLM_BIN] [--quick] [--keys]
                               [--hop]

With `--keys`, gpupanel runs with `[panel] auth = "keys"` and its two routes are called with
an API key (made with `gpupanel keys create`, limited to the worker and the models used,
with a concurrency limit above the load): the same figures, with every request
authenticated and checked against the key's scopes.

With `--hop`, gpupanel's two routes cross a second gpupanel proxy, as the plane's do to a
worker of another node of a Ray cluster (docs/cluster.md): `gpupanel serve` with
`auth = "keys"` runs the worker, as a node's agent does, and the plane in front of it
(benchmarks/hop.py) reaches the worker through that serve's `/proxy/{id}` with its admin
token as the cluster token. The gpupanel rows then count both processes' CPU, and their
RSS is the plane's.

LiteLLM lives in its own virtual environment (see benchmarks/README.md); without it the
LiteLLM row is skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import psutil

from gpupanel.sim.workstation import parse_spec

HERE = Path(__file__).resolve().parent
FAST, PACED = "bench", "bench-50tps"
PACED_RATE = 50
WORKER = "up"
DIRECT, WORKER_ROUTE, V1_ROUTE, LITELLM = (
    "direct",
    "gpupanel /proxy/{id}/v1",
    "gpupanel /v1",
    "LiteLLM proxy",
)
GPUPANEL = (WORKER_ROUTE, V1_ROUTE)
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer unused"}
KEY_RE = re.compile(r"gpk-[A-Za-z0-9_-]{43}")
CHAT = json.dumps({"model": FAST, "messages": [{"role": "user", "content": "ping"}]}).encode()


def stream_body(model: str, tokens: int) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "count"}],
            "stream": True,
            "max_tokens": tokens,
        }
    ).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


class OtherLoad:
    """CPU used on this host by processes that are not part of the benchmark, as a fraction
    of one core: on a 2-core machine anything else running skews every figure. (Processes
    that start and end within the window are not seen.)"""

    def __init__(self, ours: Callable[[], list[psutil.Process]]) -> None:
        self.ours = ours
        self.start()

    def _others(self) -> dict[tuple[int, float], float]:
        mine = {p.pid for p in self.ours()}
        out = {}
        for p in psutil.process_iter(["ppid", "create_time", "cpu_times"]):
            info = p.info
            if p.pid in mine or p.pid == 2 or info["ppid"] == 2 or info["cpu_times"] is None:
                continue  # ours, or a kernel thread (loopback traffic lands there too)
            out[(p.pid, info["create_time"])] = info["cpu_times"].user + info["cpu_times"].system
        return out

    def start(self) -> None:
        self.wall, self.before = time.monotonic(), self._others()

    def read(self) -> float:
        after = self._others()
        used = sum(cpu - self.before.get(key, 0.0) for key, cpu in after.items())
        return max(0.0, used / (time.monotonic() - self.wall))


class BrokenPath(Exception):
    """A path answered something other than the expected response."""


@dataclass
class Target:
    """One way to reach the upstream's `/v1/chat/completions`."""

    name: str
    url: str
    session: aiohttp.ClientSession
    cpu: Callable[[], float] | None = None  # CPU seconds used so far by the proxy's processes
    rounds: list[dict[str, float]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=lambda: HEADERS)

    def check(self, response: aiohttp.ClientResponse) -> None:
        if response.status != 200:
            raise BrokenPath(f"{self.name}: HTTP {response.status}")
        if self.name in GPUPANEL and response.headers.get("X-GPUPanel-Worker") != WORKER:
            raise BrokenPath(f"{self.name}: no X-GPUPanel-Worker: {WORKER} header")


# ---- the measurements ---------------------------------------------------------------------


async def chat(t: Target) -> None:
    async with t.session.post(t.url, data=CHAT, headers=t.headers) as r:
        body = await r.read()
        t.check(r)
        if b'"pong"' not in body:
            raise BrokenPath(f"{t.name}: unexpected answer {body[:200]!r}")


async def warm(t: Target, concurrency: int) -> None:
    """Open (again) the connections a test needs: idle ones close after 3 s."""
    await asyncio.gather(*(chat(t) for _ in range(concurrency)))


async def latency(t: Target, requests: int, limit_s: float) -> dict[str, float]:
    """Sequential requests: p50 and p99 in ms (at most `limit_s` of them for slow paths)."""
    await warm(t, 1)
    for _ in range(20):
        await chat(t)
    times = []
    deadline = time.perf_counter() + limit_s
    for _ in range(requests):
        start = time.perf_counter()
        await chat(t)
        times.append(time.perf_counter() - start)
        if start > deadline and len(times) >= 200:
            break
    return {"p50": pct(times, 0.5) * 1e3, "p99": pct(times, 0.99) * 1e3, "n": len(times)}


async def throughput(t: Target, concurrency: int, seconds: float) -> dict[str, float]:
    """Completed requests per second with `concurrency` clients in a closed loop."""
    await warm(t, concurrency)
    done = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await chat(t)
            done += 1

    cpu = t.cpu() if t.cpu else 0.0
    await asyncio.gather(*(client() for _ in range(concurrency)))
    figures = {"rps": done / (time.perf_counter() - start)}
    if t.cpu:
        figures["cpu_us"] = (t.cpu() - cpu) / done * 1e6
    return figures


async def capacity(t: Target, streams: int, tokens: int, seconds: float) -> dict[str, float]:
    """SSE events/s received with `streams` concurrent streams, each as fast as the upstream
    sends; streams still running at the deadline are cut (their events so far count)."""
    await warm(t, streams)
    events = 0
    completed = 0
    body = stream_body(FAST, tokens)
    start = time.perf_counter()
    deadline = start + seconds

    async def client() -> None:
        nonlocal events, completed
        while time.perf_counter() < deadline:
            async with t.session.post(t.url, data=body, headers=t.headers) as r:
                t.check(r)
                count, tail, last = 0, b"", b""
                async for data in r.content.iter_any():
                    count += (tail + data).count(b"data:")  # tail < 5 bytes: none counted twice
                    tail, last = data[-4:], (last + data)[-16:]
                    if time.perf_counter() >= deadline:
                        events += count
                        return
            events += count
            if b"[DONE]" not in last or count < tokens + 1:
                raise BrokenPath(f"{t.name}: stream of {count} events without [DONE]")
            completed += 1

    await asyncio.gather(*(client() for _ in range(streams)))
    elapsed = time.perf_counter() - start
    return {"events_s": events / elapsed, "completed": completed}


async def paced(t: Target, streams: int, tokens: int) -> dict[str, float]:
    """`streams` streams of `tokens` at PACED_RATE tokens/s, started together: time to first
    chunk (median, last) from the common start, and the delay of each chunk from the upstream's
    write to the client's read once all streams run (the start burst is what TTFC measures)."""
    await warm(t, streams)  # as in steady use
    await asyncio.sleep(0.1)
    body = stream_body(PACED, tokens)
    delays: list[tuple[float, float]] = []  # (arrival, delay)
    firsts: list[float] = []
    start = time.monotonic()

    async def client() -> None:
        stamps: list[float] = []
        async with t.session.post(t.url, data=body, headers=t.headers) as r:
            t.check(r)
            buffer = b""
            done = False
            async for data in r.content.iter_any():
                now = time.monotonic()
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    payload = event.strip().removeprefix(b"data:").strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    if not payload:
                        continue
                    choices = json.loads(payload).get("choices") or [{}]
                    content = (choices[0].get("delta") or {}).get("content")
                    if content:
                        if not stamps:
                            firsts.append(now - start)
                        stamps.append(float(content))
                        delays.append((now, now - float(content)))
        if not done or len(stamps) != tokens or stamps != sorted(stamps):
            raise BrokenPath(f"{t.name}: paced stream of {len(stamps)} tokens, expected {tokens}")

    await asyncio.gather(*(client() for _ in range(streams)))
    running = start + max(firsts)
    steady = [d for arrival, d in delays if arrival > running] or [d for _, d in delays]
    return {
        "ttfc_p50": statistics.median(firsts) * 1e3,
        "ttfc_max": max(firsts) * 1e3,
        "chunk_p50": pct(steady, 0.5) * 1e3,
        "chunk_p99": pct(steady, 0.99) * 1e3,
    }


async def sanity(t: Target) -> None:
    """The expected JSON and SSE, parsed in full, before any figure is taken."""
    async with t.session.post(t.url, data=CHAT, headers=t.headers) as r:
        t.check(r)
        reply = await r.json(content_type=None)
    if reply["choices"][0]["message"]["content"] != "pong":
        raise BrokenPath(f"{t.name}: unexpected answer {reply!r}")
    async with t.session.post(t.url, data=stream_body(FAST, 20), headers=t.headers) as r:
        t.check(r)
        if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
            raise BrokenPath(f"{t.name}: stream content type {r.headers.get('Content-Type')}")
        text = (await r.read()).decode()
    events = [e.strip().removeprefix("data:").strip() for e in text.split("\n\n") if e.strip()]
    chunks = [json.loads(e) for e in events[:-1]]
    contents = [
        c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")
    ]  # fmt: skip
    if events[-1] != "[DONE]" or len([c for c in contents if c]) != 20:
        raise BrokenPath(f"{t.name}: unexpected stream {text[:300]!r}")


# ---- the processes ------------------------------------------------------------------------


def wait_http(
    url: str, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise SystemExit(f"{what} exited with status {proc.returncode}:\n" + "\n".join(tail))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not answer at {url} within {timeout:g} s")


class Stack:
    """gpupanel serve with the upstream as its worker, and LiteLLM on the same upstream."""

    def __init__(
        self,
        root: Path,
        litellm: Path | None,
        profile: Path | None = None,
        without: tuple[str, ...] = (),
        keys: bool = False,
        hop: bool = False,
    ) -> None:
        self.root = root
        self.keys = keys or hop  # an agent: every request with the token
        self.hop = hop
        self.plane: subprocess.Popen[bytes] | None = None  # benchmarks/hop.py, with --hop
        self.key: str | None = None  # the API key the gpupanel paths send, with --keys
        self.admin: dict[str, str] = {}  # the admin token's header for /panel, with --keys
        self.profile = profile
        self.without = without
        self.litellm_bin = litellm
        self.panel_port, self.worker_port, self.litellm_port = (free_port() for _ in range(3))
        self.panel_url = f"http://127.0.0.1:{self.panel_port}"
        self.serve_url = self.panel_url  # where the worker's gpupanel is (the agent's, with --hop)
        self.upstream_url = f"http://127.0.0.1:{self.worker_port}"
        self.env = {
            **os.environ,
            "GPUPANEL_SIM_DIR": str(root / "sim"),
            "XDG_STATE_HOME": str(root / "state"),
        }
        self.serve: subprocess.Popen[bytes] | None = None
        self.litellm: subprocess.Popen[bytes] | None = None
        self.worker_pid: int | None = None

    def start(self) -> None:
        parse_spec("1x24").save(self.root / "sim")
        config = self.root / "gpupanel.toml"
        config.write_text(
            ('[panel]\nauth = "keys"\n' if self.keys else "")
            + textwrap.dedent(
                f"""
                [[workers]]
                id = "{WORKER}"
                runtime = "ollama"
                gpu = 0
                port = {self.worker_port}
                command = [{json.dumps(sys.executable)}, {json.dumps(str(HERE / "upstream.py"))}]
                env = {{ UPSTREAM_MODELS = "{FAST},{PACED}" }}
                """
            )
        )
        if self.keys and not self.hop:
            self.key = self._create_key(config)
        with open(self.root / "serve.log", "wb") as log:
            if self.without:  # as if these modules were not installed (for a before/after)
                blocked = ", ".join(repr(m) for m in self.without)
                code = f"import sys; sys.modules.update(dict.fromkeys([{blocked}])); " + (
                    "from gpupanel.cli import main; sys.exit(main(sys.argv[1:]))"
                )
                program = ["-c", code]
            else:
                program = ["-m", "gpupanel"]
            profiler = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
            self.serve = subprocess.Popen(
                [sys.executable, *profiler, *program, "serve", "--simulate", "--config", str(config),
                 "--port", str(self.panel_port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_http(
            f"{self.panel_url}/panel/health",
            60,
            "gpupanel serve",
            self.serve,
            self.root / "serve.log",
        )
        if self.keys:
            token = (self.root / "state" / "gpupanel" / "admin-token").read_text().strip()
            self.admin = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer = httpx.get(
                f"{self.panel_url}/panel/workers", headers=self.admin, trust_env=False
            )
            w = answer.json()["workers"][WORKER]
            self.worker_pid = w.get("pid") or self.worker_pid
            if w["status"] == "running" and {FAST, PACED} <= set(w["models_available"]):
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"worker {WORKER} not running with its models; see {self.root}")
        if self.hop:
            self._start_plane()
        if self.litellm_bin is not None:
            self._start_litellm()

    def _start_plane(self) -> None:
        """The plane in front of serve, which is now the agent (see the module's docstring)."""
        port = free_port()
        with open(self.root / "plane.log", "wb") as log:
            self.plane = subprocess.Popen(
                [sys.executable, str(HERE / "hop.py"), str(port), self.serve_url,
                 str(self.root / "state" / "gpupanel" / "admin-token"),
                 str(self.root / "plane-state"), WORKER, f"{FAST},{PACED}"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.panel_url = f"http://127.0.0.1:{port}"
        wait_http(
            f"{self.panel_url}/panel/health", 60, "the plane", self.plane, self.root / "plane.log"
        )

    def _create_key(self, config: Path) -> str:
        """An API key for the gpupanel paths, made as a user would (`gpupanel keys create`):
        scoped to the worker and the benchmark's models, with a concurrency limit the load
        (64 streams at most) stays under, so that the scope checks run on every request."""
        done = subprocess.run(
            [sys.executable, "-m", "gpupanel", "keys", "create", "bench", "--config", str(config),
             "--workers", WORKER, "--models", f"{FAST},{PACED}", "--max-inflight", "1000"],
            env=self.env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        found = KEY_RE.search(done.stdout)
        if found is None:
            raise SystemExit(f"gpupanel keys create printed no key: {done.stdout!r}")
        return found.group(0)

    def _start_litellm(self) -> None:
        assert self.litellm_bin is not None
        config = self.root / "litellm.yaml"
        settings = {
            "model_list": [
                {
                    "model_name": m,
                    "litellm_params": {
                        "model": f"openai/{m}",
                        "api_base": f"{self.upstream_url}/v1",
                        "api_key": "unused",
                    },
                }
                for m in (FAST, PACED)
            ],
            "litellm_settings": {"telemetry": False, "drop_params": True},
            # loopback only and no keys, as gpupanel is here: no auth work on either side
            "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
        }
        config.write_text(json.dumps(settings, indent=1))  # JSON is YAML
        env = {
            k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VIRTUAL_ENV")
        }  # fmt: skip
        env.update(LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True", NO_DOCS="True")
        with open(self.root / "litellm.log", "wb") as log:
            self.litellm = subprocess.Popen(
                [str(self.litellm_bin), "--config", str(config), "--host", "127.0.0.1",
                 "--port", str(self.litellm_port), "--num_workers", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_http(
            f"http://127.0.0.1:{self.litellm_port}/health/liveliness",
            180,
            "LiteLLM",
            self.litellm,
            self.root / "litellm.log",
        )

    def processes(self) -> list[psutil.Process]:
        """This benchmark's processes: the client, gpupanel and its worker, LiteLLM."""
        procs = [psutil.Process()]
        for proc in (self.serve, self.plane, self.litellm):
            if proc is not None:
                with contextlib.suppress(psutil.Error):
                    procs += tree(proc.pid)
        return procs

    def rss(self) -> dict[str, float]:
        out = {}
        if self.serve is not None:
            shown = self.plane or self.serve  # with --hop: the plane's (the agent's as usual)
            out["gpupanel"] = psutil.Process(shown.pid).memory_info().rss / 2**20
        if self.litellm is not None:
            tree = psutil.Process(self.litellm.pid)
            procs = [tree, *tree.children(recursive=True)]
            out[LITELLM] = sum(p.memory_info().rss for p in procs) / 2**20
        return out

    def stop(self) -> None:
        if self.plane is not None and self.plane.poll() is None:
            self.plane.send_signal(signal.SIGTERM)
            try:
                self.plane.wait(30)
            except subprocess.TimeoutExpired:
                self.plane.kill()
                self.plane.wait()
        if self.serve is not None and self.serve.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(
                    f"{self.serve_url}/panel/workers/{WORKER}/stop",
                    headers=self.admin,
                    timeout=30,
                    trust_env=False,
                )
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(30)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait()
        if self.worker_pid is not None and psutil.pid_exists(self.worker_pid):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(self.worker_pid)
                if proc.environ().get("GPUPANEL_SIM_DIR") == self.env["GPUPANEL_SIM_DIR"]:
                    print(f"note: worker {self.worker_pid} outlived its stop; killing it")
                    proc.kill()
        if self.litellm is not None and self.litellm.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.litellm.pid, signal.SIGTERM)
            try:
                self.litellm.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.litellm.pid, signal.SIGKILL)
                self.litellm.wait()


# ---- the run ------------------------------------------------------------------------------


async def run(stack: Stack, args: argparse.Namespace) -> tuple[list[Target], list[float]]:
    urls = {
        DIRECT: f"{stack.upstream_url}/v1/chat/completions",
        WORKER_ROUTE: f"{stack.panel_url}/proxy/{WORKER}/v1/chat/completions",
        V1_ROUTE: f"{stack.panel_url}/v1/chat/completions",
    }
    if stack.litellm is not None:
        urls[LITELLM] = f"http://127.0.0.1:{stack.litellm_port}/v1/chat/completions"
    assert stack.serve is not None
    gp = [psutil.Process(p.pid) for p in (stack.serve, stack.plane) if p is not None]
    litellm = stack.litellm
    cpu: dict[str, Callable[[], float] | None] = {
        DIRECT: None,
        WORKER_ROUTE: lambda: cpu_seconds(gp),
        V1_ROUTE: lambda: cpu_seconds(gp),
        LITELLM: lambda: cpu_seconds(tree(litellm.pid)) if litellm else 0.0,
    }
    targets = [
        Target(
            name,
            url,
            aiohttp.ClientSession(
                # under uvicorn's 5 s keep-alive (LiteLLM, gpupanel), so that a connection the
                # server is closing is never reused
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3),
                timeout=aiohttp.ClientTimeout(total=120),
            ),
            cpu[name],
            headers=(
                {**HEADERS, "Authorization": f"Bearer {stack.key}"}
                if stack.key is not None and name in GPUPANEL
                else HEADERS
            ),
        )
        for name, url in urls.items()
    ]
    noise: list[float] = []
    try:
        for t in targets:
            await sanity(t)
            for _ in range(50):
                await chat(t)
            await asyncio.gather(*(chat(t) for _ in range(64)))  # open the pools' connections
        print("sanity checks passed: JSON, SSE and X-GPUPanel-Worker on every path", flush=True)
        tests: list[tuple[str, Callable[[Target], Awaitable[dict[str, float]]]]] = [
            ("latency", lambda t: latency(t, args.requests, args.latency_s)),
            ("throughput", lambda t: throughput(t, 32, args.seconds)),
            ("paced", lambda t: paced(t, 64, args.paced_tokens)),
            ("capacity", lambda t: capacity(t, 64, args.stream_tokens, args.seconds)),
        ]
        if args.only:
            tests = [(n, f) for n, f in tests if n in args.only.split(",")]
        load = OtherLoad(stack.processes)
        for r in range(args.rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            figures: dict[str, dict[str, float]] = {t.name: {} for t in targets}
            worst = 0.0
            for name, test in tests:
                for t in order:
                    for attempt in range(1, args.retries + 2):
                        load.start()
                        measured = await test(t)
                        other = load.read()
                        await asyncio.sleep(0.2)  # let cut streams' hang-ups settle
                        if other <= args.max_other or attempt > args.retries:
                            break
                        print(
                            f"  {name} via {t.name}: other processes used {other:.0%} of a "
                            "core meanwhile; measuring again in 5 s",
                            flush=True,
                        )
                        await asyncio.sleep(5)
                    figures[t.name].update(measured)
                    worst = max(worst, other)
                print(f"round {r + 1}: {name} done", flush=True)
            for t in targets:
                t.rounds.append(figures[t.name])
            noise.append(worst)
            print(f"round {r + 1}: other processes used up to {worst:.0%} of a core", flush=True)
    finally:
        for t in targets:
            await t.session.close()
    return targets, noise


def report(
    targets: list[Target], rss: dict[str, float], noise: list[float], args: argparse.Namespace
) -> bool:
    direct = next(t for t in targets if t.name == DIRECT)

    nan = float("nan")  # a figure that was not measured (--only)

    def med(t: Target, key: str) -> float:
        return statistics.median(f.get(key, nan) for f in t.rounds)

    def added(t: Target, key: str) -> float:
        pairs = zip(t.rounds, direct.rounds, strict=True)
        return statistics.median(f.get(key, nan) - d.get(key, nan) for f, d in pairs)

    def ratio(t: Target, key: str) -> float:
        pairs = zip(t.rounds, direct.rounds, strict=True)
        return statistics.median(f.get(key, nan) / d.get(key, 1.0) for f, d in pairs)

    rows = [
        ["path", "p50/p99 ms", "added p50/p99", "req/s @32", "stream chunks/s", "% direct",
         "TTFC p50/last", "added", "chunk delay p50/p99", "added", "CPU us/req", "RSS MB"],
    ]  # fmt: skip
    for t in targets:
        is_direct = t is direct
        rows.append(
            [
                t.name,
                f"{med(t, 'p50'):.2f} / {med(t, 'p99'):.2f}",
                "" if is_direct else f"{added(t, 'p50'):+.2f} / {added(t, 'p99'):+.2f}",
                f"{med(t, 'rps'):,.0f}",
                f"{med(t, 'events_s'):,.0f}",
                "" if is_direct else f"{ratio(t, 'events_s') * 100:.0f} %",
                f"{med(t, 'ttfc_p50'):.1f} / {med(t, 'ttfc_max'):.1f}",
                "" if is_direct else f"{added(t, 'ttfc_p50'):+.1f} / {added(t, 'ttfc_max'):+.1f}",
                f"{med(t, 'chunk_p50'):.2f} / {med(t, 'chunk_p99'):.2f}",
                "" if is_direct else f"{added(t, 'chunk_p50'):+.2f} / {added(t, 'chunk_p99'):+.2f}",
                "" if is_direct else f"{med(t, 'cpu_us'):.0f}",
                "" if is_direct else f"{rss['gpupanel' if t.name in GPUPANEL else t.name]:.0f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    print(
        f"medians of {args.rounds} interleaved round(s); latency and TTFC in ms; "
        f"{os.cpu_count()} CPU(s), Python {platform.python_version()}"
    )
    for i, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if max(noise) > args.max_other:
        print(
            f"WARNING: other processes used up to {max(noise):.0%} of a core during the "
            "rounds: the figures are skewed; rerun on a quiet machine"
        )
    print()
    ok = True
    budgets: list[tuple[str, Callable[[Target], float], Callable[[float], str], float, bool]] = [
        ("added p50 <= 1 ms", lambda t: added(t, "p50"), lambda v: f"{v:+.2f} ms", 1.0, False),
        ("added p99 <= 3 ms", lambda t: added(t, "p99"), lambda v: f"{v:+.2f} ms", 3.0, False),
        ("streaming >= 75 % of direct", lambda t: ratio(t, "events_s") * 100,
         lambda v: f"{v:.0f} %", 75.0, True),
        ("req/s @32 >= 1,000", lambda t: med(t, "rps"), lambda v: f"{v:,.0f}", 1000.0, True),
        ("TTFC, 64 streams, last, added <= 50 ms", lambda t: added(t, "ttfc_max"),
         lambda v: f"{v:+.1f} ms", 50.0, False),
        ("RSS <= 100 MB", lambda t: rss["gpupanel"], lambda v: f"{v:.0f} MB", 100.0, False),
    ]  # fmt: skip
    gp = [t for t in targets if t.name in GPUPANEL]
    print(f"{'budget (gpupanel)':<40}" + "".join(f"{t.name:>28}" for t in gp))
    for label, value, fmt, limit, at_least in budgets:
        cells = []
        for t in gp:
            v = value(t)
            within = v >= limit if at_least else v <= limit
            ok &= within
            cells.append(f"{fmt(v)} {'within' if within else 'OVER'}")
        print(f"{label:<40}" + "".join(f"{c:>28}" for c in cells))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="sequential, for p50/p99")
    parser.add_argument("--latency-s", type=float, default=4.0, help="cap per path and round")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run")
    parser.add_argument("--stream-tokens", type=int, default=100, help="per capacity stream")
    parser.add_argument("--paced-tokens", type=int, default=100, help="per 50 tokens/s stream")
    parser.add_argument(
        "--litellm",
        default=os.environ.get("LITELLM_BIN"),
        help="the `litellm` executable of its own venv (default $LITELLM_BIN)",
    )
    parser.add_argument("--quick", action="store_true", help="1 round, short runs")
    parser.add_argument("--only", help="some of: latency,throughput,paced,capacity")
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.15,
        help="remeasure when other processes used more than this fraction of a core",
    )
    parser.add_argument("--retries", type=int, default=3, help="remeasurements at most")
    parser.add_argument(
        "--serve-without",
        default="",
        help="run gpupanel serve as if these were not installed (comma list: uvloop,httptools)",
    )
    parser.add_argument("--json", type=Path, help="also write the per-round figures here")
    parser.add_argument(
        "--keys",
        action="store_true",
        help='gpupanel with auth = "keys", its routes called with a scoped API key',
    )
    parser.add_argument(
        "--profile", type=Path, help="run gpupanel serve under cProfile, stats to this file"
    )
    parser.add_argument(
        "--hop",
        action="store_true",
        help="gpupanel's routes through a plane and an agent (a second gpupanel), as to a "
        "worker of another node",
    )
    args = parser.parse_args()
    if args.hop and (args.keys or args.profile or args.serve_without):
        parser.error("--hop does not combine with --keys, --profile or --serve-without")
    if args.profile and args.serve_without:
        parser.error("--profile and --serve-without do not combine")
    if args.quick:
        args.rounds, args.requests, args.seconds, args.latency_s = 1, 500, 1.0, 1.5
    litellm = Path(args.litellm) if args.litellm else None
    if litellm is None or not os.access(litellm, os.X_OK):
        print(
            f"note: LiteLLM skipped: {'no executable at ' + str(litellm) if litellm else 'no --litellm or $LITELLM_BIN'}"
            " (see benchmarks/README.md to install it in its own venv)"
        )
        litellm = None
    with tempfile.TemporaryDirectory(prefix="gpupanel-proxy-bench-") as tmp:
        stack = Stack(
            Path(tmp),
            litellm,
            args.profile and args.profile.resolve(),
            tuple(m for m in args.serve_without.split(",") if m),
            keys=args.keys,
            hop=args.hop,
        )
        try:
            stack.start()
            try:
                import uvloop
            except ImportError:
                targets, noise = asyncio.run(run(stack, args))
            else:
                targets, noise = uvloop.run(run(stack, args))
            rss = stack.rss()
        except BrokenPath as exc:
            print(f"FAILED sanity check: {exc}")
            return 2
        finally:
            stack.stop()
    ok = report(targets, rss, noise, args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rss_mb": rss, "other_load": noise, "rounds": {t.name: t.rounds for t in targets}},
                indent=1,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
