"""Operations on many jobs and on the installation: retention purges and erasure,
bulk cancel and replay (audited), priority changes, lane pauses, worker rows.

Bulk actions pick the matching jobs, then move them in one statement whose first
step locks them and re-checks their status (a job that moved meanwhile is left
out), writing each job's history row (actor, bulk action id) with the move.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.lifecycle import TERMINAL, JobState
from conveyor.db.jobs import ListFilter, filtered
from conveyor.db.schema import bulk_actions, jobs, lane_pauses, tenants, workers

Row = Mapping[str, Any]

ALL_TENANTS = "*"
"""The tenant of a lane pause that applies to every tenant."""

_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL))


def _tx(engine: AsyncEngine) -> Any:
    """A transaction (the engine otherwise runs each statement in autocommit)."""
    return engine.execution_options(isolation_level="READ COMMITTED").begin()


# ---------------------------------------------------------------- retention and erasure

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
    async with _tx(engine) as conn:
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
    async with _tx(engine) as conn:
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
    async with _tx(engine) as conn:
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
    async with _tx(engine) as conn:
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


# ---------------------------------------------------------------- bulk actions


@dataclass(frozen=True)
class JobFilter(ListFilter):
    """ListJobs' filter plus a model; the gateway always names the statuses."""

    model: str = ""

    def as_json(self) -> dict[str, Any]:
        """The filter as the audit row keeps it."""
        return {
            "statuses": list(self.statuses),
            "lane": self.lane,
            "created_after": self.created_after.isoformat() if self.created_after else None,
            "created_before": self.created_before.isoformat() if self.created_before else None,
            "labels": dict(self.labels),
            "model": self.model,
        }


def _matching(flt: JobFilter, columns: Sequence[Any]) -> sa.Select[Any]:
    stmt = filtered(sa.select(*columns), flt).where(jobs.c.status.in_(list(flt.statuses)))
    if flt.model:
        stmt = stmt.where(jobs.c.model == flt.model)
    return stmt


async def count_matching(engine: AsyncEngine, flt: JobFilter, limit: int) -> int:
    """How many jobs match (at most `limit`): a dry run."""
    async with engine.connect() as conn:
        inner = _matching(flt, [jobs.c.id]).limit(limit).subquery()
        return int((await conn.execute(sa.select(sa.func.count()).select_from(inner))).scalar_one())


async def _matching_ids(conn: AsyncConnection, flt: JobFilter, limit: int) -> list[uuid.UUID]:
    stmt = _matching(flt, [jobs.c.id]).order_by(jobs.c.created_at, jobs.c.id).limit(limit)
    return list((await conn.execute(stmt)).scalars())


_IDS = sa.bindparam("ids", type_=sa.ARRAY(UUID(as_uuid=True)))
_STATES = sa.bindparam("from_states", type_=sa.ARRAY(sa.Text))

_HISTORY = """
  ev AS (
    INSERT INTO job_events (job_id, seq, status, previous, attempt, detail, created_at, actor)
    SELECT id, seq, status, previous_status, attempts, CAST(:detail AS jsonb), updated_at, :actor
      FROM moved
  )
"""

_CANCEL_QUEUED = sa.text(
    """
WITH picked AS (
  SELECT id, status AS previous_status FROM jobs
   WHERE id = ANY(:ids) AND tenant = :tenant AND status IN ('pending', 'scheduled')
     FOR UPDATE
), moved AS (
  UPDATE jobs j SET status = 'cancelled', updated_at = :now, finished_at = :now,
                    seq = j.seq + 1, lease_id = NULL
    FROM picked WHERE j.id = picked.id
  RETURNING j.*, picked.previous_status
), """
    + _HISTORY
    + "SELECT * FROM moved"
).bindparams(_IDS)

_REQUEST_CANCEL = sa.text(
    """
UPDATE jobs SET cancel_requested_at = coalesce(cancel_requested_at, :now),
                cancel_requested_by = coalesce(cancel_requested_by, :actor)
 WHERE id = ANY(:ids) AND tenant = :tenant AND status = 'running'
RETURNING id, tenant
"""
).bindparams(_IDS)

