"""Snapshot pieces as small HTML fragments for the panel's HTML widgets.

Pure functions over snapshot dicts (docs/api.md): no widgets, no I/O, so they are cheap to
call on every binder pass and easy to test. Every value from the snapshot is escaped.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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
.gpupanel-panel table.gpupanel-grid { table-layout: fixed; width: 100%; border-collapse: collapse; font-size: 0.9em; }
.gpupanel-panel table.gpupanel-grid td, .gpupanel-panel table.gpupanel-grid th {
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; padding: 2px 6px 2px 4px;
  text-align: left; vertical-align: middle; }
.gpupanel-panel table.gpupanel-grid th { color: #374151; font-weight: 600; border-bottom: 2px solid #d1d5db; }
.gpupanel-panel .gpupanel-gpu { position: relative; border-bottom: 1px solid #e5e7eb; }
.gpupanel-panel .gpupanel-gpu:hover { background: #f9fafb; }
.gpupanel-panel .gpupanel-gpu.gpupanel-selected { background: #eff6ff; box-shadow: inset 3px 0 0 #2563eb; }
.gpupanel-panel .gpupanel-gpu .gpupanel-select {
  position: absolute !important; left: 0; top: 0; width: 100% !important; height: 100% !important;
  margin: 0 !important; padding: 0 !important; opacity: 0; z-index: 2; cursor: pointer; }
.gpupanel-panel .gpupanel-controls { border: 1px solid #d1d5db; border-radius: 4px; padding: 4px 8px; margin-top: 6px; }
.gpupanel-panel .gpupanel-log-tail { display: flex; flex-direction: column-reverse; max-height: 220px;
  overflow: auto; background: #111827; }
.gpupanel-panel .gpupanel-log pre { margin: 0; padding: 4px 6px; color: #e5e7eb; background: #111827;
  font-size: 0.82em; line-height: 1.35; white-space: pre-wrap; }
.gpupanel-panel .gpupanel-warning { border-bottom: 1px solid #f3f4f6; }
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


def selected_html(gpu: Mapping[str, Any]) -> str:
    """The selected GPU in one line: index, name, the whole UUID."""
    lost = f" {_pill('LOST', '#b91c1c')}" if gpu.get("lost") else ""
    return (
        f"<b>GPU {esc(gpu.get('index'))}</b> \u00b7 {esc(gpu.get('name') or 'unknown')}{lost} "
        f'\u00b7 <code style="font-size:0.85em">{esc(gpu.get("uuid"))}</code>'
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
        lines.append(f'<span style="color:#2563eb">\u21bb {esc(pending)}\u2026</span>')
    return "<br>".join(lines)


# ---- warnings and requests ------------------------------------------------------------------


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


# ---- the overview: one row per GPU ----------------------------------------------------------

OVERVIEW_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("gpu", "GPU", 3.5),
    ("name", "name", 15.5),
    ("uuid", "UUID", 9.0),
    ("vram", "VRAM used / total", 14.0),
    ("util", "util", 4.5),
    ("power", "power", 5.0),
    ("temp", "temp", 4.5),
    ("workers", "worker \u00b7 status \u00b7 pin", 15.0),
    ("models", "loaded models", 14.0),
    ("inflight", "in flight", 5.0),
    ("warnings", "warnings", 10.0),
)
"""The overview's columns: hook (`gpupanel-col-<hook>` on each cell), heading, width in % of
the row (every row is its own one-row table; the shared widths line the rows up)."""

VRAM_BAR_PX = 70
UUID_HEX = 8


def short_uuids(uuids: Iterable[str], digits: int = UUID_HEX) -> dict[str, str]:
    """Each GPU UUID as `GPU-` and its first `digits` characters, longer where two of
    `uuids` would look alike (the full UUID is in the row's tooltip and the GPU's detail)."""
    unique = list(dict.fromkeys(uuids))
    bodies = {u: u[4:] if u.startswith("GPU-") else u for u in unique}
    out: dict[str, str] = {}
    for u in unique:
        body, n = bodies[u], digits
        while n < len(body) and any(o != u and bodies[o][:n] == body[:n] for o in unique):
            n += 1
        out[u] = u[: len(u) - len(body)] + body[:n]
    return out


def vram_fraction(used: float | None, total: float | None) -> float | None:
    """used / total in [0, 1]; None when either is unknown (or total is 0)."""
    if used is None or not total:
        return None
    return min(1.0, max(0.0, float(used) / float(total)))


def vram_colour(fraction: float | None) -> str:
    """Green below 80 %, amber below 95 % (`near_full_gpu`), red from there."""
    if fraction is None:
        return "#9ca3af"
    return "#16a34a" if fraction < 0.8 else "#d97706" if fraction < 0.95 else "#dc2626"


def vram_bar_html(used: float | None, total: float | None) -> str:
    """A small bar filled to used/total, then `used / total GiB`."""
    fraction = vram_fraction(used, total)
    width = 0.0 if fraction is None else round(fraction * 100, 1)
    bar = (
        f'<span class="gpupanel-vram-bar" title="{"?" if fraction is None else f"{width:g} %"}" '
        f'style="display:inline-block;width:{VRAM_BAR_PX}px;height:9px;background:#e5e7eb;'
        'border-radius:2px;vertical-align:middle;margin-right:6px;overflow:hidden">'
        f'<span style="display:block;width:{width:g}%;height:100%;'
        f'background:{vram_colour(fraction)}"></span></span>'
    )
    return f"{bar}{gib(used, unit=False)} / {gib(total, unit=False)} GiB"


def _short_name(name: Any) -> str:
    text = str(name or "unknown")
    return text[len("NVIDIA ") :] if text.startswith("NVIDIA ") else text


def _number(value: Any, unit: str, digits: int = 0) -> str:
    return "?" if value is None else f"{float(value):.{digits}f} {unit}"


def workers_on(uuid: str, workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Ids of the workers pinned to the GPU `uuid`, sorted."""
    return sorted(wid for wid, w in workers.items() if w.get("gpu_uuid") == uuid)


