"""Retention and erasure on the real stack: the dispatcher purges finished jobs past
their tenant's retention, with their history, attempts and webhook deliveries (a
purged job is NOT_FOUND), keeps everything else, and counts the rows it deleted;
DeleteJob erases one finished job now and refuses a live one."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient, FailedPrecondition, InvalidArgument, NotFound
from conveyor.db.retention import set_retention
from conveyor.v1 import jobs_pb2
from tests.conftest import TenantClient, eventually, finished
from tests.stack import Backing, Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
ROOT = Path(__file__).resolve().parents[2]
DATA_TABLES = ("job_events", "job_attempts", "webhook_deliveries")


async def _finished_job(client: ConveyorClient, **fields: object) -> str:
    job = await client.submit(MODEL, "Say hi.", max_tokens=16, **fields)  # type: ignore[arg-type]
    done = await finished(client, job.id)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    return job.id


async def _age(db: AsyncEngine, job_id: str, days: int) -> None:
    """Make a finished job look `days` old."""
    async with db.connect() as conn:
        await conn.execute(
            sa.text(
                "UPDATE jobs SET finished_at = now() - make_interval(days => :d) WHERE id = :id"
            ),
            {"d": days, "id": uuid.UUID(job_id)},
        )


async def _rows(db: AsyncEngine, job_id: str) -> dict[str, int]:
    """Rows of the job in jobs and in each table of its data."""
    counts: dict[str, int] = {}
    async with db.connect() as conn:
        for table, column in (("jobs", "id"), *((t, "job_id") for t in DATA_TABLES)):
            counts[table] = int(
                (
                    await conn.execute(
                        sa.text(f"SELECT count(*) FROM {table} WHERE {column} = :id"),
                        {"id": uuid.UUID(job_id)},
                    )
                ).scalar_one()
            )
    return counts


def _purged_metric(stack: Stack, table: str) -> float:
    port = stack.env["CONVEYOR_DISPATCHER_METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    name = f'conveyor_retention_purged_rows_total{{table="{table}"}}'
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    return 0.0


async def test_finished_jobs_past_their_tenants_retention_are_purged_with_their_data(
    tenant_client: TenantClient, db: AsyncEngine, stack: Stack
) -> None:
    short, default, forever = (f"ret-{k}-{uuid.uuid4().hex[:6]}" for k in ("a", "b", "c"))
    await set_retention(db, short, 1)
    await set_retention(db, forever, 0)
    async with (
        tenant_client(short) as a,
        tenant_client(default) as b,
        tenant_client(forever) as c,
    ):
        # Webhooks to a closed port: each job has deliveries (failing, retried).
        hook = {"webhook_url": "http://127.0.0.1:9/hook"}
        expired = [await _finished_job(a, **hook) for _ in range(2)]
        recent = await _finished_job(a, **hook)
        waiting = await a.submit(MODEL, "later", max_tokens=16, delay=timedelta(hours=1))
        within_default = await _finished_job(b)
        kept_forever = await _finished_job(c)
        # Read before aging: once aged, the dispatcher may purge at any moment.
        before = _purged_metric(stack, "jobs")
        for job_id in expired:
            assert (await _rows(db, job_id))["webhook_deliveries"] > 0
        for job_id in expired:
            await _age(db, job_id, 2)  # past tenant a's one day
        await _age(db, within_default, 2)  # within the default 30 days
        await _age(db, kept_forever, 4000)  # retention 0: never purged

        async def purged() -> bool:
            return [(await _rows(db, j))["jobs"] for j in expired] == [0] * len(expired)

        await eventually(purged, within_s=30)
        for job_id in expired:
            assert await _rows(db, job_id) == dict.fromkeys(("jobs", *DATA_TABLES), 0)
            with pytest.raises(NotFound):
                await a.get(job_id)
        assert (await a.get(recent)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
        assert (await a.get(waiting.id)).status == jobs_pb2.JOB_STATUS_SCHEDULED
        assert (await b.get(within_default)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
        assert (await c.get(kept_forever)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
        assert (await _rows(db, recent))["job_events"] > 0
        assert _purged_metric(stack, "jobs") >= before + len(expired)
        assert _purged_metric(stack, "job_events") > 0


async def test_delete_job_erases_a_finished_job_and_its_data_now(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    job_id = await _finished_job(client, webhook_url="http://127.0.0.1:9/hook")
    assert (await _rows(db, job_id))["job_events"] > 0
    await client.delete(job_id)
    assert await _rows(db, job_id) == dict.fromkeys(("jobs", *DATA_TABLES), 0)
    with pytest.raises(NotFound):
        await client.get(job_id)
    with pytest.raises(NotFound):
        await client.delete(job_id)


async def test_delete_job_refuses_a_live_job_and_another_tenants_job(
    client: ConveyorClient, tenant_client: TenantClient, db: AsyncEngine
) -> None:
    waiting = await client.submit(MODEL, "later", max_tokens=16, delay=timedelta(hours=1))
    with pytest.raises(FailedPrecondition):
        await client.delete(waiting.id)
    assert (await client.get(waiting.id)).status == jobs_pb2.JOB_STATUS_SCHEDULED
    mine = await _finished_job(client)
    async with tenant_client("ret-intruder") as other:
        with pytest.raises(NotFound):
            await other.delete(mine)
        with pytest.raises(InvalidArgument) as bad:
            await other.delete("not-a-uuid")
    assert bad.value.field_violations[0][0] == "id"
    assert (await _rows(db, mine))["jobs"] == 1
    await client.cancel(waiting.id)


def _conveyor(backing: Backing, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONVEYOR_DATABASE_URL": backing.database_url}
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_tenants_set_retention_days_stores_the_tenants_retention(
    backing: Backing, db: AsyncEngine
) -> None:
    tenant = f"ret-cli-{uuid.uuid4().hex[:6]}"
    done = _conveyor(backing, "tenants", "set", tenant, "--retention-days", "7")
    assert done.returncode == 0, done.stderr
    assert "retention_days=7" in done.stdout
    async with db.connect() as conn:
        days = (
            await conn.execute(
                sa.text("SELECT retention_days FROM tenants WHERE tenant = :t"), {"t": tenant}
            )
        ).scalar_one()
    assert days == 7