_REPLAY = sa.text(
    """
WITH picked AS (
  SELECT id, status AS previous_status FROM jobs
   WHERE id = ANY(:ids) AND tenant = :tenant AND status = ANY(:from_states)
     FOR UPDATE
), moved AS (
  UPDATE jobs j
     SET status = 'pending', max_attempts = j.attempts + :budget, dead_reason = NULL,
         finished_at = NULL, published_at = NULL, run_at = NULL, cancel_requested_at = NULL,
         cancel_requested_by = NULL, updated_at = :now, seq = j.seq + 1
    FROM picked WHERE j.id = picked.id
  RETURNING j.*, picked.previous_status
), """
    + _HISTORY
    + "SELECT * FROM moved"
).bindparams(_IDS, _STATES)


@dataclass(frozen=True)
class BulkResult:
    action_id: uuid.UUID
    matched: int
    moved: Sequence[Row]
    """Jobs moved (cancelled or replayed), each with its previous_status."""
    cancel_requested: Sequence[Row] = ()
    """Running jobs flagged for cancellation (id, tenant)."""


async def _audit(
    conn: AsyncConnection,
    action_id: uuid.UUID,
    flt: JobFilter,
    action: str,
    actor: str,
    matched: int,
    changed: int,
    now: datetime,
) -> None:
    await conn.execute(
        sa.insert(bulk_actions).values(
            id=action_id,
            tenant=flt.tenant,
            actor=actor,
            action=action,
            filter=flt.as_json(),
            matched=matched,
            changed=changed,
            created_at=now,
        )
    )


async def bulk_cancel(
    engine: AsyncEngine, flt: JobFilter, limit: int, actor: str, reason: str, now: datetime
) -> BulkResult:
    """Cancel the matching queued jobs and flag the matching running ones, audited."""
    action_id = uuid.uuid4()
    detail = orjson.dumps({"reason": reason, "bulk_action_id": str(action_id)}).decode()
    async with _tx(engine) as conn:
        ids = await _matching_ids(conn, flt, limit)
        params = {"ids": ids, "tenant": flt.tenant, "now": now, "actor": actor}
        moved = [
            dict(r)
            for r in (await conn.execute(_CANCEL_QUEUED, {**params, "detail": detail})).mappings()
        ]
        flagged = [dict(r) for r in (await conn.execute(_REQUEST_CANCEL, params)).mappings()]
        await _audit(
            conn, action_id, flt, "cancel", actor, len(ids), len(moved) + len(flagged), now
        )
    return BulkResult(action_id, len(ids), moved, flagged)


async def bulk_replay(
    engine: AsyncEngine,
    flt: JobFilter,
    limit: int,
    actor: str,
    budget: int,
    now: datetime,
    action: str = "retry",
) -> BulkResult:
    """Queue the matching failed or dead jobs again with `budget` more attempts, audited."""
    action_id = uuid.uuid4()
    detail = orjson.dumps({"reason": f"replayed by {action}", "bulk_action_id": str(action_id)})
    async with _tx(engine) as conn:
        ids = await _matching_ids(conn, flt, limit)
        moved = [
            dict(r)
            for r in (
                await conn.execute(
                    _REPLAY,
                    {
                        "ids": ids,
                        "tenant": flt.tenant,
                        "from_states": list(flt.statuses),
                        "budget": budget,
                        "now": now,
                        "actor": actor,
                        "detail": detail.decode(),
                    },
                )
            ).mappings()
        ]
        await _audit(conn, action_id, flt, action, actor, len(ids), len(moved), now)
    return BulkResult(action_id, len(ids), moved)


# ---------------------------------------------------------------- priority


