"""The JSON contract of the management API (`/panel`) as pydantic models, and the proxy's
routes as documentation (docs/api.md, "Management routes" and "JSON shapes").

Requests: each body is a model here, validated strictly (a bool is a JSON boolean, an
integer a JSON integer) after `gpupanel.api.limits.loads` decoded it; query and path
integers are ASCII digits only and bounded before anything converts them. Every refusal
names the field and what it must be (`MUST`), in the messages clients have always seen.

Answers: the routes send the JSON they always sent; these models only describe it (the
OpenAPI document at `/panel/openapi.json`). Objects that are core dataclasses (a worker, a
GPU, a warning, an app) are described by those dataclasses themselves, so a field added
there shows up here without a second copy. Answer objects allow more fields than they
list: a newer server may add some.

Imports only pydantic, core and gpupanel.errors: the client validates its bodies with the
same models without loading the control plane.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticUseDefault

from gpupanel.api.limits import loads
from gpupanel.core.model import GpuSample, HostSample
from gpupanel.core.requests import AppInfo, RequestInfo
from gpupanel.core.units import parse_go_duration
from gpupanel.core.usage import MUST as USAGE_MUST
from gpupanel.core.warning import Warning
from gpupanel.core.worker import LoadedModel, WorkerState
from gpupanel.errors import Invalid

# ---- bounds (docs/api.md, "Limits") ----------------------------------------------------------

MAX_NUM_CTX = 2**24
"""Tokens of context a load or an estimate may ask for (16,777,216)."""
MAX_PARALLEL = 1024
"""Parallel slots an estimate may ask for."""
MAX_LOG_LINES = 10_000
"""Lines of a worker's log one request may read."""
DEFAULT_LOG_LINES = 50
MAX_PID = 2**22
"""Linux's largest pid_max (PID_MAX_LIMIT): pids are below it, so no process has a pid over it."""
MAX_KEEP_ALIVE_S = 10**9
"""Seconds (about 31 years) a keep_alive may name either way; negative means forever."""
MAX_KEEP_ALIVE_CHARS = 64
MAX_MODEL_NAME = 512
MAX_OWNER = 256
MAX_APP_WORKERS = 256
APP_NAME_PATTERN = r"^[A-Za-z0-9_.@:/-]{1,64}$"
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")
_QUERY_INT_DIGITS = 10
"""Digits a query or path integer may have: every bound above has fewer, so the number is
refused by its bound, and a 5,000-digit one never reaches int()."""

MUST: dict[str, str] = {
    "worker": "is required (and 'model' for Ollama workers)",
    "model": f"must be a model name of 1-{MAX_MODEL_NAME} characters",
    "num_ctx": f"must be a positive integer (tokens of context per slot), at most {MAX_NUM_CTX}",
    "parallel": f"must be a positive integer (slots), at most {MAX_PARALLEL}",
    "lines": f"must be a positive integer, at most {MAX_LOG_LINES}",
    "pid": f"must be a process id: a positive integer, at most {MAX_PID}",
    "keep_alive": (
        'must be seconds or a duration such as "30m" or "1h30m" (Go syntax; negative: keep '
        f"loaded forever), at most {MAX_KEEP_ALIVE_S} s either way"
    ),
    "exclusive": "must be true or false",
    "force": "must be true or false",
    "name": "is required: 1-64 of A-Z a-z 0-9 _ . @ : / -",
    "owner": f"must be a string of at most {MAX_OWNER} characters, or null",
    "workers": f"must be a list of worker ids (at most {MAX_APP_WORKERS})",
    "kv_cache_type": f"must be one of {', '.join(KV_CACHE_TYPES)}",
    **USAGE_MUST,  # since, until, by of GET /panel/usage
}
"""What each field must be, as the 400 answer words it: "field 'num_ctx' must be ..."."""
MAX_MOMENT_CHARS = 32
"""Characters a `since` or `until` of GET /panel/usage may have."""

_WHERE = {"query": "query parameter", "path": "path parameter", "header": "header"}


# ---- validators --------------------------------------------------------------------------------

_DIGITS = re.compile(f"[0-9]{{1,{_QUERY_INT_DIGITS}}}")


def query_int(value: object) -> object:
    """A query or path integer: ASCII digits only ('²', '+5', ' 5', '1_0', '1e3' and very long
    numbers are refused before any conversion); an empty value takes the default."""
    if isinstance(value, str):
        if value == "":
            raise PydanticUseDefault()
        if not _DIGITS.fullmatch(value):
            raise ValueError("not a positive integer in ASCII digits")
        return int(value)
    return value


