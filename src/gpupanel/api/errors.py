"""Error responses in the caller's dialect (DESIGN.md section 5)."""

from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    403: "forbidden",
    404: "not_found_error",
    409: "conflict",
    413: "request_too_large",
}


def panel_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    """`{"error": {"message", "type", "code"}}` for /panel routes."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}}, status_code=status
    )
