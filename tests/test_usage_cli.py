"""`gpupanel usage`: asks the running control plane (in process here: the real app served on
loopback), or, when none answers, reads the state directory's usage file itself (as a real
subprocess); a table with aligned columns, or JSON; one line for a bad option."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gpupanel import cli
from gpupanel.adapters.usage_db import USAGE_FILE
from gpupanel.api.app import build_app
from gpupanel.core.config import Config, PanelSettings
from gpupanel.core.requests import Finished
from gpupanel.services.plane import Plane
from gpupanel.services.usage import UsageLog
from tests.api.conftest import BASE, FakeNode, refused_port, served, worker
from tests.conftest import free_port


def finished(
    app: str, worker: str = "gpu0", model: str = "llama3:latest", **changes: Any
) -> Finished:
    values: dict[str, Any] = {
        "app": app,
        "worker": worker,
        "model": model,
        "outcome": "ok",
        "status": 200,
        "duration_s": 2.5,
        "ttft_s": 0.1,
        "tokens_in": 12,
        "tokens_out": 340,
        "counted": "reported",
        "chunks": 341,
        "failovers": 0,
        "ended": time.time() - 60,
    }
    values.update(changes)
    return Finished(**values)


UNCOUNTED: dict[str, Any] = {"counted": "chunks", "tokens_in": None, "tokens_out": None}


def history(state_dir: Path) -> None:
    """A usage file as a control plane that stopped left it."""
    usage = UsageLog(state_dir, 90)
    assert usage.open()
    usage.add(finished("team-a"))
    usage.add(finished("team-a", worker="gpu1", outcome="error", status=500, **UNCOUNTED))
    usage.add(finished("notebook", chunks=45, **UNCOUNTED))
    usage.add(finished("", model="qwen2.5:0.5b"))
    usage.close()


def gpupanel(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupanel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
    )


@pytest.fixture
def offline(tmp_path: Path) -> dict[str, str]:
    """An environment where no control plane answers, with a usage file in its state dir."""
    history(tmp_path / "state" / "gpupanel")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env["GPUPANEL_URL"] = f"http://127.0.0.1:{free_port()}"
    env.pop("GPUPANEL_CONFIG", None)
    return env


def test_format_usage_aligns_columns_and_never_mixes_unreported_tokens() -> None:
    report = {
        "since": 1_700_000_000.0,
        "until": 1_700_086_400.0,
        "by": "app",
        "rows": [
            {"key": "team-a", "requests": 12, "errors": 1, "cancelled": 0, "tokens_in": 340,
             "tokens_out": 1200, "counted_requests": 12, "uncounted_chunks": 0, "gpu_seconds": 34.25},
            {"key": "", "requests": 3, "errors": 0, "cancelled": 1, "tokens_in": 0,
             "tokens_out": 0, "counted_requests": 0, "uncounted_chunks": 45, "gpu_seconds": 2.0},
        ],
        "total": {"requests": 15, "errors": 1, "cancelled": 1, "tokens_in": 340, "tokens_out": 1200,
                  "counted_requests": 12, "uncounted_chunks": 45, "gpu_seconds": 36.25},
    }  # fmt: skip
    lines = cli.format_usage(report).splitlines()
    assert lines[0].startswith("usage by app, ")
    head, a, none, total = lines[1:5]
    assert head.split("  ")[0] == "APP" and "TOKENS OUT (REPORTED)" in head
    assert "CHUNKS, NO COUNT" in head
    # Right-aligned numbers: each column ends where its header ends.
    for column in ("REQUESTS", "TOKENS OUT (REPORTED)", "GPU-SECONDS"):
        end = head.index(column) + len(column)
        assert a[end - 1] != " " and none[end - 1] != " " and total[end - 1] != " "
    assert a.split()[:2] == ["team-a", "12"] and a.split()[-1] == "34.2"
    cells = none.split()
    assert cells[0] == "(no" and cells[1] == "app)"
    assert cells[5:7] == ["-", "-"]  # no token was reported for these: not a 0
    assert cells[7:9] == ["0/3", "45"]
    assert total.split()[:2] == ["TOTAL", "15"] and "12/15" in total
    empty = cli.format_usage({**report, "rows": []})
    assert empty.endswith("(whole hours): no requests")


def test_offline_it_reads_the_state_directory_and_says_so(
    offline: dict[str, str], tmp_path: Path
) -> None:
    result = gpupanel("usage", env=offline, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "state" / "gpupanel" / USAGE_FILE
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr
    assert "no control plane answers" in result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:6]}
    assert set(rows) == {"team-a", "notebook", "(no", "TOTAL"}
    assert rows["team-a"][1:3] == ["2", "1"]  # requests, errors
    assert rows["notebook"][4:8] == ["-", "-", "0/1", "45"]
    assert rows["TOTAL"][1] == "4"

    as_json = gpupanel(
        "usage", "--json", "--by", "worker", "--since", "2h", env=offline, cwd=tmp_path
    )
    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert body["by"] == "worker" and body["persistent"] is True
    assert {r["key"]: r["requests"] for r in body["rows"]} == {"gpu0": 3, "gpu1": 1}
    assert body["total"]["tokens_out"] == 680 and body["total"]["uncounted_chunks"] == 45

    models = json.loads(
        gpupanel("usage", "--json", "--by", "model", env=offline, cwd=tmp_path).stdout
    )
    assert {r["key"] for r in models["rows"]} == {"llama3:latest", "qwen2.5:0.5b"}
    earlier = json.loads(
        gpupanel("usage", "--json", "--until", "2h", env=offline, cwd=tmp_path).stdout
    )
    assert earlier["rows"] == []


def test_offline_with_no_history_yet(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "nothing")}
    env["GPUPANEL_URL"] = f"http://127.0.0.1:{free_port()}"
    result = gpupanel("usage", env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("no requests")
    assert not (tmp_path / "nothing" / "gpupanel" / USAGE_FILE).exists()


def test_offline_a_damaged_file_is_one_line_and_left_where_it_is(tmp_path: Path) -> None:
    state = tmp_path / "state" / "gpupanel"
    state.mkdir(parents=True)
    (state / USAGE_FILE).write_bytes(b"garbage " * 100)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env["GPUPANEL_URL"] = f"http://127.0.0.1:{free_port()}"
    result = gpupanel("usage", env=env, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("gpupanel: usage history ")
    assert (state / USAGE_FILE).read_bytes() == b"garbage " * 100  # a reader moves nothing


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--since", "7x"), "--since must be a span back from now"),
        (("--until", "later"), "--until must be"),
        (("--since", "1h", "--until", "2h"), "--since must be before --until"),
    ],
)
def test_a_bad_option_is_one_line(
    offline: dict[str, str], tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    result = gpupanel("usage", *args, env=offline, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"gpupanel: {says}") and result.stdout == ""


async def test_it_asks_the_running_control_plane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "elsewhere"))  # its file is not read
    monkeypatch.delenv("GPUPANEL_TOKEN", raising=False)
    node = FakeNode.of([worker("gpu0", refused_port())])
    config = Config(panel=PanelSettings(), workers=tuple(node.specs.values()))
    plane = Plane([node], config, BASE, "9.9.9-test")
    plane.usage = UsageLog(tmp_path / "served", 90)
    plane.usage.open()
    plane.usage.add(finished("team-a"))  # pending: only the running control plane knows it
    plane.usage.add(finished("team-b", worker="gpu1"))
    await plane.refresh()
    app, close = build_app(plane, "127.0.0.1")
    try:
        async with served(app) as url:
            code = await asyncio.to_thread(cli.main, ["usage", "--url", url, "--json"])
            out = capsys.readouterr()
            assert code == 0 and out.err == ""
            body = json.loads(out.out)
            assert {r["key"]: r["requests"] for r in body["rows"]} == {"team-a": 1, "team-b": 1}
            code = await asyncio.to_thread(cli.main, ["usage", "--url", url, "--by", "worker"])
            out = capsys.readouterr()
            assert code == 0 and out.err == ""
            assert out.out.startswith("usage by worker, ")
            assert {line.split()[0] for line in out.out.splitlines()[2:5]} == {
                "gpu0",
                "gpu1",
                "TOTAL",
            }
            plane.usage = None  # a control plane that answers, and refuses: no fallback
            code = await asyncio.to_thread(cli.main, ["usage", "--url", url])
            out = capsys.readouterr()
            assert code == 1 and "keeps no usage history" in out.err and out.out == ""
    finally:
        await close()
