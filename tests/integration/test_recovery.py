"""Retries, timeouts, shutdown and crashes: each ends with every job in a known state, once."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2
from tests.conftest import eventually, job_attempts, job_history
from tests.stack import Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"


async def _running(client: ConveyorClient, *job_ids: str) -> None:
    async def all_running() -> bool:
        jobs = [await client.get(j) for j in job_ids]
        return all(j.status == jobs_pb2.JOB_STATUS_RUNNING for j in jobs)

    await eventually(all_running, within_s=30, every_s=0.05)


async def test_a_rate_limited_job_waits_out_retry_after_then_succeeds(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    job = await client.submit(
        MODEL, "x", max_tokens=8, labels={"x-sim-fail": "429", "x-sim-fail-attempts": "1"}
    )
    done = await client.wait(job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 2
    first, second = await job_attempts(db, job.id)
    assert (first.outcome, second.outcome) == ("scheduled", "succeeded")
    # The simulator answers 429 with retry-after: 1; the retry honours it.
    assert second.started_at - first.finished_at >= timedelta(seconds=1)
    assert "scheduled" in await job_history(db, job.id)


async def test_a_hung_model_call_ends_at_the_jobs_timeout_as_a_transient_failure(
    client: ConveyorClient,
) -> None:
    job = await client.submit(
        MODEL,
        "x",
        max_tokens=8,
        max_attempts=1,
        timeout=timedelta(seconds=1),
        labels={"x-sim-latency-ms": "5000"},
    )
    done = await client.wait(job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_DEAD
    assert done.error.code == "timeout" and done.error.retryable
    assert done.finished_at.ToDatetime() - done.started_at.ToDatetime() < timedelta(seconds=4)


async def test_sigterm_lets_in_flight_jobs_finish_and_hands_back_the_rest(
    client: ConveyorClient, stack: Stack, db: AsyncEngine
) -> None:
    stack.stop("worker")
    stack.start("worker", CONVEYOR_WORKER_SHUTDOWN_GRACE_S="2")
    quick = await client.submit(MODEL, "quick", max_tokens=8, labels={"x-sim-latency-ms": "500"})
    slow = await client.submit(MODEL, "slow", max_tokens=8, labels={"x-sim-latency-ms": "4000"})
    await _running(client, quick.id, slow.id)
    stopping = stack.terminate("worker")
    try:
        assert await asyncio.to_thread(stopping.proc.wait, 20) == 0
        finished = await client.get(quick.id)
        assert finished.status == jobs_pb2.JOB_STATUS_SUCCEEDED, "finished within the grace period"
        handed_back = await client.get(slow.id)
        assert handed_back.status == jobs_pb2.JOB_STATUS_PENDING, "handed back, not lost"
        assert handed_back.max_attempts == slow.max_attempts + 1, "the shutdown costs no attempt"
    finally:
        stack.start("worker")
    done = await client.wait(slow.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 2
    assert [a.outcome for a in await job_attempts(db, slow.id)] == ["handed_back", "succeeded"]
    assert await job_history(db, slow.id) == [
        "pending",
        "running",
        "pending",
        "running",
        "succeeded",
    ]


async def test_a_job_that_loses_its_worker_on_its_last_attempt_is_dead_not_looping(
    client: ConveyorClient, stack: Stack
) -> None:
    job = await client.submit(
        MODEL, "x", max_tokens=8, max_attempts=1, labels={"x-sim-latency-ms": "3000"}
    )
    await _running(client, job.id)
    stack.kill("worker")
    stack.start("worker")
    done = await client.wait(job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_DEAD
    assert done.error.code == "worker_lost" and "worker was lost" in done.dead_reason
    assert done.attempts == 1


async def test_killing_a_worker_with_50_jobs_in_flight_loses_none_and_runs_none_twice(
    client: ConveyorClient, stack: Stack, db: AsyncEngine
) -> None:
    jobs = [
        await client.submit(MODEL, f"crash {i}", max_tokens=8, labels={"x-sim-latency-ms": "2500"})
        for i in range(50)
    ]
    ids = [j.id for j in jobs]
    await _running(client, *ids)
    stack.kill("worker")
    stack.start("worker")
    finished = await asyncio.gather(*(client.wait(j, 90) for j in ids))
    assert [j.status for j in finished] == [jobs_pb2.JOB_STATUS_SUCCEEDED] * 50
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT job_id, count(*) FILTER (WHERE status = 'succeeded') AS wins"
                " FROM job_events WHERE job_id = ANY(:ids) GROUP BY job_id"
            ),
            {"ids": [uuid.UUID(i) for i in ids]},
        )
        wins = {str(r.job_id): r.wins for r in rows}
    assert wins == dict.fromkeys(ids, 1), "every job finished exactly once"
    assert all(j.attempts == 2 for j in finished), "the killed attempt, then the one that finished"


async def test_the_wait_for_rate_limit_budget_counts_against_the_jobs_timeout(
    client: ConveyorClient, stack: Stack, db: AsyncEngine
) -> None:
    model = f"claude-scarce-{uuid.uuid4().hex[:6]}"  # one request a minute, for this test only
    stack.stop("worker")
    stack.start("worker", CONVEYOR_RATE_LIMITS=json.dumps({model: {"requests_per_minute": 1}}))
    try:
        first = await client.submit(model, "takes the only request", max_tokens=8)
        assert (await client.wait(first.id, 30)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
        starved = await client.submit(
            model, "waits", max_tokens=8, max_attempts=1, timeout=timedelta(seconds=2)
        )
        done = await client.wait(starved.id, 30)
    finally:
        stack.stop("worker")
        stack.start("worker")
    assert done.status == jobs_pb2.JOB_STATUS_DEAD, "not left waiting a minute for budget"
    assert done.error.code == "timeout" and done.error.retryable
    assert [a.outcome for a in await job_attempts(db, starved.id)] == ["dead"]
