"""Jobs published together (conveyor.bus.broker.publish_jobs): each one is confirmed or
reported failed on its own, arrives as the message `publish_job` would have sent, and
shares its channel with publishes made one by one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType

from conveyor.bus import broker
from tests.stack import Backing

pytestmark = pytest.mark.integration


@pytest.fixture
async def confirming(backing: Backing) -> AsyncIterator[AbstractChannel]:
    """A channel with publisher confirms, as the gateway's and the dispatcher's."""
    connection = await aio_pika.connect_robust(backing.amqp_url)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def _route(channel: AbstractChannel, key: str) -> tuple[AbstractExchange, AbstractQueue]:
    """A direct exchange of its own and a queue bound to it by `key`."""
    exchange = await channel.declare_exchange(
        f"test.jobs.{uuid.uuid4().hex}", ExchangeType.DIRECT, auto_delete=True
    )
    queue = await channel.declare_queue(
        exclusive=True, arguments={"x-max-priority": 9, "x-queue-type": "classic"}
    )
    await queue.bind(exchange, routing_key=key)
    return exchange, queue


def _job(key: str, priority: int = 0) -> broker.JobPublish:
    message = broker.JobMessage(job_id=uuid.uuid4(), tenant="acme")
    return broker.JobPublish(message, key, priority, {"traceparent": "00-x", "n": priority})


async def _drain(queue: AbstractQueue, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    messages = []
    for _ in range(count):
        message = await queue.get(timeout=5, fail=True)
        assert message is not None
        await message.ack()
        messages.append(message)
    assert await queue.get(fail=False) is None, "nothing more than was published"
    return messages


async def test_jobs_published_together_are_each_confirmed_and_queued(
    confirming: AbstractChannel,
) -> None:
    exchange, queue = await _route(confirming, "default.acme")
    jobs = [_job("default.acme", i % 10) for i in range(broker.PUBLISH_CHUNK * 2 + 7)]

    results = await broker.publish_jobs(exchange, jobs, timeout_s=10)

    assert results == [None] * len(jobs)
    messages = await _drain(queue, len(jobs))
    assert {m.message_id for m in messages} == {str(j.message.job_id) for j in jobs}
    sent = {str(j.message.job_id): j for j in jobs}
    for message in messages:
        job = sent[str(message.message_id)]
        assert broker.JobMessage.decode(message.body) == job.message
        assert message.content_type == broker.JOB_CONTENT_TYPE
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.priority == job.priority
        assert message.headers == job.headers


async def test_a_job_no_queue_takes_is_reported_alone(confirming: AbstractChannel) -> None:
    exchange, queue = await _route(confirming, "default.acme")
    jobs = [_job("default.acme"), _job("nowhere.acme"), _job("default.acme")]

    results = await broker.publish_jobs(exchange, jobs, timeout_s=10)

    assert results[0] is None and results[2] is None
    assert isinstance(results[1], broker.Unroutable)
    await _drain(queue, 2)


async def test_publishes_together_and_one_by_one_share_a_channel(
    confirming: AbstractChannel,
) -> None:
    exchange, queue = await _route(confirming, "bulk.acme")
    together = [[_job("bulk.acme") for _ in range(50)] for _ in range(4)]
    alone = [_job("bulk.acme") for _ in range(30)]

    batches = asyncio.gather(
        *(broker.publish_jobs(exchange, jobs, timeout_s=10) for jobs in together)
    )
    singles = asyncio.gather(
        *(
            broker.publish_job(
                exchange, j.message, "bulk", j.priority, j.headers, j.routing_key, timeout_s=10
            )
            for j in alone
        )
    )
    outcomes, _ = await asyncio.gather(batches, singles)

    assert all(result is None for results in outcomes for result in results)
    await _drain(queue, 4 * 50 + 30)


async def test_a_closed_channel_fails_each_job_without_raising(backing: Backing) -> None:
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange, _ = await _route(channel, "default.acme")
        await channel.close()

        results = await broker.publish_jobs(exchange, [_job("default.acme")] * 3, timeout_s=5)

    assert len(results) == 3 and all(isinstance(r, Exception) for r in results)
