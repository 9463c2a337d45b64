"""In-flight requests and apps as the snapshot reports them (docs/api.md, "Request" and "App")."""

from __future__ import annotations

from dataclasses import dataclass


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
