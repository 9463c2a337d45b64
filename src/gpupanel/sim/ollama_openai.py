"""The simulated server's OpenAI-compatible routes, shaped as Ollama's `openai` layer answers.

`/v1/models`, `/v1/models/{model}`, `/v1/chat/completions`, `/v1/completions` and
`/v1/embeddings`; streams are server-sent events (`data: {json}`) ending in
`data: [DONE]`, with a usage chunk (no choices) before it when
`stream_options.include_usage` is set (on `/v1/completions` Ollama then also puts a zero
`usage` in every other chunk); errors are
`{"error": {"message", "type", "param": null, "code": null}}`.
"""

from __future__ import annotations

import base64
import contextlib
import random
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from gpupanel.sim.catalogue import ModelSpec
from gpupanel.sim.ollama_core import Generated, OllamaSim
from gpupanel.sim.ollama_http import ApiError, dumps, read_json
from gpupanel.sim.textgen import count_tokens, embedding

FINGERPRINT = "fp_ollama"


def _usage(result: Generated) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.eval_count,
        "total_tokens": result.prompt_tokens + result.eval_count,
    }


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ApiError(400, f"{key} must be a non-negative integer")
            return value
    return None


def _text_of(content: Any) -> str:
    """A message's content: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


class OpenAIRoutes:
    """Handlers bound to one simulated server."""

    def __init__(self, sim: OllamaSim) -> None:
        self.sim = sim

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model:.+}", self.model)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/embeddings", self.embeddings)

    def _entry(self, name: str) -> dict[str, Any] | None:
        modified = self.sim.store.modified(name)
        if modified is None or name not in self.sim.catalogue:
            return None
        return {"id": name, "object": "model", "created": int(modified), "owned_by": "library"}

    async def models(self, request: web.Request) -> web.StreamResponse:
        data = [e for e in map(self._entry, self.sim.store.names()) if e is not None]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        spec = self.sim.pulled(name)
        entry = self._entry(spec.name)
        if entry is None:
            raise ApiError(404, f"model '{name}' not found")
        return web.json_response(entry)

    def _model(self, body: Mapping[str, Any]) -> tuple[str, ModelSpec]:
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ApiError(400, "model is required")
        return model, self.sim.pulled(model)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model, spec = self._model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list")
        if not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "each message must be an object")
        if spec.embedding_only:
            raise ApiError(400, f'"{model}" does not support chat')
        prompt = "\n".join(f"{m.get('role', '')}: {_text_of(m.get('content'))}" for m in messages)
        cid = f"chatcmpl-{random.randint(0, 999)}"

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        def complete(result: Generated) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.done_reason,
                    }
                ],
                "usage": _usage(result),
            }

        def piece(token: str) -> dict[str, Any]:
            return chunk({"role": "assistant", "content": token}, None)

        def last(result: Generated) -> dict[str, Any]:
            return chunk({"role": "assistant", "content": ""}, result.done_reason)

        return await self._run(request, body, model, spec, prompt, complete, piece, last)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model, spec = self._model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompt = "\n".join(prompt)
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string")
        if spec.embedding_only:
            raise ApiError(400, f'"{model}" does not support generate')
        cid = f"cmpl-{random.randint(0, 999)}"

        def shaped(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"text": text, "index": 0, "finish_reason": finish}],
            }

        def complete(result: Generated) -> dict[str, Any]:
            return {**shaped(result.text, result.done_reason), "usage": _usage(result)}

        return await self._run(
            request,
            body,
            model,
            spec,
            prompt,
            complete,
            lambda token: shaped(token, None),
            lambda result: shaped("", result.done_reason),
            zero_usage=True,
        )

    async def _run(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        model: str,
        spec: ModelSpec,
        prompt: str,
        complete: Callable[[Generated], dict[str, Any]],
        piece: Callable[[str], dict[str, Any]],
        last: Callable[[Generated], dict[str, Any]],
        zero_usage: bool = False,
    ) -> web.StreamResponse:
        """Generate and answer whole or as a stream. With `zero_usage` (Ollama's completions),
        a stream asked for usage carries `usage` of zeros in each chunk before the real one."""
        sim = self.sim
        num_predict = _max_tokens(body)
        stream_options = body.get("stream_options") or {}
        include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        sim.count_generation()
        async with sim.hold(spec, {}, sim.settings.keep_alive) as (lm, _load_ns):
            if not body.get("stream"):

                async def collect(token: str) -> None:
                    return None

                result = await sim.produce(lm, prompt, num_predict, collect)
                return web.json_response(complete(result))
            resp = web.StreamResponse()
            resp.content_type = "text/event-stream"
            await resp.prepare(request)

            zeros = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

            async def send(obj: Any) -> None:
                if zero_usage and include_usage and "usage" not in obj:
                    obj = {**obj, "usage": zeros}
                await resp.write(b"data: " + dumps(obj) + b"\n\n")

            async def write(token: str) -> None:
                await send(piece(token))

            with contextlib.suppress(ConnectionError):
                result = await sim.produce(lm, prompt, num_predict, write)
                await send(last(result))
                if include_usage:
                    usage_chunk = last(result)
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = _usage(result)
                    await send(usage_chunk)
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            return resp

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        model, spec = self._model(body)
        raw = body.get("input")
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
            texts = [" ".join(map(str, raw))]
        elif isinstance(raw, list) and all(isinstance(t, (str, list)) for t in raw):
            texts = [t if isinstance(t, str) else " ".join(map(str, t)) for t in raw]
        else:
            raise ApiError(400, "invalid input type: input must be a string or an array")
        if not texts:
            raise ApiError(400, "invalid input: input is empty")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be 'float' or 'base64'")
        dims = body.get("dimensions")
        if dims is not None and (
            isinstance(dims, bool)
            or not isinstance(dims, int)
            or not 0 < dims <= spec.shape.embedding_length
        ):
            raise ApiError(400, f"dimensions must be between 1 and {spec.shape.embedding_length}")
        async with self.sim.hold(spec, {}, self.sim.settings.keep_alive):
            vectors = [
                embedding(spec.name, t, spec.shape.embedding_length, dimensions=dims) for t in texts
            ]
        data = []
        for index, vector in enumerate(vectors):
            value: Any = vector
            if encoding == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": value, "index": index})
        tokens = sum(count_tokens(t) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
