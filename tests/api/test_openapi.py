"""The OpenAPI document of /panel (and of the proxy's routes), the offline docs page, and
the routes' real answers checked against the schemas the document declares: in process,
over the rig of tests/api/conftest.py."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
import schemathesis
from jsonschema import Draft202012Validator

from gpupanel.api import panel
from gpupanel.core.model import GpuProcess
from tests.api.conftest import FakeNode, Rig, Rigs, gpu, refused_port, worker

PANEL_ROUTES = {
    ("get", "/panel/health"),
    ("get", "/panel/snapshot"),
    ("get", "/panel/events"),
    ("get", "/panel/workers"),
    ("post", "/panel/workers/ensure"),
    ("post", "/panel/workers/{id}/start"),
    ("post", "/panel/workers/{id}/stop"),
    ("post", "/panel/workers/{id}/restart"),
    ("get", "/panel/workers/{id}/log"),
    ("post", "/panel/workers/{id}/load"),
    ("post", "/panel/workers/{id}/unload"),
    ("post", "/panel/workers/{id}/pull"),
    ("get", "/panel/estimate"),
    ("get", "/panel/warnings"),
    ("get", "/panel/requests"),
    ("get", "/panel/apps"),
    ("post", "/panel/apps"),
    ("delete", "/panel/apps/{name}"),
    ("post", "/panel/processes/{pid}/stop"),
    ("get", "/panel/usage"),
}
PROXY_ROUTES = {
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/embeddings"),
    ("get", "/v1/models"),
    ("get", "/proxy/{worker}/v1/{path}"),
    ("post", "/proxy/{worker}/v1/{path}"),
    ("get", "/proxy/{worker}/api/{path}"),
    ("post", "/proxy/{worker}/api/{path}"),
    ("delete", "/proxy/{worker}/api/{path}"),
}
METRICS_ROUTES = {("get", "/metrics")}  # served by api/metrics.py, described in the document
WITH_INPUT = {  # a body or a query: a 400 names the field
    ("get", "/panel/estimate"),
    ("get", "/panel/workers/{id}/log"),
    ("post", "/panel/workers/{id}/load"),
    ("post", "/panel/workers/{id}/unload"),
    ("post", "/panel/workers/{id}/pull"),
    ("post", "/panel/apps"),
    ("post", "/panel/processes/{pid}/stop"),
    ("get", "/panel/usage"),
}


async def document(rig: Rig) -> dict[str, Any]:
    r = await rig.client.get("/panel/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc: dict[str, Any] = r.json()
    return doc


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in doc["paths"].items() for method in item}


def schema_of(
    doc: dict[str, Any], method: str, path: str, status: int, media: str = "application/json"
) -> Draft202012Validator:
    """A validator for what `method path` documents for `status` (refs resolved in `doc`)."""
    responses = doc["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method} {path} does not declare {status}"
    schema = responses[str(status)]["content"][media]["schema"]
    return Draft202012Validator({**schema, "components": doc["components"]})


def conforms(doc: dict[str, Any], method: str, path: str, r: httpx.Response) -> Any:
    """The answer's JSON, checked against the schema its route documents for its status."""
    body = r.json()
    errors = list(schema_of(doc, method, path, r.status_code).iter_errors(body))
    assert not errors, f"{method} {path} {r.status_code}: {errors[0].message} in {r.text[:300]}"
    return body


# ---- the document ------------------------------------------------------------------------------


async def test_the_document_is_valid_openapi(rig: Rig) -> None:
    doc = await document(rig)
    assert doc["openapi"].startswith("3.1") and doc["info"]["version"] == "9.9.9-test"
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema
    for name, schema in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema), name
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs <= set(doc["components"]["schemas"]), refs - set(doc["components"]["schemas"])


async def test_it_lists_every_panel_route_and_the_proxy_routes(rig: Rig) -> None:
    doc = await document(rig)
    assert operations(doc) == PANEL_ROUTES | PROXY_ROUTES | METRICS_ROUTES
    # Each documented /panel route is served (the answer is never "no route").
    filled = {"{id}": "a", "{name}": "nobody", "{pid}": "777"}
    for method, path in sorted(PANEL_ROUTES - {("get", "/panel/events")}):
        url = path
        for key, value in filled.items():
            url = url.replace(key, value)
        r = await rig.client.request(method.upper(), url)
        assert not r.text.startswith('{"error":{"message":"no route'), (method, path, r.text)


async def test_fastapi_never_routes_the_proxy(rig: Rig) -> None:
    """The proxy's routes are in the document only: the /panel app itself has none of them
    (api/app.py hands them to the raw proxy first)."""
    api = panel.build(rig.plane)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as alone:
        for method, path in sorted(PROXY_ROUTES | METRICS_ROUTES):
            url = path.replace("{worker}", "a").replace("{path}", "tags")
            r = await alone.request(method.upper(), url)
            assert r.status_code == 404, (method, path)
            assert r.json()["error"]["message"] == f"no route {method.upper()} {url}"
    # Through the whole app, the proxy answers them, in its own dialects.
    r = await rig.client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_required"
    assert "param" in r.json()["error"]
    r = await rig.client.get("/proxy/zz/api/tags")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


async def test_every_route_declares_its_answers_and_errors(rig: Rig) -> None:
    doc = await document(rig)
    for method, path in PANEL_ROUTES:
        responses = doc["paths"][path][method]["responses"]
        assert "422" not in responses, (method, path)
        success = [s for s in responses if s.startswith("2")]
        assert len(success) == 1 and responses[success[0]]["content"], (method, path)
        errors = {s for s in responses if not s.startswith("2")}
        assert {"403", "404", "413"} <= errors, (method, path)
        if (method, path) in WITH_INPUT:
            assert "400" in errors, (method, path)
        for status in errors:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/PanelError", (method, path, status)
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "code"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]


