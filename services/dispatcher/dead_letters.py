"""The dead-letter consumer: every message on `conveyor.dead` ends its job as `dead`.

A message arrives here when a worker rejected it (attempts exhausted, poison,
a message naming no job) or RabbitMQ dead-lettered it. The job, if the
message names one and it is still live, is marked dead (the table's `dead_letter`
transition) with the reason and the x-death data kept in its history; a message
naming no job is logged and dropped.

A message whose job cannot be written now (Postgres unreachable, a statement timed
out) goes back to the queue after a pause and is tried again: left unacked, such
messages would fill the prefetch and stall the consumer for good. Messages are
settled by conveyor.bus.settle, from the outcome the handler returns.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import settle
from conveyor.bus.broker import JobMessage
from conveyor.bus.events import EventPublisher
from conveyor.core.lifecycle import JobState, transition
from conveyor.core.metrics import JOBS_FINISHED
from conveyor.db import transitions as db

log = logging.getLogger(__name__)

RETRY_PAUSE_S = 1.0
"""How long a dead letter whose job could not be written waits before it is requeued."""


def _x_death(message: AbstractIncomingMessage) -> list[dict[str, Any]]:
    deaths = (message.headers or {}).get("x-death") or []
    out = []
    for d in deaths if isinstance(deaths, list) else []:
        if isinstance(d, dict):
            out.append({str(k): str(v) for k, v in d.items()})
    return out


class DeadLetterHandler:
    def __init__(
        self, engine: AsyncEngine, events: EventPublisher, retry_pause_s: float = RETRY_PAUSE_S
    ) -> None:
        self.engine = engine
        self.events = events
        self.retry_pause_s = retry_pause_s
        self._consume = settle.consumer(self.handle, self._on_error)

    def __call__(self, message: AbstractIncomingMessage) -> Awaitable[None]:
        return self._consume(message)

    def _on_error(self, message: AbstractIncomingMessage, exc: Exception) -> settle.Outcome:
        log.warning(
            "dead letter not recorded; requeued after a pause",
            extra={"message_id": message.message_id, "error": repr(exc)},
        )
        return settle.requeue(self.retry_pause_s)

    async def handle(self, message: AbstractIncomingMessage) -> settle.Outcome:
        deaths = _x_death(message)
        try:
            job = JobMessage.decode(message.body)
        except ValueError as exc:
            log.error(
                "unparseable dead letter dropped", extra={"error": str(exc), "x_death": deaths}
            )
            return settle.ACK
        reason = deaths[0].get("reason", "rejected") if deaths else "rejected"
        moved = await db.transition(
            self.engine,
            job.job_id,
            transition("dead_letter").from_states,
            JobState.DEAD,
            dead_reason=f"dead-lettered ({reason})",
            detail={"x_death": deaths},
        )
        if moved is None:
            log.info("dead letter for a finished or unknown job", extra={"job_id": str(job.job_id)})
            return settle.ACK
        JOBS_FINISHED.labels(moved.lane, JobState.DEAD.value).inc()
        try:
            await self.events.publish_status(moved, moved.previous_status)
        except Exception as exc:  # events are advisory; the row is the record
            log.warning(
                "event publish failed", extra={"job_id": str(job.job_id), "error": repr(exc)}
            )
        log.info("job dead", extra={"job_id": str(job.job_id), "reason": reason})
        return settle.ACK
