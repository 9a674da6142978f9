"""Fair sharing between tenants: one tenant's bulk backlog does not hold up another
tenant's jobs submitted after it; they start within the first few freed worker slots.

(bench/fairness.py measures the same with fairness on and off.)
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC

import aio_pika
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.client import ConveyorClient, FailedPrecondition
from conveyor.v1 import jobs_pb2
from tests.conftest import TenantClient, finished
from tests.stack import Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
BACKLOG = 5_000
WORKER_SLOTS = 16


def _request(prompt: str, **labels: str) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        model=MODEL,
        max_tokens=8,
        lane="bulk",
        messages=[jobs_pb2.Message(role="user", content=prompt)],
        labels=labels,
    )


async def _cancel_unfinished(client: ConveyorClient, db: AsyncEngine, tenant: str) -> None:
    async with db.connect() as conn:
        ids = (
            await conn.execute(
                sa.text(
                    "SELECT id::text FROM jobs WHERE tenant = :t"
                    " AND status IN ('pending', 'scheduled', 'running')"
                ),
                {"t": tenant},
            )
        ).scalars()
        pending = list(ids)

    async def cancel(job_id: str) -> None:
        with contextlib.suppress(FailedPrecondition):  # it finished meanwhile
            await client.cancel(job_id, reason="end of the fairness test")

    for start in range(0, len(pending), 200):
        await asyncio.gather(*(cancel(j) for j in pending[start : start + 200]))


async def test_a_tenants_backlog_does_not_hold_up_another_tenants_later_jobs(
    stack: Stack, db: AsyncEngine, tenant_client: TenantClient
) -> None:
    bulk, team = f"bulk-{uuid.uuid4().hex[:6]}", f"team-{uuid.uuid4().hex[:6]}"
    stack.stop("worker")
    stack.start("worker", CONVEYOR_WORKER_CONCURRENCY=str(WORKER_SLOTS))
    try:
        async with tenant_client(bulk) as a, tenant_client(team) as b:
            try:
                # A's backlog: 5,000 jobs of 200 ms on 16 slots, some 60 s of work.
                await a.submit_many(
                    [_request(f"bulk {i}", **{"x-sim-latency-ms": "200"}) for i in range(BACKLOG)]
                )
                later = await b.submit_many([_request(f"interactive-ish {i}") for i in range(5)])
                done = [await finished(b, job.id, 60) for job in later]
                assert all(j.status == jobs_pb2.JOB_STATUS_SUCCEEDED for j in done)
                submitted = min(j.created_at.ToDatetime(tzinfo=UTC) for j in done)
                last_start = max(j.started_at.ToDatetime(tzinfo=UTC) for j in done)
                async with db.connect() as conn:
                    counts = (
                        await conn.execute(
                            sa.text(
                                """
                                SELECT count(*) FILTER (WHERE started_at < :submitted) AS before,
                                       count(*) FILTER (WHERE started_at >= :submitted
                                                          AND started_at < :last) AS meanwhile
                                  FROM jobs WHERE tenant = :t
                                """
                            ),
                            {"t": bulk, "submitted": submitted, "last": last_start},
                        )
                    ).one()
                waits = [
                    round(
                        (j.started_at.ToDatetime() - j.created_at.ToDatetime()).total_seconds(), 3
                    )
                    for j in done
                ]
                print(
                    f"B's waits (s): {waits}; A's jobs started before B's submit: {counts.before},"
                    f" between B's submit and B's last start: {counts.meanwhile}"
                )
                # Without fairness the whole rest of A's backlog would have started first.
                assert BACKLOG - counts.before > BACKLOG // 2, "A's backlog was still there"
                assert counts.meanwhile < 100, "B waited for a few freed slots, not the backlog"
            finally:
                stack.stop("worker")
                await _cancel_unfinished(a, db, bulk)
    finally:
        connection = await aio_pika.connect(stack.backing.amqp_url)
        async with connection:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                queue = await channel.declare_queue(
                    broker.tenant_lane_queue("bulk", bulk), passive=True
                )
                await queue.purge()  # the cancelled jobs' messages: nothing left to run
        if stack.pid("worker") is not None:
            stack.stop("worker")
        stack.start("worker")
