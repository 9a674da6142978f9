"""What becomes of a job when things go wrong: every path ends in a known state."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import aio_pika
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.client import AlreadyExists, ConveyorClient
from conveyor.v1 import jobs_pb2
from tests.conftest import eventually, job_attempts, job_history
from tests.stack import Backing, Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"


async def _until(client: ConveyorClient, job_id: str, status: int) -> None:
    """Wait until the job reaches `status`."""

    async def reached() -> bool:
        return (await client.get(job_id)).status == status

    await eventually(reached)


async def test_a_permanent_provider_error_fails_the_job_at_once(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    job = await client.submit(MODEL, "x", max_tokens=8, labels={"x-sim-fail": "400"})
    done = await client.wait(job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_FAILED
    assert done.attempts == 1
    assert done.error.code == "invalid_request_error" and not done.error.retryable
    assert done.error.http_status == 400 and done.error.message
    assert [a.outcome for a in await job_attempts(db, job.id)] == ["failed"]


async def test_transient_errors_retry_until_attempts_run_out_then_the_job_is_dead(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    job = await client.submit(
        MODEL, "x", max_tokens=8, max_attempts=3, labels={"x-sim-fail": "529"}
    )
    done = await client.wait(job.id, 60)
    assert done.status == jobs_pb2.JOB_STATUS_DEAD
    assert done.attempts == 3
    assert "attempts exhausted" in done.dead_reason
    assert done.error.code == "overloaded_error" and done.error.retryable
    assert [a.outcome for a in await job_attempts(db, job.id)] == ["scheduled", "scheduled", "dead"]
    history = await job_history(db, job.id)
    assert history.count("running") == 3 and history[-1] == "dead"


async def test_a_dropped_stream_is_retried_as_a_connection_error(client: ConveyorClient) -> None:
    job = await client.submit(
        MODEL, "x", max_tokens=8, max_attempts=2, labels={"x-sim-fail": "drop"}
    )
    done = await client.wait(job.id, 60)
    assert done.status == jobs_pb2.JOB_STATUS_DEAD and done.attempts == 2
    assert done.error.code == "connection_error" and done.error.retryable


async def test_an_error_event_mid_stream_is_classified_by_its_type(client: ConveyorClient) -> None:
    job = await client.submit(
        MODEL, "x", max_tokens=8, max_attempts=1, labels={"x-sim-fail": "error-event"}
    )
    done = await client.wait(job.id, 60)
    assert done.status == jobs_pb2.JOB_STATUS_DEAD
    assert done.error.code == "overloaded_error" and done.error.retryable


async def test_retry_job_replays_a_failed_job_and_keeps_its_history(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    job = await client.submit(MODEL, "x", max_tokens=8, labels={"x-sim-fail": "401"})
    failed = await client.wait(job.id, 30)
    assert failed.status == jobs_pb2.JOB_STATUS_FAILED
    replayed = await client.retry(job.id)
    assert replayed.status == jobs_pb2.JOB_STATUS_PENDING
    again = await client.wait(job.id, 30)
    assert again.status == jobs_pb2.JOB_STATUS_FAILED and again.attempts == 2
    assert [a.outcome for a in await job_attempts(db, job.id)] == ["failed", "failed"]
    assert (await job_history(db, job.id)).count("failed") == 2


async def test_a_dead_job_retried_at_once_runs_again_whatever_the_dispatcher_does(
    client: ConveyorClient, db: AsyncEngine, stack: Stack
) -> None:
    """A job the worker wrote dead leaves no dead letter behind: one still queued when
    RetryJob revives the job would make the dispatcher kill the revived job again."""
    stack.stop("dispatcher")
    try:
        job = await client.submit(
            MODEL,
            "x",
            max_tokens=8,
            max_attempts=1,
            labels={"x-sim-fail": "529", "x-sim-fail-attempts": "1"},
        )
        dead = await client.wait(job.id, 30)
        assert dead.status == jobs_pb2.JOB_STATUS_DEAD
        stack.stop("worker")
        assert (await client.retry(job.id)).status == jobs_pb2.JOB_STATUS_PENDING
    finally:
        stack.start("dispatcher")
    try:
        await asyncio.sleep(2)  # the dispatcher consumes whatever waits in conveyor.dead
        assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_PENDING
    finally:
        stack.start("worker")
    done = await client.wait(job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 2
    assert (await job_history(db, job.id))[-4:] == ["dead", "pending", "running", "succeeded"]


async def test_a_queued_job_survives_a_worker_restart(client: ConveyorClient, stack: Stack) -> None:
    stack.stop("worker")
    try:
        jobs = [await client.submit(MODEL, f"queued {i}", max_tokens=8) for i in range(5)]
        await asyncio.sleep(0.5)
        for job in jobs:
            assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_PENDING
        stats = await client.stats()
        depth = {lane.lane: lane.queue_depth for lane in stats.lanes}
        assert depth["default"] >= 5
    finally:
        stack.start("worker")
    for job in jobs:
        done = await client.wait(job.id, 30)
        assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 1


async def test_a_job_whose_worker_was_killed_mid_call_is_recovered_and_finishes_once(
    client: ConveyorClient, stack: Stack, db: AsyncEngine
) -> None:
    job = await client.submit(MODEL, "slow", max_tokens=8, labels={"x-sim-latency-ms": "3000"})
    await _until(client, job.id, jobs_pb2.JOB_STATUS_RUNNING)
    stack.kill("worker")
    stack.start("worker")
    done = await client.wait(job.id, 60)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert done.attempts == 2, "the killed attempt counts; the second one finished"
    history = await job_history(db, job.id)
    assert history.count("succeeded") == 1
    assert "pending" in history[history.index("running") :], "recovered back to pending"


async def test_a_delayed_job_waits_in_scheduled_then_runs(client: ConveyorClient) -> None:
    job = await client.submit(MODEL, "later", max_tokens=8, delay=timedelta(seconds=1.5))
    assert job.status == jobs_pb2.JOB_STATUS_SCHEDULED
    done = await client.wait(job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    waited = done.started_at.ToDatetime() - done.created_at.ToDatetime()
    assert waited >= timedelta(seconds=1.5)


async def test_a_cancelled_scheduled_job_never_runs(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    job = await client.submit(MODEL, "never", max_tokens=8, delay=timedelta(seconds=1))
    cancelled = await client.cancel(job.id, reason="changed my mind")
    assert cancelled.status == jobs_pb2.JOB_STATUS_CANCELLED
    await asyncio.sleep(2)
    after = await client.get(job.id)
    assert after.status == jobs_pb2.JOB_STATUS_CANCELLED and after.attempts == 0
    assert [a.outcome for a in await job_attempts(db, job.id)] == []


async def test_cancelling_a_running_job_aborts_the_model_call_and_keeps_partial_text(
    client: ConveyorClient,
) -> None:
    job = await client.submit(
        MODEL,
        "long",
        max_tokens=200,
        labels={"x-sim-tokens": "200", "x-sim-tokens-per-second": "20"},
    )
    seen = 0
    async for event in client.watch(job.id):
        if event.WhichOneof("payload") == "token_delta":
            seen += 1
            if seen == 3:
                await client.cancel(job.id)
    done = await client.get(job.id)
    assert done.status == jobs_pb2.JOB_STATUS_CANCELLED
    assert done.result_text and len(done.result_text.split()) < 200
    assert done.cancel_requested_at.seconds > 0


async def test_an_idempotency_key_returns_the_first_job(client: ConveyorClient) -> None:
    key = f"order-{uuid.uuid4()}"
    first = await client.submit(MODEL, "once", max_tokens=8, idempotency_key=key)
    again = await client.submit(MODEL, "once", max_tokens=8, idempotency_key=key)
    assert again.id == first.id
    with pytest.raises(AlreadyExists):
        await client.submit(MODEL, "a different request", max_tokens=8, idempotency_key=key)


async def test_concurrent_submits_with_one_key_make_one_job(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    key = f"race-{uuid.uuid4()}"
    jobs = await asyncio.gather(
        *(client.submit(MODEL, "race", max_tokens=8, idempotency_key=key) for _ in range(8))
    )
    assert len({j.id for j in jobs}) == 1
    async with db.connect() as conn:
        n = (
            await conn.execute(
                sa.text("SELECT count(*) FROM jobs WHERE idempotency_key = :k"), {"k": key}
            )
        ).scalar_one()
    assert n == 1
    done = await client.wait(jobs[0].id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 1


async def test_poison_and_orphan_messages_are_dead_lettered_not_retried(
    client: ConveyorClient, backing: Backing, stack: Stack
) -> None:
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(broker.JOBS_EXCHANGE)
        await exchange.publish(aio_pika.Message(b"\x00not json"), routing_key="default")
        orphan = broker.JobMessage(job_id=uuid.uuid4(), tenant="default")
        await exchange.publish(aio_pika.Message(orphan.encode()), routing_key="default")
        expected = ("dead letter for a finished or unknown job", "unparseable dead letter dropped")

        async def both_seen() -> bool:
            return all(line in stack.log("dispatcher") for line in expected)

        await eventually(both_seen, within_s=20)
        dead = await channel.declare_queue(broker.DEAD_LETTER_QUEUE, passive=True)
        assert dead.declaration_result.message_count == 0, "the dispatcher consumed them"
    # The worker is still healthy afterwards.
    job = await client.wait((await client.submit(MODEL, "after poison", max_tokens=8)).id, 30)
    assert job.status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_pending_jobs_whose_messages_were_purged_still_run_exactly_once(
    client: ConveyorClient, stack: Stack, backing: Backing, db: AsyncEngine
) -> None:
    stack.stop("worker")
    try:
        jobs = [await client.submit(MODEL, f"purged {i}", max_tokens=8) for i in range(20)]
        ids = [uuid.UUID(j.id) for j in jobs]

        async def all_published() -> bool:
            async with db.connect() as conn:
                n = await conn.execute(
                    sa.text(
                        "SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND published_at IS NOT NULL"
                    ),
                    {"ids": ids},
                )
                return bool(n.scalar_one() == len(ids))

        await eventually(all_published)
        # The broker loses every waiting message, as when a queue is purged.
        connection = await aio_pika.connect(backing.amqp_url)
        async with connection:
            channel = await connection.channel()
            purged = 0
            for lane in stack.settings.lanes:
                for name in (broker.lane_queue(lane), broker.tenant_lane_queue(lane, "default")):
                    queue = await channel.declare_queue(name, passive=True)
                    purged += (await queue.purge()).message_count or 0
        assert purged >= len(jobs)
        for job in jobs:
            assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_PENDING
    finally:
        stack.start("worker")
    done = await asyncio.gather(*(client.wait(j.id, 60) for j in jobs))
    assert [(j.status, j.attempts) for j in done] == [(jobs_pb2.JOB_STATUS_SUCCEEDED, 1)] * 20
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT job_id, count(*) FILTER (WHERE status = 'succeeded') AS wins"
                " FROM job_events WHERE job_id = ANY(:ids) GROUP BY job_id"
            ),
            {"ids": ids},
        )
        assert {r.job_id: r.wins for r in rows} == dict.fromkeys(ids, 1), "each ran exactly once"
