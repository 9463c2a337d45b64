"""The in-flight registry and the apps: who is asking which worker for what, right now.

Owned by the runtime loop (the proxy runs there too), so no locks. An entry is opened when
a proxied request starts and closed in a `finally`, however the request ends.

The app registry is bounded (docs/api.md, "App"): at most `max_apps` apps, registered or
seen by their `X-GPUPanel-App` header (with API keys: by the name of a request's key). A new
app beyond the bound takes the place of the seen-only app idle the longest; when there is
none, registering is refused (Conflict, a 409 naming `DELETE /panel/apps/{name}`) and a
request of an app never seen is served but not counted (its requests in flight still are,
for an API key's concurrency limit: `in_flight_of`). An app neither registered again nor
seen in a request for `app_ttl_s` is forgotten, lazily (when the registry is next used); an
app with requests in flight never is.
"""

from __future__ import annotations

import builtins
import itertools
import math
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields

from gpupanel.core.names import valid_app_name
from gpupanel.core.requests import AppInfo, RequestInfo
from gpupanel.core.routing import Bench
from gpupanel.errors import Conflict, NotFound

__all__ = ["APP_TTL_S", "MAX_APPS", "TAIL_CHUNKS", "InFlight", "Traffic", "valid_app_name"]

TAIL_CHUNKS = 3
"""Body chunks of an answer kept in `InFlight.tail` (a stream's token counts come last)."""

MAX_APPS = 256
"""Apps the registry holds at most (registered and seen together)."""

APP_TTL_S = 7 * 24 * 3600.0
"""An app not registered again nor seen in a request for this long is forgotten (a week)."""


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
    stats: _App | None = field(default=None, repr=False)
    """The app entry this request counts in (None: no app, or the registry was full)."""
    began: float = 0.0
    """`time.monotonic()` at the start (durations are measured from it)."""
    first_chunk: float | None = None
    """`time.monotonic()` when the first body chunk of the answer went out."""
    status: int = 0
    """The status answered (0: none was, the request failed before)."""
    cancelled: bool = False
    """The client hung up before the answer ended."""
    failovers: int = 0
    """Workers tried before the one that answered (or before giving up)."""
    tail: tuple[builtins.bytes, ...] = ()  # `bytes` alone would name the field above
    """The answer's last body chunks (at most `TAIL_CHUNKS`), where token counts are read."""


@dataclass(slots=True)
class _App:
    name: str
    owner: str | None = None
    workers: tuple[str, ...] = ()
    registered: bool = False
    requests: int = 0
    bytes: int = 0
    errors: int = 0
    in_flight: int = 0
    last_seen: float = 0.0


