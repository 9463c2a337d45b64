"""`/metrics` read by a real Prometheus server (Debian's `prometheus` package): it scrapes a
running `gpupanel serve --simulate`, and the test asks Prometheus itself, through its HTTP
query API (PromQL), what it stored (docs/metrics.md).

Skipped where `prometheus` is not installed, unless GPUPANEL_REQUIRE_PROMETHEUS=1 (set by
CI, which installs it) turns the skip into a failure.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, kill_simulated, wait_for

pytestmark = pytest.mark.slow

MODEL = "qwen2.5:0.5b"
APP = "promtest"
REQUESTS = 40
PACE_S = 0.2  # one request every 0.2 s: 5 requests per second for 8 s
MIB = 2**20


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        reason = "prometheus is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("GPUPANEL_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{reason}, and GPUPANEL_REQUIRE_PROMETHEUS=1 says it must be there")
        pytest.skip(reason)
    return found


class Prometheus:
    """A Prometheus server on loopback and its query API."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10, trust_env=False)

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = self.http.get("/api/v1/query", params=params).json()
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, promql: str, at: float | None = None) -> float | None:
        """The single value of an instant query (None when the result is empty)."""
        result = self.query(promql, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Panel, Prometheus]]:
    binary = _prometheus_binary()
    root = tmp_path_factory.mktemp("prometheus")
    sim_dir = root / "sim"
    parse_spec("2x24").save(sim_dir)
    ports = [free_port(), free_port()]
    config = root / "gpupanel.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [[workers]]
            id = "a"
            gpu = 0
            port = {ports[0]}
            env = {{ GPUPANEL_SIM_PULLED = "{MODEL}" }}

            [[workers]]
            id = "b"
            gpu = 1
            port = {ports[1]}
            env = {{ GPUPANEL_SIM_PULLED = "{MODEL}" }}
            """
        )
    )
    env = {**os.environ, "GPUPANEL_SIM_DIR": str(sim_dir), "XDG_STATE_HOME": str(root / "state")}
    panel = Panel(env, config, free_port(), root / "serve.log").start()
    prom_port = free_port()
    (root / "prometheus.yml").write_text(
        textwrap.dedent(
            f"""
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            scrape_configs:
              - job_name: gpupanel
                static_configs:
                  - targets: ["127.0.0.1:{panel.port}"]
            """
        )
    )
    with open(root / "prometheus.log", "wb") as log:
        server = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    prometheus = Prometheus(f"http://127.0.0.1:{prom_port}")
    try:
        wait_for(
            lambda: all(
                w["status"] == "running" and w["models_available"] for w in panel.workers().values()
            ),
            30,
            "workers a and b running with their model",
        )
        wait_for(lambda: prometheus.http.get("/-/ready").status_code == 200, 30, "Prometheus")
        wait_for(lambda: prometheus.value('up{job="gpupanel"}') == 1, 30, "a successful scrape")
        yield panel, prometheus
    finally:
        server.terminate()
        server.wait(timeout=30)
        panel.shutdown()
        kill_simulated(sim_dir)


def test_dcgm_framebuffer_per_uuid_is_the_panel_snapshot(stack: tuple[Panel, Prometheus]) -> None:
    panel, prometheus = stack
    # A model loaded on worker a holds memory on its GPU: the values compared are not all zero.
    assert panel.post("/panel/workers/a/load", json={"model": MODEL}).status_code == 200

    def agree() -> dict[str, float] | None:
        gpus = panel.http.get("/panel/snapshot").json()["gpus"]
        expected = {uuid: float(g["memory"]["used"] // MIB) for uuid, g in gpus.items()}
        stored = {
            s["metric"]["UUID"]: float(s["value"][1])
            for s in prometheus.query('DCGM_FI_DEV_FB_USED{job="gpupanel"}')
        }
        return expected if stored == expected else None

    expected = wait_for(agree, 15, "DCGM_FI_DEV_FB_USED per UUID to equal the snapshot")
    assert len(expected) == 2
    assert any(used > 0 for used in expected.values())
    labels = prometheus.query('DCGM_FI_DEV_FB_USED{job="gpupanel"}')[0]["metric"]
    assert {"gpu", "UUID", "modelName", "Hostname", "device"} <= set(labels)
    assert labels["simulated"] == "true"


def test_request_rate_and_ttft_histogram_match_the_traffic_sent(
    stack: tuple[Panel, Prometheus],
) -> None:
    panel, prometheus = stack
    client = openai.OpenAI(
        base_url=f"{panel.url}/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"X-GPUPanel-App": APP},
    )
    started = time.time()
    for i in range(REQUESTS):
        messages = [{"role": "user", "content": f"count {i}"}]
        if i % 2:
            stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            reply = client.chat.completions.create(model=MODEL, messages=messages)
            assert reply.choices[0].message.content
        time.sleep(max(0.0, started + (i + 1) * PACE_S - time.time()))
    ended = time.time()
    selector = f'{{job="gpupanel",app="{APP}"}}'

    def total(metric: str) -> float | None:
        value = prometheus.value(f"sum({metric}{selector})")
        return value if value == REQUESTS else None

    assert wait_for(lambda: total("gpupanel_requests_total"), 15, "every request scraped")
    ok = prometheus.value(
        f'sum(gpupanel_requests_total{{job="gpupanel",app="{APP}",outcome="ok"}})'
    )
    assert ok == REQUESTS
    # The rate Prometheus computes over the middle of the traffic is the pace it was sent at.
    middle = (started + ended) / 2
    rate = prometheus.value(f"sum(rate(gpupanel_requests_total{selector}[4s]))", at=middle)
    sent_rate = REQUESTS / (ended - started)
    assert rate is not None
    assert 0.6 * sent_rate <= rate <= 1.5 * sent_rate, (rate, sent_rate)
    # Every request had a first chunk: the TTFT histogram holds all of them, in order.
    assert wait_for(
        lambda: total("gpupanel_time_to_first_token_seconds_count"), 10, "the TTFT histogram"
    )
    buckets = prometheus.query(
        f"sum by (le) (gpupanel_time_to_first_token_seconds_bucket{selector})"
    )
    counts = sorted((float(b["metric"]["le"]), float(b["value"][1])) for b in buckets)
    assert counts[-1] == (float("inf"), REQUESTS)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(counts))
    p99 = prometheus.value(
        f"histogram_quantile(0.99, sum by (le) (rate(gpupanel_time_to_first_token_seconds_bucket{selector}[1m])))",
        at=ended,
    )
    assert p99 is not None and 0 < p99 < 5
