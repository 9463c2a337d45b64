"""Schemathesis against a live `gpupanel serve --simulate`: every /panel route of the OpenAPI
document the server itself publishes, with generated valid input (no 5xx, and every answer
in the status, content type and schema the document declares) and generated invalid input
(no 5xx, and refused with a 4xx in the declared error shape). The proxy's routes are fuzzed
elsewhere (tests/api/test_proxy_fuzz.py).

Bounded: a few dozen examples per route, one control plane for the whole file.
`/panel/events` is left out (an endless stream; tests/api covers it). Stopping a process by
pid is only ever asked for a pid no process can have (`IMPOSSIBLE_PID`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from gpupanel.api.schemas import MAX_PID
from gpupanel.sim.workstation import parse_spec
from tests.e2e.conftest import Panel, free_port, kill_simulated, serve, wait_for

pytestmark = pytest.mark.slow

OPERATIONS = [
    ("GET", "/panel/health"),
    ("GET", "/panel/snapshot"),
    ("GET", "/panel/workers"),
    ("GET", "/panel/warnings"),
    ("GET", "/panel/requests"),
    ("GET", "/panel/apps"),
    ("GET", "/panel/estimate"),
    ("GET", "/panel/workers/{id}/log"),
    ("POST", "/panel/workers/ensure"),
    ("POST", "/panel/workers/{id}/start"),
    ("POST", "/panel/workers/{id}/stop"),
    ("POST", "/panel/workers/{id}/restart"),
    ("POST", "/panel/workers/{id}/load"),
    ("POST", "/panel/workers/{id}/unload"),
    ("POST", "/panel/workers/{id}/pull"),
    ("POST", "/panel/apps"),
    ("DELETE", "/panel/apps/{name}"),
    ("POST", "/panel/processes/{pid}/stop"),
]
SLOW = {"/panel/workers/{id}/start", "/panel/workers/{id}/restart", "/panel/workers/ensure"}
"""Routes that wait for a worker to start: fewer examples."""

WITH_INPUT = {
    ("GET", "/panel/estimate"),
    ("GET", "/panel/workers/{id}/log"),
    ("POST", "/panel/workers/{id}/load"),
    ("POST", "/panel/workers/{id}/unload"),
    ("POST", "/panel/workers/{id}/pull"),
    ("POST", "/panel/apps"),
    ("POST", "/panel/processes/{pid}/stop"),
}
"""Routes with a query or a body, which invalid input can be generated for."""

IMPOSSIBLE_PID = MAX_PID
"""Linux pids are below pid_max, which is at most 2**22 (PID_MAX_LIMIT): no process has it."""


def no_internal_error(ctx: Any, response: Any, case: Any) -> None:
    """A 500 is a bug, always. 502, 503 and 504 say the worker failed, is stopped or timed
    out: legitimate where the route documents them (status_code_conformance checks that),
    e.g. a load on a worker that a generated `stop` has just stopped."""
    if response.status_code == 500 or response.status_code > 504:
        raise AssertionError(f"{response.status_code}: {response.text[:300]}")


POSITIVE = [
    no_internal_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
NEGATIVE = [
    not_a_server_error,  # invalid input is refused before any worker is asked
    negative_data_rejection,
    status_code_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Panel, Any]]:
    """One `gpupanel serve --simulate` with two workers (gpu0 and gpu1, the ids the
    document gives as examples), and the OpenAPI document it serves, loaded by schemathesis."""
    root = tmp_path_factory.mktemp("fuzz")
    sim_dir = root / "sim"
    sim_dir.mkdir()
    parse_spec("2x24").save(sim_dir)
    env = {**os.environ, "GPUPANEL_SIM_DIR": str(sim_dir), "XDG_STATE_HOME": str(root / "state")}
    panel = serve(
        root,
        env,
        f"""
        [[workers]]
        id = "gpu0"
        gpu = 0
        port = {free_port()}
        env = {{ GPUPANEL_SIM_PULLED = "llama3.1:8b" }}

        [[workers]]
        id = "gpu1"
        gpu = 1
        port = {free_port()}
        """,
    )
    try:
        wait_for(
            lambda: all(w["status"] == "running" for w in panel.workers().values()),
            30,
            "both workers running",
        )
        schema = schemathesis.openapi.from_url(f"{panel.url}/panel/openapi.json")
        yield panel, schema
    finally:
        with contextlib.suppress(Exception):
            panel.shutdown()
        kill_simulated(sim_dir)


def test_the_impossible_pid_is_impossible() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert pid_max <= IMPOSSIBLE_PID and not psutil.pid_exists(IMPOSSIBLE_PID)


def test_documented_uses_succeed_and_conform(live: tuple[Panel, Any]) -> None:
    """The paths generated input rarely reaches (a model the worker has, a known worker),
    called once each and checked against the document like the generated ones."""
    panel, schema = live
    steps: list[tuple[str, str, dict[str, Any], int]] = [
        ("/panel/workers/{id}/load", "POST", {"path_parameters": {"id": "gpu0"}, "body": {
            "model": "llama3.1:8b", "keep_alive": "30m", "num_ctx": 4096}}, 200),
        ("/panel/estimate", "GET", {"query": {
            "worker": "gpu0", "model": "llama3.1:8b", "num_ctx": 8192, "parallel": 2}}, 200),
        ("/panel/workers/{id}/unload", "POST", {"path_parameters": {"id": "gpu0"}, "body": {
            "model": "llama3.1:8b"}}, 200),
        ("/panel/workers/{id}/pull", "POST", {"path_parameters": {"id": "gpu1"}, "body": {
            "model": "qwen2.5:0.5b"}}, 200),
        ("/panel/apps", "POST", {"body": {"name": "team-a", "workers": ["gpu0"]}}, 201),
        ("/panel/apps/{name}", "DELETE", {"path_parameters": {"name": "team-a"}}, 200),
        ("/panel/workers/{id}/stop", "POST", {"path_parameters": {"id": "gpu1"}}, 200),
        ("/panel/workers/{id}/load", "POST", {"path_parameters": {"id": "gpu1"}, "body": {
            "model": "qwen2.5:0.5b"}}, 503),
        ("/panel/workers/{id}/start", "POST", {"path_parameters": {"id": "gpu1"}}, 200),
        ("/panel/workers/{id}/log", "GET", {"path_parameters": {"id": "gpu1"}}, 200),
    ]  # fmt: skip
    for path, method, data, status in steps:
        kind = {"media_type": "application/json"} if "body" in data else {}
        case = schema[path][method].Case(**data, **kind)
        response = case.call(base_url=panel.url, timeout=60)
        assert response.status_code == status, (path, response.text)
        case.validate_response(response, checks=POSITIVE)
    lines = panel.post("/panel/workers/gpu1/pull", json={"model": "qwen2.5:0.5b"}).text
    assert '"success"' in lines.splitlines()[-1]


def _cases() -> Iterator[Any]:
    for method, path in OPERATIONS:
        modes = [GenerationMode.POSITIVE]
        if (method, path) in WITH_INPUT:
            modes.append(GenerationMode.NEGATIVE)
        pins = [False, True] if "{id}" in path or path == "/panel/estimate" else [False]
        for mode in modes:
            for pinned in pins:
                label = f"{method} {path} {mode.value}{' gpu0' if pinned else ''}"
                yield pytest.param(method, path, mode, pinned, id=label)


@pytest.mark.parametrize(("method", "path", "mode", "pinned"), list(_cases()))
def test_panel_route(
    live: tuple[Panel, Any], method: str, path: str, mode: GenerationMode, pinned: bool
) -> None:
    """`pinned`: the worker is gpu0 (a real one) rather than a generated id, so that the
    input reaches the worker's own checks and answers."""
    panel, schema = live
    operation = schema[path][method]
    fixed = {"pid": IMPOSSIBLE_PID} if "{pid}" in path else None
    if pinned and "{id}" in path:
        fixed = {"id": "gpu0"}
    query = {"worker": "gpu0"} if pinned and path == "/panel/estimate" else None
    checks = POSITIVE if mode is GenerationMode.POSITIVE else NEGATIVE
    examples = 6 if path in SLOW else 30
    calls: list[int] = []

    @hypothesis.given(case=operation.as_strategy(mode, path_parameters=fixed, query=query))
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        if "{pid}" in path:  # never a process of this machine
            assert case.path_parameters["pid"] == IMPOSSIBLE_PID
        response = case.call(base_url=panel.url, timeout=60)
        calls.append(response.status_code)
        case.validate_response(response, checks=checks)

    run()
    assert calls, "no request was made"
    assert 500 not in calls


def test_five_thousand_registrations_stay_bounded(live: tuple[Panel, Any]) -> None:
    """Regression: each new name grew the registry, and every snapshot, for good."""
    panel, _ = live
    process = psutil.Process(panel.proc.pid if panel.proc else 0)
    statuses = [
        panel.post("/panel/apps", json={"name": f"flood-{i}"}).status_code for i in range(5000)
    ]
    assert set(statuses) <= {201, 409} and statuses[-1] == 409
    assert statuses.count(201) <= 256
    apps = panel.http.get("/panel/apps").json()["apps"]
    assert len(apps) <= 256
    assert len(panel.http.get("/panel/snapshot").json()["apps"]) <= 256
    refused = panel.post("/panel/apps", json={"name": "one-more"}).json()["error"]
    assert refused["code"] == "too_many_apps" and "DELETE /panel/apps/{name}" in refused["message"]
    assert panel.http.delete("/panel/apps/flood-0").status_code in (200, 404)
    assert process.is_running()
