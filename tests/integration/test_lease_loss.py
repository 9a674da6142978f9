"""A worker that lost its lease stops its model call: the job runs once more elsewhere,
succeeds exactly once, and the model is called at most twice (never two calls
streaming to the end for one job).

Each test resets the simulator's counters and runs one job, so `/stats` counts that
job's calls: `requests` (calls made), `completed` (streamed to the end) and
`client_disconnects` (calls the worker aborted).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.db import jobs as db_jobs
from conveyor.v1 import jobs_pb2
from tests.conftest import eventually, job_attempts, job_history
from tests.faults import FaultProxy
from tests.stack import Backing, Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
SLOW = {"x-sim-tokens": "80", "x-sim-tokens-per-second": "10"}
"""About 8 s of streaming: longer than the test stack's lease (4 s)."""


async def _simulator(stack: Stack, method: str, path: str, body: Any = None) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{stack.simulator_url}{path}", json=body) as resp,
    ):
        resp.raise_for_status()
        result: dict[str, Any] = await resp.json()
        return result


async def _calls(stack: Stack) -> dict[str, Any]:
    return await _simulator(stack, "GET", "/stats")


async def _status(db: AsyncEngine, job_id: str) -> str:
    async with db.connect() as conn:
        row = await conn.execute(
            sa.text("SELECT status FROM jobs WHERE id = :id"), {"id": uuid.UUID(job_id)}
        )
        return str(row.scalar_one())


async def _streaming(stack: Stack, client: ConveyorClient) -> str:
    """Submit the slow job and wait until its first call streams; its id."""
    await _simulator(stack, "POST", "/control", {"reset_stats": True})
    job = await client.submit(MODEL, "a long answer", max_tokens=100, labels=SLOW)

    async def streaming() -> bool:
        stats = await _calls(stack)
        return bool(stats["requests"] == 1 and stats["tokens_emitted"] > 0)

    await eventually(streaming, within_s=30)
    assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_RUNNING
    return job.id


async def _aborted(stack: Stack) -> bool:
    return bool((await _calls(stack))["client_disconnects"] == 1)


async def _succeeded_once_after_one_lost_attempt(
    stack: Stack, client: ConveyorClient, db: AsyncEngine, job_id: str
) -> None:
    done = await client.wait(job_id, 60)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 2
    assert [a.outcome for a in await job_attempts(db, job_id)] == ["lost", "succeeded"]
    assert (await job_history(db, job_id)).count("succeeded") == 1
    stats = await _calls(stack)
    assert stats["requests"] == 2, "the aborted call and the one that finished"
    assert stats["completed"] == 1 and stats["client_disconnects"] == 1


async def _take_over(db: AsyncEngine, job_id: str, lease_s: float) -> None:
    """As after a heartbeat lost for longer than the lease: the sweeper takes the job
    over, and the dispatcher's outbox publishes its next attempt."""
    async with db.connect() as conn:
        await conn.execute(
            sa.text("UPDATE jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = :id"),
            {"id": uuid.UUID(job_id)},
        )
        await conn.commit()
    assert [j.id for j in await db_jobs.requeue_stalled(db, lease_s)] == [uuid.UUID(job_id)]


async def _taken_over_while_streaming(
    stack: Stack, client: ConveyorClient, db: AsyncEngine, logged: str
) -> None:
    """A job's lease is taken over while its call streams: the call is aborted (the
    worker logs `logged`), and the next attempt succeeds once."""
    job_id = await _streaming(stack, client)
    await _take_over(db, job_id, stack.settings.lease_s)
    await eventually(lambda: _aborted(stack), within_s=30)
    assert logged in stack.log("worker")
    await _succeeded_once_after_one_lost_attempt(stack, client, db, job_id)


async def test_a_worker_whose_lease_was_taken_over_aborts_its_call_and_the_job_succeeds_once(
    client: ConveyorClient, stack: Stack, db: AsyncEngine
) -> None:
    # Its heartbeat or its claim of the next attempt, whichever comes first, tells it.
    await _taken_over_while_streaming(stack, client, db, "lease lost; model call aborted")


@pytest.fixture
def rare_heartbeats(stack: Stack) -> Iterator[None]:
    """The worker renews its leases every 30 s and the leases last 120 s, so within a
    test no heartbeat (and no sweep) tells the worker that a lease was taken over."""
    rare = {"CONVEYOR_LEASE_S": "120", "CONVEYOR_WORKER_HEARTBEAT_S": "30"}
    for name in ("dispatcher", "worker"):
        stack.stop(name)
        stack.start(name, **rare)
    try:
        yield
    finally:
        for name in ("dispatcher", "worker"):
            stack.stop(name)
            stack.start(name)


async def test_a_worker_that_claims_the_next_attempt_of_a_job_it_still_runs_aborts_the_earlier_call(
    client: ConveyorClient, stack: Stack, db: AsyncEngine, rare_heartbeats: None
) -> None:
    # The next attempt reaches the same worker long before its next heartbeat: the claim
    # itself ends the earlier call, which would otherwise stream to the end unwatched.
    await _taken_over_while_streaming(stack, client, db, "taken over by a later attempt")


@pytest.fixture
def proxied_worker(stack: Stack, backing: Backing) -> Iterator[FaultProxy]:
    """The stack's worker, talking to Postgres through a proxy the test can stall."""
    url = make_url(backing.database_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    stack.stop("worker")
    try:
        stack.start("worker", CONVEYOR_DATABASE_URL=proxy.url(backing.database_url))
        yield proxy
    finally:
        proxy.restore()
        stack.stop("worker")
        stack.start("worker")
        proxy.close()


async def test_a_worker_that_cannot_renew_its_lease_aborts_its_call_before_the_job_is_requeued(
    client: ConveyorClient, stack: Stack, db: AsyncEngine, proxied_worker: FaultProxy
) -> None:
    job_id = await _streaming(stack, client)
    proxied_worker.stall()  # the worker's database link hangs; the dispatcher's works
    try:
        # The worker aborts its call by itself, while its database is still unreachable.
        await eventually(lambda: _aborted(stack), within_s=30)

        async def requeued() -> bool:
            return await _status(db, job_id) == "pending"

        await eventually(requeued, within_s=30)  # by the dispatcher's sweeper
    finally:
        proxied_worker.restore()
    await _succeeded_once_after_one_lost_attempt(stack, client, db, job_id)
