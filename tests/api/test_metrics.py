"""`GET /metrics` in process: traffic through the real proxy (the real `openai` client where
it fits, scripted workers on loopback), then the exposition parsed with prometheus_client's
own parser; `promtool check metrics` on it; the admin token with keys on (tests/api/conftest.py
has the rig)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpupanel.core.model import Memory, Utilization
from gpupanel.core.snapshot import Snapshot
from gpupanel.services.meter import MIB, OTHER
from tests.api.conftest import (
    MODEL,
    FakeNode,
    Reply,
    Rig,
    Rigs,
    Seen,
    eventually,
    gpu,
    refused_port,
    served,
    sse_chunks,
    worker,
)
from tests.api.test_auth import bearer, keyed

CHAT: dict[str, Any] = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
PROMTOOL = Path("/usr/bin/promtool")


class Scrape:
    """One exposition, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        """The sample `name` whose labels include `labels` (None if none; more than one
        matching is an error)."""
        found = [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        assert len(found) <= 1, found
        return found[0].value if found else None

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample `name` whose labels include `labels`."""
        return sum(
            s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()
        )


async def scrape(client: httpx.AsyncClient, **headers: str) -> Scrape:
    r = await client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    return Scrape(r.text)


def usage_stream(model: str, words: Iterable[str], prompt: int, completion: int) -> list[bytes]:
    """An OpenAI stream asked for with `stream_options.include_usage`: `"usage": null` in
    each event, then an event with no choices and the usage, then `[DONE]`."""
    events = [
        c.replace(b'"finish_reason": null}]', b'"finish_reason": null}], "usage": null')
        for c in sse_chunks(model, list(words))[:-1]
    ]
    usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
             "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                      "total_tokens": prompt + completion}}  # fmt: skip
    return [*events, b"data: " + json.dumps(usage).encode() + b"\n\n", b"data: [DONE]\n\n"]


# ---- the route --------------------------------------------------------------------------------------


async def test_metrics_route_content_type_head_and_other_methods(rig: Rig) -> None:
    r = await rig.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "gpupanel_info" in r.text
    head = await rig.client.head("/metrics")
    assert head.status_code == 200 and head.content == b""
    post = await rig.client.post("/metrics")
    assert post.status_code == 404 and post.json()["error"]["message"].startswith(
        "no route POST /metrics"
    )


async def test_dcgm_metrics_equal_the_snapshot(rigs: Rigs) -> None:
    up = await rigs.upstream("a")
    gpus = [
        gpu("GPU-0", 0, used=7 * 1024**3 + 5 * MIB + 77),
        replace(gpu("GPU-1", 1, used=123 * MIB), utilization=Utilization(88, 40), power_w=None),
    ]
    node = FakeNode.of([worker("a", up.port)], gpus=gpus)
    rig = await rigs.build(node, upstreams={"a": up})
    snap: Snapshot = rig.plane.snapshot
    got = await scrape(rig.client)
    for g in snap.gpus:
        assert isinstance(g.memory, Memory) and g.memory.used is not None
        labels = {"UUID": g.uuid, "gpu": str(g.index), "device": f"nvidia{g.index}"}
        assert got.value("DCGM_FI_DEV_FB_USED", **labels) == g.memory.used // MIB
        assert got.value("DCGM_FI_DEV_FB_FREE", **labels) == (g.memory.free or 0) // MIB
        assert got.value("DCGM_FI_DEV_GPU_UTIL", **labels) == g.utilization.gpu
        assert got.value("DCGM_FI_DEV_GPU_TEMP", **labels) == g.temperature_c
        assert got.value("DCGM_FI_DEV_POWER_USAGE", **labels) == g.power_w  # None: no sample
        sample = next(s for s in got.samples if s.name == "DCGM_FI_DEV_GPU_TEMP"
                      and s.labels["UUID"] == g.uuid)  # fmt: skip
        assert sample.labels["modelName"] == g.name and sample.labels["simulated"] == "false"
        assert sample.labels["Hostname"]
    assert got.families["DCGM_FI_DEV_FB_USED"].type == "gauge"
    assert got.value("gpupanel_info", version="9.9.9-test", simulated="false") == 1


# ---- requests through the proxy ----------------------------------------------------------------


async def test_reported_tokens_through_the_openai_client(rig: Rig) -> None:
    client = rig.openai()
    labels = {"app": "", "worker": "a", "model": MODEL}
    try:
        answer = await client.chat.completions.create(**CHAT)  # the worker's usage: 1 in, 2 out
        assert answer.usage is not None
        got = await scrape(rig.client)
        assert (
            got.value("gpupanel_tokens_total", **labels, direction="in")
            == answer.usage.prompt_tokens
        )
        assert (
            got.value("gpupanel_tokens_total", **labels, direction="out")
            == answer.usage.completion_tokens
        )

        async def with_usage(seen: Seen, reply: Reply) -> None:
            assert seen.json()["stream_options"] == {"include_usage": True}  # as the client sent it
            await reply.stream(usage_stream("llama3", ["Hel", "lo"], prompt=9, completion=5))

        rig.upstreams["a"].handler = with_usage
        stream = await client.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
        usage = [c.usage async for c in stream if c.usage is not None]
        assert len(usage) == 1
        got = await scrape(rig.client)
        assert got.value("gpupanel_tokens_total", **labels, direction="out") == (
            answer.usage.completion_tokens + usage[0].completion_tokens
        )
        assert got.value("gpupanel_tokens_total", **labels, direction="in") == (
            answer.usage.prompt_tokens + usage[0].prompt_tokens
        )

        async def without_usage(seen: Seen, reply: Reply) -> None:
            assert "stream_options" not in seen.json()  # gpupanel never adds it
            await reply.stream(sse_chunks("llama3", ["a", "b", "c"]))

        rig.upstreams["a"].handler = without_usage
        stream = await client.chat.completions.create(**CHAT, stream=True)
        assert len([c async for c in stream]) == 3
    finally:
        await client.close()
    got = await scrape(rig.client)
    # No counts reported: the stream's chunks are counted apart, the token counters unchanged.
    assert got.value("gpupanel_uncounted_chunks_total", **labels) == 4  # 3 words + [DONE]
    assert got.value("gpupanel_tokens_total", **labels, direction="out") == 2 + 5
    assert got.value("gpupanel_requests_total", **labels, outcome="ok") == 3
    assert got.value("gpupanel_time_to_first_token_seconds_count", **labels) == 3
    assert got.value("gpupanel_request_duration_seconds_count", **labels) == 3
    assert got.families["gpupanel_time_to_first_token_seconds"].type == "histogram"


async def test_outcomes_ok_error_and_cancelled(rigs: Rigs) -> None:
    a, b = await rigs.upstream("a"), await rigs.upstream("b")
    node = FakeNode.of([
        worker("a", a.port, gpu_uuid="GPU-0"),
        worker("b", b.port, gpu_uuid="GPU-1", pid=4001),
        worker("gone", refused_port(), gpu_uuid="GPU-1", pid=4002),
    ])  # fmt: skip
    rig = await rigs.build(node, upstreams={"a": a, "b": b})
    app = {"X-GPUPanel-App": "nb"}

    async def broken(seen: Seen, reply: Reply) -> None:
        await reply.json({"error": "boom"}, status=500)

    b.handler = broken
    assert (
        await rig.client.post("/proxy/a/v1/chat/completions", json=CHAT, headers=app)
    ).status_code == 200
    assert (
        await rig.client.post("/proxy/b/v1/chat/completions", json=CHAT, headers=app)
    ).status_code == 500
    # gpupanel's own 502 (the worker cannot be reached) counts as an error too.
    assert (
        await rig.client.post("/proxy/gone/v1/chat/completions", json=CHAT, headers=app)
    ).status_code == 502

    chunks = sse_chunks("llama3", ["x"] * 3)

    async def endless(seen: Seen, reply: Reply) -> None:
        await reply.head()
        for c in chunks:
            await reply.chunk(c)
        await reply.hung_up(timeout=5)
        reply.close()

    a.handler = endless
    async with served(rig.app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as http:
        async with http.stream(
            "POST", "/proxy/a/v1/chat/completions", json={**CHAT, "stream": True}, headers=app
        ) as r:
            async for _ in r.aiter_raw():
                break
            got = await scrape(rig.client)
            assert got.value("gpupanel_requests_in_flight", app="nb", worker="a") == 1
        await eventually(lambda: rig.plane.traffic.live == {})
    got = await scrape(rig.client)
    model = MODEL  # "llama3" as the workers name it
    assert (
        got.value("gpupanel_requests_total", app="nb", worker="a", model=model, outcome="ok") == 1
    )
    assert (
        got.value("gpupanel_requests_total", app="nb", worker="b", model=model, outcome="error")
        == 1
    )
    assert (
        got.value("gpupanel_requests_total", app="nb", worker="gone", model=model, outcome="error")
        == 1
    )
    assert (
        got.value("gpupanel_requests_total", app="nb", worker="a", model=model, outcome="cancelled")
        == 1
    )
    assert got.value("gpupanel_requests_in_flight", app="nb", worker="a") is None
    assert got.total("gpupanel_requests_total") == 4


async def test_failovers_are_counted(rigs: Rigs) -> None:
    b = await rigs.upstream("b")
    node = FakeNode.of(
        [worker("a", refused_port()), worker("b", b.port, gpu_uuid="GPU-1", pid=4001)]
    )
    rig = await rigs.build(node, upstreams={"b": b})
    r = await rig.client.post("/v1/chat/completions", json=CHAT, headers={"X-GPUPanel-App": "nb"})
    assert r.status_code == 200 and r.headers["x-gpupanel-worker"] == "b"
    got = await scrape(rig.client)
    assert got.value("gpupanel_failovers_total", app="nb", model=MODEL) == 1
    assert (
        got.value("gpupanel_requests_total", app="nb", worker="b", model=MODEL, outcome="ok") == 1
    )


async def test_no_worker_reachable_is_an_error_after_a_failover(rigs: Rigs) -> None:
    node = FakeNode.of(
        [worker("a", refused_port()), worker("b", refused_port(), gpu_uuid="GPU-1", pid=4001)]
    )
    rig = await rigs.build(node)
    r = await rig.client.post("/v1/chat/completions", json=CHAT, headers={"X-GPUPanel-App": "nb"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "workers_unreachable"
    got = await scrape(rig.client)
    # gpupanel's own 502, after moving from the first worker to the second (the last tried).
    assert (
        got.value("gpupanel_requests_total", app="nb", worker="b", model=MODEL, outcome="error")
        == 1
    )
    assert got.total("gpupanel_requests_total") == 1
    assert got.value("gpupanel_failovers_total", app="nb", model=MODEL) == 1
    assert got.value("gpupanel_time_to_first_token_seconds_count", app="nb") is None


async def test_ten_thousand_bogus_models_leave_the_series_count_bounded(rig: Rig) -> None:
    """Every request names a model no worker has: they all count as `other`."""

    async def one(i: int) -> None:
        body = {**CHAT, "model": f"bogus-{i}"}
        r = await rig.client.post("/proxy/a/v1/chat/completions", json=body)
        assert r.status_code == 200

    await one(0)
    first = await scrape(rig.client)
    for start in range(1, 10_000, 100):
        await asyncio.gather(*(one(i) for i in range(start, min(start + 100, 10_000))))
    after = await scrape(rig.client)
    assert len(after.samples) == len(first.samples)
    print(f"series after 1 request: {len(first.samples)}; after 10,000: {len(after.samples)}")
    assert (
        after.value("gpupanel_requests_total", app="", worker="a", model=OTHER, outcome="ok")
        == 10_000
    )
    assert "bogus" not in after.text


async def test_promtool_accepts_the_exposition(rig: Rig) -> None:
    if not PROMTOOL.exists():
        reason = "promtool is not installed (Debian's prometheus package; .ci/run installs it)"
        if os.environ.get("GPUPANEL_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{reason}, and GPUPANEL_REQUIRE_PROMETHEUS=1 says it must be there")
        pytest.skip(reason)
    client = rig.openai()
    try:
        await client.chat.completions.create(**CHAT, extra_headers={"X-GPUPanel-App": "nb"})
    finally:
        await client.close()
    r = await rig.client.get("/metrics")
    assert "gpupanel_requests_total{" in r.text

    def check(exposition: bytes) -> tuple[int, list[str]]:
        done = subprocess.run(
            [str(PROMTOOL), "check", "metrics"], input=exposition, capture_output=True, check=False
        )
        return done.returncode, (done.stdout + done.stderr).decode().splitlines()

    # The whole exposition parses (exit 1 would be an error). promtool's only finding is the
    # DCGM exporter's own label name `modelName` (camelCase), kept so that the DCGM Grafana
    # dashboards work unchanged: exit 3 (lint findings), each about a DCGM_ metric.
    code, findings = await asyncio.to_thread(check, r.content)
    assert code in (0, 3), findings
    dcgm_lint = "label names should be written in 'snake_case' not 'camelCase'"
    assert all(f.startswith("DCGM_FI_DEV_") and f.endswith(dcgm_lint) for f in findings), findings
    # gpupanel's own metrics are lint-clean.
    ours = b"".join(line + b"\n" for line in r.content.splitlines() if b"DCGM_FI_DEV_" not in line)
    assert b"gpupanel_requests_total{" in ours
    code, findings = await asyncio.to_thread(check, ours)
    assert (code, findings) == (0, [])


# ---- keys on ------------------------------------------------------------------------------------


async def test_with_keys_metrics_need_the_admin_token(rigs: Rigs, tmp_path: Path) -> None:
    k = await keyed(rigs, tmp_path / "state")
    key = k.key("app1")
    none = await k.client.get("/metrics")
    assert none.status_code == 401 and none.json()["error"]["code"] == "unauthorized"
    assert "admin token" in none.json()["error"]["message"]
    assert none.headers["www-authenticate"].startswith("Bearer")
    by_key = await k.client.get("/metrics", headers=bearer(key))
    assert by_key.status_code == 403 and by_key.json()["error"]["code"] == "admin_only"
    got = await scrape(k.client, **bearer(k.token))
    assert got.value("gpupanel_info", version="9.9.9-test", simulated="false") == 1
