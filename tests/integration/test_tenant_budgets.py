"""Tenants' budgets: a submit whose worst case would pass the tenant's daily or
monthly limit is RESOURCE_EXHAUSTED (ErrorInfo BUDGET_EXHAUSTED, RetryInfo until the
next period) with nothing written; reservations are released when a job finishes
without spending them; the limit is exact under concurrent submits through two
gateways; and jobs accepted before the limit run to the end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient, FailedPrecondition, ResourceExhausted
from conveyor.db.admin import create_api_key, set_tenant
from conveyor.v1 import jobs_pb2
from devtools import devstack
from tests.conftest import TenantClient, finished
from tests.stack import Stack, free_ports

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
LATER = timedelta(hours=1)
"""Jobs submitted with this delay stay scheduled, so their reservations stay put."""


async def _spend(db: AsyncEngine, tenant: str) -> tuple[int, int]:
    """The ledger's (day, month) micro-dollars of the tenant."""
    async with db.connect() as conn:
        row = (
            await conn.execute(
                sa.text("SELECT day_micros, month_micros FROM tenant_spend WHERE tenant = :t"),
                {"t": tenant},
            )
        ).one()
    return int(row.day_micros), int(row.month_micros)


async def _reserved(db: AsyncEngine, tenant: str) -> list[int]:
    async with db.connect() as conn:
        result = await conn.execute(
            sa.text("SELECT budget_micros FROM jobs WHERE tenant = :t"), {"t": tenant}
        )
        return [int(v) for v in result.scalars()]


async def test_a_submit_over_the_daily_budget_is_refused_until_the_next_day(
    db: AsyncEngine, tenant_client: TenantClient
) -> None:
    tenant = f"budget-{uuid.uuid4().hex[:6]}"
    # Each job's worst case: 1,000 output tokens at $15/M = $0.015, plus its input.
    await set_tenant(db, tenant, daily_budget_usd=0.04)
    async with tenant_client(tenant) as client:
        first = await client.submit(MODEL, "one", max_tokens=1000, delay=LATER)
        await client.submit(MODEL, "two", max_tokens=1000, delay=LATER)
        with pytest.raises(ResourceExhausted) as refused:
            await client.submit(MODEL, "three", max_tokens=1000, delay=LATER)
        error = refused.value
        assert error.reason == "BUDGET_EXHAUSTED"
        assert error.info["period"] == "daily" and error.info["limit_micros"] == "40000"
        now = datetime.now(UTC)
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
        assert error.retry_after is not None
        assert abs(error.retry_after - (midnight - now)) < timedelta(seconds=30)
        reserved = await _reserved(db, tenant)
        assert len(reserved) == 2, "nothing was written for the refused submit"
        assert await _spend(db, tenant) == (sum(reserved), sum(reserved))
        async with db.connect() as conn:
            others = await conn.execute(
                sa.text("SELECT budget_micros FROM jobs WHERE tenant = :t AND id <> :id"),
                {"t": tenant, "id": first.id},
            )
            reserved_after = [0, int(others.scalar_one())]

        # A cancelled job never spent its reservation: it is released, and a job fits.
        await client.cancel(first.id)
        assert (await finished(client, first.id, 10)).status == jobs_pb2.JOB_STATUS_CANCELLED
        assert await _spend(db, tenant) == (reserved_after[1], reserved_after[1])
        await client.submit(MODEL, "three again", max_tokens=1000, delay=LATER)


async def test_the_monthly_budget_counts_too(db: AsyncEngine, tenant_client: TenantClient) -> None:
    tenant = f"monthly-{uuid.uuid4().hex[:6]}"
    await set_tenant(db, tenant, daily_budget_usd=100, monthly_budget_usd=0.02)
    async with tenant_client(tenant) as client:
        await client.submit(MODEL, "one", max_tokens=1000, delay=LATER)
        with pytest.raises(ResourceExhausted) as refused:
            await client.submit(MODEL, "two", max_tokens=1000, delay=LATER)
    assert refused.value.reason == "BUDGET_EXHAUSTED"
    assert refused.value.info["period"] == "monthly"
    assert refused.value.retry_after is not None and refused.value.retry_after > timedelta(0)
    assert len(await _reserved(db, tenant)) == 1


async def test_a_budgeted_tenant_cannot_submit_to_an_unpriced_model(
    db: AsyncEngine, tenant_client: TenantClient
) -> None:
    tenant = f"unpriced-{uuid.uuid4().hex[:6]}"
    await set_tenant(db, tenant, daily_budget_usd=10)
    async with tenant_client(tenant) as client:
        with pytest.raises(FailedPrecondition) as refused:
            await client.submit("claude-invented-123", "hi", max_tokens=10)
    assert "no price" in refused.value.details
    assert await _reserved(db, tenant) == []


async def test_a_job_accepted_before_the_limit_runs_to_the_end_and_settles_its_cost(
    db: AsyncEngine, tenant_client: TenantClient
) -> None:
    tenant = f"settle-{uuid.uuid4().hex[:6]}"
    await set_tenant(db, tenant, daily_budget_usd=1)
    async with tenant_client(tenant) as client:
        job = await client.submit(MODEL, "run me", max_tokens=200, delay=timedelta(seconds=2))
        (reservation,) = await _reserved(db, tenant)
        await set_tenant(db, tenant, daily_budget_usd=0)  # the limit drops under it
        with pytest.raises(ResourceExhausted):
            await client.submit(MODEL, "refused", max_tokens=200)
        done = await finished(client, job.id, 60)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.priced
    assert done.cost_micros < reservation
    assert await _spend(db, tenant) == (done.cost_micros, done.cost_micros)


@pytest.fixture
async def second_gateway(stack: Stack) -> AsyncIterator[str]:
    (port,) = free_ports(1)
    name = "gateway-budgets"
    stack.start_extra(
        devstack.Service(name, "services.gateway", "grpc", f"127.0.0.1:{port}", "JobService"),
        CONVEYOR_GATEWAY_PORT=str(port),
        CONVEYOR_GATEWAY_METRICS_PORT="0",
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stack.stop(name)


async def test_the_budget_is_exact_under_concurrent_submits_through_two_gateways(
    db: AsyncEngine, stack: Stack, second_gateway: str
) -> None:
    tenant = f"race-{uuid.uuid4().hex[:6]}"
    limit_usd = 0.25
    await set_tenant(db, tenant, daily_budget_usd=limit_usd)
    key, _ = await create_api_key(db, tenant, "race", "member")
    async with (
        ConveyorClient(stack.gateway, stack.notifier, api_key=key) as one,
        ConveyorClient(second_gateway, stack.notifier, api_key=key) as two,
    ):

        async def submit(i: int) -> bool:
            client = one if i % 2 else two
            try:
                await client.submit(MODEL, f"job {i:03d}", max_tokens=1000, delay=LATER)
            except ResourceExhausted as exc:
                assert exc.reason == "BUDGET_EXHAUSTED"
                return False
            return True

        accepted = sum(await asyncio.gather(*(submit(i) for i in range(40))))
    reserved = await _reserved(db, tenant)
    assert len(reserved) == accepted and len(set(reserved)) == 1, "identical jobs"
    each, limit = reserved[0], round(limit_usd * 1e6)
    assert accepted * each <= limit < (accepted + 1) * each, "every job that fitted, no more"
    assert await _spend(db, tenant) == (sum(reserved), sum(reserved))