class Traffic:
    """In-flight requests by id, per-app totals, and the workers benched from `/v1` routing.

    `clock` gives epoch seconds (requests' start times, apps' last use); `app_ttl_s` is how
    long an unused app is kept, `max_apps` how many apps are kept at most."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        app_ttl_s: float = APP_TTL_S,
        max_apps: int = MAX_APPS,
        on_close: Callable[[InFlight], None] | None = None,
    ) -> None:
        self.clock = clock
        self.on_close = on_close
        self.app_ttl_s = app_ttl_s
        self.max_apps = max_apps
        self.bench = Bench()
        self.live: dict[str, InFlight] = {}
        self.apps: dict[str, _App] = {}
        self._app_live: dict[str, int] = {}  # requests in flight per app, registry full or not
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        self._next_expiry = math.inf  # no app can expire before this (a lower bound)

    def open(
        self, worker: str | None, model: str | None, app: str | None, path: str, method: str
    ) -> InFlight:
        """Register a request that starts now."""
        now = self.clock()
        entry = InFlight(
            id=f"req-{self._prefix}-{next(self._ids)}",
            worker=worker,
            model=model,
            app=app,
            started=now,
            path=path,
            method=method,
            began=time.monotonic(),
        )
        self.live[entry.id] = entry
        if app is not None:
            self._app_live[app] = self._app_live.get(app, 0) + 1
            self._expire(now)
            stats = self.apps.get(app) or self._add(app, now)
            if stats is not None:
                stats.requests += 1
                stats.in_flight += 1
                self._seen(stats, now)
                entry.stats = stats
        return entry

    def close(self, entry: InFlight) -> None:
        """Remove a request that ended (idempotent), and hand it to `on_close` (metrics and
        usage history) once."""
        stats = entry.stats
        if self.live.pop(entry.id, None) is None:
            return
        if self.on_close is not None:
            self.on_close(entry)
        if entry.app is not None:
            left = self._app_live.pop(entry.app, 1) - 1
            if left:
                self._app_live[entry.app] = left
        if stats is not None:
            stats.bytes += entry.bytes
            stats.errors += entry.failed
            stats.in_flight -= 1
            self._seen(stats, self.clock())

    def in_flight_of(self, app: str) -> int:
        """Requests of `app` in flight now (counted even when the app registry is full: an
        API key's concurrency limit rests on it)."""
        return self._app_live.get(app, 0)

    def in_flight(self) -> dict[str, int]:
        """Requests in flight per worker."""
        counts: dict[str, int] = {}
        for e in self.live.values():
            if e.worker is not None:
                counts[e.worker] = counts.get(e.worker, 0) + 1
        return counts

    def register(self, name: str, owner: str | None, workers: Collection[str]) -> AppInfo:
        """Register (or update) an app and the workers it owns; Conflict when the registry
        holds `max_apps` apps and none of them can make room."""
        now = self.clock()
        self._expire(now)
        app = self.apps.get(name) or self._add(name, now)
        if app is None:
            raise Conflict(
                f"cannot register app {name!r}: gpupanel keeps at most {self.max_apps} apps "
                "and all of them are registered or busy; remove one with "
                "DELETE /panel/apps/{name} (GET /panel/apps lists them)",
                "too_many_apps",
            )
        app.owner, app.workers, app.registered = owner, tuple(workers), True
        self._seen(app, now)
        return self.app_info(app)

    def remove(self, name: str) -> AppInfo:
        """Forget an app (its registration, workers and totals); NotFound if there is none.
        Its requests in flight finish, uncounted."""
        self._expire(self.clock())
        app = self.apps.pop(name, None)
        if app is None:
            raise NotFound(f"no app {name!r} (GET /panel/apps lists them)", "app_not_found")
        return self.app_info(app)

    def allowed_workers(self, name: str | None) -> tuple[str, ...] | None:
        """The workers a registered app owns (None: no restriction)."""
        if not name:
            return None
        self._expire(self.clock())
        app = self.apps.get(name)
        return app.workers if app is not None and app.workers else None

    def owners(self) -> dict[str, str]:
        """Worker id -> the registered app that owns it."""
        self._expire(self.clock())
        return {w: a.name for a in self.apps.values() if a.registered for w in a.workers}

    def app_info(self, app: _App) -> AppInfo:
        return AppInfo(
            name=app.name,
            owner=app.owner,
            workers=app.workers,
            registered=app.registered,
            in_flight=app.in_flight,
            requests=app.requests,
            bytes=app.bytes,
            errors=app.errors,
        )

    # ---- the bound and the expiry ------------------------------------------------------------

    def _add(self, name: str, now: float) -> _App | None:
        """A new entry for `name`, making room if the registry is full by forgetting the
        seen-only app idle the longest; None when nothing can make room."""
        if len(self.apps) >= self.max_apps:
            idle = [a for a in self.apps.values() if not a.registered and a.in_flight == 0]
            if not idle:
                return None
            del self.apps[min(idle, key=lambda a: a.last_seen).name]
        app = self.apps[name] = _App(name, last_seen=now)
        return app

    def _seen(self, app: _App, now: float) -> None:
        app.last_seen = max(app.last_seen, now)
        self._next_expiry = min(self._next_expiry, app.last_seen + self.app_ttl_s)

    def _expire(self, now: float) -> None:
        """Forget the apps unused for `app_ttl_s` (none with requests in flight). Cheap when
        nothing is due: most calls compare two numbers."""
        if now < self._next_expiry:
            return
        cutoff = now - self.app_ttl_s
        for name in [n for n, a in self.apps.items() if a.in_flight == 0 and a.last_seen <= cutoff]:
            del self.apps[name]
        # Apps in flight are left out: closing their last request marks them seen again.
        idle = (a.last_seen for a in self.apps.values() if a.in_flight == 0)
        self._next_expiry = min(idle, default=math.inf) + self.app_ttl_s

    def requests(self) -> tuple[RequestInfo, ...]:
        """The in-flight requests, oldest first."""
        names = [f.name for f in fields(RequestInfo)]
        return tuple(RequestInfo(*(getattr(e, n) for n in names)) for e in self.live.values())

    def app_infos(self) -> tuple[AppInfo, ...]:
        self._expire(self.clock())
        return tuple(self.app_info(a) for a in sorted(self.apps.values(), key=lambda a: a.name))
