"""Per-tenant limits: a submit quota (jobs per minute, refused whole with
RESOURCE_EXHAUSTED saying when to retry, nothing written) and a concurrency limit
(never more of the tenant's jobs running at once, over every worker)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ResourceExhausted
from conveyor.db.tenants import set_tenant_limits
from conveyor.v1 import jobs_pb2
from tests.conftest import TenantClient, finished
from tests.stack import Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"


def _request(prompt: str) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        model=MODEL, max_tokens=8, messages=[jobs_pb2.Message(role="user", content=prompt)]
    )


async def _count(db: AsyncEngine, tenant: str) -> int:
    async with db.connect() as conn:
        result = await conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE tenant = :t"), {"t": tenant}
        )
        return int(result.scalar_one())


async def test_a_tenant_over_its_submit_quota_is_told_when_to_retry(
    db: AsyncEngine, tenant_client: TenantClient
) -> None:
    tenant = f"quota-{uuid.uuid4().hex[:6]}"
    await set_tenant_limits(db, tenant, submit_per_minute=6)
    async with tenant_client(tenant) as client:
        accepted = [await client.submit(MODEL, f"job {i}", max_tokens=8) for i in range(4)]
        await client.submit_many([_request("a"), _request("b")])  # the quota's last two
        with pytest.raises(ResourceExhausted) as refused:
            await client.submit(MODEL, "one too many", max_tokens=8)
        with pytest.raises(ResourceExhausted):
            await client.submit_many([_request("c"), _request("d")])
        error = refused.value
        assert error.retry_after is not None
        assert timedelta(0) < error.retry_after <= timedelta(seconds=11), "a minute holds 6"
        assert "quota" in error.details and "retry in" in error.details
        assert await _count(db, tenant) == 6, "nothing was written for the refused calls"
        for job in accepted:
            assert (await finished(client, job.id, 30)).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_the_quota_of_a_tenant_without_its_own_comes_from_the_settings(
    stack: Stack, db: AsyncEngine, tenant_client: TenantClient
) -> None:
    tenant = f"plain-{uuid.uuid4().hex[:6]}"
    stack.stop("gateway")
    stack.start("gateway", CONVEYOR_TENANT_SUBMIT_PER_MINUTE="2")
    try:
        async with tenant_client(tenant) as client:
            first = await client.submit(MODEL, "1", max_tokens=8)
            await client.submit(MODEL, "2", max_tokens=8)
            with pytest.raises(ResourceExhausted) as refused:
                await client.submit(MODEL, "3", max_tokens=8)
            assert refused.value.retry_after is not None
            assert await _count(db, tenant) == 2
            assert (await finished(client, first.id, 30)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
    finally:
        stack.stop("gateway")
        stack.start("gateway")


async def test_a_tenant_never_runs_more_jobs_at_once_than_its_limit(
    db: AsyncEngine, tenant_client: TenantClient
) -> None:
    tenant = f"capped-{uuid.uuid4().hex[:6]}"
    await set_tenant_limits(db, tenant, max_running=2)
    async with tenant_client(tenant) as client:
        jobs = await client.submit_many(
            [
                jobs_pb2.SubmitJobRequest(
                    model=MODEL,
                    max_tokens=8,
                    messages=[jobs_pb2.Message(role="user", content=f"slow {i}")],
                    labels={"x-sim-latency-ms": "300"},
                )
                for i in range(8)
            ]
        )
        done = [await finished(client, job.id, 60) for job in jobs]
    assert all(j.status == jobs_pb2.JOB_STATUS_SUCCEEDED for j in done)
    assert all(j.attempts == 1 for j in done), "a deferred job keeps its attempts"
    async with db.connect() as conn:
        spans = (
            await conn.execute(
                sa.text(
                    "SELECT a.started_at, a.finished_at FROM job_attempts a"
                    " JOIN jobs j ON j.id = a.job_id WHERE j.tenant = :t"
                ),
                {"t": tenant},
            )
        ).all()
        running = (
            await conn.execute(
                sa.text("SELECT running FROM tenants WHERE tenant = :t"), {"t": tenant}
            )
        ).scalar_one()
    edges = sorted([(s.started_at, 1) for s in spans] + [(s.finished_at, -1) for s in spans])
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    assert most == 2, "two at a time: the limit, and no less"
    assert running == 0, "the count of running jobs is back to zero"
