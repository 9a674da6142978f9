"""Periodic control-plane work, each step safe to run in several dispatchers at once
(rows are picked with FOR UPDATE SKIP LOCKED):

- due: scheduled jobs (delays, retry timers) whose time has come become pending;
- stalled: running jobs without a heartbeat within the lease go back to pending
  (or to dead, when that was their last attempt);
- outbox: pending jobs the broker never confirmed are published (again);
- lost messages: pending jobs published longer ago than CONVEYOR_PENDING_REPUBLISH_S
  and still not claimed are published again (their message may be gone: a purged or
  lost queue). Postgres is the source of truth; a duplicate message is harmless,
  since a claim only moves a pending job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aio_pika.abc import AbstractConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.broker import DEAD_LETTER_QUEUE, lane_queue, queue_depths, tenant_lane_queue
from conveyor.bus.events import EventPublisher
from conveyor.bus.outbox import JobQueue
from conveyor.core.config import Settings
from conveyor.core.lifecycle import JobState
from conveyor.core.metrics import JOBS_FINISHED, QUEUE_DEPTH
from conveyor.db import sweeps as db
from conveyor.db.tenants import tenant_names

log = logging.getLogger(__name__)


async def tick(
    engine: AsyncEngine, queue: JobQueue, events: EventPublisher, settings: Settings
) -> dict[str, int]:
    """One pass of every timer; returns how many jobs each step moved."""
    due = await db.release_due(engine)
    recovered = await db.requeue_stalled(engine, settings.lease_s)
    stalled = [j for j in recovered if j.status == JobState.PENDING]
    lost = [j for j in recovered if j.status == JobState.DEAD]
    if recovered:
        log.warning("stalled jobs recovered", extra={"requeued": len(stalled), "dead": len(lost)})
    for job in recovered:
        await events.publish_status(job, JobState.RUNNING.value)
    for job in lost:
        JOBS_FINISHED.labels(job.lane, JobState.DEAD.value).inc()
    unconfirmed = await db.unpublished(engine, older_than_s=settings.outbox_after_s)
    stale = await db.stale_pending(engine, older_than_s=settings.pending_republish_s)
    if stale:
        log.warning("pending jobs not claimed in time; published again", extra={"jobs": len(stale)})
    published = await queue.enqueue([*due, *stalled, *unconfirmed, *stale])
    return {
        "due": len(due),
        "stalled": len(stalled),
        "lost": len(lost),
        "unconfirmed": len(unconfirmed),
        "republished": len(stale),
        "published": published,
    }


async def run_timers(
    engine: AsyncEngine,
    queue: JobQueue,
    events: EventPublisher,
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        try:
            moved = await tick(engine, queue, events, settings)
            if any(moved.values()):
                log.info("timers", extra=moved)
        except Exception as exc:  # Postgres or RabbitMQ away: try again next tick
            log.warning("timer pass failed", extra={"error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.dispatcher_interval_s)


async def sample_queue_depths(
    connection: AbstractConnection,
    engine: AsyncEngine,
    settings: Settings,
    stop: asyncio.Event,
    every_s: float = 5.0,
) -> None:
    """Keep the queue-depth gauges current: per lane (its shared queue and every
    tenant's queue of it, summed) and the dead-letter queue."""
    while not stop.is_set():
        try:
            async with engine.connect() as conn:
                tenants = await tenant_names(conn)
        except Exception as exc:  # Postgres away: sample the shared queues only
            log.debug("tenant list unavailable", extra={"error": repr(exc)})
            tenants = []
        per_lane = {
            lane: [lane_queue(lane), *(tenant_lane_queue(lane, t) for t in tenants)]
            for lane in settings.lanes
        }
        names = [name for names in per_lane.values() for name in names]
        depths = await queue_depths(connection, [*names, DEAD_LETTER_QUEUE])
        for lane, queues in per_lane.items():
            found = [depths[q] for q in queues if q in depths]
            if found:
                QUEUE_DEPTH.labels(lane_queue(lane)).set(sum(found))
        if DEAD_LETTER_QUEUE in depths:
            QUEUE_DEPTH.labels(DEAD_LETTER_QUEUE).set(depths[DEAD_LETTER_QUEUE])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
