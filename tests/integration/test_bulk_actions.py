"""Bulk actions on the real stack, with hundreds of jobs: CancelJobs and RetryJobs act on
exactly the jobs their filter matches (up to the limit), a dry run counts without
changing anything, RedriveDeadJobs replays a tenant's dead jobs; every action is
audited with its actor, and each job's history names the action."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient, InvalidArgument, PermissionDenied
from conveyor.db.admin import create_api_key
from conveyor.v1 import jobs_pb2
from tests.conftest import TenantClient, eventually
from tests.stack import Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
FAST = {"x-sim-latency-ms": "0", "x-sim-tokens": "2", "x-sim-tokens-per-second": "0"}
"""Simulator labels: an answer at once, so hundreds of jobs run quickly."""


def _job(labels: dict[str, str], **fields: Any) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        model=MODEL,
        max_tokens=16,
        messages=[jobs_pb2.Message(role="user", content="Say hi.")],
        labels=labels,
        **fields,
    )


def _delayed(labels: dict[str, str]) -> jobs_pb2.SubmitJobRequest:
    request = _job(labels)
    request.delay.FromTimedelta(timedelta(hours=1))
    return request


async def _statuses(db: AsyncEngine, ids: list[str]) -> Counter[str]:
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT status FROM jobs WHERE id = ANY(:ids)"),
            {"ids": [uuid.UUID(i) for i in ids]},
        )
        return Counter(r.status for r in rows)


async def _all_in(db: AsyncEngine, ids: list[str], status: str) -> bool:
    return (await _statuses(db, ids)) == Counter({status: len(ids)})


async def _audit(db: AsyncEngine, tenant: str) -> list[Any]:
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT id, actor, action, matched, changed, filter FROM bulk_actions"
                " WHERE tenant = :t ORDER BY created_at"
            ),
            {"t": tenant},
        )
        return list(rows)


async def _last_event(db: AsyncEngine, job_id: str) -> Any:
    async with db.connect() as conn:
        return (
            await conn.execute(
                sa.text(
                    "SELECT status, actor, detail FROM job_events WHERE job_id = :id"
                    " ORDER BY seq DESC LIMIT 1"
                ),
                {"id": uuid.UUID(job_id)},
            )
        ).one()


async def test_cancel_jobs_cancels_exactly_the_matching_jobs_up_to_the_limit(
    tenant_client: TenantClient, db: AsyncEngine
) -> None:
    tenant = f"bulk-c-{uuid.uuid4().hex[:6]}"
    async with tenant_client(tenant) as client:
        doomed = [j.id for j in await client.submit_many([_delayed({"batch": "x"})] * 300)]
        spared = [j.id for j in await client.submit_many([_delayed({"batch": "y"})] * 100)]
        flt = client.job_filter(labels={"batch": "x"})

        dry = await client.cancel_jobs(flt, dry_run=True, limit=10_000)
        assert (dry.matched, dry.changed, dry.dry_run, dry.action_id) == (300, 0, True, "")
        assert await _all_in(db, doomed + spared, "scheduled")

        first = await client.cancel_jobs(flt, limit=200, reason="incident 42")
        assert (first.matched, first.changed) == (200, 200)
        assert await _statuses(db, doomed) == Counter({"cancelled": 200, "scheduled": 100})
        second = await client.cancel_jobs(flt, reason="incident 42")
        assert (second.matched, second.changed) == (100, 100)

        assert await _all_in(db, doomed, "cancelled")
        assert await _all_in(db, spared, "scheduled")
        audit = await _audit(db, tenant)
        assert [(a.action, a.matched, a.changed) for a in audit] == [
            ("cancel", 200, 200),
            ("cancel", 100, 100),
        ]
        assert all(a.actor.startswith(f"{tenant}/") for a in audit)
        assert audit[0].filter["labels"] == {"batch": "x"}
        event = await _last_event(db, doomed[0])
        assert event.status == "cancelled"
        assert event.actor == audit[0].actor
        assert event.detail["bulk_action_id"] in {str(a.id) for a in audit}
        assert event.detail["reason"] == "incident 42"


async def test_cancel_jobs_asks_the_workers_to_stop_matching_running_jobs(
    tenant_client: TenantClient, db: AsyncEngine
) -> None:
    async with tenant_client(f"bulk-r-{uuid.uuid4().hex[:6]}") as client:
        slow = {"kind": "slow", "x-sim-latency-ms": "60000"}
        ids = [j.id for j in await client.submit_many([_job(slow)] * 5)]
        await eventually(lambda: _all_in(db, ids, "running"), within_s=30)
        result = await client.cancel_jobs(
            client.job_filter(statuses=[jobs_pb2.JOB_STATUS_RUNNING], labels={"kind": "slow"})
        )
        assert (result.matched, result.cancel_requested, result.changed) == (5, 5, 0)
        await eventually(lambda: _all_in(db, ids, "cancelled"), within_s=30)


async def test_a_bulk_action_on_statuses_it_cannot_change_is_refused_and_changes_nothing(
    tenant_client: TenantClient, db: AsyncEngine
) -> None:
    async with tenant_client(f"bulk-v-{uuid.uuid4().hex[:6]}") as client:
        ids = [j.id for j in await client.submit_many([_delayed({"batch": "v"})] * 3)]
        with pytest.raises(InvalidArgument) as cancel:
            await client.cancel_jobs(
                client.job_filter(
                    statuses=[jobs_pb2.JOB_STATUS_SCHEDULED, jobs_pb2.JOB_STATUS_SUCCEEDED]
                )
            )
        assert cancel.value.field_violations[0][0] == "filter.statuses[1]"
        with pytest.raises(InvalidArgument) as retry:
            await client.retry_jobs(client.job_filter(statuses=[jobs_pb2.JOB_STATUS_PENDING]))
        assert retry.value.field_violations[0][0] == "filter.statuses[0]"
        with pytest.raises(InvalidArgument) as limit:
            await client.cancel_jobs(limit=10_001)
        assert limit.value.field_violations[0][0] == "limit"
        with pytest.raises(InvalidArgument) as lane:
            await client.cancel_jobs(client.job_filter(lane="nope"))
        assert lane.value.field_violations[0][0] == "filter.lane"
        assert await _all_in(db, ids, "scheduled")


@pytest.mark.timeout(300)
async def test_retry_jobs_and_redrive_dead_jobs_replay_hundreds_of_jobs(
    tenant_client: TenantClient, db: AsyncEngine, stack: Stack
) -> None:
    tenant = f"bulk-d-{uuid.uuid4().hex[:6]}"
    # The first attempt fails: permanently (400: failed) or with nothing left to retry
    # (529 with one attempt: dead). A replay's attempt succeeds.
    first_fails = {"x-sim-fail-attempts": "1", **FAST}
    async with tenant_client(tenant) as client:
        failed = [
            j.id
            for j in await client.submit_many(
                [_job({**first_fails, "x-sim-fail": "400", "kind": "bad"})] * 200
            )
        ]
        dead = [
            j.id
            for j in await client.submit_many(
                [_job({**first_fails, "x-sim-fail": "529", "kind": "overload"}, max_attempts=1)]
                * 100
            )
        ]
        await eventually(lambda: _all_in(db, failed, "failed"), within_s=120)
        await eventually(lambda: _all_in(db, dead, "dead"), within_s=120)

        dry = await client.retry_jobs(client.job_filter(labels={"kind": "bad"}), dry_run=True)
        assert (dry.matched, dry.changed) == (200, 0)
        assert await _all_in(db, failed, "failed")

        retried = await client.retry_jobs(client.job_filter(statuses=[jobs_pb2.JOB_STATUS_FAILED]))
        assert (retried.matched, retried.changed) == (200, 200)
        # A member cannot redrive another tenant's dead jobs; nothing changes.
        async with tenant_client(f"bulk-o-{uuid.uuid4().hex[:6]}") as other:
            with pytest.raises(PermissionDenied):
                await other.redrive_dead(tenant)
        assert await _all_in(db, dead, "dead")
        redriven = await client.redrive_dead()
        assert (redriven.matched, redriven.changed) == (100, 100)

        await eventually(lambda: _all_in(db, failed + dead, "succeeded"), within_s=120)
        audit = await _audit(db, tenant)
        assert [(a.action, a.changed) for a in audit] == [("retry", 200), ("redrive", 100)]
        event_statuses = await _history_statuses(db, dead[0])
        assert event_statuses[-4:] == ["dead", "pending", "running", "succeeded"]


async def _history_statuses(db: AsyncEngine, job_id: str) -> list[str]:
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT status FROM job_events WHERE job_id = :id ORDER BY seq"),
            {"id": uuid.UUID(job_id)},
        )
        return [r.status for r in rows]


async def test_an_operator_redrives_another_tenants_dead_jobs(
    tenant_client: TenantClient, db: AsyncEngine, stack: Stack
) -> None:
    tenant = f"bulk-e-{uuid.uuid4().hex[:6]}"
    async with tenant_client(tenant) as client:
        dead = [
            j.id
            for j in await client.submit_many(
                [_job({"x-sim-fail-attempts": "1", "x-sim-fail": "529", **FAST}, max_attempts=1)]
                * 20
            )
        ]
        await eventually(lambda: _all_in(db, dead, "dead"), within_s=60)
    key, _ = await create_api_key(db, "operators", f"op-{uuid.uuid4().hex[:8]}", "operator")
    async with ConveyorClient(stack.gateway, stack.notifier, api_key=key) as operator:
        result = await operator.redrive_dead(tenant)
    assert (result.matched, result.changed) == (20, 20)
    await eventually(lambda: _all_in(db, dead, "succeeded"), within_s=60)
    (audit,) = await _audit(db, tenant)
    assert audit.actor.startswith("operators/op-")