async def set_priority(
    engine: AsyncEngine, job_id: uuid.UUID, tenant: str, priority: int, now: datetime
) -> Row | None:
    """Change a pending or scheduled job's priority; None if it is neither. A pending
    job is marked unpublished, so it is queued again (by the caller, else the outbox)."""
    async with engine.connect() as conn:
        row = (
            (
                await conn.execute(
                    sa.update(jobs)
                    .where(
                        jobs.c.id == job_id,
                        jobs.c.tenant == tenant,
                        jobs.c.status.in_([JobState.PENDING.value, JobState.SCHEDULED.value]),
                    )
                    .values(
                        priority=priority,
                        updated_at=now,
                        published_at=sa.case(
                            (jobs.c.status == JobState.PENDING.value, None),
                            else_=jobs.c.published_at,
                        ),
                    )
                    .returning(*jobs.c)
                )
            )
            .mappings()
            .first()
        )
    return dict(row) if row else None


# ---------------------------------------------------------------- lane pauses


async def pause_lane(
    engine: AsyncEngine, tenant: str, lane: str, actor: str, reason: str, now: datetime
) -> Row:
    """Pause a lane of a tenant (or of every tenant, ALL_TENANTS); idempotent, the first
    pause's actor and time are kept."""
    async with engine.connect() as conn:
        await conn.execute(
            insert(lane_pauses)
            .values(tenant=tenant, lane=lane, paused_by=actor, reason=reason, paused_at=now)
            .on_conflict_do_nothing(index_elements=["tenant", "lane"])
        )
        row = (
            (
                await conn.execute(
                    sa.select(lane_pauses).where(
                        lane_pauses.c.tenant == tenant, lane_pauses.c.lane == lane
                    )
                )
            )
            .mappings()
            .one()
        )
    return dict(row)


async def resume_lane(engine: AsyncEngine, tenant: str, lane: str) -> bool:
    """Lift a lane pause; False if there was none."""
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.delete(lane_pauses)
            .where(lane_pauses.c.tenant == tenant, lane_pauses.c.lane == lane)
            .returning(lane_pauses.c.lane)
        )
        return result.first() is not None


async def lane_pause_rows(conn: AsyncConnection, tenant: str | None = None) -> list[Row]:
    """The lane pauses (of one tenant: its own and the every-tenant ones)."""
    stmt = sa.select(lane_pauses).order_by(lane_pauses.c.lane, lane_pauses.c.tenant)
    if tenant is not None:
        stmt = stmt.where(lane_pauses.c.tenant.in_([tenant, ALL_TENANTS]))
    return [dict(r) for r in (await conn.execute(stmt)).mappings()]


# ---------------------------------------------------------------- workers


async def worker_heartbeat(
    engine: AsyncEngine,
    worker_id: str,
    host: str,
    pid: int,
    lanes: Sequence[str],
    in_flight: int,
    concurrency: int,
    started_at: datetime,
    now: datetime,
) -> bool:
    """Upsert a worker's row; whether a drain was requested."""
    upsert = insert(workers).values(
        id=worker_id,
        host=host,
        pid=pid,
        lanes=list(lanes),
        in_flight=in_flight,
        concurrency=concurrency,
        started_at=started_at,
        heartbeat_at=now,
    )
    stmt = upsert.on_conflict_do_update(
        index_elements=["id"],
        set_={"in_flight": in_flight, "heartbeat_at": now, "lanes": list(lanes)},
    ).returning(workers.c.drain_requested_at)
    async with engine.connect() as conn:
        drain = (await conn.execute(stmt)).scalar()
    return drain is not None


async def forget_worker(engine: AsyncEngine, worker_id: str) -> None:
    async with engine.connect() as conn:
        await conn.execute(sa.delete(workers).where(workers.c.id == worker_id))


async def live_workers(conn: AsyncConnection, since: datetime) -> list[Row]:
    stmt = sa.select(workers).where(workers.c.heartbeat_at >= since).order_by(workers.c.id)
    return [dict(r) for r in (await conn.execute(stmt)).mappings()]


async def request_drain(engine: AsyncEngine, worker_id: str, now: datetime) -> Row | None:
    async with engine.connect() as conn:
        row = (
            (
                await conn.execute(
                    sa.update(workers)
                    .where(workers.c.id == worker_id)
                    .values(drain_requested_at=sa.func.coalesce(workers.c.drain_requested_at, now))
                    .returning(*workers.c)
                )
            )
            .mappings()
            .first()
        )
    return dict(row) if row else None
