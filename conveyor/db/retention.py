"""Retention and erasure: finished jobs past their tenant's retention are purged with
their history, attempts and webhook deliveries; one finished job can be erased now;
old schedule fires and silent workers' rows are forgotten."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.lifecycle import TERMINAL, JobState
from conveyor.db.schema import jobs, tenants, workers
from conveyor.db.statements import Row

_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL))


def transaction(engine: AsyncEngine) -> Any:
    """A transaction (the engine otherwise runs each statement in autocommit)."""
    return engine.execution_options(isolation_level="READ COMMITTED").begin()


# Deletes the `doomed` jobs with their history, attempts and webhook deliveries (and
# those deliveries' attempts), counting the rows of each table. The children go in the
# same statement (their foreign keys would cascade anyway) so that each is counted.
_PURGE = """
WITH doomed AS ({doomed}),
wa AS (
  DELETE FROM webhook_attempts a USING webhook_deliveries d, doomed
   WHERE a.delivery_id = d.id AND d.job_id = doomed.id RETURNING 1
), wd AS (
  DELETE FROM webhook_deliveries d USING doomed WHERE d.job_id = doomed.id RETURNING 1
), ev AS (
  DELETE FROM job_events e USING doomed WHERE e.job_id = doomed.id RETURNING 1
), att AS (
  DELETE FROM job_attempts a USING doomed WHERE a.job_id = doomed.id RETURNING 1
), jb AS (
  DELETE FROM jobs j USING doomed WHERE j.id = doomed.id RETURNING 1
)
SELECT (SELECT count(*) FROM jb) AS jobs, (SELECT count(*) FROM ev) AS job_events,
       (SELECT count(*) FROM att) AS job_attempts,
       (SELECT count(*) FROM wd) AS webhook_deliveries,
       (SELECT count(*) FROM wa) AS webhook_attempts
"""

# Finished jobs past their tenant's retention, oldest first, skipping rows another
# transaction holds (a purge never waits for a lock, nor holds one for long).
_EXPIRED = f"""
SELECT j.id FROM jobs j LEFT JOIN tenants t ON t.tenant = j.tenant
 WHERE j.finished_at IS NOT NULL AND j.finished_at < :oldest
   AND j.status IN ({_TERMINAL_SQL})
   AND coalesce(t.retention_days, :default_days) > 0
   AND j.finished_at < CAST(:now AS timestamptz) - make_interval(days => coalesce(t.retention_days, :default_days))
 ORDER BY j.finished_at LIMIT :batch
   FOR UPDATE OF j SKIP LOCKED
"""

PURGED_TABLES = ("jobs", "job_events", "job_attempts", "webhook_deliveries", "webhook_attempts")


async def shortest_retention_days(conn: AsyncConnection, default_days: int) -> int | None:
    """The shortest retention in force (days), or None when every job is kept forever."""
    days = (
        await conn.execute(
            sa.select(sa.func.min(sa.func.coalesce(tenants.c.retention_days, default_days))).where(
                sa.func.coalesce(tenants.c.retention_days, default_days) > 0
            )
        )
    ).scalar()
    candidates = [d for d in (days, default_days) if d]
    return min(candidates) if candidates else None


async def purge_expired(
    engine: AsyncEngine, now: datetime, default_days: int, batch: int
) -> dict[str, int]:
    """Delete one batch of finished jobs past their retention, with their data; the
    rows deleted per table."""
    async with engine.connect() as conn:
        shortest = await shortest_retention_days(conn, default_days)
    if shortest is None:
        return dict.fromkeys(PURGED_TABLES, 0)
    async with transaction(engine) as conn:
        row = (
            (
                await conn.execute(
                    sa.text(_PURGE.format(doomed=_EXPIRED)),
                    {
                        "oldest": now - timedelta(days=shortest),
                        "now": now,
                        "default_days": default_days,
                        "batch": batch,
                    },
                )
            )
            .mappings()
            .one()
        )
    return {k: int(row[k]) for k in PURGED_TABLES}


async def purge_schedule_fires(engine: AsyncEngine, now: datetime, default_days: int) -> int:
    """Forget fired occurrences older than their tenant's retention (a batch)."""
    async with transaction(engine) as conn:
        result = await conn.execute(
            sa.text(
                """
                DELETE FROM schedule_fires f USING (
                  SELECT f.schedule_id, f.fire_at FROM schedule_fires f
                    JOIN schedules s ON s.id = f.schedule_id
                    LEFT JOIN tenants t ON t.tenant = s.tenant
                   WHERE coalesce(t.retention_days, :d) > 0
                     AND f.created_at < CAST(:now AS timestamptz) - make_interval(days => coalesce(t.retention_days, :d))
                   LIMIT 1000 FOR UPDATE OF f SKIP LOCKED
                ) old WHERE f.schedule_id = old.schedule_id AND f.fire_at = old.fire_at
                """
            ),
            {"d": default_days, "now": now},
        )
        return int(result.rowcount or 0)


async def purge_stale_workers(engine: AsyncEngine, before: datetime) -> int:
    """Delete the rows of workers silent since `before` (killed without cleaning up)."""
    async with engine.connect() as conn:
        result = await conn.execute(sa.delete(workers).where(workers.c.heartbeat_at < before))
        return int(result.rowcount or 0)


class JobNotFound(Exception):
    pass


class JobLive(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


async def delete_job(engine: AsyncEngine, job_id: uuid.UUID, tenant: str) -> dict[str, int]:
    """Erase one finished job of a tenant with its data now; the rows deleted per table.

    Raises JobNotFound (none, or another tenant's) or JobLive (not finished yet).
    """
    async with transaction(engine) as conn:
        status = (
            await conn.execute(
                sa.select(jobs.c.status)
                .where(jobs.c.id == job_id, jobs.c.tenant == tenant)
                .with_for_update()
            )
        ).scalar()
        if status is None:
            raise JobNotFound(str(job_id))
        if not JobState(status).terminal:
            raise JobLive(status)
        row = (
            (
                await conn.execute(
                    sa.text(_PURGE.format(doomed="SELECT CAST(:id AS uuid) AS id")),
                    {"id": job_id},
                )
            )
            .mappings()
            .one()
        )
    return {k: int(row[k]) for k in PURGED_TABLES}


async def set_retention(engine: AsyncEngine, tenant: str, days: int | None) -> Row:
    """Set a tenant's retention in days (None: the default; 0: forever)."""
    async with transaction(engine) as conn:
        await conn.execute(
            insert(tenants).values(tenant=tenant).on_conflict_do_nothing(index_elements=["tenant"])
        )
        row = (
            (
                await conn.execute(
                    sa.update(tenants)
                    .where(tenants.c.tenant == tenant)
                    .values(retention_days=days)
                    .returning(*tenants.c)
                )
            )
            .mappings()
            .one()
        )
        return dict(row)
