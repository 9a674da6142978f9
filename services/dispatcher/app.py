"""Start-up of the dispatcher: topology, the dead-letter consumer and the timers."""

from __future__ import annotations

import asyncio
import logging

from conveyor.bus import broker
from conveyor.bus.events import EventPublisher
from conveyor.bus.outbox import JobQueue, TenantLanes
from conveyor.core.config import Settings
from conveyor.server.runtime import backing_services, freeze_startup_heap

from .batcher import run_batcher
from .dead_letters import DeadLetterHandler
from .retention import run_retention
from .schedules import run_schedules
from .timers import run_timers, sample_queue_depths

log = logging.getLogger(__name__)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    async with backing_services(settings, "dispatcher") as (engine, connection):
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=64)
        topology = await broker.declare_topology(channel, settings.lanes, settings.max_priority)
        events_channel = await connection.channel(publisher_confirms=False)
        events_exchange = await events_channel.get_exchange(broker.EVENTS_EXCHANGE)
        events = EventPublisher(events_exchange)
        tag = await topology.dead_queue.consume(DeadLetterHandler(engine, events))
        tenants = None
        if settings.fair_tenants:
            tenants = TenantLanes(
                engine, channel, events_exchange, settings.lanes, settings.max_priority
            )
            await tenants.answer_queries(events_channel)
        queue = JobQueue(engine, topology.jobs, tenants=tenants, batch_lanes=settings.batch_lanes)
        timers = asyncio.create_task(run_timers(engine, queue, events, settings, stop))
        depths = asyncio.create_task(sample_queue_depths(connection, engine, settings, stop))
        firing = asyncio.create_task(run_schedules(engine, queue, events, settings, stop))
        purging = asyncio.create_task(run_retention(engine, settings, stop))
        batching = asyncio.create_task(run_batcher(engine, events, settings, stop))
        freeze_startup_heap()
        log.info("dispatcher ready")
        await stop.wait()
        await topology.dead_queue.cancel(tag)
        await timers
        await firing
        await purging
        await batching
        await queue.close()
        await depths