def _worker_cell(worker: Mapping[str, Any]) -> str:
    status, pin = str(worker.get("status")), str(worker.get("pin"))
    return (
        f"<b>{esc(worker.get('id'))}</b> "
        f'<span style="color:{STATUS_COLOURS.get(status, "#6b7280")}">{esc(status)}</span> '
        f'<span style="color:{PIN_COLOURS.get(pin, "#6b7280")}">{esc(pin)}</span>'
    )


def _models_cell(workers: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    names, plain = [], []
    for w in workers:
        for m in w.get("models_loaded") or ():
            size, vram = m.get("size"), m.get("size_vram")
            on_cpu = size is not None and vram is not None and vram < size
            names.append(
                esc(m.get("name")) + (' <span style="color:#b45309">(CPU)</span>' if on_cpu else "")
            )
            plain.append(str(m.get("name")))
    if not names:
        return f'<span style="{MUTED}">none</span>', ""
    return ", ".join(names), ", ".join(plain)


SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def by_severity(warnings: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Most severe first, then by code and subject."""
    return sorted(
        warnings,
        key=lambda w: (
            SEVERITY_ORDER.get(str(w.get("severity")), 3),
            str(w.get("code")),
            str(w.get("subject")),
        ),
    )


def warnings_of_gpu(
    gpu: Mapping[str, Any],
    warnings: Iterable[Mapping[str, Any]],
    workers: Mapping[str, Mapping[str, Any]],
) -> list[Mapping[str, Any]]:
    """The warnings about one GPU: its own (subject its UUID), those of the workers pinned to
    it (`<worker>` or `<worker>/<model>`) and of the processes on it (`pid:<pid>`); most
    severe first."""
    uuid = str(gpu.get("uuid"))
    ids = set(workers_on(uuid, workers))
    pids = {f"pid:{p.get('pid')}" for p in gpu.get("processes") or ()}
    mine = [
        w
        for w in warnings
        if (subject := str(w.get("subject"))) == uuid
        or subject in pids
        or subject.split("/", 1)[0] in ids
    ]
    return by_severity(mine)


def _warnings_cell(warnings: Sequence[Mapping[str, Any]]) -> str:
    if not warnings:
        return f'<span style="{MUTED}">\u2014</span>'
    first = warnings[0]
    colour = SEVERITY_COLOURS.get(str(first.get("severity")), "#6b7280")
    more = f" +{len(warnings) - 1}" if len(warnings) > 1 else ""
    return f"{_pill(str(first.get('code')), colour)}{more}"


def gpu_order(gpus: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The overview's order of GPUs (by UUID): grouped by host when the plane spans several
    (docs/cluster.md), then by index."""
    return sorted(
        gpus,
        key=lambda u: (
            str(gpus[u].get("host") or ""),
            gpus[u].get("index") is None,
            gpus[u].get("index") or 0,
            u,
        ),
    )


def overview_head_html() -> str:
    """The overview's heading row (same column widths as every row)."""
    cols = "".join(f'<col style="width:{w}%">' for _, _, w in OVERVIEW_COLUMNS)
    heads = "".join(f"<th>{esc(title)}</th>" for _, title, _ in OVERVIEW_COLUMNS)
    return f'<table class="gpupanel-grid"><colgroup>{cols}</colgroup><tr>{heads}</tr></table>'


def overview_row_html(
    gpu: Mapping[str, Any],
    workers: Mapping[str, Mapping[str, Any]],
    warnings: Sequence[Mapping[str, Any]],
    in_flight: int,
    short_uuid: str,
) -> str:
    """One GPU as a row of the overview: index, name, short UUID, VRAM bar, utilisation,
    power, temperature, its workers (status, pin), loaded models, requests in flight, its
    warnings (`warnings` as `warnings_of_gpu` gives them). Full texts are in tooltips."""
    mem = gpu.get("memory") or {}
    used, total = mem.get("used"), mem.get("total")
    util = (gpu.get("utilization") or {}).get("gpu")
    limit = gpu.get("power_limit_w")
    mine = [workers[wid] for wid in workers_on(str(gpu.get("uuid")), workers)]
    models_html, models_text = _models_cell(mine)
    index = gpu.get("index")
    lost = f" {_pill('LOST', '#b91c1c')}" if gpu.get("lost") else ""
    cells = {
        "gpu": f"<b>{'?' if index is None else esc(index)}</b>{lost}",
        "name": (
            f'<span style="{MUTED}">{esc(gpu["host"])} \u00b7</span> ' if gpu.get("host") else ""
        )
        + esc(_short_name(gpu.get("name"))),
        "uuid": f"<code>{esc(short_uuid)}</code>",
        "vram": vram_bar_html(used, total),
        "util": "?" if util is None else f"{esc(util)} %",
        "power": _number(gpu.get("power_w"), "W"),
        "temp": "?" if gpu.get("temperature_c") is None else f"{esc(gpu['temperature_c'])} \u00b0C",
        "workers": ", ".join(_worker_cell(w) for w in mine)
        or f'<span style="{MUTED}">no worker</span>',
        "models": models_html,
        "inflight": str(in_flight) if in_flight else f'<span style="{MUTED}">0</span>',
        "warnings": _warnings_cell(warnings),
    }
    titles = {
        "name": (f"{gpu['host']}: " if gpu.get("host") else "") + str(gpu.get("name") or ""),
        "uuid": str(gpu.get("uuid") or ""),
        "power": "" if limit is None else f"limit {float(limit):.0f} W",
        "models": models_text,
        "warnings": "\n".join(str(w.get("message")) for w in warnings),
    }
    cols = "".join(f'<col style="width:{w}%">' for _, _, w in OVERVIEW_COLUMNS)
    tds = "".join(
        f'<td class="gpupanel-col-{key}"'
        + (f' title="{esc(titles[key])}"' if titles.get(key) else "")
        + f">{cells[key]}</td>"
        for key, _, _ in OVERVIEW_COLUMNS
    )
    return f'<table class="gpupanel-grid"><colgroup>{cols}</colgroup><tr>{tds}</tr></table>'


def stub_gpu(uuid: str) -> dict[str, Any]:
    """A row for a GPU that workers are pinned to but the snapshot does not list."""
    return {"uuid": uuid, "index": None, "name": "not present", "memory": {}, "processes": []}


# ---- warnings and the actions that fix them -------------------------------------------------


@dataclass(frozen=True, slots=True)
class WarningAction:
    """What fixes a warning, as the panel offers it: `kind` is `restart`, `start`, `unload`,
    `pull` or `stop_pid`; `confirm` asks before doing it (stopping a process)."""

    kind: str
    label: str
    worker: str | None = None
    model: str | None = None
    pid: int | None = None
    confirm: bool = False


def warning_action(
    warning: Mapping[str, Any], workers: Mapping[str, Mapping[str, Any]]
) -> WarningAction | None:
    """The action that fixes `warning`, where the panel has one (docs/api.md, "Warning
    codes"): restart a worker pinned to the wrong GPU or spilled to others, or down; start a
    worker out of its crash loop; unload a model that spilled to the CPU; pull a missing
    model; stop (after a confirmation) an unmanaged GPU process or the process holding a
    worker's port. None for the rest (a hot or full GPU, a lost one, the state file)."""
    code, subject = str(warning.get("code")), str(warning.get("subject"))
    worker_id, _, model = subject.partition("/")
    worker = workers.get(worker_id)
    if code in ("pinned_to_wrong_gpu", "cross_gpu_memory", "endpoint_down") and worker:
        return WarningAction("restart", f"restart {worker_id}", worker=worker_id)
    if code == "crash_loop" and worker:
        return WarningAction("start", f"start {worker_id}", worker=worker_id)
    if code == "model_on_cpu" and worker and model:
        return WarningAction("unload", f"unload {model}", worker=worker_id, model=model)
    if code == "missing_model" and worker and model:
        return WarningAction("pull", f"pull {model}", worker=worker_id, model=model)
    if code == "unmanaged_worker" and subject.startswith("pid:") and subject[4:].isdigit():
        pid = int(subject[4:])
        return WarningAction("stop_pid", f"stop pid {pid}", pid=pid, confirm=True)
    if code == "port_taken" and worker:
        holder = worker.get("blocked_by") or {}
        held = holder.get("pid") if isinstance(holder, Mapping) else None
        if isinstance(held, int):
            return WarningAction("stop_pid", f"stop pid {held}", pid=held, confirm=True)
    return None


def warning_html(warning: Mapping[str, Any]) -> str:
    """One warning on a line: severity, code, subject, message, since."""
    severity = str(warning.get("severity"))
    return (
        f"{_pill(severity, SEVERITY_COLOURS.get(severity, '#6b7280'))} "
        f"<code>{esc(warning.get('code'))}</code> <b>{esc(warning.get('subject'))}</b> "
        f"{esc(warning.get('message'))} "
        f'<span style="{MUTED}">since {clock(warning.get("since"))}</span>'
    )


def warnings_title_html(count: int, scope: str = "") -> str:
    """The heading of a warning list."""
    where = f" {esc(scope)}" if scope else ""
    if not count:
        return f'<b>Warnings{where}</b> <span style="{MUTED}">none</span>'
    return f"<b>Warnings{where} ({count})</b>"


def confirm_html(action: WarningAction, gpu_processes: Mapping[int, Mapping[str, Any]]) -> str:
    """The question asked before stopping a process."""
    proc = gpu_processes.get(action.pid) if action.pid is not None else None
    holds = (
        f" (it holds {gib(proc.get('used_memory'))} on GPU {esc(proc.get('gpu_index'))})"
        if proc
        else ""
    )
    return (
        f'<b style="color:#b91c1c">Stop pid {esc(action.pid)}?</b>{holds} It is not a gpupanel '
        "worker: it gets SIGTERM, then SIGKILL after the grace period, with its child "
        "processes."
    )


# ---- pulls ----------------------------------------------------------------------------------


class PullTally:
    """The progress of one pull from its streamed lines (docs/api.md, `POST .../pull`):
    bytes completed over the bytes of the layers seen so far, never going back, and 100 %
    only once the pull says `success`."""

    def __init__(self, worker: str, model: str) -> None:
        self.worker, self.model = worker, model
        self._layers: dict[str, tuple[int, int]] = {}
        self.percent = 0.0
        self.status = "starting"

    def add(self, line: Mapping[str, Any]) -> dict[str, Any]:
        """Take one progress line; the progress to show."""
        digest, total = line.get("digest"), line.get("total")
        if isinstance(digest, str) and isinstance(total, int) and total > 0:
            completed = line.get("completed")
            done = completed if isinstance(completed, int) else 0
            self._layers[digest] = (min(max(done, 0), total), total)
        self.status = str(line.get("status") or self.status)
        if self.status == "success":
            self.percent = 100.0
        elif self._layers:
            done = sum(c for c, _ in self._layers.values())
            size = sum(t for _, t in self._layers.values())
            self.percent = max(self.percent, min(99.0, done * 100.0 / size))
        return self.progress()

    def progress(self) -> dict[str, Any]:
        """What the panel shows: worker, model, status, percent, bytes done and known."""
        return {
            "worker": self.worker,
            "model": self.model,
            "status": self.status,
            "percent": self.percent,
            "completed": sum(c for c, _ in self._layers.values()),
            "total": sum(t for _, t in self._layers.values()),
        }


def pull_html(progress: Mapping[str, Any] | None, running: bool) -> str:
    """The line beside the pull's bar: model, worker, status, percent, bytes."""
    if not progress:
        return ""
    state = "pulling" if running else "pull"
    size = (
        f" \u00b7 {_size(progress.get('completed'))} of {_size(progress.get('total'))}"
        if progress.get("total")
        else ""
    )
    return (
        f"{state} <b>{esc(progress.get('model'))}</b> on {esc(progress.get('worker'))}: "
        f"{esc(progress.get('status'))} \u00b7 {float(progress.get('percent') or 0):.0f} %{size}"
    )


# ---- logs -----------------------------------------------------------------------------------


def log_html(
    worker_id: str, lines: Sequence[str] | None, error: str | None, when: float | None
) -> str:
    """The tail of a worker's log in a dark box (newest line last)."""
    head = (
        f"<b>Log of {esc(worker_id)}</b> "
        f'<span style="{MUTED}">last {len(lines or ())} line(s), read {clock(when)}, '
        "refreshed every few seconds</span>"
    )
    if error:
        return f'{head}<br><span style="color:#b91c1c">{esc(error)}</span>'
    body = "\n".join(esc(line) for line in lines or ()) or "(empty)"
    # column-reverse: the box opens scrolled to its end, the newest line
    return f'{head}<div class="gpupanel-log-tail"><pre>{body}</pre></div>'


# ---- the combined VRAM chart ----------------------------------------------------------------

PALETTE = (
    "#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777",
    "#4b5563", "#65a30d",
)  # fmt: skip
"""Line colours of the combined chart, by GPU position."""


def vram_key_html(labels: Sequence[tuple[str, str]]) -> str:
    """The key of the combined chart: (label, colour) per GPU."""
    items = " ".join(f'<span style="color:{c}">\u2501 {esc(label)}</span>' for label, c in labels)
    return (
        f'<span style="font-size:0.85em"><span style="{MUTED}">VRAM used per GPU (GiB), '
        f"last 5 min:</span> {items}</span>"
    )
