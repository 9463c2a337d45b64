"""The audit log of control actions (docs/security.md, "The audit log"), in process: the
`Audit` middleware over the real app and a fake node (tests/api/conftest.py), behind a stand-in
for the authentication layer that names the caller; and `gpupanel audit`, which prints it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from gpupanel import cli
from gpupanel.adapters.audit import AUDIT_FILE, AuditLog
from gpupanel.api.audit import BODY_PEEK, Audit, audited, describe
from gpupanel.api.caller import CALLER, Caller
from gpupanel.errors import Conflict
from tests.api.conftest import BASE, Rig, Rigs

SECRET = "gpt-do-not-record-me"


def as_caller(app: ASGIApp, caller: Caller | None) -> ASGIApp:
    """What the authentication layer does before the audit: name the request's caller."""

    async def named(scope: Scope, receive: Receive, send: Send) -> None:
        if caller is not None:
            scope[CALLER] = caller
        await app(scope, receive, send)

    return named


class Audited:
    """A rig's app behind `Audit` (and a caller), with a client and the log it writes."""

    def __init__(self, rig: Rig, log: AuditLog, caller: Caller | None) -> None:
        self.rig = rig
        self.log = log
        self.audit = Audit(rig.app, log)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=as_caller(self.audit, caller)), base_url=BASE
        )

    def entries(self) -> list[dict[str, Any]]:
        return self.log.tail(1000)


@pytest.fixture
async def audited_rig(rigs: Rigs, tmp_path: Path) -> AsyncIterator[Audited]:
    rig = await rigs.pair()
    setup = Audited(rig, AuditLog(tmp_path / "state"), Caller("key", "ci-bot"))
    yield setup
    await setup.client.aclose()


async def test_every_control_action_is_recorded_after_its_answer(audited_rig: Audited) -> None:
    client = audited_rig.client
    assert (await client.get("/panel/snapshot")).status_code == 200  # reads are not actions
    assert audited_rig.entries() == []
    assert (await client.post("/panel/workers/a/restart")).status_code == 200
    assert (await client.post("/panel/workers/b/stop")).status_code == 200
    assert (await client.post("/panel/workers/ensure")).status_code == 200
    r = await client.post("/panel/workers/a/load", json={"model": "llama3", "force": True})
    assert r.status_code == 200, r.text
    assert (await client.post("/panel/workers/a/unload", json={"model": "llama3"})).is_success
    assert (await client.post("/panel/workers/a/pull", json={"model": "qwen"})).is_success
    assert (await client.post("/panel/processes/4000/stop", json={"force": False})).is_success
    assert (await client.post("/panel/apps", json={"name": "chat-ui"})).is_success
    assert (await client.delete("/panel/apps/chat-ui")).is_success
    audited_rig.rig.node.errors["start"] = Conflict("port 11435 is taken", "port_taken")
    assert (await client.post("/panel/workers/a/start")).status_code == 409
    assert (await client.post("/panel/workers/zz/restart")).status_code == 404

    entries = audited_rig.entries()
    assert [(e["caller"], e["action"], e["outcome"]) for e in entries] == [
        ("ci-bot", "restart a", "ok"),
        ("ci-bot", "stop b", "ok"),
        ("ci-bot", "ensure", "ok"),
        ("ci-bot", "load a llama3", "ok"),
        ("ci-bot", "unload a llama3", "ok"),
        ("ci-bot", "pull a qwen", "ok"),
        ("ci-bot", "stop pid 4000", "ok"),
        ("ci-bot", "register app chat-ui", "ok"),
        ("ci-bot", "delete app chat-ui", "ok"),
        ("ci-bot", "start a", "error 409"),
        ("ci-bot", "restart zz", "error 404"),
    ]
    load = entries[3]
    assert load["worker"] == "a" and load["model"] == "llama3" and load["force"] is True
    assert load["status"] == 200 and load["caller_kind"] == "key"
    assert entries[6]["pid"] == 4000 and entries[6]["force"] is False
    times = [e["time"] for e in entries]
    assert times == sorted(times) and all(isinstance(t, float) for t in times)
    mode = stat.S_IMODE(os.stat(audited_rig.log.path).st_mode)
    assert mode == 0o600, oct(mode)


