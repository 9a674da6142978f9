"""Lane control, workers and priority changes on the real stack: a paused lane's jobs
wait pending (not failed) until it is resumed, for one tenant or, by an operator, for
every tenant, also across a worker restart; an operator lists the live workers and
drains one (it finishes its calls and exits); a waiting job's priority changes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import (
    ConveyorClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from conveyor.db.admin import create_api_key
from conveyor.v1 import jobs_pb2
from devtools import devstack
from tests.conftest import TenantClient, eventually, finished
from tests.stack import Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"


def _job(lane: str, **labels: str) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        model=MODEL,
        max_tokens=16,
        messages=[jobs_pb2.Message(role="user", content="Say hi.")],
        lane=lane,
        labels=labels,
    )


async def _statuses(db: AsyncEngine, ids: list[str]) -> Counter[str]:
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT status, attempts FROM jobs WHERE id = ANY(:ids)"),
            {"ids": [uuid.UUID(i) for i in ids]},
        )
        return Counter(f"{r.status}/{r.attempts}" for r in rows)


async def _all_succeeded(db: AsyncEngine, ids: list[str]) -> bool:
    return (await _statuses(db, ids)) == Counter({"succeeded/1": len(ids)})


@pytest.fixture
async def operator(stack: Stack, db: AsyncEngine) -> AsyncIterator[ConveyorClient]:
    key, _ = await create_api_key(db, "operators", f"op-{uuid.uuid4().hex[:8]}", "operator")
    async with ConveyorClient(stack.gateway, stack.notifier, api_key=key) as client:
        yield client


async def test_a_paused_lane_holds_its_jobs_pending_until_it_is_resumed(
    tenant_client: TenantClient, db: AsyncEngine
) -> None:
    tenant = f"lane-a-{uuid.uuid4().hex[:6]}"
    async with tenant_client(tenant) as client, tenant_client(f"lane-b-{tenant[7:]}") as other:
        pause = await client.pause_lane("bulk", reason="provider incident")
        assert (pause.lane, pause.tenant, pause.reason) == ("bulk", tenant, "provider incident")
        assert pause.paused_by.startswith(f"{tenant}/")
        assert [(p.lane, p.tenant) for p in await client.lane_pauses()] == [("bulk", tenant)]

        held = [j.id for j in await client.submit_many([_job("bulk")] * 20)]
        running = [j.id for j in await client.submit_many([_job("default")] * 5)]
        elsewhere = [j.id for j in await other.submit_many([_job("bulk")] * 5)]
        # The tenant's other lane, and another tenant's same lane, run as usual.
        await eventually(lambda: _all_succeeded(db, running + elsewhere), within_s=60)
        # Well past the dispatcher's republish of unclaimed jobs (5 s in the tests).
        for _ in range(3):
            assert await _statuses(db, held) == Counter({"pending/0": 20})
            await asyncio.sleep(2.5)

        assert await client.resume_lane("bulk")
        assert not await client.resume_lane("bulk")  # nothing left to resume
        await eventually(lambda: _all_succeeded(db, held), within_s=60)
        assert await client.lane_pauses() == []


async def test_only_an_operator_pauses_a_lane_of_every_tenant_and_a_restarted_worker_obeys(
    tenant_client: TenantClient, operator: ConveyorClient, db: AsyncEngine, stack: Stack
) -> None:
    async with tenant_client(f"lane-c-{uuid.uuid4().hex[:6]}") as client:
        with pytest.raises(PermissionDenied):
            await client.pause_lane("interactive", all_tenants=True)
        with pytest.raises(PermissionDenied):
            await client.pause_lane("interactive", tenant="someone-else")
        with pytest.raises(InvalidArgument) as bad:
            await client.pause_lane("nope")
        assert bad.value.field_violations[0][0] == "lane"
        # Other tests' tenants may hold pauses of their own; none holds every tenant.
        assert [p for p in await operator.lane_pauses() if p.tenant == "*"] == []

        pause = await operator.pause_lane("interactive", all_tenants=True)
        assert pause.tenant == "*"
        # A worker that starts now reads the pause from Postgres.
        stack.stop("worker")
        try:
            stack.start("worker")
            held = [j.id for j in await client.submit_many([_job("interactive")] * 10)]
            others = [j.id for j in await client.submit_many([_job("default")] * 3)]
            await eventually(lambda: _all_succeeded(db, others), within_s=60)
            await asyncio.sleep(2.0)
            assert await _statuses(db, held) == Counter({"pending/0": 10})
            # A member sees the every-tenant pause that holds its jobs.
            assert [(p.lane, p.tenant) for p in await client.lane_pauses()] == [
                ("interactive", "*")
            ]
        finally:
            await operator.resume_lane("interactive", all_tenants=True)
        await eventually(lambda: _all_succeeded(db, held), within_s=60)


async def test_a_waiting_jobs_priority_changes_and_other_jobs_refuse_it(
    tenant_client: TenantClient, db: AsyncEngine
) -> None:
    async with tenant_client(f"lane-p-{uuid.uuid4().hex[:6]}") as client:
        scheduled = await client.submit(MODEL, "later", max_tokens=16, delay=timedelta(hours=1))
        assert (await client.set_priority(scheduled.id, 7)).priority == 7
        assert (await client.get(scheduled.id)).priority == 7

        await client.pause_lane("bulk")
        (pending,) = await client.submit_many([_job("bulk")])
        raised = await client.set_priority(pending.id, 9)
        assert (raised.priority, raised.status) == (9, jobs_pb2.JOB_STATUS_PENDING)
        await client.resume_lane("bulk")
        # Queued again at its new priority; the old message is skipped: one attempt.
        done = await finished(client, pending.id)
        assert (done.status, done.priority, done.attempts) == (
            jobs_pb2.JOB_STATUS_SUCCEEDED,
            9,
            1,
        )

        with pytest.raises(FailedPrecondition):
            await client.set_priority(pending.id, 1)
        with pytest.raises(InvalidArgument) as bad:
            await client.set_priority(scheduled.id, 10)
        assert bad.value.field_violations[0][0] == "priority"
        async with tenant_client("lane-p-intruder") as other:
            with pytest.raises(NotFound):
                await other.set_priority(scheduled.id, 1)
        assert (await client.get(scheduled.id)).priority == 7
        await client.cancel(scheduled.id)


def _start_worker_2(stack: Stack) -> None:
    stack.start_extra(
        devstack.Service("worker-2", "services.worker", "log"), CONVEYOR_WORKER_METRICS_PORT="0"
    )


@pytest.fixture
def worker_2(stack: Stack) -> Iterator[devstack.Started]:
    _start_worker_2(stack)
    try:
        yield stack.procs["worker-2"]
    finally:
        with contextlib.suppress(Exception):
            stack.stop("worker-2")


async def test_an_operator_lists_the_workers_and_drains_one(
    tenant_client: TenantClient,
    operator: ConveyorClient,
    db: AsyncEngine,
    stack: Stack,
    worker_2: devstack.Started,
) -> None:
    async def two_workers() -> bool:
        return len(await operator.workers()) >= 2

    await eventually(two_workers, within_s=30)
    workers = await operator.workers()
    pids = {w.pid: w for w in workers}
    assert worker_2.proc.pid in pids
    mine = pids[worker_2.proc.pid]
    assert list(mine.lanes) == ["interactive", "default", "bulk"]
    assert mine.concurrency == 64 and not mine.draining

    async with tenant_client(f"lane-w-{uuid.uuid4().hex[:6]}") as client:
        with pytest.raises(PermissionDenied):
            await client.workers()
        with pytest.raises(PermissionDenied):
            await client.drain_worker(mine.id)
        slow = {"x-sim-latency-ms": "3000"}
        # Only worker-2 takes jobs meanwhile, so that it is the one with calls to finish.
        stack.stop("worker")
        try:
            ids = [j.id for j in await client.submit_many([_job("default", **slow)] * 20)]

            async def busy() -> bool:
                return any(w.in_flight > 0 for w in await operator.workers() if w.id == mine.id)

            await eventually(busy, within_s=30)
            drained = await operator.drain_worker(mine.id)
            assert drained.draining
            # It finishes its calls (none handed back), takes no new ones, and exits.
            await eventually(lambda: _exited(worker_2), within_s=60)
            assert worker_2.proc.returncode == 0
        finally:
            stack.start("worker")
        await eventually(lambda: _all_succeeded(db, ids), within_s=60)
        assert mine.id not in {w.id for w in await operator.workers()}
        with pytest.raises(NotFound):
            await operator.drain_worker("no-such-worker")
    assert '"msg":"drained"' in stack.log("worker-2")


async def _exited(started: devstack.Started) -> bool:
    return started.proc.poll() is not None
