"""Token counters against what the client saw, end to end: a real `gpupanel serve` with a
simulated Ollama worker (which sends counts the way Ollama does), and a real `llama-server`
worker (marker `llamacpp`), driven by the real `openai` and `ollama` clients; the counters
read from `GET /metrics` (docs/metrics.md, "Token counts")."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, serve, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("leftover_guard")]

MODEL = "qwen2.5:0.5b"
EMBED = "nomic-embed-text"
HI = [{"role": "user", "content": "Say hello."}]


def counter(panel: Panel, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels` (0 when there are none),
    once every request has ended."""
    panel.settled()
    r = panel.http.get("/metrics")
    assert r.status_code == 200, r.text
    return sum(
        s.value
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def tokens(panel: Panel, direction: str, model: str) -> float:
    return counter(panel, "gpupanel_tokens_total", direction=direction, model=model)


def test_simulated_ollama_counts_in_every_format(
    tmp_path: Path, panel_env: dict[str, str], sim_dir: Path
) -> None:
    parse_spec("1x24").save(sim_dir)
    pulled = f"{MODEL},{EMBED}"
    panel = serve(
        tmp_path,
        panel_env,
        f"""
        [[workers]]
        id = "w"
        gpu = 0
        port = {free_port()}
        env = {{ GPUPANEL_SIM_PULLED = "{pulled}", GPUPANEL_SIM_REPLY_TOKENS = "12" }}
        """,
    )
    try:
        wait_for(
            lambda: (w := panel.worker("w"))["status"] == "running" and w["models_available"],
            30,
            "worker w running with its models",
        )
        v1 = openai.OpenAI(base_url=f"{panel.url}/v1", api_key="x", max_retries=0)

        # OpenAI-compatible, whole: `usage`.
        before = tokens(panel, "out", MODEL), tokens(panel, "in", MODEL)
        answer = v1.chat.completions.create(model=MODEL, messages=HI, max_tokens=5)  # type: ignore[arg-type]
        assert answer.usage is not None
        assert tokens(panel, "out", MODEL) - before[0] == answer.usage.completion_tokens == 5
        assert tokens(panel, "in", MODEL) - before[1] == answer.usage.prompt_tokens > 0

        # A stream with include_usage: the usage event before [DONE].
        before = tokens(panel, "out", MODEL), tokens(panel, "in", MODEL)
        stream = v1.chat.completions.create(
            model=MODEL,
            messages=HI,  # type: ignore[arg-type]
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage for c in stream if c.usage is not None]
        assert len(usage) == 1
        assert tokens(panel, "out", MODEL) - before[0] == usage[0].completion_tokens == 6
        assert tokens(panel, "in", MODEL) - before[1] == usage[0].prompt_tokens

        # A completion stream with include_usage: Ollama puts a zero usage in every event
        # before the real one; the last one counts.
        before = tokens(panel, "out", MODEL), tokens(panel, "in", MODEL)
        pieces = list(
            v1.completions.create(
                model=MODEL,
                prompt="Once upon",
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        zeros = [c for c in pieces if c.usage is not None and c.usage.completion_tokens == 0]
        assert zeros and pieces[-1].usage is not None
        assert tokens(panel, "out", MODEL) - before[0] == pieces[-1].usage.completion_tokens == 4
        assert tokens(panel, "in", MODEL) - before[1] == pieces[-1].usage.prompt_tokens

        # A stream without include_usage: Ollama sends no counts (and gpupanel asks for none):
        # its chunks are counted apart, the token counters stay as they were.
        before = (
            tokens(panel, "out", MODEL),
            counter(panel, "gpupanel_uncounted_chunks_total", model=MODEL),
        )
        events = list(
            v1.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, stream=True)  # type: ignore[arg-type]
        )
        assert events and all(e.usage is None for e in events)
        assert tokens(panel, "out", MODEL) == before[0]
        assert counter(panel, "gpupanel_uncounted_chunks_total", model=MODEL) > before[1]

        # Native Ollama, streamed and whole: prompt_eval_count / eval_count of the done line.
        native = ollama.Client(host=f"{panel.url}/proxy/w")
        before = tokens(panel, "out", MODEL), tokens(panel, "in", MODEL)
        parts = list(native.chat(model=MODEL, messages=HI, stream=True, options={"num_predict": 7}))
        done = parts[-1]
        assert done.done and done.eval_count == 7 and done.prompt_eval_count
        assert tokens(panel, "out", MODEL) - before[0] == done.eval_count
        assert tokens(panel, "in", MODEL) - before[1] == done.prompt_eval_count
        before = tokens(panel, "out", MODEL), tokens(panel, "in", MODEL)
        whole = native.generate(model=MODEL, prompt="Once upon", options={"num_predict": 3})
        assert whole.eval_count == 3 and whole.prompt_eval_count
        assert tokens(panel, "out", MODEL) - before[0] == whole.eval_count
        assert tokens(panel, "in", MODEL) - before[1] == whole.prompt_eval_count

        # Embeddings: prompt tokens only. (The label is the worker's name for the model.)
        embed = next(m for m in panel.worker("w")["models_available"] if m.startswith(EMBED))
        assert embed == f"{EMBED}:latest"
        before = tokens(panel, "in", embed), tokens(panel, "out", embed)
        emb = v1.embeddings.create(model=EMBED, input=["one two", "three"])
        assert tokens(panel, "in", embed) - before[0] == emb.usage.prompt_tokens > 0
        embedded = native.embed(model=EMBED, input="four five six")
        assert embedded.prompt_eval_count
        assert tokens(panel, "in", embed) - before[0] == (
            emb.usage.prompt_tokens + embedded.prompt_eval_count
        )
        assert tokens(panel, "out", embed) == before[1]
    finally:
        panel.shutdown()


@pytest.mark.llamacpp
def test_llama_server_completion_tokens_equal_what_the_client_saw(
    tmp_path: Path,
    panel_env: dict[str, str],
    sim_dir: Path,
    smollm2_gguf: Path,
    llama_server_bin: Path,
) -> None:
    parse_spec("1x24").save(sim_dir)
    panel = serve(
        tmp_path,
        panel_env,
        f"""
        [[workers]]
        id = "llama"
        runtime = "llamacpp"
        gpu = 0
        port = {free_port()}
        model_path = "{smollm2_gguf}"
        context = 512
        alias = "smollm2"
        command = ["{llama_server_bin}"]
        args = ["-t", "2"]
        """,
    )
    model = "smollm2"
    try:
        wait_for(
            lambda: (w := panel.worker("llama"))["status"] == "running" and w["models_available"],
            90,
            "llama-server running",
        )
        client = openai.OpenAI(base_url=f"{panel.url}/v1", api_key="x", max_retries=0)

        # Whole: llama-server's `usage` (its `timings` come after it and are not counted twice).
        before = tokens(panel, "out", model), tokens(panel, "in", model)
        answer = client.chat.completions.create(model=model, messages=HI, max_tokens=8)  # type: ignore[arg-type]
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        assert tokens(panel, "out", model) - before[0] == answer.usage.completion_tokens
        assert tokens(panel, "in", model) - before[1] == answer.usage.prompt_tokens

        # Streamed with include_usage: the usage event.
        before = tokens(panel, "out", model), tokens(panel, "in", model)
        stream = client.chat.completions.create(
            model=model,
            messages=HI,  # type: ignore[arg-type]
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage for c in stream if c.usage is not None]
        assert len(usage) == 1 and usage[0].completion_tokens > 0
        assert tokens(panel, "out", model) - before[0] == usage[0].completion_tokens
        assert tokens(panel, "in", model) - before[1] == usage[0].prompt_tokens

        # Streamed without include_usage: llama-server still puts `timings` in its last event
        # (prompt_n + cache_n in, predicted_n out); those are counted, not the chunks.
        before = tokens(panel, "out", model), tokens(panel, "in", model)
        uncounted = counter(panel, "gpupanel_uncounted_chunks_total", model=model)
        body = {"model": model, "messages": HI, "max_tokens": 5, "stream": True}
        with httpx.stream("POST", f"{panel.url}/v1/chat/completions", json=body, timeout=60) as r:
            raw = b"".join(r.iter_bytes())
        events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
        assert all("usage" not in e for e in events)
        timings = events[-1]["timings"]
        assert timings["predicted_n"] > 0
        assert tokens(panel, "out", model) - before[0] == timings["predicted_n"]
        assert tokens(panel, "in", model) - before[1] == (
            timings["prompt_n"] + timings.get("cache_n", 0)
        )
        assert counter(panel, "gpupanel_uncounted_chunks_total", model=model) == uncounted
    finally:
        panel.shutdown()
