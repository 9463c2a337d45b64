"""`GET /panel/usage` in process: the real app over a plane with a usage log (tests/api/
conftest.py), fed by requests through the proxy (the real `openai` client) or by records
made directly; its answer against the OpenAPI document; 400s that name the parameter."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gpupanel.core.requests import Finished
from gpupanel.services.usage import UsageLog
from tests.api.conftest import MODEL, Rig
from tests.api.test_openapi import conforms, document


def finished(app: str, worker: str = "a", **changes: Any) -> Finished:
    values: dict[str, Any] = {
        "app": app,
        "worker": worker,
        "model": MODEL,
        "outcome": "ok",
        "status": 200,
        "duration_s": 1.25,
        "ttft_s": 0.05,
        "tokens_in": 4,
        "tokens_out": 9,
        "counted": "reported",
        "chunks": 10,
        "failovers": 0,
        "ended": time.time(),
    }
    values.update(changes)
    return Finished(**values)


@pytest.fixture
def usage(rig: Rig, tmp_path: Path) -> UsageLog:
    """The rig's plane with a usage log in `tmp_path`, fed as the runtime feeds it."""
    log = UsageLog(tmp_path, 90)
    assert log.open()
    rig.plane.usage = log
    rig.plane.on_finished = (*rig.plane.on_finished, log.add)
    return log


async def test_usage_by_app_model_and_worker(rig: Rig, usage: UsageLog) -> None:
    usage.add(finished("team-a"))
    usage.add(finished("team-a", worker="b", outcome="error", status=500))
    usage.flush()
    usage.add(finished("team-b", counted="chunks", tokens_in=None, tokens_out=None))
    r = await rig.client.get("/panel/usage", params={"since": "1h", "by": "app"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["by"] == "app" and body["persistent"] is True and body["problem"] is None
    assert body["until"] - body["since"] == pytest.approx(3600, abs=1)
    rows = {row["key"]: row for row in body["rows"]}
    assert [row["key"] for row in body["rows"]] == ["team-a", "team-b"]
    assert rows["team-a"]["requests"] == 2 and rows["team-a"]["errors"] == 1
    assert rows["team-a"]["tokens_out"] == 18 and rows["team-a"]["counted_requests"] == 2
    # Not reported: no tokens, its chunks counted on their own.
    assert rows["team-b"]["tokens_out"] == 0 and rows["team-b"]["counted_requests"] == 0
    assert rows["team-b"]["uncounted_chunks"] == 10
    assert body["total"]["requests"] == 3 and body["total"]["gpu_seconds"] == 3.75
    assert sum(h["requests"] for h in body["hours"]) == 3
    workers = (await rig.client.get("/panel/usage?by=worker")).json()
    assert {row["key"]: row["requests"] for row in workers["rows"]} == {"a": 2, "b": 1}
    models = (await rig.client.get("/panel/usage?by=model&since=30d")).json()
    assert [(row["key"], row["requests"]) for row in models["rows"]] == [(MODEL, 3)]
    long_ago = (await rig.client.get("/panel/usage?since=30d&until=2d")).json()
    assert long_ago["rows"] == [] and long_ago["total"]["requests"] == 0


async def test_requests_through_the_proxy_are_counted_per_app(rig: Rig, usage: UsageLog) -> None:
    for app, n in (("notebook", 2), ("batch", 1)):
        client = rig.openai(default_headers={"X-GPUPanel-App": app})
        for _ in range(n):
            answer = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content
        await client.close()
    body = (await rig.client.get("/panel/usage?since=1h")).json()
    rows = {row["key"]: row for row in body["rows"]}
    assert {k: r["requests"] for k, r in rows.items()} == {"notebook": 2, "batch": 1}
    # The scripted worker reports usage (1 prompt, 2 completion tokens per answer).
    assert rows["notebook"]["tokens_out"] == 4 and rows["notebook"]["counted_requests"] == 2
    assert rows["notebook"]["gpu_seconds"] > 0


async def test_the_answer_matches_the_document(rig: Rig, usage: UsageLog) -> None:
    usage.add(finished("team-a"))
    usage.add(finished(""))
    doc = await document(rig)
    body = conforms(doc, "get", "/panel/usage", await rig.client.get("/panel/usage"))
    assert {row["key"] for row in body["rows"]} == {"team-a", ""}
    conforms(doc, "get", "/panel/usage", await rig.client.get("/panel/usage?by=nope"))
    params = {p["name"]: p["schema"] for p in doc["paths"]["/panel/usage"]["get"]["parameters"]}
    assert params["by"]["enum"] == ["app", "model", "worker"]
    assert params["since"]["maxLength"] == 32


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("since=7x", "query parameter 'since' must be a span back from now"),
        ("since=-1d", "query parameter 'since' must be"),
        ("until=tomorrow", "query parameter 'until' must be"),
        ("by=gpu", "query parameter 'by' must be one of app, model, worker"),
        ("by=App", "query parameter 'by' must be one of"),
        ("since=1h&until=2h", "query parameter 'since' must be before query parameter 'until'"),
        ("since=" + "1" * 40, "query parameter 'since' must be"),
    ],
)
async def test_bad_parameters_are_400s_naming_them(
    rig: Rig, usage: UsageLog, query: str, named: str
) -> None:
    r = await rig.client.get(f"/panel/usage?{query}")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(named)


async def test_a_plane_without_usage_history_says_so(rig: Rig) -> None:
    assert rig.plane.usage is None
    r = await rig.client.get("/panel/usage")
    assert r.status_code == 503 and r.json()["error"]["code"] == "usage_off"
    bad = await rig.client.get("/panel/usage?by=gpu")  # the parameters are checked first
    assert bad.status_code == 400


async def test_a_history_kept_in_memory_says_why(rig: Rig, tmp_path: Path) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("not a directory")
    log = UsageLog(blocked, 90)
    assert not log.open()
    rig.plane.usage = log
    log.add(finished("team-a"))
    body = (await rig.client.get("/panel/usage")).json()
    assert body["persistent"] is False and "usage.sqlite3" in body["problem"]
    assert body["rows"][0]["requests"] == 1
    await rig.plane.refresh()
    warnings = (await rig.client.get("/panel/warnings")).json()["warnings"]
    assert [w["subject"] for w in warnings if w["code"] == "usage_unwritable"] == [
        str(blocked / "usage.sqlite3")
    ]
