"""`GET /metrics`: the plane's metrics in the Prometheus text format (docs/metrics.md).

A small raw ASGI handler, routed by `api/app.py` before the /panel app (no body to read, no
framework in the way): it renders the meter's own registry with prometheus_client. The
metrics are collected on the loop (what the plane published and counted, read in one go),
and only turned into text in a thread: formatting is most of a scrape's cost (several
milliseconds for a few thousand samples), and the loop serves the proxy. With
`[panel] auth = "keys"` it needs the admin token (`api/auth.py`), which Prometheus sends with
`authorization: {credentials_file: ...}` in its scrape config.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import Receive, Scope, Send

from gpupanel.api.errors import panel_error

PATH = "/metrics"


class _Collected(Collector):
    """Metric families already collected, to be rendered away from the loop."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class Metrics:
    """The ASGI handler of `GET /metrics` (HEAD too) over one registry; any other method is
    a 404 in the panel's error shape, as for the other routes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await panel_error(404, f"no route {method} {PATH}: use GET {PATH}")(
                scope, receive, send
            )
            return
        families = list(self.registry.collect())  # on the loop: one consistent reading
        body = await asyncio.to_thread(generate_latest, _Collected(families))
        headers = [
            (b"content-type", CONTENT_TYPE_LATEST.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
