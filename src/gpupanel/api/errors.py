"""Errors at the HTTP boundary: each semantic error kind maps to a status here, once, and is
answered in the caller's dialect (docs/api.md, "Errors").

- `/panel` routes: `{"error": {"message", "type", "code"}}`;
- OpenAI routes (`/v1`, `/proxy/{id}/v1`): `{"error": {"message", "type", "param", "code"}}`;
- native Ollama routes (`/proxy/{id}/api`): `{"error": "..."}`.
"""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

from gpupanel.errors import (
    Conflict,
    Forbidden,
    GpuPanelError,
    Invalid,
    NotFound,
    TooLarge,
    Unavailable,
    WorkerFailed,
    WorkerTimeout,
)

_KINDS: tuple[tuple[type[GpuPanelError], int, str], ...] = (
    (TooLarge, 413, "request_too_large"),
    (Invalid, 400, "invalid_request_error"),
    (NotFound, 404, "not_found_error"),
    (Forbidden, 403, "forbidden"),
    (Conflict, 409, "conflict"),
    (Unavailable, 503, "service_unavailable"),
    (WorkerTimeout, 504, "timeout"),
    (WorkerFailed, 502, "bad_gateway"),
)


def status_of(exc: GpuPanelError) -> tuple[int, str]:
    """The HTTP status and error type of a gpupanel error (500 for one of no known kind)."""
    for kind, status, name in _KINDS:
        if isinstance(exc, kind):
            return status, name
    return 500, "server_error"


def panel_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    """`{"error": {"message", "type", "code"}}` for /panel routes, by status."""
    kind = next((name for _, s, name in _KINDS if s == status), None)
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}}, status_code=status
    )


def panel_response(exc: GpuPanelError) -> JSONResponse:
    """A gpupanel error as a /panel error response."""
    status, _ = status_of(exc)
    return panel_error(status, str(exc), exc.code)


def dialect_body(dialect: str, exc: GpuPanelError) -> tuple[int, bytes]:
    """A gpupanel error as a proxy answer: status and body in the route's dialect
    (`ollama`: `{"error": "..."}`; otherwise OpenAI's)."""
    status, kind = status_of(exc)
    if dialect == "ollama":
        return status, json.dumps({"error": str(exc)}).encode()
    error = {"message": str(exc), "type": kind, "param": None, "code": exc.code}
    return status, json.dumps({"error": error}).encode()
