"""The dead-letter consumer rides out a database outage: a dead letter whose job cannot
be written goes back to the queue after a pause, so more dead letters than the
consumer's prefetch (64) arriving while Postgres is unreachable are all recorded once
it is back, each job ending as dead."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import aio_pika
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.client import ConveyorClient
from tests.conftest import eventually
from tests.faults import FaultProxy
from tests.stack import Backing, Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
JOBS = 100
"""More than the dead-letter consumer's prefetch (64)."""


@pytest.fixture
def proxied_dispatcher(stack: Stack, backing: Backing) -> Iterator[FaultProxy]:
    """The stack's dispatcher, talking to Postgres through a proxy the test can cut."""
    url = make_url(backing.database_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    stack.stop("dispatcher")
    try:
        stack.start("dispatcher", CONVEYOR_DATABASE_URL=proxy.url(backing.database_url))
        yield proxy
    finally:
        proxy.restore()
        stack.stop("dispatcher")
        stack.start("dispatcher")
        proxy.close()


async def _statuses(db: AsyncEngine, ids: list[uuid.UUID]) -> dict[str, int]:
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT status, count(*) AS n FROM jobs WHERE id = ANY(:ids) GROUP BY status"),
            {"ids": ids},
        )
        return {r.status: r.n for r in rows}


async def _dead_letter(backing: Backing, jobs: list[tuple[uuid.UUID, str]]) -> None:
    """Have RabbitMQ dead-letter a message per job (they expire at once in a queue whose
    dead-letter exchange is Conveyor's), as it does with a job's message."""
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        doomed = await channel.declare_queue(
            f"test.doomed.{uuid.uuid4().hex[:8]}",
            auto_delete=False,
            arguments={
                "x-dead-letter-exchange": broker.DEAD_LETTER_EXCHANGE,
                "x-message-ttl": 0,
                "x-expires": 60_000,
            },
        )
        for job_id, tenant in jobs:
            message = broker.JobMessage(job_id=job_id, tenant=tenant)
            await channel.default_exchange.publish(
                aio_pika.Message(message.encode()), routing_key=doomed.name
            )


async def test_dead_letters_arriving_while_postgres_is_unreachable_end_their_jobs_as_dead(
    client: ConveyorClient,
    stack: Stack,
    backing: Backing,
    db: AsyncEngine,
    proxied_dispatcher: FaultProxy,
) -> None:
    # Scheduled an hour ahead, so only their dead letters move them.
    jobs = [
        await client.submit(MODEL, f"doomed {i}", max_tokens=8, delay=timedelta(hours=1))
        for i in range(JOBS)
    ]
    ids = [uuid.UUID(j.id) for j in jobs]
    proxied_dispatcher.cut()  # the dispatcher's Postgres is gone; everyone else's works
    try:
        await _dead_letter(backing, [(i, j.tenant) for i, j in zip(ids, jobs, strict=True)])

        async def failing() -> bool:
            return stack.log("dispatcher").count("dead letter not recorded") >= JOBS

        await eventually(failing, within_s=60)
        assert await _statuses(db, ids) == {"scheduled": JOBS}, "nothing written meanwhile"
    finally:
        proxied_dispatcher.restore()

    async def all_dead() -> bool:
        return await _statuses(db, ids) == {"dead": JOBS}

    await eventually(all_dead, within_s=60)
    async with db.connect() as conn:
        reasons = await conn.execute(
            sa.text("SELECT DISTINCT dead_reason FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}
        )
        assert [r.dead_reason for r in reasons] == ["dead-lettered (expired)"]
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(broker.DEAD_LETTER_QUEUE, passive=True)
        assert dead.declaration_result.message_count == 0, "every dead letter consumed"
