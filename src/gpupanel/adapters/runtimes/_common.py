"""What every runtime adapter shares: the pinned launch, the timed probe and HTTP calls whose
failures come back as `Probe` values or as `RuntimeRequestError`, never as httpx exceptions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from gpupanel.adapters.runtimes.base import Launch, Models, Probe
from gpupanel.core.config import WorkerSpec
from gpupanel.core.defaults import LOOPBACK
from gpupanel.core.worker import LoadedModel
from gpupanel.errors import RuntimeRequestError

PROBE_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 10.0


def pinned_launch(
    spec: WorkerSpec,
    default_command: Sequence[str],
    args: Sequence[str],
    env: Mapping[str, str] = {},
    forced: Mapping[str, str] = {},
) -> Launch:
    """The argv and environment that start `spec` pinned to its GPU (docs/architecture.md, "Identity and pinning").

    argv: `spec.command` (or the runtime's `default_command`), the runtime's `args`, then
    `spec.args`. env: `CUDA_DEVICE_ORDER=PCI_BUS_ID` and the runtime's `env`, overridden by
    the user's `spec.env`; then `forced` (what the control plane relies on, such as the
    listening address) and `CUDA_VISIBLE_DEVICES=<spec.gpu>` always win, so a worker can
    never be configured off its GPU or its port.
    """
    merged = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", **env, **spec.env, **forced}
    merged["CUDA_VISIBLE_DEVICES"] = spec.gpu
    argv = (*(spec.command or default_command), *args, *spec.args)
    return Launch(argv=tuple(argv), env=merged)


def base_url(spec: WorkerSpec) -> str:
    """Workers listen on loopback only; the proxy is what other hosts may reach."""
    return f"http://{LOOPBACK}:{spec.port}"


def describe(exc: BaseException) -> str:
    """One line for a transport failure (httpx messages are sometimes empty)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_text(response: httpx.Response) -> str:
    """The server's own error message: Ollama's `{"error": "..."}`, OpenAI's
    `{"error": {"message": ...}}`, or the start of the body."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    body = response.text.strip()
    return body[:200] if body else f"HTTP {response.status_code}"


def status_judge(response: httpx.Response) -> str | None:
    """Ready means HTTP 200; anything else is reported with the server's message."""
    if response.status_code == 200:
        return None
    return f"HTTP {response.status_code}: {error_text(response)}"


Judge = Callable[[httpx.Response], str | None]


async def timed_probe(client: httpx.AsyncClient, url: str, timeout_s: float, judge: Judge) -> Probe:
    """GET `url` within `timeout_s` in all; `judge` turns the answer into None (ready) or an
    error. Never raises: a refused connection, a timeout or a bad answer is `ok=False`."""
    start = time.perf_counter()
    try:
        response = await asyncio.wait_for(client.get(url, timeout=timeout_s), timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return Probe(ok=False, error=f"no answer from {url} within {timeout_s:g} s")
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        return Probe(ok=False, error=describe(exc))
    latency_ms = (time.perf_counter() - start) * 1000.0
    error = judge(response)
    return Probe(ok=error is None, latency_ms=latency_ms, error=error)


class HttpRuntime:
    """What the adapters have in common: the worker's URL and how long a probe may take."""

    name = ""

    def __init__(self, probe_timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.probe_timeout_s = probe_timeout_s

    def base_url(self, spec: WorkerSpec) -> str:
        """The worker's root URL, e.g. `http://127.0.0.1:11435`."""
        return base_url(spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(probe_timeout_s={self.probe_timeout_s:g})"


async def request_json(
    client: httpx.AsyncClient,
    spec: WorkerSpec,
    method: str,
    path: str,
    *,
    body: Mapping[str, Any] | None = None,
    timeout_s: float = REQUEST_TIMEOUT_S,
    what: str | None = None,
) -> Any:
    """The JSON answer of one request to the worker; failures raise `RuntimeRequestError`
    naming the worker and the call (`what`, else method and path), with the server's own
    message and status."""
    what = f"worker {spec.id}: {what or f'{method} {path}'}"
    try:
        response = await client.request(method, base_url(spec) + path, json=body, timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        raise RuntimeRequestError(f"{what}: {describe(exc)}") from exc
    if response.status_code >= 400:
        raise RuntimeRequestError(f"{what}: {error_text(response)}", response.status_code)
    try:
        return response.json()
    except ValueError as exc:
        raise RuntimeRequestError(
            f"{what}: the answer is not JSON: {response.text[:200]!r}", response.status_code
        ) from exc


def records(payload: Any, key: str) -> list[dict[str, Any]]:
    """The objects listed under `payload[key]`, skipping anything that is not an object."""
    items = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, dict)]


def int_or_none(value: Any) -> int | None:
    """An integer field, or None when the server left it out or sent something else."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class SingleModelRuntime(HttpRuntime):
    """An OpenAI-compatible server of exactly one model (llama-server, vLLM): ready when
    `GET /health` is 200, and every model `/v1/models` lists is loaded."""

    def judge_health(self, response: httpx.Response) -> str | None:
        """None when the `/health` answer means ready, else what is wrong."""
        return status_judge(response)

    async def probe(self, client: httpx.AsyncClient, spec: WorkerSpec) -> Probe:
        """Is the server up and its model ready (`GET /health`)?"""
        url = self.base_url(spec) + "/health"
        return await timed_probe(client, url, self.probe_timeout_s, self.judge_health)

    async def models(self, client: httpx.AsyncClient, spec: WorkerSpec) -> Models:
        """The served model(s), available and loaded. llama-server reports its size in
        `meta.size`, vLLM its context in `max_model_len`; what is not reported is None."""
        payload = await request_json(client, spec, "GET", "/v1/models")
        loaded = tuple(
            _served_model(m) for m in records(payload, "data") if isinstance(m.get("id"), str)
        )
        return Models(available=tuple(m.name for m in loaded), loaded=loaded)


def _served_model(item: dict[str, Any]) -> LoadedModel:
    meta = item.get("meta")
    return LoadedModel(
        name=item["id"],
        size=int_or_none(meta.get("size")) if isinstance(meta, dict) else None,
        context_length=int_or_none(item.get("max_model_len")),
    )
