"""The `gpupanel` command line (docs/api.md, "Command line")."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupanel._version import __version__
from gpupanel.core.config import DEFAULT_PANEL_PORT, PanelSettings
from gpupanel.core.defaults import DEFAULT_DASHBOARD_PORT, DEFAULT_PANEL_URL, URL_ENV
from gpupanel.core.model import GpuSample
from gpupanel.core.snapshot import Snapshot
from gpupanel.core.units import gib
from gpupanel.core.worker import WorkerState
from gpupanel.errors import GpuPanelError, NoDriverError

if TYPE_CHECKING:
    from gpupanel.adapters.keys import ApiKey
    from gpupanel.client import Panel


def _num(value: float | int | None, fmt: str, unit: str = "") -> str:
    return "?" if value is None else f"{value:{fmt}}{unit}"


def format_gpu(g: GpuSample) -> list[str]:
    """Table lines for one GPU: a summary line, then one line per process."""
    if g.lost:
        return [f"{g.index:<4}{g.uuid}  LOST: the GPU stopped answering the driver"]
    power = f"{_num(g.power_w, '.0f')} / {_num(g.power_limit_w, '.0f')} W"
    lines = [
        f"{g.index:<4}{g.uuid}  {g.name or '?'}\n"
        f"    memory {gib(g.memory.used, unit=False)} / {gib(g.memory.total)}"
        f"   util {_num(g.utilization.gpu, 'd', ' %')}"
        f"   power {power}   temp {_num(g.temperature_c, 'd', ' C')}"
    ]
    for p in g.processes:
        owner = f"worker {p.worker}" if p.worker else "unmanaged"
        lines.append(f"    pid {p.pid:<8} {gib(p.used_memory)}   {owner}")
    if not g.processes:
        lines.append("    no compute processes")
    return lines


def format_snapshot(snap: Snapshot) -> str:
    """A readable table of a snapshot."""
    when = datetime.fromtimestamp(snap.time).strftime("%Y-%m-%d %H:%M:%S")
    kind = "SIMULATED workstation" if snap.simulated else "workstation"
    out = [f"gpupanel {__version__}: {kind}, {len(snap.gpus)} GPU(s), {when}"]
    for g in snap.gpus:
        out += format_gpu(g)
    return "\n".join(out)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from gpupanel.services.sampler import Sampler, gpu_backend

    sampler = Sampler(gpu_backend(args.simulate))
    try:
        snap = sampler.snapshot()
    finally:
        sampler.close()
    if args.json:
        print(json.dumps(snap.to_json(), indent=2))
    else:
        print(format_snapshot(snap))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """What this machine needs, one line per check (docs/doctor.md); 1 if any FAILs."""
    from gpupanel.services.doctor import failed, run_checks

    checks = run_checks(args.simulate, args.config)
    if args.json:
        print(json.dumps([c.to_json() for c in checks], indent=2))
        return 1 if failed(checks) else 0
    width = max(len(c.name) for c in checks)
    for c in checks:
        fix = f"  -> fix: {c.fix}" if c.fix and c.verdict != "ok" else ""
        print(f"{c.verdict:<4}  {c.name:<{width}}  {c.found}{fix}")
    counts = {v: sum(c.verdict == v for c in checks) for v in ("ok", "warn", "FAIL")}
    print(f"{len(checks)} checks: {counts['ok']} ok, {counts['warn']} warn, {counts['FAIL']} FAIL")
    return 1 if failed(checks) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from gpupanel.api.build import control_plane
    from gpupanel.services.runtime import bind_panel_socket, raise_open_files_limit, run_loop

    raise_open_files_limit()  # before the runtime sizes its connection limit from it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    plane = control_plane(args.config, args.simulate, args.host, args.port, ray=args.ray)
    config, panel = plane.config, plane.config.panel
    gpus = [g.uuid for g in plane.node.backend.sample()]
    backend = plane.node.backend
    sock = bind_panel_socket(panel.host, panel.port)
    kind = "SIMULATED workstation" if backend.simulated else "workstation"
    print(f"gpupanel {__version__} on a {kind} with {len(gpus)} GPU(s); config: {config.source}")
    for line in access_lines(plane.config.panel, plane.url, plane.node.store.directory):
        print(line)
    print(f"  panel API  {plane.url}/panel/snapshot")
    for w in config.workers:
        print(
            f"  worker {w.id:<10} {w.runtime:<8} GPU {w.gpu} port {w.port}  -> {plane.url}/proxy/{w.id}/v1"
        )
    for node in plane.plane.nodes[1:]:  # other hosts of a Ray cluster (docs/cluster.md)
        for worker_id in node.worker_ids():
            w = node.spec(worker_id)
            print(
                f"  worker {w.id:<10} {w.runtime:<8} GPU {w.gpu} port {w.port}  on node {node.name}"
            )
    print("Ctrl-C stops the control plane; workers keep running.", flush=True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, plane.stop)
        await plane.run(sock)

    run_loop(main())
    print("gpupanel stopped; workers keep running (a new `gpupanel serve` adopts them).")
    return 0


def access_lines(panel: PanelSettings, url: str, state_dir: Path) -> list[str]:
    """What `gpupanel serve` says, once, about who may reach it and with what: where it
    listens beyond loopback, TLS, and where the admin token is (never the token itself:
    it is in a file only its user can read)."""
    from gpupanel.adapters.token import TOKEN_FILE
    from gpupanel.services.runtime import LOOPBACK, WILDCARDS

    lines = []
    if panel.host not in LOOPBACK:
        scheme = "https" if panel.tls_cert else "http"
        wildcard = panel.host in WILDCARDS
        name = socket.gethostname() if wildcard else panel.host
        name = f"[{name}]" if ":" in name else name
        where = "every interface" if wildcard else panel.host
        lines.append(
            f"  listening  on {where}, port {panel.port}: {scheme}://{name}:{panel.port} "
            "from other hosts (workers stay on loopback)"
        )
        if not panel.tls_cert:
            lines.append(
                "  warning    no TLS: keys and the admin token cross the network in clear "
                "text; set tls_cert and tls_key in [panel]"
            )
    if panel.auth == "keys":
        lines.append(
            f"  admin token  in {state_dir / TOKEN_FILE} (only this user can read it): this "
            "host's CLI, gpupanel.connect() and %load_ext gpupanel use it from there"
        )
        lines.append(
            f"               elsewhere, send `Authorization: Bearer <admin token>` to {url}"
            "/panel, or set $GPUPANEL_TOKEN for the CLI and Python client; apps use API keys "
            "(`gpupanel keys create NAME`)"
        )
    return lines


def cmd_demo(args: argparse.Namespace) -> int:
    from gpupanel.launchers.demo import DemoOptions, run_demo

    options = DemoOptions(
        port=args.port,
        dashboard_port=args.dashboard_port,
        dashboard=not args.no_dashboard,
        duration=args.duration,
        traffic=not args.no_traffic,
    )
    return run_demo(options)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from gpupanel.launchers.voila import INSTALL_HINT, serve_dashboard, voila_available

    if not voila_available():
        print(f"gpupanel: the dashboard needs Voila: {INSTALL_HINT}", file=sys.stderr)
        return 1
    return serve_dashboard(args.port, args.url.rstrip("/"))


def format_workers(workers: Sequence[WorkerState]) -> str:
    """A table of workers (a snapshot's)."""
    rows = [("ID", "RUNTIME", "STATUS", "PIN", "PID", "PORT", "GPU", "RESTARTS")]
    for w in workers:
        gpu = w.gpu_uuid if w.gpu_index is None else f"{w.gpu_index}:{w.gpu_uuid[:12]}"
        pid = "-" if w.pid is None else str(w.pid)
        rows.append((w.id, w.runtime, w.status, w.pin, pid, str(w.port), gpu, str(w.restarts)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    errors = [f"  {w.id}: {w.last_error}" for w in workers if w.last_error]
    return "\n".join(lines + errors)


def _connect(url: str) -> Panel:
    from gpupanel.client import connect

    return connect(url)


def cmd_workers(args: argparse.Namespace) -> int:
    panel = _connect(args.url)
    if args.action is None:
        print(format_workers(panel.typed_snapshot().workers))
        return 0
    if args.action == "ensure":
        print(f"started: {', '.join(panel.ensure()) or 'nothing (all running)'}")
        return 0
    if args.all == bool(args.id):
        raise GpuPanelError(f"`gpupanel workers {args.action}` needs one worker ID or --all")
    for worker_id in list(panel.workers) if args.all else [args.id]:
        worker = getattr(panel, args.action)(worker_id)
        print(f"{worker_id}: {args.action} done (status {worker['status']}, pid {worker['pid']})")
    return 0


def progress_line(line: dict[str, object], width: int = 30) -> str:
    """One line of pull progress: the status, and a bar when the size is known."""
    status = str(line.get("status", ""))
    total, done = line.get("total"), line.get("completed")
    if isinstance(total, int) and total > 0 and isinstance(done, int):
        filled = int(width * min(done, total) / total)
        bar = "#" * filled + "-" * (width - filled)
        return f"{status[:40]:<40} [{bar}] {gib(done, 2, unit=False):>6}/{gib(total, 2)}"
    return status


def cmd_pull(args: argparse.Namespace) -> int:
    panel = _connect(args.url)
    interactive = sys.stderr.isatty()
    last = ""
    for line in panel.pull_lines(args.id, args.model):
        text = progress_line(line)
        if interactive:
            print(f"\r{text:<90}", end="", file=sys.stderr, flush=True)
        elif text.split("[")[0] != last.split("[")[0]:
            print(text, file=sys.stderr)
        last = text
    if interactive:
        print(file=sys.stderr)
    print(f"{args.model} is on worker {args.id}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    panel = _connect(args.url)
    if args.dry_run:
        est = panel.estimate(args.id, args.model, args.num_ctx)
        verdict = {True: "fits", False: "does NOT fit", None: "free memory unknown"}[est["fits"]]
        print(f"{verdict}: {est['explain']}")
        return 0 if est["fits"] is not False else 1
    result = panel.load(
        args.id, args.model, args.keep_alive, args.num_ctx, args.exclusive, args.force
    )
    print(f"loaded {args.model} on {args.id}: {result['estimate']['explain']}")
    for problem in result["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


_AUDIT_SHOWN = frozenset(("time", "caller", "caller_kind", "action", "outcome", "status")) | {
    "worker",
    "model",
    "pid",
    "app",
}
"""Fields of an audit entry that its line shows already (the rest follow as `name=value`)."""


def _printable(value: object) -> str:
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(value))


def format_audit(entry: dict[str, Any]) -> str:
    """One audit entry as a line: time, caller, action, outcome, then its other details
    (`force=True`, `via=proxy`, ...). Names taken from requests are printed with their
    control characters escaped."""
    when = entry.get("time")
    shown = (
        datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S")
        if isinstance(when, (int, float))
        else "?"
    )
    caller, action, outcome = (
        _printable(entry.get(k, "?")) for k in ("caller", "action", "outcome")
    )
    extra = " ".join(
        f"{_printable(k)}={_printable(v)}" for k, v in entry.items() if k not in _AUDIT_SHOWN
    )
    return f"{shown}  {caller:<16} {action:<40} {outcome}" + (f"  {extra}" if extra else "")


def cmd_audit(args: argparse.Namespace) -> int:
    from gpupanel.adapters.audit import AUDIT_FILE, AuditLog
    from gpupanel.client import local_state_dir

    if args.lines < 1:
        raise GpuPanelError(f"--lines must be at least 1, got {args.lines}")
    state_dir = local_state_dir(args.config, strict=True)
    log = AuditLog(state_dir)
    try:
        entries = log.tail(args.lines)
    except OSError as exc:
        raise GpuPanelError(f"cannot read the audit log {log.path}: {exc.strerror}") from None
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    if not entries:
        print(f"no control actions recorded yet ({state_dir / AUDIT_FILE})")
        return 0
    for entry in entries:
        print(format_audit(entry))
    return 0


# ---- gpupanel usage: who used how much (docs/api.md, "Usage history") ------------------------

_USAGE_COLUMNS = (
    ("REQUESTS", "requests"),
    ("ERRORS", "errors"),
    ("CANCELLED", "cancelled"),
    ("TOKENS IN (REPORTED)", "tokens_in"),
    ("TOKENS OUT (REPORTED)", "tokens_out"),
    ("COUNTED", "counted_requests"),
    ("CHUNKS, NO COUNT", "uncounted_chunks"),
    ("GPU-SECONDS", "gpu_seconds"),
)


def _usage_cells(counts: dict[str, Any]) -> list[str]:
    """The numbers of one usage row. Tokens are the runtimes' own counts: `-` when none of
    the row's requests reported any; COUNTED says of how many requests they are."""
    cells = []
    for _, name in _USAGE_COLUMNS:
        value = counts.get(name, 0)
        if name in ("tokens_in", "tokens_out") and not counts.get("counted_requests"):
            cells.append("-")
        elif name == "counted_requests":
            cells.append(f"{value}/{counts.get('requests', 0)}")
        elif name == "gpu_seconds":
            cells.append(f"{float(value):.1f}")
        else:
            cells.append(str(value))
    return cells


def format_usage(report: dict[str, Any]) -> str:
    """A usage report (`GET /panel/usage`) as a table with aligned columns: one row per app,
    model or worker, and the total. Tokens the runtimes did not report are never mixed in:
    those requests' answers count as chunks, in a column of their own."""
    by = str(report.get("by", "app"))
    since, until = _when(report.get("since")), _when(report.get("until"))
    rows = report.get("rows") or []
    title = f"usage by {by}, {since} to {until} (whole hours)"
    if not rows:
        return f"{title}: no requests"
    table = [(by.upper(), *(h for h, _ in _USAGE_COLUMNS))]
    for row in rows:
        key = _printable(row.get("key", "")) or f"(no {by})"
        table.append((key, *_usage_cells(row)))
    table.append(("TOTAL", *_usage_cells(report.get("total") or {})))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [title]
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(widths[i + 1]) for i, c in enumerate(r[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        "TOKENS: as the runtimes reported them, for the COUNTED requests; CHUNKS, NO COUNT: "
        "answer chunks of the others"
    )
    lines.append(
        "GPU-SECONDS: request durations on a worker, summed (overlapping requests each count)"
    )
    return "\n".join(lines)


def cmd_usage(args: argparse.Namespace) -> int:
    import time

    from gpupanel.adapters.usage_db import USAGE_FILE
    from gpupanel.client import PanelError, connect
    from gpupanel.core.usage import period
    from gpupanel.services.usage import read_file

    asked = period(args.since, args.until, args.by, time.time(), named="--{}")
    try:
        panel = connect(args.url)
    except PanelError as exc:
        if exc.status is not None:
            raise  # a control plane answered, and refused
        panel_settings, state_dir = _keys_panel(args.config)
        path = state_dir / USAGE_FILE
        print(
            f"gpupanel: no control plane answers at {args.url}: reading the usage history "
            f"in {path}",
            file=sys.stderr,
        )
        report = read_file(path, asked, panel_settings.usage_retention_days).to_json()
    else:
        report = panel.usage(args.since, args.by, args.until)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_usage(report))
    if not report.get("persistent", True):
        print(
            f"gpupanel: note: usage history is kept in memory only: {report.get('problem')}",
            file=sys.stderr,
        )
    return 0


# ---- gpupanel keys: API keys, in the state directory (docs/security.md, "API keys") ----------

_EXPIRY_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str) -> float:
    """Seconds from a `--expires` value: a whole number and one unit of s, m, h, d, w
    (`30d`, `12h`, `2w`); GpuPanelError naming the form otherwise."""
    number, unit = text[:-1], text[-1:]
    if unit not in _EXPIRY_UNITS or not number.isascii() or not number.isdigit():
        raise GpuPanelError(
            f"--expires {text!r}: give a whole number and a unit, s, m, h, d or w (e.g. 30d)"
        )
    seconds = int(number) * _EXPIRY_UNITS[unit]
    if not 0 < seconds <= 100 * 365 * 86400:
        raise GpuPanelError(f"--expires {text!r}: from 1 s to 100 years")
    return float(seconds)


def _names_arg(text: str | None, what: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise GpuPanelError(f"--{what}: give one or more names separated by commas")
    return names


def _check_configured(workers: list[str] | None, config_file: str | None) -> None:
    """A key's workers must be workers of the config's `[[workers]]` (when it has them:
    without, the workers depend on the GPUs found). A typo would make a key that can use
    nothing."""
    from gpupanel.adapters.config_file import find_config
    from gpupanel.client import local_config

    listed = local_config(config_file, strict=True).get("workers")
    if workers is None or not isinstance(listed, list):
        return
    known = [w["id"] for w in listed if isinstance(w, dict) and isinstance(w.get("id"), str)]
    unknown = [w for w in workers if w not in known]
    if unknown:
        raise GpuPanelError(
            f"--workers: no worker {unknown[0]!r} in {find_config(config_file)} (its workers: "
            f"{', '.join(known) or 'none'}); check the name, or add the worker there first"
        )


def _keys_panel(config_file: str | None) -> tuple[PanelSettings, Path]:
    """The `[panel]` settings of the config `gpupanel serve` would read here (validated),
    and the state directory they name: where the keys live."""
    from gpupanel.adapters.config_file import find_config
    from gpupanel.client import local_panel_settings, local_state_dir
    from gpupanel.core.config import parse_config

    raw = local_panel_settings(config_file, strict=True)
    path = find_config(config_file)
    panel = parse_config({"panel": raw}, str(path or "<default>"), ()).panel
    return panel, local_state_dir(config_file)


def _when(t: float | None, never: str = "never") -> str:
    return never if t is None else datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _audit_keys(state_dir: Path, action: str, outcome: str, **detail: Any) -> None:
    """One line in the audit log for a key created or revoked here (caller `local`, with the
    OS user); a log that cannot be written is a warning, not a failed command."""
    import getpass

    from gpupanel.adapters.audit import AuditLog

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = str(os.getuid())
    try:
        AuditLog(state_dir).append("local", action, outcome, user=user, via="cli", **detail)
    except OSError as exc:
        print(f"gpupanel: warning: audit log not written: {exc.strerror or exc}", file=sys.stderr)


def format_keys(keys: Sequence[ApiKey], now: float) -> str:
    """A table of keys: never a secret (only each one's first characters)."""
    rows = [("NAME", "PREFIX", "STATE", "WORKERS", "MODELS", "IN FLIGHT", "CREATED", "EXPIRES")]
    for k in keys:
        rows.append(
            (
                k.name,
                k.prefix + "...",
                k.state(now) + ("" if k.revoked is None else f" {_when(k.revoked)}"),
                ",".join(k.workers) if k.workers is not None else "any",
                ",".join(k.models) if k.models is not None else "any",
                str(k.max_inflight) if k.max_inflight is not None else "any",
                _when(k.created),
                _when(k.expires),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows)


def cmd_keys(args: argparse.Namespace) -> int:
    import time

    from gpupanel.adapters.keys import KeyStore

    panel, state_dir = _keys_panel(args.config)
    store = KeyStore(state_dir)
    now = time.time()
    if args.action == "list":
        keys = store.read()
        if args.json:
            shown = [
                {
                    **{k: v for k, v in key.to_json().items() if k != "sha256"},
                    "state": key.state(now),
                }
                for key in keys
            ]
            print(json.dumps(shown, indent=2))
        elif keys:
            print(format_keys(keys, now))
        else:
            print(f"no API keys in {state_dir} (`gpupanel keys create NAME` makes one)")
        return 0
    if args.action == "revoke":
        try:
            key, was_active = store.revoke(args.name, now)
        except GpuPanelError as exc:
            _audit_keys(state_dir, "keys.revoke", "error", key=args.name, error=str(exc))
            raise
        if key.revoked != now:
            print(
                f"API key {key.name!r} ({key.prefix}...) was already revoked on {_when(key.revoked)}"
            )
            return 0
        _audit_keys(state_dir, "keys.revoke", "ok", key=key.name, prefix=key.prefix)
        state = "" if was_active else " (it had expired already)"
        print(
            f"revoked API key {key.name!r} ({key.prefix}...){state}: a running control plane "
            "refuses it from its next request"
        )
        return 0
    expires = None if args.expires is None else now + parse_expiry(args.expires)
    workers, models = _names_arg(args.workers, "workers"), _names_arg(args.models, "models")
    _check_configured(workers, args.config)
    scope = {
        "workers": workers,
        "models": models,
        "max_inflight": args.max_inflight,
        "expires": expires,
    }
    try:
        key, secret = store.create(args.name, now, workers, models, args.max_inflight, expires)
    except GpuPanelError as exc:
        _audit_keys(state_dir, "keys.create", "error", key=args.name, error=str(exc), **scope)
        raise
    _audit_keys(state_dir, "keys.create", "ok", key=key.name, prefix=key.prefix, **scope)
    limit = "any number" if key.max_inflight is None else f"at most {key.max_inflight}"
    host = f"[{panel.host}]" if ":" in panel.host else panel.host
    url = f"{'https' if panel.tls_cert else 'http'}://{host}:{panel.port}"
    print(
        f"# API key {key.name!r} ({key.prefix}...) for app {key.name!r}: workers "
        f"{', '.join(key.workers) if key.workers is not None else 'any'}; models "
        f"{', '.join(key.models) if key.models is not None else 'any'}; {limit} in flight; "
        f"expires {_when(key.expires)}"
    )
    print("# The secret is shown only now (gpupanel keeps only its hash): store it.")
    print(f"export OPENAI_API_KEY={secret}")
    print(f"export OPENAI_BASE_URL={url}/v1")
    print(
        f'# ollama: Client(host="{url}/proxy/<worker>", '
        'headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})'
    )
    if panel.auth != "keys":
        print(
            f'gpupanel: note: [panel] auth is "{panel.auth}" here, so keys are not checked: '
            'set auth = "keys" in [panel] of gpupanel.toml',
            file=sys.stderr,
        )
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    if args.runtime == "ollama":
        from gpupanel.sim import ollama

        return ollama.main(list(args.rest))
    raise AssertionError(args.runtime)  # argparse's choices prevent this


def _add_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--simulate",
        nargs="?",
        const="",
        default=None,
        metavar="SPEC",
        help="use a simulated workstation: the recorded one, or SPEC "
        "('4x24', '2x24,2x48', or a JSON/TOML file)",
    )


def _add_url(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_PANEL_URL),
        help=f"control plane URL (default ${URL_ENV} or {DEFAULT_PANEL_URL})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpupanel", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gpupanel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("snapshot", help="print one telemetry snapshot")
    p.add_argument("--json", action="store_true", help="print the JSON form")
    _add_simulate(p)
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser(
        "doctor", help="check what this machine needs (driver, GPUs, runtimes, ports, ...)"
    )
    p.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="gpupanel.toml (default: $GPUPANEL_CONFIG, ./gpupanel.toml)",
    )
    _add_simulate(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("serve", help="run the control plane in the foreground")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="gpupanel.toml (default: $GPUPANEL_CONFIG, ./gpupanel.toml)",
    )
    p.add_argument(
        "--host",
        help='address to listen on (default 127.0.0.1; beyond loopback only with auth = "keys")',
    )
    p.add_argument("--port", type=int, help=f"panel port (default {DEFAULT_PANEL_PORT})")
    _add_simulate(p)
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="attach to the Ray cluster at ADDRESS (default: the one `ray start` made here) "
        "and serve the workers of its other nodes too (docs/cluster.md; pip install "
        "'gpupanel[ray]')",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "demo",
        help="the whole thing on a simulated 4-GPU workstation: workers, traffic, dashboard",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PANEL_PORT,
        help=f"panel port (default {DEFAULT_PANEL_PORT})",
    )
    p.add_argument(
        "--dashboard-port",
        dest="dashboard_port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        help=f"dashboard port (default {DEFAULT_DASHBOARD_PORT})",
    )
    p.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    p.add_argument("--no-traffic", action="store_true", help="do not generate traffic")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop by itself after SECONDS")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("dashboard", help="serve the Voila dashboard of the running control plane")
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        help=f"port (default {DEFAULT_DASHBOARD_PORT})",
    )
    _add_url(p)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("workers", help="list or control workers of the running control plane")
    p.add_argument("action", nargs="?", choices=["start", "stop", "restart", "ensure"])
    p.add_argument("id", nargs="?", help="worker id")
    p.add_argument("--all", action="store_true", help="every worker")
    _add_url(p)
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("load", help="load a model on a worker, behind the VRAM guard")
    p.add_argument("id", help="worker id")
    p.add_argument("model")
    p.add_argument(
        "--keep-alive", dest="keep_alive", help="e.g. 30m, or seconds; negative: forever"
    )
    p.add_argument("--num-ctx", dest="num_ctx", type=int, help="context length in tokens")
    p.add_argument(
        "--exclusive", action="store_true", help="unload the worker's other models first"
    )
    p.add_argument(
        "--force", action="store_true", help="load even if the estimate says it won't fit"
    )
    p.add_argument("--dry-run", action="store_true", help="only print the estimate and verdict")
    _add_url(p)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("pull", help="pull a model onto a worker, with progress")
    p.add_argument("id", help="worker id")
    p.add_argument("model")
    _add_url(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("audit", help="the last control actions (the audit log of this host)")
    p.add_argument("--lines", "-n", type=int, default=20, metavar="N", help="how many (default 20)")
    p.add_argument("--json", action="store_true", help="the entries as JSON lines")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="gpupanel.toml naming the state directory (default: $GPUPANEL_CONFIG, "
        "./gpupanel.toml)",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("usage", help="who used how much: requests, tokens, GPU-seconds")
    p.add_argument(
        "--since",
        default="7d",
        help="a span back from now: 30m, 24h, 7d (units s m h d w), or epoch seconds (default 7d)",
    )
    p.add_argument("--until", default="now", help="end of the period, same forms (default now)")
    p.add_argument(
        "--by", choices=["app", "model", "worker"], default="app", help="rows per (default app)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_url(p)
    p.add_argument(
        "--config",
        metavar="FILE",
        help="gpupanel.toml naming the state directory, read when no control plane answers "
        "(default: $GPUPANEL_CONFIG, ./gpupanel.toml)",
    )
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("keys", help="API keys per app: create, list, revoke")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", help="make a key; its secret is printed once")
    k.add_argument("name", help="the key's app name (1-64 of A-Z a-z 0-9 _ . @ : / -)")
    k.add_argument("--workers", metavar="A,B", help="only these workers (default: any)")
    k.add_argument("--models", metavar="M1,M2", help="only these models (default: any)")
    k.add_argument(
        "--max-inflight", dest="max_inflight", type=int, metavar="N", help="requests in flight"
    )
    k.add_argument("--expires", metavar="30d", help="lifetime: N and s, m, h, d or w")
    k = keys.add_parser("list", help="the keys (never a secret)")
    k.add_argument("--json", action="store_true", help="print JSON")
    k = keys.add_parser("revoke", help="refuse a key from now on")
    k.add_argument("name", help="the key's name")
    for k in keys.choices.values():
        k.add_argument("--config", metavar="FILE", help="gpupanel.toml naming the state directory")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("sim", help="simulated workstation programs")
    p.add_argument("runtime", choices=["ollama"], help="which simulated server")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments, e.g. 'serve'")
    p.set_defaults(func=cmd_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gpupanel` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NoDriverError as exc:
        print(f"gpupanel: {exc}; {exc.hint}", file=sys.stderr)
        return 1
    except GpuPanelError as exc:
        print(f"gpupanel: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
