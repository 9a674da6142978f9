"""The HTTP/JSON API (services/http) against a real stack: bearer keys and tenants as on
gRPC, one error shape with the field violations, refused requests that write nothing,
security headers, and no key in any log."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.db.admin import create_api_key
from conveyor.v1 import jobs_pb2
from tests.conftest import count_jobs
from tests.integration.http_api import job_body, submit
from tests.stack import Stack

pytestmark = pytest.mark.integration


async def test_a_call_without_a_valid_key_is_401_and_another_tenants_job_is_404(
    http: aiohttp.ClientSession,
    anonymous: aiohttp.ClientSession,
    client: ConveyorClient,
    db: AsyncEngine,
) -> None:
    before = await count_jobs(db)
    async with anonymous.post("/v1/jobs", json=job_body()) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "UNAUTHENTICATED"
    wrong = {"Authorization": "Bearer cvk_" + "x" * 43}
    async with anonymous.post("/v1/jobs", json=job_body(), headers=wrong) as r:
        assert r.status == 401
    async with anonymous.get("/v1/jobs", headers={"Authorization": "Basic abc"}) as r:
        assert r.status == 401
    assert await count_jobs(db) == before, "nothing written"

    job = await submit(http, delay="60s")
    other_key, _ = await create_api_key(db, "http-other", f"k-{uuid.uuid4().hex[:6]}", "member")
    other = {"Authorization": f"Bearer {other_key}"}
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/history"),
        ("POST", f"/v1/jobs/{job['id']}:cancel"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
    ]:
        async with anonymous.request(method, path, headers=other) as r:
            assert r.status == 404, (method, path, await r.text())
            assert (await r.json())["error"]["code"] == "NOT_FOUND"
    assert (await client.get(job["id"])).status == jobs_pb2.JOB_STATUS_SCHEDULED, "not cancelled"
    await client.cancel(job["id"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (job_body(maxTokens=0), "max_tokens"),
        (job_body(messages=[]), "messages"),
        (job_body(lane="nowhere"), "lane"),
        ({**job_body(), "maxTokens": "many"}, "maxTokens"),
        ({**job_body(), "colour": "blue"}, "colour"),
        (["not", "an", "object"], "body"),
    ],
)
async def test_bad_input_is_400_with_the_field_named_and_writes_nothing(
    http: aiohttp.ClientSession, db: AsyncEngine, body: Any, field: str
) -> None:
    before = await count_jobs(db)
    async with http.post("/v1/jobs", json=body) as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["http_status"] == 400
    assert [d["field"] for d in error["details"]] == [field]
    assert error["details"][0]["description"]
    assert await count_jobs(db) == before


async def test_malformed_json_unknown_parameters_and_paths_are_4xx_in_the_error_shape(
    http: aiohttp.ClientSession, db: AsyncEngine
) -> None:
    before = await count_jobs(db)
    async with http.post(
        "/v1/jobs", data=b'{"model": ', headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["details"][0]["field"] == "body"
    async with http.get("/v1/jobs?statuss=pending") as r:
        assert r.status == 400
        assert (await r.json())["error"]["details"][0]["field"] == "statuss"
    async with http.get("/v1/jobs?page_size=lots") as r:
        assert r.status == 400
    async with http.get("/v1/jobs/not-a-uuid") as r:
        assert r.status == 400
        assert (await r.json())["error"]["details"][0]["field"] == "id"
    async with http.get("/v1/nothing-here") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
    async with http.delete("/v1/jobs") as r:
        assert r.status == 405 and "error" in await r.json()
    assert await count_jobs(db) == before


async def test_a_body_beyond_the_size_limit_is_413_and_writes_nothing(
    http: aiohttp.ClientSession, db: AsyncEngine, stack: Stack
) -> None:
    from conveyor.server.runtime import max_request_bytes

    before = await count_jobs(db)
    huge = "x" * (2 * max_request_bytes(stack.settings) + 1)
    async with http.post("/v1/jobs", json=job_body(huge)) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert await count_jobs(db) == before


async def test_every_answer_has_a_content_security_policy_and_cors_is_off_by_default(
    http: aiohttp.ClientSession,
) -> None:
    origin = {"Origin": "https://elsewhere.example"}
    for path in ("/v1/stats", "/v1/nothing", "/healthz", "/openapi.json"):
        async with http.get(path, headers=origin) as r:
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert "Access-Control-Allow-Origin" not in r.headers


# --------------------------------------------------------------------------- logs


async def test_no_api_key_appears_in_any_log(
    http: aiohttp.ClientSession, anonymous: aiohttp.ClientSession, stack: Stack, api_key: str
) -> None:
    wrong = "cvk_" + uuid.uuid4().hex + "y" * 11
    await submit(http)
    async with anonymous.get("/v1/stats", headers={"Authorization": f"Bearer {wrong}"}) as r:
        assert r.status == 401
    async with http.get("/v1/jobs?api_key=" + wrong) as r:
        assert r.status == 400
    # A request aiohttp cannot parse (a NUL after the key): its parser quotes the line.
    host, port = stack.settings.http_host, stack.settings.http_port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /v1/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\x00\r\n\r\n".encode()
    )
    assert b" 400 " in await reader.readline()
    writer.close()
    await asyncio.sleep(0.5)  # the refusal is logged after the answer
    for name in ("http", "gateway", "notifier"):
        log = stack.log(name)
        assert api_key not in log and wrong not in log, name
