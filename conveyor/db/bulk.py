"""Bulk actions on the jobs a filter matches (cancel and replay, audited) and priority
changes.

Bulk actions pick the matching jobs, then move them in one statement whose first
step locks them and re-checks their status (a job that moved meanwhile is left
out), writing each job's history row (actor, bulk action id) with the move. The
from-states are the lifecycle table's (conveyor.core.lifecycle.TRANSITIONS).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.lifecycle import QUEUED, Job, JobState
from conveyor.db.jobs import ListFilter
from conveyor.db.retention import transaction
from conveyor.db.schema import bulk_actions, jobs
from conveyor.db.statements import Row, states
from conveyor.db.transitions import leaving, literal


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
    where, params = flt.where()
    where += " AND status = ANY(CAST(:statuses AS text[]))"
    params["statuses"] = list(flt.statuses)
    if flt.model:
        where += " AND model = :model"
        params["model"] = flt.model
    return sa.select(*columns).where(sa.text(where).bindparams(**params))


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
   WHERE id = ANY(:ids) AND tenant = :tenant AND """
    + leaving("cancel")
    + """
     FOR UPDATE
), moved AS (
  UPDATE jobs j SET status = """
    + literal(JobState.CANCELLED)
    + """, updated_at = :now, finished_at = :now,
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
 WHERE id = ANY(:ids) AND tenant = :tenant AND """
    + leaving("cancel_running")
    + """
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
     SET status = """
    + literal(JobState.PENDING)
    + """, max_attempts = j.attempts + :budget, dead_reason = NULL,
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
    moved: Sequence[Job]
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
    async with transaction(engine) as conn:
        ids = await _matching_ids(conn, flt, limit)
        params = {"ids": ids, "tenant": flt.tenant, "now": now, "actor": actor}
        moved = [
            Job.from_row(r)
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
    async with transaction(engine) as conn:
        ids = await _matching_ids(conn, flt, limit)
        moved = [
            Job.from_row(r)
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
) -> Job | None:
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
                        jobs.c.status.in_(states(QUEUED)),
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
    return Job.from_row(dict(row)) if row else None
