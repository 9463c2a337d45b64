"""In-flight requests and apps as the snapshot reports them (docs/api.md, "Request" and "App"),
and a finished request as metrics and usage history count it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A proxied request while it runs."""

    id: str
    worker: str | None
    model: str | None
    app: str | None
    started: float
    chunks: int
    bytes: int
    path: str
    method: str


@dataclass(frozen=True, slots=True)
class AppInfo:
    """An app: registered with `POST /panel/apps`, or seen by its `X-GPUPanel-App` header."""

    name: str
    owner: str | None
    workers: tuple[str, ...]
    registered: bool
    in_flight: int
    requests: int
    bytes: int
    errors: int


Outcome = Literal["ok", "error", "cancelled"]
Counted = Literal["reported", "chunks"]


@dataclass(frozen=True, slots=True)
class Finished:
    """A proxied request that has ended, as metrics and usage history count it (docs/metrics.md).

    `app`, `worker` and `model` are label values already bounded by the meter (an unknown
    model is folded into one value, a request with no app is `""`). `outcome`: `ok` (an
    answer under 400 sent whole), `error` (an error status, or no worker could answer), or
    `cancelled` (the client hung up first). Token counts are the runtime's own where it
    reported them (`counted = "reported"`: OpenAI `usage`, Ollama's `prompt_eval_count` /
    `eval_count`, llama-server's `timings`); otherwise `tokens_in`/`tokens_out` are None and
    `counted = "chunks"`: only `chunks` (the answer's body chunks) says how much came back.
    `ttft_s` is the time to the first body chunk (None if none came); `ended` epoch seconds.
    """

    app: str
    worker: str
    model: str
    outcome: Outcome
    status: int
    duration_s: float
    ttft_s: float | None
    tokens_in: int | None
    tokens_out: int | None
    counted: Counted
    chunks: int
    failovers: int
    ended: float