def empty_is_absent(value: object) -> object:
    """An optional query string: empty (`?model=`) is the same as absent."""
    if value == "":
        raise PydanticUseDefault()
    return value


_GO_PART = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h)"
_GO_DURATION = re.compile(f"[-+]?(?:0|(?:{_GO_PART})+)")
_SECONDS = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
KEEP_ALIVE_PATTERN = f"^(?:{_SECONDS.pattern}|{_GO_DURATION.pattern})$"


def _keep_alive(value: object) -> object:
    """A keep_alive as Ollama takes it: a number of seconds, or a Go duration string ("30m",
    "1h30m", "-1s"); negative keeps the model loaded forever. A string that is a bare number
    ("300", "-1", what `--keep-alive` passes) becomes that number: Ollama reads a string only
    as a duration and would refuse it. NaN, infinities and anything over MAX_KEEP_ALIVE_S
    either way are refused: they must never reach a worker."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not seconds or a duration")
    out: int | float | str = value
    if isinstance(value, int):
        if abs(value) > MAX_KEEP_ALIVE_S:  # before float(): 10**400 would overflow it
            raise ValueError("too large")
        return value
    if isinstance(value, float):
        seconds = value
    elif len(value) > MAX_KEEP_ALIVE_CHARS:
        raise ValueError("too long")
    elif _SECONDS.fullmatch(value):
        seconds = float(value)
        out = int(seconds) if seconds.is_integer() else seconds
    else:
        try:
            seconds = parse_go_duration(value)
        except ValueError:
            raise ValueError("not a duration") from None
    if not math.isfinite(seconds) or abs(seconds) > MAX_KEEP_ALIVE_S:
        raise ValueError("not finite or too large")
    return out


# ---- request types -------------------------------------------------------------------------------

KeepAlive = Annotated[
    int | float | str,
    BeforeValidator(_keep_alive),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": -MAX_KEEP_ALIVE_S, "maximum": MAX_KEEP_ALIVE_S},
                {
                    "type": "string",
                    "pattern": KEEP_ALIVE_PATTERN,
                    "maxLength": MAX_KEEP_ALIVE_CHARS,
                },
            ],
            "description": (
                'Seconds, or a Go duration such as "30m" or "1h30m"; negative keeps the model '
                'loaded forever, 0 unloads it at once. A string that is a bare number ("300") '
                "is sent to the worker as that number of seconds."
            ),
            "examples": ["30m", 300, -1],
        }
    ),
]
ModelName = Annotated[StrictStr, Field(min_length=1, max_length=MAX_MODEL_NAME)]
BodyNumCtx = Annotated[StrictInt, Field(ge=1, le=MAX_NUM_CTX)]


class JsonBody(BaseModel):
    """A JSON request body: strict types; fields it does not know are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    MUST: ClassVar[dict[str, str]] = {}


class LoadBody(JsonBody):
    """`POST /panel/workers/{id}/load`: load a model behind the VRAM guard."""

    MUST: ClassVar[dict[str, str]] = {"model": "is required: the model to load"}

    model: ModelName = Field(description="The model to load.", examples=["llama3.1:8b"])
    keep_alive: KeepAlive | None = None
    num_ctx: BodyNumCtx | None = Field(
        None, description="Tokens of context per slot (default: the worker's, else Ollama's rule)."
    )
    exclusive: StrictBool = Field(
        False, description="Unload the worker's other models first (their memory counts as free)."
    )
    force: StrictBool = Field(False, description="Load even if the guard says it will not fit.")


class UnloadBody(JsonBody):
    """`POST /panel/workers/{id}/unload`."""

    MUST: ClassVar[dict[str, str]] = {"model": "is required: the model to unload"}

    model: ModelName = Field(examples=["llama3.1:8b"])


class PullBody(JsonBody):
    """`POST /panel/workers/{id}/pull`."""

    MUST: ClassVar[dict[str, str]] = {"model": "is required: the model to pull"}

    model: ModelName = Field(examples=["qwen2.5:0.5b"])


class AppRegistration(JsonBody):
    """`POST /panel/apps`: register (or update) an app and the workers it owns."""

    name: Annotated[StrictStr, Field(pattern=APP_NAME_PATTERN)] = Field(
        description="What its requests carry as `X-GPUPanel-App`.", examples=["team-a"]
    )
    owner: Annotated[StrictStr, Field(max_length=MAX_OWNER)] | None = None
    workers: Annotated[list[StrictStr], Field(max_length=MAX_APP_WORKERS)] = Field(
        default_factory=list,
        description="Worker ids; `/v1` requests of this app are routed only to them.",
        examples=[["gpu0"]],
    )


