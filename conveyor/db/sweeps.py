"""The dispatcher's sweeps over many jobs, each safe to run in several dispatchers at
once (rows are picked with FOR UPDATE SKIP LOCKED): due scheduled jobs released,
stalled running ones recovered, unconfirmed or unclaimed pending ones found to
publish again. Written like conveyor/db/transitions.py, from the same table."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.lifecycle import Job, JobState
from conveyor.db.statements import as_json, sql, utcnow
from conveyor.db.transitions import EVENT_INSERT, LOST_ATTEMPT_SEQ_GAP, leaving, literal

_REQUEUE_STALLED = sql(
    """
WITH stalled AS (
  SELECT id FROM jobs
   WHERE """
    + leaving("recover")
    + """ AND heartbeat_at < :stale_before
   ORDER BY heartbeat_at LIMIT :limit FOR UPDATE SKIP LOCKED
), moved AS (
  UPDATE jobs j
     SET status = CASE WHEN j.attempts >= j.max_attempts THEN """
    + literal(JobState.DEAD)
    + " ELSE "
    + literal(JobState.PENDING)
    + """ END,
         dead_reason = CASE WHEN j.attempts >= j.max_attempts
                            THEN 'attempts exhausted: the worker was lost on the last attempt'
                            ELSE j.dead_reason END,
         finished_at = CASE WHEN j.attempts >= j.max_attempts THEN :now ELSE NULL END,
         error = CASE WHEN j.attempts >= j.max_attempts
                      THEN '{"code": "worker_lost", "message": "no heartbeat within the lease", "retryable": true}'::jsonb
                      ELSE j.error END,
         lease_id = NULL, heartbeat_at = NULL, published_at = NULL,
         updated_at = :now, seq = seq + 1 + """
    + str(LOST_ATTEMPT_SEQ_GAP)
    + """
    FROM stalled WHERE j.id = stalled.id
  RETURNING j.*
), """
    + EVENT_INSERT.replace(":previous", literal(JobState.RUNNING)).replace(":actor", "NULL")
    + """,
  att AS (
    UPDATE job_attempts a SET finished_at = :now, outcome = 'lost'
      FROM moved WHERE a.job_id = moved.id AND a.attempt = moved.attempts
  )
SELECT * FROM moved
"""
)


async def requeue_stalled(engine: AsyncEngine, lease_s: float, limit: int = 500) -> list[Job]:
    """Recover running jobs whose worker stopped heartbeating.

    Each goes back to pending, or to dead when that was its last attempt (a job
    that keeps killing its worker must not loop). Returns the moved rows.
    """
    now = utcnow()
    return await _REQUEUE_STALLED.jobs(
        engine,
        {
            "stale_before": now - timedelta(seconds=lease_s),
            "now": now,
            "limit": limit,
            "detail": as_json({"reason": "stalled: no heartbeat within the lease"}),
        },
    )


_RELEASE_DUE = sql(
    """
WITH due AS (
  SELECT id FROM jobs
   WHERE """
    + leaving("release")
    + """ AND run_at <= :now
   ORDER BY run_at LIMIT :limit FOR UPDATE SKIP LOCKED
), moved AS (
  UPDATE jobs j SET status = """
    + literal(JobState.PENDING)
    + """, published_at = NULL, updated_at = :now, seq = seq + 1
    FROM due WHERE j.id = due.id
  RETURNING j.*
), """
    + EVENT_INSERT.replace(":previous", literal(JobState.SCHEDULED)).replace(":actor", "NULL")
    + """
SELECT id, tenant, lane, priority, trace_id, traceparent, status, model FROM moved
"""
)


async def release_due(engine: AsyncEngine, limit: int = 500) -> list[Job]:
    """Move scheduled jobs whose time has come to pending; returns them to publish."""
    return await _RELEASE_DUE.jobs(engine, {"now": utcnow(), "limit": limit, "detail": None})


_UNPUBLISHED = sql(
    """
SELECT id, tenant, lane, priority, trace_id, traceparent, status, model FROM jobs
 WHERE status = """
    + literal(JobState.PENDING)
    + """ AND published_at IS NULL AND updated_at < :cutoff
 ORDER BY created_at LIMIT :limit
"""
)


async def unpublished(engine: AsyncEngine, older_than_s: float, limit: int = 500) -> list[Job]:
    """Pending jobs whose publish was never confirmed (the outbox), oldest first."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return await _UNPUBLISHED.jobs(engine, {"cutoff": cutoff, "limit": limit})


_REPUBLISH_STALE = sql(
    """
WITH stale AS (
  SELECT id FROM jobs
   WHERE status = """
    + literal(JobState.PENDING)
    + """ AND published_at IS NOT NULL AND published_at < :stale_before
   ORDER BY published_at LIMIT :limit FOR UPDATE SKIP LOCKED
)
UPDATE jobs j SET published_at = :now
  FROM stale WHERE j.id = stale.id
RETURNING j.id, j.tenant, j.lane, j.priority, j.trace_id, j.traceparent, j.status, j.model
"""
)


async def stale_pending(engine: AsyncEngine, older_than_s: float, limit: int = 500) -> list[Job]:
    """Pending jobs whose message went out more than `older_than_s` ago and was never
    claimed (a purged or lost queue), to publish again; each is stamped as published
    now, so it is republished at most once per `older_than_s`. A job whose message is
    merely waiting in a long queue gets a second one, which the conditional claim
    makes harmless."""
    now = utcnow()
    return await _REPUBLISH_STALE.jobs(
        engine,
        {"stale_before": now - timedelta(seconds=older_than_s), "now": now, "limit": limit},
    )
