"""The in-flight registry and the apps: who is asking which worker for what, right now.

Owned by the runtime loop (the proxy runs there too), so no locks. An entry is opened when
a proxied request starts and closed in a `finally`, however the request ends.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields

from gpupanel.core.requests import AppInfo, RequestInfo
from gpupanel.core.routing import Bench

_APP_NAME = re.compile(r"^[A-Za-z0-9_.@:/-]{1,64}$")


@dataclass(slots=True)
class InFlight:
    """A live request; `chunks` and `bytes` grow as the response streams."""

    id: str
    worker: str | None
    model: str | None
    app: str | None
    started: float
    path: str
    method: str
    chunks: int = 0
    bytes: int = 0
    failed: bool = False


@dataclass(slots=True)
class _App:
    name: str
    owner: str | None = None
    workers: tuple[str, ...] = ()
    registered: bool = False
    requests: int = 0
    bytes: int = 0
    errors: int = 0


def valid_app_name(name: str) -> bool:
    """App names are short identifiers: letters, digits and `_ . @ : / -`."""
    return bool(_APP_NAME.match(name))


class Traffic:
    """In-flight requests by id, per-app totals, and the workers benched from `/v1` routing."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.bench = Bench()
        self.live: dict[str, InFlight] = {}
        self.apps: dict[str, _App] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"

    def open(
        self, worker: str | None, model: str | None, app: str | None, path: str, method: str
    ) -> InFlight:
        """Register a request that starts now."""
        entry = InFlight(
            id=f"req-{self._prefix}-{next(self._ids)}",
            worker=worker,
            model=model,
            app=app,
            started=self.clock(),
            path=path,
            method=method,
        )
        self.live[entry.id] = entry
        if app is not None:
            self.apps.setdefault(app, _App(app)).requests += 1
        return entry

    def close(self, entry: InFlight) -> None:
        """Remove a request that ended (idempotent)."""
        if self.live.pop(entry.id, None) is not None and entry.app is not None:
            stats = self.apps.setdefault(entry.app, _App(entry.app))
            stats.bytes += entry.bytes
            stats.errors += entry.failed

    def in_flight(self) -> dict[str, int]:
        """Requests in flight per worker."""
        counts: dict[str, int] = {}
        for e in self.live.values():
            if e.worker is not None:
                counts[e.worker] = counts.get(e.worker, 0) + 1
        return counts

    def register(self, name: str, owner: str | None, workers: Collection[str]) -> AppInfo:
        """Register (or update) an app and the workers it owns."""
        app = self.apps.setdefault(name, _App(name))
        app.owner, app.workers, app.registered = owner, tuple(workers), True
        return self.app_info(app)

    def allowed_workers(self, name: str | None) -> tuple[str, ...] | None:
        """The workers a registered app owns (None: no restriction)."""
        app = self.apps.get(name) if name else None
        return app.workers if app is not None and app.workers else None

    def owners(self) -> dict[str, str]:
        """Worker id -> the registered app that owns it."""
        return {w: a.name for a in self.apps.values() if a.registered for w in a.workers}

    def app_info(self, app: _App) -> AppInfo:
        live = sum(1 for e in self.live.values() if e.app == app.name)
        return AppInfo(
            name=app.name,
            owner=app.owner,
            workers=app.workers,
            registered=app.registered,
            in_flight=live,
            requests=app.requests,
            bytes=app.bytes,
            errors=app.errors,
        )

    def requests(self) -> tuple[RequestInfo, ...]:
        """The in-flight requests, oldest first."""
        names = [f.name for f in fields(RequestInfo)]
        return tuple(RequestInfo(*(getattr(e, n) for n in names)) for e in self.live.values())

    def app_infos(self) -> tuple[AppInfo, ...]:
        return tuple(self.app_info(a) for a in sorted(self.apps.values(), key=lambda a: a.name))
