"""Ollama (`ollama serve`) as a worker runtime.

Launch environment (docs/architecture.md, "Identity and pinning"): `OLLAMA_HOST=127.0.0.1:<port>` (forced: the
control plane probes that port), `OLLAMA_VULKAN=0` (Ollama 0.24-0.32's Vulkan backend sees
NVIDIA cards and ignores `CUDA_VISIBLE_DEVICES`) and `OLLAMA_NOPRUNE=1` (workers may share
a models directory, and one start must not prune another's blobs). `OLLAMA_CONTEXT_LENGTH`
is set only when the spec gives a context: Ollama's own default depends on the GPU's memory,
and the user's `env` may set it too. Beyond the `Runtime` protocol, Ollama can load and
unload models on request (`load`, `unload`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from gpupanel.adapters.runtimes import _common
from gpupanel.adapters.runtimes.base import Launch, Models, Probe
from gpupanel.core.config import WorkerSpec
from gpupanel.core.defaults import LOOPBACK
from gpupanel.core.names import same_model
from gpupanel.core.worker import LoadedModel
from gpupanel.errors import RuntimeRequestError

LOAD_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What a worker says about one of its models: size in bytes and GGUF-style metadata."""

    size: int | None
    model_info: dict[str, Any]


KeepAlive = str | float | int


class OllamaRuntime(_common.HttpRuntime):
    """Workers that run `ollama serve` (or a stand-in given as the spec's `command`)."""

    name = "ollama"

    def launch(self, spec: WorkerSpec) -> Launch:
        """`ollama serve` pinned to `spec.gpu`, listening on 127.0.0.1:`spec.port`."""
        env = {"OLLAMA_VULKAN": "0", "OLLAMA_NOPRUNE": "1"}
        if spec.context is not None:
            env["OLLAMA_CONTEXT_LENGTH"] = str(spec.context)
        if spec.parallel is not None:
            env["OLLAMA_NUM_PARALLEL"] = str(spec.parallel)
        forced = {"OLLAMA_HOST": f"{LOOPBACK}:{spec.port}"}
        return _common.pinned_launch(spec, ("ollama",), ("serve",), env, forced)

    async def probe(self, client: httpx.AsyncClient, spec: WorkerSpec) -> Probe:
        """Ready when `GET /api/version` answers 200 (Ollama serves only once it is set up)."""
        url = self.base_url(spec) + "/api/version"
        return await _common.timed_probe(client, url, self.probe_timeout_s, _common.status_judge)

    async def models(self, client: httpx.AsyncClient, spec: WorkerSpec) -> Models:
        """Pulled models (`/api/tags`) and those resident in memory (`/api/ps`)."""
        tags, ps = await asyncio.gather(
            _common.request_json(client, spec, "GET", "/api/tags"),
            _common.request_json(client, spec, "GET", "/api/ps"),
        )
        available = tuple(
            m["name"] for m in _common.records(tags, "models") if isinstance(m.get("name"), str)
        )
        loaded = tuple(
            LoadedModel(
                name=m["name"],
                size=_common.int_or_none(m.get("size")),
                size_vram=_common.int_or_none(m.get("size_vram")),
                expires_at=m.get("expires_at") if isinstance(m.get("expires_at"), str) else None,
                context_length=_common.int_or_none(m.get("context_length")),
            )
            for m in _common.records(ps, "models")
            if isinstance(m.get("name"), str)
        )
        return Models(available=available, loaded=loaded)

    async def load(
        self,
        client: httpx.AsyncClient,
        spec: WorkerSpec,
        model: str,
        keep_alive: KeepAlive | None = None,
        num_ctx: int | None = None,
        timeout_s: float = LOAD_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Load `model` into memory now (a generate call without a prompt) and return Ollama's
        answer (`done_reason: "load"`, `load_duration` in ns). `keep_alive` is seconds or a Go
        duration ("30m"; negative keeps it forever); `num_ctx` sets its context in tokens."""
        body: dict[str, Any] = {"model": model, "stream": False}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        if num_ctx is not None:
            body["options"] = {"num_ctx": num_ctx}
        return await self._generate(client, spec, body, timeout_s, f"load {model}")

    async def unload(
        self,
        client: httpx.AsyncClient,
        spec: WorkerSpec,
        model: str,
        timeout_s: float = _common.REQUEST_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Drop `model` from memory now (`keep_alive: 0`); returns `done_reason: "unload"`."""
        body = {"model": model, "keep_alive": 0, "stream": False}
        return await self._generate(client, spec, body, timeout_s, f"unload {model}")

    async def describe(self, client: httpx.AsyncClient, spec: WorkerSpec, model: str) -> ModelFacts:
        """The model's size in bytes (`/api/tags`) and its `model_info` (`/api/show`),
        what the VRAM estimator needs."""
        tags, show = await asyncio.gather(
            _common.request_json(client, spec, "GET", "/api/tags"),
            _common.request_json(
                client, spec, "POST", "/api/show", body={"model": model}, what=f"show {model}"
            ),
        )
        size = next(
            (
                _common.int_or_none(m.get("size"))
                for m in _common.records(tags, "models")
                if isinstance(m.get("name"), str) and same_model(m["name"], model)
            ),
            None,
        )
        info = show.get("model_info") if isinstance(show, dict) else None
        return ModelFacts(size=size, model_info=info if isinstance(info, dict) else {})

    async def pull(
        self, client: httpx.AsyncClient, spec: WorkerSpec, model: str
    ) -> AsyncIterator[dict[str, Any]]:
        """`/api/pull` progress lines as they stream (`{status, digest?, total?, completed?}`);
        an error line or HTTP error raises `RuntimeRequestError`."""
        url = self.base_url(spec) + "/api/pull"
        what = f"worker {spec.id}: pull {model}"
        try:
            async with client.stream(
                "POST", url, json={"model": model}, timeout=httpx.Timeout(30.0, read=None)
            ) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise RuntimeRequestError(f"{what}: {_common.error_text(r)}", r.status_code)
                async for raw in r.aiter_lines():
                    if not raw.strip():
                        continue
                    line = json.loads(raw)
                    if isinstance(line, dict) and isinstance(line.get("error"), str):
                        raise RuntimeRequestError(f"{what}: {line['error']}")
                    if isinstance(line, dict):
                        yield line
        except (httpx.HTTPError, OSError, ValueError) as exc:
            raise RuntimeRequestError(f"{what}: {_common.describe(exc)}") from exc

    @staticmethod
    async def _generate(
        client: httpx.AsyncClient,
        spec: WorkerSpec,
        body: dict[str, Any],
        timeout_s: float,
        what: str,
    ) -> dict[str, Any]:
        answer = await _common.request_json(
            client, spec, "POST", "/api/generate", body=body, timeout_s=timeout_s, what=what
        )
        if not isinstance(answer, dict):
            raise RuntimeRequestError(f"worker {spec.id}: {what}: unexpected answer {answer!r}")
        if isinstance(answer.get("error"), str):
            raise RuntimeRequestError(f"worker {spec.id}: {what}: {answer['error']}")
        return answer
