"""The machinery of the panel's one-writer rule (docs/architecture.md, "One writer").

- `Batch`: the writes of one binder pass. A trait is set only when its value changed, and
  each widget touched is held with `hold_sync()` until the pass ends, so a changed widget
  sends one message per pass and an unchanged one sends none.
- `Binder`: a daemon thread that runs one pass about once a second (earlier when woken,
  never more often than `min_gap_s`) until stopped. A thread rather than the kernel's IOLoop
  because it works the same in a Jupyter kernel, in Voila and in plain Python (tests),
  where there is no running IOLoop; ipykernel >= 7.1 (and 6.x) send comm messages from
  threads correctly, 7.0.x does not (the package excludes it).
- `Commands`: what button clicks do. A click submits a command to a small thread pool and
  returns; the command's outcome (or error message) waits here until the next pass shows
  it. A long command (a pull) reports its progress here as well, for the next passes to
  show. Clicks and commands never touch widgets.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import ipywidgets

from gpupanel.errors import GpuPanelError

logger = logging.getLogger(__name__)


class Batch:
    """The trait writes of one binder pass, sent when the `with` block ends."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._held: set[int] = set()
        self.changes = 0

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _hold(self, widget: Any) -> None:
        if id(widget) not in self._held:
            self._held.add(id(widget))
            self._stack.enter_context(widget.hold_sync())

    def set(self, widget: Any, name: str, value: Any) -> bool:
        """Set `widget.name = value` unless it already has that value; True if it changed."""
        if getattr(widget, name) == value:
            return False
        return self.put(widget, name, value)

    def put(self, widget: Any, name: str, value: Any) -> bool:
        """Set `widget.name = value` without comparing (for arrays the caller versions)."""
        self._hold(widget)
        setattr(widget, name, value)
        self.changes += 1
        return True

    def show(self, widget: Any, visible: bool) -> bool:
        """Show or hide a widget (its layout's `display`)."""
        return self.set(widget.layout, "display", None if visible else "none")


class Binder:
    """Calls `pass_fn` on a daemon thread about every `interval_s` until `stop()`."""

    def __init__(
        self,
        pass_fn: Callable[[], Any],
        interval_s: float = 1.0,
        min_gap_s: float = 0.2,
        name: str = "gpupanel-binder",
    ) -> None:
        self.pass_fn = pass_fn
        self.interval_s = interval_s
        self.min_gap_s = min_gap_s
        self.name = name
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (no-op when it runs)."""
        if self.running:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Ask for a pass soon (after `min_gap_s` since the last one), not in a second."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for a pass in progress to end."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.pass_fn()
            except Exception:  # the pass reports its own errors; this only keeps us alive
                logger.debug("gpupanel binder pass failed", exc_info=True)
            self._wake.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
            self._wake.clear()
            gap = self.min_gap_s - (time.monotonic() - started)
            if gap > 0:
                self._stopping.wait(gap)


@dataclass(frozen=True, slots=True)
class Reply:
    """What a command returns: a message for the status line and optional data."""

    message: str
    ok: bool = True
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished command. `seq` orders outcomes; `data` is the Reply's data."""

    key: str
    label: str
    ok: bool
    message: str
    seq: int
    finished: float
    data: Mapping[str, Any] = field(default_factory=dict)


def describe_error(exc: BaseException) -> str:
    """An error as one line for the panel: gpupanel's own messages as they are, anything
    else with its type (never a traceback)."""
    if isinstance(exc, GpuPanelError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Commands:
    """Commands submitted by clicks, run on a small pool; their outcomes wait for the binder.

    At most one command per `key` (e.g. `worker:gpu1`) is pending at a time: a second click
    while one runs is ignored. A command may `report` its progress under its key (the
    latest report is kept, after the command ends too, until the key is submitted again).
    `version` changes whenever pending, outcomes or progress change.
    """

    def __init__(self, on_change: Callable[[], None] = lambda: None, max_workers: int = 4) -> None:
        self.on_change = on_change
        self._lock = threading.Lock()
        self._pending: dict[str, str] = {}
        self._outcomes: dict[str, Outcome] = {}
        self._progress: dict[str, Mapping[str, Any]] = {}
        self._seq = itertools.count(1)
        self.version = 0
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="gpupanel-cmd")
        self._closed = False

    def submit(
        self,
        key: str,
        label: str,
        fn: Callable[[], Reply],
        progress: Mapping[str, Any] | None = None,
    ) -> bool:
        """Run `fn` in the pool; False (and nothing runs) when `key` is already pending.
        `progress`: what to show until the command reports its own (e.g. 0 %)."""
        with self._lock:
            if self._closed or key in self._pending:
                return False
            self._pending[key] = label
            if progress is None:
                self._progress.pop(key, None)
            else:
                self._progress[key] = dict(progress)
            self.version += 1
        try:
            self._pool.submit(self._run, key, label, fn)
        except RuntimeError:  # the pool was shut down meanwhile
            with self._lock:
                self._pending.pop(key, None)
            return False
        self.on_change()
        return True

    def report(self, key: str, progress: Mapping[str, Any]) -> None:
        """Record the progress of the command running under `key` (from its own thread);
        the next binder pass shows it."""
        with self._lock:
            self._progress[key] = dict(progress)
            self.version += 1
        self.on_change()

    def progress(self, key: str) -> Mapping[str, Any] | None:
        """The latest progress reported under `key`, or None."""
        with self._lock:
            return self._progress.get(key)

    def note(self, key: str, label: str, message: str, ok: bool = False) -> None:
        """Record an outcome without running anything (e.g. a form field that is wrong)."""
        self._finish(key, label, Reply(message, ok=ok))

    def _run(self, key: str, label: str, fn: Callable[[], Reply]) -> None:
        try:
            reply = fn()
        except Exception as exc:
            if not isinstance(exc, GpuPanelError):
                logger.debug("gpupanel command %s failed", label, exc_info=True)
            reply = Reply(f"{label}: {describe_error(exc)}", ok=False)
        self._finish(key, label, reply)

    def _finish(self, key: str, label: str, reply: Reply) -> None:
        with self._lock:
            self._pending.pop(key, None)
            self._outcomes[key] = Outcome(
                key, label, reply.ok, reply.message, next(self._seq), time.time(), reply.data
            )
            self.version += 1
        self.on_change()

    def state(self) -> tuple[dict[str, str], dict[str, Outcome]]:
        """Copies of (pending labels by key, latest outcome by key)."""
        with self._lock:
            return dict(self._pending), dict(self._outcomes)

    @property
    def busy(self) -> bool:
        """True while any command runs."""
        with self._lock:
            return bool(self._pending)

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until no command runs (for tests and scripts); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.busy:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        """Refuse new commands; running ones finish in the background."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def close_tree(root: Any) -> None:
    """Close a widget and everything it holds (a plain `close()` leaves children open)."""
    for child in descendants(root):
        child.close()
    root.close()


def descendants(root: Any) -> list[Any]:
    """Every widget reachable from `root` through its traits (children, layouts, marks...),
    deepest first, `root` excluded."""
    seen: set[int] = {id(root)}
    out: list[Any] = []

    def walk(widget: Any) -> None:
        for name in widget.keys:
            value = getattr(widget, name, None)
            items = list(value.values()) if isinstance(value, dict) else value
            if not isinstance(items, (list, tuple)):
                items = [items]
            for item in items:
                if isinstance(item, ipywidgets.Widget) and id(item) not in seen:
                    seen.add(id(item))
                    walk(item)
                    out.append(item)

    walk(root)
    return out
