"""Lane queues keep their backlog on disk (lazy, format version 2), and lane queues an
older deployment declared with other arguments keep working: RabbitMQ refuses to
redeclare them, so they are used as they are, with one warning, and the channel that
declares them stays open (it may carry consumers and unconfirmed publishes)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import ChannelPreconditionFailed

from conveyor.bus import broker
from conveyor.core.config import LANES
from conveyor.v1 import jobs_pb2
from tests.conftest import TenantClient, finished
from tests.stack import Backing, Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
LANE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "classic",
    "x-queue-mode": "lazy",
    "x-queue-version": 2,
    "x-max-priority": 9,
    "x-dead-letter-exchange": broker.DEAD_LETTER_EXCHANGE,
}
OLDER_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "classic",
    "x-max-priority": 9,
    "x-dead-letter-exchange": broker.DEAD_LETTER_EXCHANGE,
}
"""A lane queue's arguments before it was lazy."""


async def test_the_lane_queues_are_lazy_priority_queues(stack: Stack, backing: Backing) -> None:
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel()
        for lane in LANES:  # a declare with the same arguments is accepted, others are not
            await channel.declare_queue(
                broker.lane_queue(lane), durable=True, arguments=LANE_ARGUMENTS
            )
        with pytest.raises(ChannelPreconditionFailed):
            await channel.declare_queue(
                broker.lane_queue("default"), durable=True, arguments=OLDER_ARGUMENTS
            )


async def test_a_lane_queue_with_older_arguments_is_used_as_it_is(
    stack: Stack, backing: Backing, caplog: pytest.LogCaptureFixture
) -> None:
    lane = f"older{uuid.uuid4().hex[:8]}"
    name = broker.lane_queue(lane)
    connection = await aio_pika.connect_robust(backing.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(name, durable=True, arguments=OLDER_ARGUMENTS)
        try:
            with caplog.at_level(logging.WARNING, logger=broker.__name__):
                await broker.declare_topology(channel, (lane,), 9)
                topology = await broker.declare_topology(channel, (lane,), 9)
            assert not channel.is_closed
            warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
            assert len(warnings) == 1
            assert f"rabbitmqctl delete_queue {name} --if-empty" in warnings[0]

            # Bound and still ordered by priority.
            for priority in (0, 9):
                message = broker.JobMessage(uuid.uuid4(), f"p{priority}")
                await broker.publish_job(topology.jobs, message, lane, priority)
            first = await topology.lanes[lane].get(timeout=5)
            assert first is not None and first.priority == 9
            await first.ack()
        finally:
            await channel.queue_delete(name)


async def test_a_tenant_whose_lane_queues_have_older_arguments_still_runs_jobs(
    stack: Stack, backing: Backing, tenant_client: TenantClient
) -> None:
    tenant = f"older-{uuid.uuid4().hex[:8]}"
    names = [broker.tenant_lane_queue(lane, tenant) for lane in LANES]
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.declare_queue(name, durable=True, arguments=OLDER_ARGUMENTS)
    # The gateway declares them to publish, the worker to consume. (They stay: deleting
    # a queue the worker consumes would cancel its consumer.)
    async with tenant_client(tenant) as client:
        job = await client.submit(MODEL, "hello", max_tokens=8)
        assert (await finished(client, job.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
