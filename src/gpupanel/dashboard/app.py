"""The Voila dashboard's app (what `dashboard.ipynb` runs in each page's fresh kernel).

It always attaches to a running control plane over HTTP (`$GPUPANEL_URL`, else
127.0.0.1:8765): a Voila kernel lives only as long as its page, so it must never own the
control plane. When none answers, the page says which URL it tried and how to start one,
and retries every few seconds until one answers; then it shows the widget panel.

Credentials come as they do for any client (`gpupanel.client.connect`): `$GPUPANEL_TOKEN`,
which `gpupanel dashboard` sets for its kernels, else this host's stored admin token. The
kernel sends the token; the page never shows it (only the URL and messages that say how to
pass one).
"""

from __future__ import annotations

import html
import os
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from gpupanel.client import Panel, connect
from gpupanel.core.defaults import DEFAULT_PANEL_URL, URL_ENV
from gpupanel.errors import GpuPanelError

RETRY_S = 3.0


def waiting_message(url: str, attempts: int, retry_s: float, error: str | None = None) -> str:
    """The HTML shown while no control plane answers at `url`."""
    detail = f"<br><small>last error: {html.escape(error)}</small>" if error else ""
    return (
        f"<div><b>No gpupanel control plane answers at {html.escape(url)}.</b><br>"
        "Start one in a terminal: <code>gpupanel serve</code> (this host's GPUs) or "
        "<code>gpupanel demo</code> (a simulated workstation), or run "
        "<code>gpupanel.start()</code> in a notebook. If it listens elsewhere, set "
        "<code>GPUPANEL_URL</code> (or <code>gpupanel dashboard --url URL</code>).<br>"
        f"Trying again every {retry_s:g} s (attempt {attempts}); this page attaches as soon "
        f"as it answers.{detail}</div>"
    )


class Dashboard:
    """The page's root widget: a waiting message until the control plane answers, then the
    panel. `connect` and `show` are injectable so the waiting logic is testable offline."""

    def __init__(
        self,
        url: str | None = None,
        retry_s: float = RETRY_S,
        connect: Callable[[str], Panel] = connect,
        show: Callable[[Panel], Any] | None = None,
    ) -> None:
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_PANEL_URL).rstrip("/")
        self.retry_s = retry_s
        self._connect = connect
        self._show = show or (lambda panel: panel.show())
        self.attempts = 0
        self.panel: Panel | None = None
        self.message = widgets.HTML()
        self.root = widgets.VBox([self.message])
        self.root.add_class("gpupanel-dashboard")
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def try_attach(self) -> bool:
        """One attempt: attach and show the panel (True), or update the message (False)."""
        self.attempts += 1
        try:
            panel = self._connect(self.url)
        except GpuPanelError as exc:
            self.message.value = waiting_message(self.url, self.attempts, self.retry_s, str(exc))
            return False
        try:
            view = self._show(panel)
        except Exception as exc:  # shown on the page: a Voila kernel has nowhere else to say it
            self.message.value = (
                f"<b>Attached to {html.escape(self.url)}, but the panel failed:</b> "
                f"{html.escape(f'{type(exc).__name__}: {exc}')}"
            )
            return True
        self.panel = panel
        self.root.children = (view,)
        return True

    def start(self) -> Dashboard:
        """Attach now if the control plane answers, else keep retrying in a daemon thread."""
        if not self.try_attach():
            self._thread = threading.Thread(
                target=self._retry, name="gpupanel-dashboard-attach", daemon=True
            )
            self._thread.start()
        return self

    def _retry(self) -> None:
        while not self._closed.wait(self.retry_s):
            if self.try_attach():
                return

    def close(self) -> None:
        """Stop retrying (the kernel is going away)."""
        self._closed.set()


def dashboard(url: str | None = None, retry_s: float = RETRY_S) -> widgets.VBox:
    """The dashboard widget for the notebook cell: attached, or waiting to attach, to `url`
    (default `$GPUPANEL_URL`, else http://127.0.0.1:8765)."""
    return Dashboard(url, retry_s).start().root
