"""The dispatcher's schedule pass: fire the due occurrences of every schedule, then
queue their jobs.

Each occurrence's job is inserted with its `schedule_fires` row in one transaction
(conveyor.db.schedules.fire_due), so several dispatchers fire each occurrence once.
The jobs are published after the commit; one whose publish fails is the outbox
reconciler's, like any submitted job's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.events import EventPublisher
from conveyor.bus.outbox import JobQueue
from conveyor.contract.validation import validate_submit
from conveyor.core.config import Settings
from conveyor.core.lifecycle import JobState
from conveyor.core.metrics import JOBS_SUBMITTED, SCHEDULE_FIRES
from conveyor.core.telemetry import current_ids, tracer
from conveyor.db import schedules as db
from conveyor.db.jobs import NewJob
from conveyor.v1 import jobs_pb2

log = logging.getLogger(__name__)

SCHEDULE_LABEL = "conveyor.schedule_id"
"""The label every job of a schedule carries (ListJobs filters by it)."""


def idempotency_key(schedule_id: object, fire_at: datetime) -> str:
    """The idempotency key of an occurrence's job: one job per occurrence, by key too."""
    return f"schedule:{schedule_id}:{fire_at.astimezone(UTC).isoformat()}"


def job_maker(settings: Settings) -> Callable[[Mapping[str, Any], datetime], NewJob]:
    """Turns a schedule row and an occurrence into the job to insert, checked as a
    submit is (a template the settings now refuse raises InvalidArgument)."""

    def make(row: Mapping[str, Any], fire_at: datetime) -> NewJob:
        request = jobs_pb2.SubmitJobRequest.FromString(row["template"])
        job = validate_submit(request, settings, row["tenant"], prefix="template.", now=fire_at)
        job.idempotency_key = idempotency_key(row["id"], fire_at)
        job.labels = {**job.labels, SCHEDULE_LABEL: str(row["id"])}
        with tracer().start_as_current_span("schedule fire") as span:
            span.set_attribute("conveyor.schedule.id", str(row["id"]))
            span.set_attribute("conveyor.job.id", str(job.id))
            job.trace_id, job.traceparent = current_ids()
        job.trace_id = job.trace_id or None
        job.traceparent = job.traceparent or None
        return job

    return make


async def fire(
    engine: AsyncEngine,
    queue: JobQueue,
    events: EventPublisher,
    settings: Settings,
    make: Callable[[Mapping[str, Any], datetime], NewJob],
) -> int:
    """One pass: fire what is due, queue the jobs; how many occurrences fired."""
    fired, broken = await db.fire_due(
        engine, make, datetime.now(UTC), timedelta(seconds=settings.schedule_misfire_grace_s)
    )
    for schedule_id, why in broken:
        log.error(
            "schedule paused: its template makes no valid job",
            extra={"schedule_id": str(schedule_id), "error": why},
        )
    if not fired:
        return 0
    rows = [f.job for f in fired]
    for f in fired:
        SCHEDULE_FIRES.labels(str(f.late).lower()).inc()
        JOBS_SUBMITTED.labels(f.job.lane).inc()
    await queue.enqueue([j for j in rows if j.status == JobState.PENDING])
    try:
        await events.publish_statuses(rows, None)
    except Exception as exc:  # events are advisory; the rows are the record
        log.warning("event publish failed", extra={"jobs": len(rows), "error": repr(exc)})
    log.info(
        "schedules fired",
        extra={"jobs": len(rows), "late": sum(f.late for f in fired)},
    )
    return len(rows)


async def run_schedules(
    engine: AsyncEngine,
    queue: JobQueue,
    events: EventPublisher,
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    make = job_maker(settings)
    while not stop.is_set():
        try:
            # A full pass fires up to its limit of schedules: go on at once.
            while await fire(engine, queue, events, settings, make) and not stop.is_set():
                pass
        except Exception as exc:  # Postgres or RabbitMQ away: try again next time
            log.warning("schedule pass failed", extra={"error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.dispatcher_interval_s)