async def test_bodies_and_bounds_are_documented(rig: Rig) -> None:
    doc = await document(rig)
    load = doc["paths"]["/panel/workers/{id}/load"]["post"]["requestBody"]
    assert load["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/LoadBody"
    }
    body = doc["components"]["schemas"]["LoadBody"]
    assert body["required"] == ["model"]
    assert body["properties"]["force"]["type"] == "boolean"
    params = {p["name"]: p["schema"] for p in doc["paths"]["/panel/estimate"]["get"]["parameters"]}
    assert (params["num_ctx"]["minimum"], params["num_ctx"]["maximum"]) == (1, 2**24)
    assert params["parallel"]["maximum"] == 1024
    assert params["kv_cache_type"]["enum"] == ["f16", "q8_0", "q4_0"]
    log = doc["paths"]["/panel/workers/{id}/log"]["get"]["parameters"]
    lines = next(p["schema"] for p in log if p["name"] == "lines")
    assert (lines["minimum"], lines["maximum"], lines["default"]) == (1, 10_000, 50)
    stop = doc["paths"]["/panel/processes/{pid}/stop"]["post"]
    assert stop["requestBody"]["required"] is False


# ---- the docs page -----------------------------------------------------------------------------


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


async def test_the_docs_page_uses_only_local_assets(rig: Rig) -> None:
    r = await rig.client.get("/panel/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assets = _Assets()
    assets.feed(r.text)
    assert sorted(assets.urls) == [
        "/panel/static/favicon.png",
        "/panel/static/swagger-ui-bundle.js",
        "/panel/static/swagger-ui.css",
    ]
    assert "http:" not in r.text and "https:" not in r.text and "//" not in r.text
    assert "url: '/panel/openapi.json'" in r.text
    assert '"validatorUrl": null' in r.text  # no badge fetched from swagger.io
    for url, kind in zip(
        sorted(assets.urls), ("image/png", "text/javascript", "text/css"), strict=True
    ):
        asset = await rig.client.get(url)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert len(asset.content) > 1000, url
    missing = await rig.client.get("/panel/static/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


# ---- real answers against the document ----------------------------------------------------------


async def test_answers_conform_to_the_document(rigs: Rigs) -> None:
    gpus = [gpu("GPU-0", 0, processes=(GpuProcess(4000, 1024), GpuProcess(777, 2048))), gpu()]
    node = FakeNode.of(
        [worker("a", refused_port()), worker("b", refused_port(), gpu_uuid="GPU-1", pid=None)],
        gpus=gpus,
    )
    node.pull_lines = [{"status": "downloading", "digest": "sha256:1", "total": 9, "completed": 3}]
    rig = await rigs.build(node)
    doc = await document(rig)
    c = rig.client
    rig.plane.traffic.open("a", "m", "team", "/v1/chat/completions", "POST")
    await rig.refresh()

    async def check(method: str, path: str, url: str, **kw: Any) -> Any:
        return conforms(doc, method, path, await c.request(method.upper(), url, **kw))

    assert (await check("get", "/panel/health", "/panel/health"))["status"] == "ok"
    snap = await check("get", "/panel/snapshot", "/panel/snapshot")
    assert snap["requests"] and snap["apps"]
    await check("get", "/panel/workers", "/panel/workers")
    await check("get", "/panel/warnings", "/panel/warnings")
    await check("get", "/panel/requests", "/panel/requests")
    await check("get", "/panel/workers/{id}/log", "/panel/workers/a/log?lines=1")
    await check("get", "/panel/estimate", "/panel/estimate?worker=a&model=m")
    await check("post", "/panel/workers/{id}/load", "/panel/workers/a/load", json={"model": "m"})
    await check(
        "post", "/panel/workers/{id}/unload", "/panel/workers/a/unload", json={"model": "m"}
    )
    await check("post", "/panel/workers/ensure", "/panel/workers/ensure")
    for action in ("start", "stop", "restart"):
        await check("post", f"/panel/workers/{{id}}/{action}", f"/panel/workers/a/{action}")
    await check("post", "/panel/apps", "/panel/apps", json={"name": "x", "workers": ["a"]})
    await check("get", "/panel/apps", "/panel/apps")
    await check("delete", "/panel/apps/{name}", "/panel/apps/x")
    await check("post", "/panel/processes/{pid}/stop", "/panel/processes/777/stop")
    # Errors, in the declared shape and status.
    await check("get", "/panel/estimate", "/panel/estimate?worker=a&num_ctx=0")  # 400
    await check("get", "/panel/workers/{id}/log", "/panel/workers/zz/log")  # 404
    await check("post", "/panel/processes/{pid}/stop", "/panel/processes/0/stop")  # 404
    await check("post", "/panel/apps", "/panel/apps", content=b" " * (2**20 + 1))  # 413
    # The pull's lines, each against its schema.
    r = await c.post("/panel/workers/a/pull", json={"model": "m"})
    line = schema_of(doc, "post", "/panel/workers/{id}/pull", 200, "application/x-ndjson")
    for text in r.text.splitlines():
        line.validate(json.loads(text))


@pytest.mark.parametrize("status", [400, 403, 404, 409, 413, 502, 503, 504])
async def test_error_statuses_share_one_schema(rig: Rig, status: int) -> None:
    doc = await document(rig)
    validator = schema_of(doc, "post", "/panel/workers/{id}/load", status)
    validator.validate({"error": {"message": "m", "type": "t", "code": None}})
    assert not validator.is_valid({"detail": [{"msg": "x"}]})
