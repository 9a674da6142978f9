"""What jobs cost: each finished job's cost from its usage and the model's prices,
unpriced models reported as unpriced (never free), and GetStats's cost rows per
tenant, model and lane over a time window with the prompt cache report."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import InvalidArgument
from conveyor.core.pricing import PriceTable, cost_micros
from conveyor.server.webhooks import job_json
from conveyor.v1 import jobs_pb2
from tests.conftest import TenantClient, finished

pytestmark = pytest.mark.integration

PRICED = "claude-sonnet-4-5"
UNPRICED = "claude-invented-123"


def _usage(job: jobs_pb2.Job) -> dict[str, object]:
    """The whole usage object the provider reported."""
    return dict(json.loads(job.usage.usage_json))


async def test_a_finished_job_stores_what_its_usage_cost(
    db: AsyncEngine, tenant_client: TenantClient
) -> None:
    tenant = f"cost-{uuid.uuid4().hex[:6]}"
    async with tenant_client(tenant) as client:
        submitted = await client.submit(PRICED, "what does this cost?", max_tokens=64)
        assert not submitted.priced, "no cost before an attempt finished"
        job = await client.get((await finished(client, submitted.id, 30)).id)
    assert job.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    expected = cost_micros(PRICED, _usage(job), table=PriceTable())
    assert expected is not None and expected > 0
    assert job.priced and job.cost_micros == expected
    async with db.connect() as conn:
        row = (
            (await conn.execute(sa.text("SELECT * FROM jobs WHERE id = :id"), {"id": job.id}))
            .mappings()
            .one()
        )
    assert row["cost_micros"] == expected
    assert job_json(dict(row))["cost_micros"] == expected, "webhooks carry the cost"


async def test_a_model_missing_from_the_price_table_is_unpriced_not_free(
    tenant_client: TenantClient,
) -> None:
    tenant = f"unpriced-{uuid.uuid4().hex[:6]}"
    async with tenant_client(tenant) as client:
        submitted = await client.submit(UNPRICED, "and this?", max_tokens=16)
        job = await finished(client, submitted.id, 30)
        assert job.status == jobs_pb2.JOB_STATUS_SUCCEEDED
        assert job.usage.output_tokens > 0
        assert not job.priced and job.cost_micros == 0
        stats = await client.stats()
    (row,) = [r for r in stats.costs if r.model == UNPRICED]
    assert (row.jobs, row.unpriced_jobs, row.cost_micros) == (1, 1, 0)


async def test_stats_report_cost_per_tenant_model_and_lane_over_a_window(
    tenant_client: TenantClient,
) -> None:
    tenant = f"stats-{uuid.uuid4().hex[:6]}"
    async with tenant_client(tenant) as client:
        jobs = [
            await client.submit(PRICED, "one", max_tokens=32, lane="default"),
            await client.submit(PRICED, "two", max_tokens=32, lane="default"),
            await client.submit(PRICED, "three", max_tokens=32, lane="bulk"),
            await client.submit("claude-haiku-4-5", "four", max_tokens=32, lane="bulk"),
        ]
        done = [await finished(client, j.id, 30) for j in jobs]
        stats = await client.stats()
        rows = {(r.model, r.lane): r for r in stats.costs}
        assert set(rows) == {(PRICED, "default"), (PRICED, "bulk"), ("claude-haiku-4-5", "bulk")}
        assert all(r.tenant == tenant and r.unpriced_jobs == 0 for r in rows.values())
        assert rows[(PRICED, "default")].jobs == 2
        assert rows[(PRICED, "default")].cost_micros == done[0].cost_micros + done[1].cost_micros
        assert rows[("claude-haiku-4-5", "bulk")].cost_micros == done[3].cost_micros
        assert rows[(PRICED, "default")].tokens.output_tokens == sum(
            d.usage.output_tokens for d in done[:2]
        )
        assert stats.until.ToDatetime(UTC) - stats.since.ToDatetime(UTC) == timedelta(hours=24)

        # A window that ended before the jobs finished holds none of them.
        before = datetime.now(UTC) - timedelta(hours=1)
        empty = await client.stats(since=before - timedelta(hours=1), until=before)
        assert list(empty.costs) == []

        with pytest.raises(InvalidArgument) as refused:
            await client.stats(since=before, until=before - timedelta(minutes=1))
        assert "since" in str(refused.value)
