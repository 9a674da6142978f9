"""The HTTP/JSON API (services/http) against a real stack: every endpoint answers what
its gRPC call answers, the OpenAPI document is served, and requests schemathesis
generates from it never get a 5xx and get answers that match it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.db.admin import create_api_key
from conveyor.v1 import jobs_pb2
from services.http.app import OPENAPI_FILE
from services.http.transcode import to_json
from tests.conftest import eventually, finished
from tests.integration.http_api import job_body, submit
from tests.stack import Stack

pytestmark = pytest.mark.integration


async def test_submit_get_list_history_and_stats_answer_what_grpc_answers(
    http: aiohttp.ClientSession, client: ConveyorClient
) -> None:
    tag = uuid.uuid4().hex[:8]
    job = await submit(http, labels={"suite": tag}, lane="bulk", priority=3)
    assert job["status"] == "JOB_STATUS_PENDING" and job["lane"] == "bulk"
    done = await finished(client, job["id"])

    async with http.get(f"/v1/jobs/{job['id']}") as r:
        assert r.status == 200
        got = (await r.json())["job"]
    assert got == to_json(done), "GetJob over HTTP is the gRPC job in its JSON mapping"
    assert got["contentJson"][0]["type"] == "text", "JSON bytes fields are JSON values"
    assert isinstance(got["requestJson"]["max_tokens"], int)

    second = await submit(http, labels={"suite": tag}, lane="bulk")
    await finished(client, second["id"])
    query = f"/v1/jobs?status=succeeded&lane=bulk&labels[suite]={tag}&page_size=1"
    async with http.get(query) as r:
        assert r.status == 200, await r.text()
        page = await r.json()
    assert [j["id"] for j in page["jobs"]] == [second["id"]], "newest first"
    async with http.get(f"{query}&page_token={page['nextPageToken']}") as r:
        rest = await r.json()
    assert [j["id"] for j in rest["jobs"]] == [job["id"]] and rest["nextPageToken"] == ""

    async with http.get(f"/v1/jobs/{job['id']}/history") as r:
        history = (await r.json())["entries"]
    assert [e["status"] for e in history] == [
        "JOB_STATUS_PENDING",
        "JOB_STATUS_RUNNING",
        "JOB_STATUS_SUCCEEDED",
    ]
    async with http.get("/v1/stats") as r:
        stats = await r.json()
    assert int(stats["counts"]["succeeded"]) >= 2 and stats["tenant"] == "default"


async def test_batch_cancel_and_retry_work_over_http(
    http: aiohttp.ClientSession, client: ConveyorClient
) -> None:
    body = {
        "jobs": [
            job_body("later", delay="60s"),
            job_body("fails", labels={"x-sim-fail": "400"}),
        ]
    }
    async with http.post("/v1/jobs:batch", json=body) as r:
        assert r.status == 200, await r.text()
        later, failing = (res["job"] for res in (await r.json())["results"])
    assert later["status"] == "JOB_STATUS_SCHEDULED"

    async with http.post(f"/v1/jobs/{later['id']}:cancel", json={"reason": "not needed"}) as r:
        assert r.status == 200, await r.text()
    assert (await client.get(later["id"])).status == jobs_pb2.JOB_STATUS_CANCELLED
    async with http.post(f"/v1/jobs/{later['id']}:cancel") as r:
        error = (await r.json())["error"]
    assert (r.status, error["code"]) == (400, "FAILED_PRECONDITION"), "a finished job"

    assert (await finished(client, failing["id"])).status == jobs_pb2.JOB_STATUS_FAILED
    async with http.post(f"/v1/jobs/{failing['id']}:retry") as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["job"]["status"] in ("JOB_STATUS_PENDING", "JOB_STATUS_RUNNING")
    await eventually(lambda: _attempts_at_least(client, failing["id"], 2), within_s=30, every_s=0.2)


async def _attempts_at_least(client: ConveyorClient, job_id: str, n: int) -> bool:
    return (await client.get(job_id)).attempts >= n


async def test_the_openapi_document_is_served_and_health_answers_without_a_key(
    anonymous: aiohttp.ClientSession,
) -> None:
    async with anonymous.get("/openapi.json") as r:
        assert r.status == 200
        assert await r.json() == json.loads(OPENAPI_FILE.read_text())
    async with anonymous.get("/healthz") as r:
        assert r.status == 200


# --------------------------------------------------------------------------- schemathesis


SCHEMATHESIS_CHECKS = (
    "not_a_server_error,response_schema_conformance,status_code_conformance,"
    "content_type_conformance"
)


@pytest.mark.timeout(180)
async def test_generated_requests_never_get_a_5xx_and_every_answer_matches_the_schema(
    stack: Stack, db: AsyncEngine, tmp_path: Path
) -> None:
    """schemathesis derives requests (valid and invalid) from openapi.json and checks each
    answer; the streams are left out (a label watch never ends; the SSE tests cover them).
    It acts for a tenant of its own: its generated calls pause lanes, cancel and delete
    jobs, and must not reach the other tests' tenants."""
    api_key, _ = await create_api_key(db, f"fuzz-{uuid.uuid4().hex[:8]}", "schemathesis", "member")
    done = await asyncio.to_thread(
        subprocess.run,
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            str(OPENAPI_FILE),
            "--url",
            stack.http_url,
            "-H",
            f"Authorization: Bearer {api_key}",
            "--checks",
            SCHEMATHESIS_CHECKS,
            "--exclude-path-regex",
            "/events$",
            "--max-examples",
            "20",
            "--max-time",
            "75",
            "--request-timeout",
            "20",
            "--workers",
            "1",
            "--no-shrink",
            # Hypothesis gives up on an operation when its generator discards too many
            # candidates (it happened for a path parameter now and then): a limit of
            # the generator, not an answer of the API.
            "--suppress-health-check",
            "filter_too_much",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=tmp_path,  # its .schemathesis folder goes there
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