async def test_without_keys_the_caller_is_local(rigs: Rigs, tmp_path: Path) -> None:
    setup = Audited(await rigs.pair(), AuditLog(tmp_path), caller=None)
    try:
        assert (await setup.client.post("/panel/workers/a/restart")).is_success
    finally:
        await setup.client.aclose()
    [entry] = setup.entries()
    assert (entry["caller"], entry["caller_kind"]) == ("local", "local")
    assert entry["action"] == "restart a"


async def test_model_management_through_the_proxy_is_recorded_and_inference_is_not(
    rigs: Rigs, tmp_path: Path
) -> None:
    # (an API key may not manage a worker's models through the proxy: the admin token may)
    audited_rig = Audited(await rigs.pair(), AuditLog(tmp_path), Caller("admin", "admin"))
    client = audited_rig.client
    r = await client.post("/proxy/a/api/pull", json={"name": "qwen2.5:0.5b", "stream": False})
    assert r.status_code == 200
    r = await client.request("DELETE", "/proxy/b/api/delete", json={"model": "old"})
    assert r.status_code == 200
    body = {"model": "llama3:latest", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert (await client.post("/proxy/a/api/chat", json=body)).status_code == 200
    await client.aclose()
    entries = audited_rig.entries()
    assert [(e["caller"], e["action"], e.get("via"), e["outcome"]) for e in entries] == [
        ("admin", "pull a qwen2.5:0.5b", "proxy", "ok"),
        ("admin", "delete b old", "proxy", "ok"),
    ]


async def test_nothing_secret_reaches_the_log(audited_rig: Audited) -> None:
    """Only the fields that name the action are read from a body; never a header, a query
    string or any other field."""
    client = audited_rig.client
    r = await client.post(
        f"/panel/workers/a/load?token={SECRET}",
        json={"model": "llama3", "api_key": SECRET, "options": {"secret": SECRET}},
        headers={"Authorization": f"Bearer {SECRET}", "X-Api-Key": SECRET},
    )
    assert r.status_code == 200, r.text
    await client.post(f"/panel/workers/a/restart?token={SECRET}", content=SECRET)
    text = audited_rig.log.path.read_text()
    assert len(audited_rig.entries()) == 2 and SECRET not in text
    assert "llama3" in text


async def test_a_log_that_cannot_be_written_never_fails_the_action(
    rigs: Rigs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory should be")
    setup = Audited(await rigs.pair(), AuditLog(blocker / "state"), caller=None)
    try:
        with caplog.at_level(logging.WARNING, logger="gpupanel.audit"):
            for _ in range(3):
                r = await setup.client.post("/panel/workers/a/restart")
                assert r.status_code == 200 and r.json()["result"] == "restarted"
            assert [c[0] for c in setup.rig.node.calls] == ["restart"] * 3
            warnings = [r.getMessage() for r in caplog.records]
            assert len(warnings) == 1 and "cannot write the audit log" in warnings[0]
            assert str(blocker / "state" / AUDIT_FILE) in warnings[0]

            blocker.unlink()  # the directory can be made again: recorded, and said once
            assert (await setup.client.post("/panel/workers/a/stop")).status_code == 200
            assert (await setup.client.post("/panel/workers/a/start")).status_code == 200
    finally:
        await setup.client.aclose()
    assert [e["action"] for e in setup.entries()] == ["stop a", "start a"]
    assert [r.getMessage() for r in caplog.records][1:] == [
        f"the audit log {blocker / 'state' / AUDIT_FILE} can be written again"
    ]


# ---- outcomes that are not a status -----------------------------------------------------------


async def call(app: ASGIApp, method: str, path: str, body: bytes = b"") -> list[dict[str, Any]]:
    """Run one request through `app` by hand; the messages it sent."""
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "headers": [], "query_string": b""}  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_crash_a_cancel_and_a_client_gone_have_their_outcome(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)

    async def crash(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("a bug")

    async def stopped(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the body, as a route reads it
        raise asyncio.CancelledError

    async def gone(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the client left before the answer: nothing sent

    with pytest.raises(RuntimeError):
        await call(Audit(crash, log), "POST", "/panel/workers/a/start")
    with pytest.raises(asyncio.CancelledError):
        await call(Audit(stopped, log), "POST", "/panel/workers/a/pull", b'{"model": "m"}')
    await call(Audit(gone, log), "POST", "/panel/workers/ensure")
    assert [(e["action"], e["outcome"], e["status"]) for e in log.tail(10)] == [
        ("start a", "error 500", 500),
        ("pull a m", "cancelled", None),
        ("ensure", "no response", None),
    ]


# ---- naming the action -------------------------------------------------------------------------


def test_what_is_audited() -> None:
    assert audited("POST", "/panel/workers/a/start")
    assert audited("DELETE", "/panel/apps/x")
    assert audited("POST", "/proxy/a/api/pull") and audited("DELETE", "/proxy/a/api/delete")
    for method, path in [
        ("GET", "/panel/snapshot"),
        ("HEAD", "/panel/workers"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/proxy/a/v1/chat/completions"),
        ("POST", "/proxy/a/api/chat"),
        ("POST", "/proxy/a/api/generate"),
        ("POST", "/panelx/workers/a/start"),
    ]:
        assert not audited(method, path), (method, path)


@pytest.mark.parametrize(
    ("method", "path", "body", "action", "detail"),
    [
        ("POST", "/panel/workers/gpu0/start", None, "start gpu0", {"worker": "gpu0"}),
        ("POST", "/panel/workers/gpu0/load", {"model": 7}, "load gpu0", {"worker": "gpu0"}),
        ("POST", "/panel/workers/gpu0/load", None, "load gpu0", {"worker": "gpu0"}),
        ("POST", "/panel/processes/12/stop", {"force": "yes"}, "stop pid 12", {"pid": 12}),
        ("POST", "/panel/processes/x1/stop", None, "stop pid x1", {"pid": "x1"}),
        ("POST", "/panel/apps", {"owner": "me"}, "register app", {}),
        ("POST", "/panel/keys", {"name": "k", "secret": SECRET}, "POST /panel/keys", {}),
        ("PUT", "/panel/workers/gpu0", None, "PUT /panel/workers/gpu0", {}),
        (
            "POST",
            "/proxy/team/a/api/create",
            {"model": "m"},
            "create team/a m",
            {"worker": "team/a", "model": "m", "via": "proxy"},
        ),
    ],
)
def test_actions_are_named_from_the_route_and_the_body(
    method: str, path: str, body: dict[str, Any] | None, action: str, detail: dict[str, Any]
) -> None:
    parts = path.split("/")
    if parts[1] == "proxy":  # an encoded "/" stays in the worker id, as the proxy reads it
        parts = ["", "proxy", "team/a", "api", parts[-1]]
    assert describe(method, parts, body) == (action, detail)


def test_names_from_requests_are_cut() -> None:
    action, detail = describe("POST", ["", "panel", "workers", "w", "load"], {"model": "m" * 999})
    assert len(detail["model"]) == 200 and detail["model"].endswith("…")
    assert action == f"load w {detail['model']}"


async def test_a_large_or_odd_body_names_no_model(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)

    async def ok(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    big = json.dumps({"model": "m", "pad": "x" * BODY_PEEK}).encode()
    await call(Audit(ok, log), "POST", "/panel/workers/a/load", big)
    await call(Audit(ok, log), "POST", "/panel/workers/a/load", b"[" * 100_000)
    await call(Audit(ok, log), "POST", "/panel/workers/a/load", b'["model"]')
    assert [e["action"] for e in log.tail(10)] == ["load a"] * 3


# ---- gpupanel audit ----------------------------------------------------------------------------


def test_gpupanel_audit_prints_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "custom-state"
    config = tmp_path / "gpupanel.toml"
    config.write_text(f'[panel]\nstate_dir = "{state}"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUPANEL_CONFIG", raising=False)
    assert cli.main(["audit"]) == 0
    assert capsys.readouterr().out == f"no control actions recorded yet ({state / AUDIT_FILE})\n"

    log = AuditLog(state)
    for i in range(30):
        log.append("local", f"restart gpu{i}", "ok", status=200)
    log.append("ci-bot", "load gpu0 \x1b[31mred", "error 409", status=409)
    assert cli.main(["audit", "--lines", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[2:] == ["local", "restart", "gpu29", "ok"]
    assert lines[1].split()[2:] == ["ci-bot", "load", "gpu0", "\\x1b[31mred", "error", "409"]

    assert cli.main(["audit", "-n", "3", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["action"] for e in entries[:2]] == ["restart gpu28", "restart gpu29"]
    assert entries[2]["caller"] == "ci-bot" and entries[2]["status"] == 409

    assert cli.main(["audit", "--lines", "0"]) == 1
    assert "--lines must be at least 1" in capsys.readouterr().err
    assert cli.main(["audit", "--config", str(tmp_path / "missing.toml")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
