"""The dispatcher's retention pass: delete finished jobs past their tenant's retention
(CONVEYOR_RETENTION_DAYS unless `conveyor tenants set --retention-days` says), with
their history, attempts and webhook deliveries.

Small batches (CONVEYOR_RETENTION_BATCH jobs a statement, each its own short
transaction), rows locked by others skipped (FOR UPDATE SKIP LOCKED), so a purge
never holds up the job path; several dispatchers share the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.config import Settings
from conveyor.core.metrics import RETENTION_PURGED
from conveyor.db import retention as db

log = logging.getLogger(__name__)

MAX_BATCHES = 20
"""Batches one pass deletes at most; the rest waits for the next pass."""
STALE_WORKER_S = 3600.0
"""A worker row without a heartbeat for this long is deleted (a killed worker's)."""


def count(deleted: dict[str, int]) -> None:
    """Add deleted rows to the purge counter."""
    for table, n in deleted.items():
        if n:
            RETENTION_PURGED.labels(table).inc(n)


async def purge(engine: AsyncEngine, settings: Settings) -> dict[str, int]:
    """One pass; the rows deleted per table."""
    total = dict.fromkeys(db.PURGED_TABLES, 0)
    for _ in range(MAX_BATCHES):
        now = datetime.now(UTC)
        deleted = await db.purge_expired(
            engine, now, settings.retention_days, settings.retention_batch
        )
        count(deleted)
        for table, n in deleted.items():
            total[table] += n
        if deleted["jobs"] < settings.retention_batch:
            break
        await asyncio.sleep(0)  # let the dispatcher's other work in between batches
    now = datetime.now(UTC)
    fires = await db.purge_schedule_fires(engine, now, settings.retention_days)
    if fires:
        RETENTION_PURGED.labels("schedule_fires").inc(fires)
    total["schedule_fires"] = fires
    await db.purge_stale_workers(engine, now - timedelta(seconds=STALE_WORKER_S))
    return total


async def run_retention(engine: AsyncEngine, settings: Settings, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            deleted = await purge(engine, settings)
            if any(deleted.values()):
                log.info("retention purge", extra=deleted)
        except Exception as exc:  # Postgres away: next time
            log.warning("retention pass failed", extra={"error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.retention_interval_s)