class StopProcessBody(JsonBody):
    """`POST /panel/processes/{pid}/stop` (the body may be empty)."""

    force: StrictBool = Field(
        False, description="Stop a process that is not a worker's (an unmanaged GPU process)."
    )


BODY_MODELS: tuple[type[JsonBody], ...] = (
    LoadBody,
    UnloadBody,
    PullBody,
    AppRegistration,
    StopProcessBody,
)

B = TypeVar("B", bound=JsonBody)


def read_body(model: type[B], raw: bytes) -> B:
    """A request body as `model`: decoded by `limits.loads` (depth limit; NaN and Infinity
    refused), an empty body as `{}`, then validated. A NaN or Infinity token in a field is
    refused naming that field, as any other value it cannot take."""
    if not raw.strip():
        return parse_body(model, {})
    try:
        data = loads(raw)
    except Invalid as exc:
        named = _non_finite_field(model, raw) if exc.code == "invalid_json" else None
        raise (named or exc) from None
    return parse_body(model, data)


def _non_finite_field(model: type[JsonBody], raw: bytes) -> Invalid | None:
    """The refusal naming the field of a body that `loads` refused, when the body is a JSON
    object but for NaN or Infinity tokens (decoded here as floats, for the message only)."""
    seen: list[str] = []

    def constant(name: str) -> float:
        seen.append(name)
        return float(name)

    try:
        data = json.loads(raw, parse_constant=constant)
    except (ValueError, RecursionError):
        return None
    if not seen or not isinstance(data, dict):
        return None
    try:
        parse_body(model, data)
    except Invalid as exc:
        return exc
    return None


def parse_body(model: type[B], data: Any) -> B:
    """`data` (a decoded JSON body) as `model`; Invalid naming the field when it is not one."""
    if not isinstance(data, dict):
        raise Invalid("request body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid(error_message(exc.errors(), "body", model.MUST)) from None


def error_message(
    errors: Sequence[Mapping[str, Any]], source: str = "body", must: Mapping[str, str] | None = None
) -> str:
    """One line for the first validation error: where, which field, what it must be, and
    (for query and path values) what it got."""
    if not errors:
        return "invalid request"
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):
        source, loc = loc[0], loc[1:]
    name = loc[0] if loc else ""
    where = _WHERE.get(source, "field")
    rule = (must or {}).get(name) or MUST.get(name)
    if rule is None:
        rule = (
            "is required" if error.get("type") == "missing" else f"is invalid: {error.get('msg')}"
        )
    message = f"{where} {name!r} {rule}" if name else f"request body {rule}"
    given = error.get("input")
    if source in ("query", "path") and isinstance(given, str):
        message += f", got {given[:20]!r}"
    return message


# ---- answers -------------------------------------------------------------------------------------


class _Answer(BaseModel):
    """A JSON answer. Its schema lists its fields and does not forbid others (JSON Schema's
    default): a newer server may send fields an older document does not list."""


class ErrorDetail(_Answer):
    message: str = Field(description="What went wrong and what to do, in one line.")
    type: str = Field(description="The kind: invalid_request_error, not_found_error, conflict, ...")
    code: str | None = Field(
        description="A stable code for the case (e.g. `body_too_large`), or null."
    )


class PanelError(BaseModel):
    """Every error of `/panel`: `{"error": {"message", "type", "code"}}`."""

    error: ErrorDetail


class HealthAnswer(_Answer):
    status: Literal["ok"]
    version: str
    simulated: bool


class Snapshot(_Answer):
    """Everything the control plane knows at one tick (docs/api.md, "Snapshot")."""

    time: float = Field(description="When it was taken (epoch seconds).")
    simulated: bool
    gpus: dict[str, GpuSample] = Field(description="Every GPU, by UUID.")
    workers: dict[str, WorkerState] = Field(description="Every worker, by id.")
    warnings: list[Warning]
    requests: list[RequestInfo] = Field(description="Proxied requests in flight.")
    apps: list[AppInfo]
    host: HostSample | None


class WorkersAnswer(_Answer):
    workers: dict[str, WorkerState]


class WorkerActionAnswer(_Answer):
    result: str = Field(
        description="`started`, `restarted`; for a stop `terminated`, `killed` or `gone`."
    )
    worker: WorkerState


class EnsureAnswer(_Answer):
    started: list[str] = Field(description="The workers it started.")
    workers: dict[str, WorkerState]


class LogAnswer(_Answer):
    worker: str
    lines: list[str]


