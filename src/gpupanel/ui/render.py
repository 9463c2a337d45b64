"""Snapshot pieces as small HTML fragments for the panel's HTML widgets.

Pure functions over snapshot dicts (docs/api.md): no widgets, no I/O, so they are cheap to
call on every binder pass and easy to test. Every value from the snapshot is escaped.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gpupanel.core.units import gib
from gpupanel.ui.heuristics import GpuActivity

MUTED = "color:#6b7280"
SEVERITY_COLOURS = {"critical": "#b91c1c", "warning": "#b45309", "info": "#2563eb"}
STATUS_COLOURS = {
    "running": "#15803d",
    "starting": "#2563eb",
    "stopped": "#6b7280",
    "unhealthy": "#b45309",
    "crashed": "#b91c1c",
}
PIN_COLOURS = {
    "verified": "#15803d",
    "unverified": "#6b7280",
    "spilled": "#b45309",
    "wrong_gpu": "#b91c1c",
}
TABLE = "border-collapse:collapse;font-size:0.92em"
CELL = "padding:1px 8px 1px 0;text-align:left;vertical-align:top"


def esc(value: Any) -> str:
    """Text for HTML; None is an em dash."""
    return "\u2014" if value is None else html.escape(str(value), quote=True)


def clock(t: float | None) -> str:
    """A Unix time as local HH:MM:SS."""
    if t is None:
        return "\u2014"
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _pill(text: str, colour: str) -> str:
    return (
        f'<span style="color:white;background:{colour};border-radius:3px;padding:0 5px">'
        f"{esc(text)}</span>"
    )


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    th = "".join(f'<th style="{CELL}">{h}</th>' for h in head)
    body = "".join(
        "<tr>" + "".join(f'<td style="{CELL}">{c}</td>' for c in row) + "</tr>" for row in rows
    )
    return f'<table style="{TABLE}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


# ---- header ---------------------------------------------------------------------------------


def header_html(
    url: str, in_process: bool, snapshot: Mapping[str, Any] | None, updated: float | None
) -> str:
    """Title, control plane URL and where it runs, counts, time of the last update."""
    where = "in this kernel" if in_process else "remote"
    parts = [
        '<b style="font-size:1.25em">gpupanel</b>',
        f"control plane <code>{esc(url)}</code> ({where})",
    ]
    if snapshot is not None:
        warnings = snapshot.get("warnings", [])
        critical = sum(1 for w in warnings if w.get("severity") == "critical")
        warn_text = f"{len(warnings)} warning(s)" + (f", {critical} critical" if critical else "")
        parts += [
            f"{len(snapshot.get('gpus', {}))} GPU(s)",
            f"{len(snapshot.get('workers', {}))} worker(s)",
            warn_text,
        ]
    parts.append(f'<span style="{MUTED}">updated {clock(updated)}</span>')
    return " \u00b7 ".join(parts)


PANEL_CSS = """<style>
.gpupanel-panel .widget-html-content { line-height: 1.4; }
.gpupanel-panel .widget-html, .gpupanel-panel .widget-html-content { margin-top: 1px; margin-bottom: 1px; }
.gpupanel-panel table td, .gpupanel-panel table th { line-height: 1.3; }
</style>"""
"""Scoped to the panel: compact lines in the HTML widgets."""

SIMULATED_BADGE = (
    '<span title="a simulated workstation: these GPUs and workers are not real" '
    'style="color:white;background:#7c3aed;border-radius:4px;padding:2px 8px;'
    'font-weight:bold;letter-spacing:0.05em">SIMULATED</span>'
)


def error_html(message: str | None, last_good: float | None, interval_s: float) -> str:
    """The banner shown while the control plane does not answer ('' when it does)."""
    if not message:
        return ""
    stale = (
        f" Showing the last snapshot, from {clock(last_good)}."
        if last_good is not None
        else " Nothing to show yet."
    )
    return (
        '<div style="color:#7f1d1d;background:#fee2e2;border:1px solid #fca5a5;'
        'border-radius:4px;padding:4px 8px">'
        f"<b>control plane unreachable:</b> {esc(message)}<br>"
        f"Retrying every {interval_s:g} s.{stale}</div>"
    )


# ---- GPUs -----------------------------------------------------------------------------------


def gpu_title_html(gpu: Mapping[str, Any]) -> str:
    """Index, name and UUID of a GPU (the UUID is its identity)."""
    lost = f" {_pill('LOST', '#b91c1c')}" if gpu.get("lost") else ""
    return (
        f"<b>GPU {esc(gpu.get('index'))}</b> \u00b7 {esc(gpu.get('name') or 'unknown')}{lost}<br>"
        f'<code style="font-size:0.85em">{esc(gpu.get("uuid"))}</code>'
    )


def gpu_figures_html(gpu: Mapping[str, Any]) -> str:
    """VRAM used/total, utilisation, power against its limit, temperature."""
    mem = gpu.get("memory") or {}
    used, total = mem.get("used"), mem.get("total")
    pct = f" ({used * 100 / total:.0f} %)" if used is not None and total else ""
    util = (gpu.get("utilization") or {}).get("gpu")
    power, limit = gpu.get("power_w"), gpu.get("power_limit_w")
    power_text = "?" if power is None else f"{power:.0f}"
    limit_text = "" if limit is None else f" / {limit:.0f}"
    temp = gpu.get("temperature_c")
    return (
        f"VRAM <b>{gib(used)}</b> of {gib(total)}{pct} \u00b7 "
        f"util <b>{'?' if util is None else util} %</b> \u00b7 "
        f"power {power_text}{limit_text} W \u00b7 "
        f"{'?' if temp is None else temp} \u00b0C"
    )


CHART_KEY = (
    f'<span style="{MUTED};font-size:0.85em">last 5 min: '
    '<span style="color:#2563eb">\u2501 VRAM used</span> '
    '<span style="color:#9ca3af">\u254c VRAM total</span> (GiB, left) '
    '<span style="color:#ea580c">\u2501 utilisation</span> (%, right)</span>'
)


def gpu_processes_html(gpu: Mapping[str, Any]) -> str:
    """The compute processes on a GPU and the worker each belongs to."""
    procs = gpu.get("processes") or []
    if not procs:
        return f'<span style="{MUTED}">no processes</span>'
    rows = [
        (
            esc(p.get("pid")),
            esc(p.get("worker")) if p.get("worker") else _pill("unmanaged", "#b45309"),
            gib(p.get("used_memory")),
        )
        for p in procs
    ]
    return _table(["pid", "worker", "VRAM"], rows)


def activity_html(activity: GpuActivity | None) -> str:
    """The labelled heuristics: likely inferencing, and tokens as chunks via the proxy."""
    if activity is None:
        return ""
    flag = _pill("yes", "#15803d") if activity.likely_inferencing else _pill("no", "#6b7280")
    rate = (
        f", {activity.chunks_per_s:.1f}/s"
        if activity.chunks_per_s is not None and activity.chunks_per_s > 0
        else ""
    )
    return (
        f'likely inferencing: {flag} <span style="{MUTED}">({esc(activity.reason)})</span><br>'
        f"tokens \u2248 {activity.chunks_total} chunks via proxy{rate} "
        f'<span style="{MUTED}">({activity.in_flight} request(s) in flight, '
        f"{activity.chunks_in_flight} chunks so far)</span> "
        f'<i style="{MUTED};font-size:0.85em">heuristics</i>'
    )


# ---- workers --------------------------------------------------------------------------------


def _loaded_html(models: Sequence[Mapping[str, Any]]) -> str:
    if not models:
        return f'<span style="{MUTED}">no model loaded</span>'
    items = []
    for m in models:
        size, vram = m.get("size"), m.get("size_vram")
        text = f"<b>{esc(m.get('name'))}</b> {gib(vram)} VRAM"
        if size is not None and vram is not None and vram < size:
            text += f' <span style="color:#b45309">({gib(size - vram)} on CPU)</span>'
        if m.get("context_length"):
            text += f' <span style="{MUTED}">ctx {esc(m.get("context_length"))}</span>'
        items.append(text)
    return ", ".join(items)


def worker_html(worker: Mapping[str, Any], pending: str | None = None) -> str:
    """One worker's row: id, status, pid, GPU, pin, port, latency, models, owner, restarts,
    last error; `pending` names a command in progress for it."""
    status = str(worker.get("status"))
    pin = str(worker.get("pin"))
    health = worker.get("health") or {}
    p50 = health.get("latency_p50_ms")
    if p50 is None:
        p50 = health.get("latency_ms")
    latency = "\u2014" if p50 is None else f"{p50:.0f} ms"
    gpu_index = worker.get("gpu_index")
    first = " \u00b7 ".join(
        [
            f"<b>{esc(worker.get('id'))}</b> {_pill(status, STATUS_COLOURS.get(status, '#6b7280'))}",
            f"pid {esc(worker.get('pid'))}",
            f'<span title="{esc(worker.get("gpu_uuid"))}">GPU {"?" if gpu_index is None else esc(gpu_index)}</span>',
            f'pin <span style="color:{PIN_COLOURS.get(pin, "#6b7280")}">{esc(pin)}</span>',
            f"port {esc(worker.get('port'))}",
            f"p50 {latency}",
            f"owner {esc(worker.get('owner'))}",
            f"restarts {esc(worker.get('restarts'))}",
            f'<span style="{MUTED}">{esc(worker.get("runtime"))}</span>',
        ]
    )
    lines = [first, "loaded: " + _loaded_html(worker.get("models_loaded") or [])]
    if worker.get("last_error"):
        lines.append(f'<span style="color:#b91c1c">last error: {esc(worker["last_error"])}</span>')
    if pending:
        lines.append(f'<span style="color:#2563eb">\u23f3 {esc(pending)}\u2026</span>')
    return "<br>".join(lines)


# ---- warnings and requests ------------------------------------------------------------------


def warnings_html(warnings: Sequence[Mapping[str, Any]]) -> str:
    """Warnings, most severe first: severity, code, subject, message, since."""
    if not warnings:
        return f'<b>Warnings</b> <span style="{MUTED}">none</span>'
    order = {"critical": 0, "warning": 1, "info": 2}
    rows = [
        (
            _pill(str(w.get("severity")), SEVERITY_COLOURS.get(str(w.get("severity")), "#6b7280")),
            f"<code>{esc(w.get('code'))}</code>",
            esc(w.get("subject")),
            esc(w.get("message")),
            clock(w.get("since")),
        )
        for w in sorted(warnings, key=lambda w: (order.get(str(w.get("severity")), 3), w["code"]))
    ]
    return f"<b>Warnings ({len(warnings)})</b>" + _table(
        ["severity", "code", "subject", "message", "since"], rows
    )


def _size(n: float | None) -> str:
    """Bytes in decimal units, short."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def requests_html(
    requests: Sequence[Mapping[str, Any]], apps: Sequence[Mapping[str, Any]], now: float | None
) -> str:
    """In-flight proxied requests grouped by app, with each app's totals."""
    by_app: dict[str | None, list[Mapping[str, Any]]] = {}
    for r in requests:
        by_app.setdefault(r.get("app"), []).append(r)
    known = {a.get("name"): a for a in apps}
    names: list[str | None] = sorted(set(known) | set(by_app), key=lambda n: (n is None, n or ""))
    if not names:
        return (
            f'<b>Requests in flight</b> <span style="{MUTED}">none '
            "(apps name themselves with the X-GPUPanel-App header)</span>"
        )
    blocks = [f"<b>Requests in flight ({len(requests)})</b>"]
    for name in names:
        app = known.get(name) or {}
        live = by_app.get(name, [])
        title = f"<b>{esc(name)}</b>" if name else f'<i style="{MUTED}">no app</i>'
        totals = ""
        if app:
            totals = (
                f' <span style="{MUTED}">owner {esc(app.get("owner"))} \u00b7 '
                f"{esc(app.get('requests'))} request(s), {esc(app.get('errors'))} error(s), "
                f"{_size(app.get('bytes'))}</span>"
            )
        blocks.append(f"<div>{title}: {len(live)} in flight{totals}</div>")
        if live:
            rows = [
                (
                    f"<code>{esc(r.get('id'))}</code>",
                    esc(r.get("worker")),
                    esc(r.get("model")),
                    "?" if now is None else f"{max(0.0, now - float(r.get('started', now))):.0f} s",
                    esc(r.get("chunks")),
                    _size(r.get("bytes")),
                )
                for r in sorted(live, key=lambda r: float(r.get("started") or 0))
            ]
            blocks.append(_table(["id", "worker", "model", "for", "chunks", "bytes"], rows))
    return "".join(blocks)


def outcome_html(ok: bool, message: str) -> str:
    """A command's result line."""
    colour = "#15803d" if ok else "#b91c1c"
    mark = "\u2713" if ok else "\u2717"
    return f'<span style="color:{colour}">{mark} {esc(message)}</span>'


def estimate_html(estimate: Mapping[str, Any] | None, where: str = "") -> str:
    """The guard's verdict for a load: fits or does not fit, with the numbers."""
    if not estimate:
        return ""
    fits = bool(estimate.get("fits"))
    verdict = (
        '<b style="color:#15803d">fits</b>' if fits else '<b style="color:#b91c1c">does not fit</b>'
    )
    return f"guard{esc(where)}: {verdict} \u2014 {esc(estimate.get('explain'))}"