class Estimate(_Answer):
    """What a load would take (docs/api.md, "Estimate"): bytes; `total = weights + kv_cache +
    overhead`; `fits` is `total + margin <= free`, null when free memory is unknown."""

    model: str
    num_ctx: int
    parallel: int
    kv_cache_type: str
    weights: int
    kv_cache: int
    overhead: int
    total: int
    kv_bytes_per_token: float
    free: int | None
    margin: int
    fits: bool | None
    explain: str
    runtime: str | None = Field(
        None,
        description="'vllm' for a vLLM worker, whose memory follows vLLM's rule "
        "(docs/vllm.md): `total` is what it reserves at start, `num_ctx` its max_model_len; "
        "the fields below are then set.",
    )
    device: str | None = None
    reserved: int | None = None
    utilization: float | None = None
    block_size: int | None = None
    num_blocks: int | None = None
    kv_tokens: int | None = Field(None, description="The KV cache's capacity as vLLM logs it.")
    max_concurrency: float | None = None
    max_model_len: int | None = None
    dtype_bytes: int | None = None


class EstimateAnswer(_Answer):
    worker: str
    estimate: Estimate


class LoadAnswer(_Answer):
    worker: str
    model: str
    estimate: Estimate | None = Field(
        description="None for a vLLM worker's model, which was loaded at launch."
    )
    loaded: LoadedModel | None
    load_duration_ms: float
    problems: list[str] = Field(description="What was seen after the load (spill, CPU offload).")
    forced: bool


class UnloadAnswer(_Answer):
    worker: str
    model: str
    unloaded: Literal[True]


class PullLine(_Answer):
    """One line of a pull's `application/x-ndjson` answer: progress, or (after the stream
    started) `{"error": "..."}`."""

    status: str | None = None
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
    error: str | None = None


class WarningsAnswer(_Answer):
    warnings: list[Warning]


class RequestsAnswer(_Answer):
    requests: list[RequestInfo]


class AppsAnswer(_Answer):
    apps: list[AppInfo]


class AppAnswer(_Answer):
    app: AppInfo


class AppDeletedAnswer(_Answer):
    deleted: Literal[True]
    app: AppInfo = Field(description="The app as it was when it was removed.")


class StopProcessAnswer(_Answer):
    result: str


class UsageCounts(_Answer):
    """What the usage history counts (docs/api.md, "Usage history")."""

    requests: int = Field(description="Proxied requests that ended.")
    errors: int = Field(description="Of them, ended with an error status or unanswered.")
    cancelled: int = Field(description="Of them, the client hung up first.")
    tokens_in: int = Field(
        description="Prompt tokens as the runtimes reported them (of `counted_requests`)."
    )
    tokens_out: int = Field(
        description="Answer tokens as the runtimes reported them (of `counted_requests`)."
    )
    counted_requests: int = Field(description="Requests whose runtime reported token counts.")
    uncounted_chunks: int = Field(
        description="Answer chunks of the answered requests without reported counts (never "
        "added to the tokens)."
    )
    gpu_seconds: float = Field(
        description="Request durations on a worker, summed (overlapping requests each count)."
    )


class UsageRow(UsageCounts):
    key: str = Field(description='The app, model or worker (`""`: none).')


class UsageHour(UsageCounts):
    hour: int = Field(description="The hour's start (epoch seconds, UTC).")


class UsageAnswer(_Answer):
    """`GET /panel/usage`: the period, one row per key (most requests first), the totals
    per hour (oldest first, hours without requests left out) and the grand total."""

    since: float = Field(description="Epoch seconds; every hour that overlaps the period counts.")
    until: float
    by: Literal["app", "model", "worker"]
    rows: list[UsageRow]
    hours: list[UsageHour]
    total: UsageCounts
    retention_days: int = Field(
        description="Days of history kept (`[panel] usage_retention_days`)."
    )
    persistent: bool = Field(
        description="Whether the history is kept in the state directory (else in memory only)."
    )
    problem: str | None = Field(description="Why the history is not kept on disk now, or null.")


# ---- the proxy's routes (served by api/proxy.py, described here) ------------------------------


class OpenAIErrorDetail(_Answer):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """Errors of the OpenAI routes (`/v1/...`, `/proxy/{worker}/v1/...`)."""

    error: OpenAIErrorDetail


class OllamaError(BaseModel):
    """Errors of the native Ollama routes (`/proxy/{worker}/api/...`)."""

    error: str


class RoutedRequest(_Answer):
    """An OpenAI request (chat completion, completion, embeddings); `model` routes it, the
    rest goes to the worker as it is."""

    model: str = Field(description="Routes the request to a healthy worker that has it.")


class ModelEntry(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    workers: list[str] = Field(description="The running workers that have it.")


class ModelList(_Answer):
    object: Literal["list"]
    data: list[ModelEntry]
