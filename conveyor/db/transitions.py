"""The job's state transitions, each one conditional statement.

Every transition is one UPDATE whose WHERE names the states the lifecycle's table
(conveyor.core.lifecycle.TRANSITIONS) lets the job leave from (plus the lease for a
worker's writes), issued together with its history row in the same round trip, so a
redelivered message or a worker whose lease was taken over cannot move a job it does
not own.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.lifecycle import Job, JobState, Outcome
from conveyor.core.lifecycle import transition as table_row
from conveyor.db.engine import fetch
from conveyor.db.statements import as_json, sql, states, utcnow

__all__ = ["ClaimRequest", "Claimed", "FinishRequest", "Outcome"]

LOST_ATTEMPT_SEQ_GAP = 1_000_000
"""Sequence numbers skipped when a running attempt ends without its worker (stalled-job
recovery, a dead letter): the worker numbered its token deltas after the RUNNING event
without telling Postgres, so the next event must come after any of them (an attempt
sends at most max_tokens <= 128,000 deltas)."""


def literal(state: JobState) -> str:
    """A state as an SQL literal: a literal, not a parameter, so that the planner can
    use the partial indexes on status (jobs_due, jobs_unpublished, ...)."""
    return f"'{state.value}'"


def leaving(name: str) -> str:
    """The condition on status of the table's transition `name`: its from-states."""
    sources = table_row(name).from_states
    if len(sources) == 1:
        return f"status = {literal(sources[0])}"
    return f"status IN ({', '.join(literal(s) for s in sources)})"


# One statement per transition: the UPDATE and its history row travel together.
EVENT_INSERT = """
  ev AS (
    INSERT INTO job_events (job_id, seq, status, previous, attempt, detail, created_at, actor)
    SELECT id, seq, status, :previous, attempts, CAST(:detail AS jsonb), updated_at, :actor
      FROM moved
  )
"""
_CANCELLER = (
    f"CASE WHEN moved.status = {literal(JobState.CANCELLED)} THEN moved.cancel_requested_by END"
)
"""The actor of a transition to cancelled that a CancelJob call asked for."""

# A tenant with a concurrency limit: its row is locked (claims of that tenant queue here)
# and, on a committed change, re-read, so `running < max_running` is exact.
_CLAIM = sql(
    """
WITH slot AS (
  SELECT running < max_running AS free FROM tenants
   WHERE tenant = :tenant AND max_running IS NOT NULL
     FOR UPDATE
), moved AS (
  UPDATE jobs
     SET status = """
    + literal(JobState.RUNNING)
    + """, attempts = attempts + 1, lease_id = :lease, heartbeat_at = :now,
         started_at = :now, updated_at = :now, seq = seq + 1, error = NULL
   WHERE id = :id AND """
    + leaving("claim")
    + """ AND cancel_requested_at IS NULL
     AND coalesce((SELECT free FROM slot), true)
  RETURNING *
), """
    + EVENT_INSERT.replace(":actor", "NULL")
    + """,
  att AS (
    INSERT INTO job_attempts (job_id, attempt, lease_id, worker, started_at)
    SELECT id, attempts, lease_id, :worker, started_at FROM moved
  )
SELECT * FROM moved
"""
)


async def claim(
    engine: AsyncEngine, job_id: uuid.UUID, lease: uuid.UUID, worker: str, tenant: str
) -> Job | None:
    """Move a pending job to running under a new lease; None if it is not pending, or
    if its tenant (`tenant`, the job's) already runs as many jobs as its limit allows."""
    return await _CLAIM.job(
        engine,
        {
            "id": job_id,
            "tenant": tenant,
            "lease": lease,
            "now": utcnow(),
            "worker": worker,
            "previous": JobState.PENDING.value,
            "detail": None,
        },
    )


_FINISH = sql(
    """
WITH moved AS (
  UPDATE jobs
     SET status = :status, result_text = :result_text, stop_reason = :stop_reason,
         input_tokens = :input_tokens, output_tokens = :output_tokens,
         cache_creation_input_tokens = :cache_creation, cache_read_input_tokens = :cache_read,
         result = CAST(:result AS jsonb),
         cost_micros = CASE WHEN CAST(:cost AS bigint) IS NULL THEN NULL
                            ELSE coalesce(cost_micros, 0) + :cost END,
         error = CAST(:error AS jsonb), dead_reason = :dead_reason,
         finished_at = CASE WHEN :terminal THEN :now ELSE NULL END,
         run_at = :run_at, published_at = CASE WHEN :terminal THEN published_at ELSE NULL END,
         lease_id = NULL, heartbeat_at = NULL, updated_at = :now,
         seq = GREATEST(seq, :seq_floor) + 1
   WHERE id = :id AND lease_id = :lease AND """
    + leaving("succeed")
    + """
  RETURNING *
), """
    + EVENT_INSERT.replace(":actor", _CANCELLER)
    + """,
  att AS (
    UPDATE job_attempts a
       SET finished_at = :now, outcome = :status, error = CAST(:error AS jsonb),
           input_tokens = :input_tokens, output_tokens = :output_tokens
      FROM moved WHERE a.job_id = moved.id AND a.attempt = moved.attempts
  )
SELECT * FROM moved
"""
)


async def finish(
    engine: AsyncEngine,
    job_id: uuid.UUID,
    lease: uuid.UUID,
    outcome: Outcome,
    seq_floor: int = 0,
) -> Job | None:
    """Write an attempt's outcome if the lease still holds; None when it was refused.

    `seq_floor` is the last sequence number the worker used for token deltas, so
    the transition's event number comes after them.
    """
    usage = outcome.usage or {}
    now = utcnow()
    run_at = None if outcome.retry_in_s is None else now + timedelta(seconds=outcome.retry_in_s)
    return await _FINISH.job(
        engine,
        {
            "id": job_id,
            "lease": lease,
            "now": now,
            "status": outcome.status.value,
            "terminal": outcome.status.terminal,
            "result_text": outcome.result_text,
            "stop_reason": outcome.stop_reason,
            "input_tokens": usage.get("input_tokens"),
            "output_tokens": usage.get("output_tokens"),
            "cache_creation": usage.get("cache_creation_input_tokens"),
            "cache_read": usage.get("cache_read_input_tokens"),
            "result": as_json(outcome.result),
            "cost": outcome.cost_micros,
            "error": as_json(outcome.error),
            "dead_reason": outcome.dead_reason,
            "run_at": run_at,
            "seq_floor": seq_floor,
            "previous": JobState.RUNNING.value,
            "detail": as_json(outcome.error),
        },
    )


_TRANSITION = sql(
    """
WITH moved AS (
  UPDATE jobs
     SET status = :status, updated_at = :now,
         seq = seq + 1 + CASE WHEN status = """
    + literal(JobState.RUNNING)
    + """ THEN """
    + str(LOST_ATTEMPT_SEQ_GAP)
    + """ ELSE 0 END,
         finished_at = CASE WHEN :terminal THEN :now ELSE finished_at END,
         dead_reason = COALESCE(:dead_reason, dead_reason),
         lease_id = CASE WHEN :terminal THEN NULL ELSE lease_id END
   WHERE id = :id AND status = ANY(:from_states) AND (CAST(:tenant AS text) IS NULL OR tenant = :tenant)
  RETURNING *, (SELECT status FROM jobs WHERE id = :id) AS previous_status
), """
    + EVENT_INSERT.replace(":previous", "moved.previous_status").replace(
        ":actor", f"coalesce(:actor, {_CANCELLER})"
    )
    + """
SELECT * FROM moved
"""
)


async def transition(
    engine: AsyncEngine,
    job_id: uuid.UUID,
    from_states: Sequence[JobState],
    to: JobState,
    *,
    tenant: str | None = None,
    dead_reason: str | None = None,
    detail: Mapping[str, Any] | None = None,
    actor: str | None = None,
) -> Job | None:
    """Move a job from one of `from_states` to `to`; None if it was in none of them.

    `actor` names who asked for it; a move to cancelled defaults to whoever
    requested the cancel.
    """
    return await _TRANSITION.job(
        engine,
        {
            "id": job_id,
            "from_states": states(from_states),
            "status": to.value,
            "terminal": to.terminal,
            "tenant": tenant,
            "dead_reason": dead_reason,
            "now": utcnow(),
            "detail": as_json(detail),
            "actor": actor,
        },
    )


_REQUEST_CANCEL = sql(
    """
UPDATE jobs
   SET cancel_requested_at = coalesce(cancel_requested_at, :now),
       cancel_requested_by = coalesce(cancel_requested_by, :actor)
 WHERE id = :id AND tenant = :tenant AND """
    + leaving("cancel_running")
    + """
RETURNING *
"""
)


async def request_cancel(
    engine: AsyncEngine, job_id: uuid.UUID, tenant: str, actor: str | None = None
) -> Job | None:
    """Flag a running job for cancellation (the worker aborts it); None if not running.

    `actor` is kept for the `cancelled` transition that follows.
    """
    return await _REQUEST_CANCEL.job(
        engine,
        {"id": job_id, "tenant": tenant, "now": utcnow(), "actor": actor},
    )


@dataclass(frozen=True)
class Renewal:
    """What a heartbeat learnt about the leases it renewed."""

    lost: frozenset[uuid.UUID]
    """Leases that no longer hold: the job was taken over (stalled-job recovery, then
    perhaps another worker's claim), or is no longer running."""
    cancel: tuple[uuid.UUID, ...]
    """Ids of renewed jobs whose cancel was requested."""


# Its rows are locked in the order of their ids first, as the grouped writes lock theirs
# (LOCK_IN_ORDER, below).
_HEARTBEAT = sql(
    """
WITH locked AS MATERIALIZED (
  SELECT id FROM jobs
   WHERE lease_id = ANY(CAST(:leases AS uuid[])) AND status = """
    + literal(JobState.RUNNING)
    + """
   ORDER BY id FOR UPDATE
)
UPDATE jobs SET heartbeat_at = :now
  FROM locked
 WHERE jobs.id = locked.id AND lease_id = ANY(CAST(:leases AS uuid[])) AND status = """
    + literal(JobState.RUNNING)
    + """
RETURNING jobs.id, lease_id, cancel_requested_at
"""
)


async def heartbeat(engine: AsyncEngine, leases: Sequence[uuid.UUID]) -> Renewal:
    """Renew the leases of running jobs: which ones were lost, which jobs to cancel."""
    if not leases:
        return Renewal(lost=frozenset(), cancel=())
    rows = await _HEARTBEAT.fetch(engine, {"leases": list(leases), "now": utcnow()})
    held = {r["lease_id"] for r in rows}
    return Renewal(
        lost=frozenset(lease for lease in leases if lease not in held),
        cancel=tuple(r["id"] for r in rows if r["cancel_requested_at"] is not None),
    )


_REPLAY = sql(
    """
WITH moved AS (
  UPDATE jobs
     SET status = """
    + literal(JobState.PENDING)
    + """, max_attempts = attempts + :budget, dead_reason = NULL,
         finished_at = NULL, published_at = NULL, run_at = NULL, cancel_requested_at = NULL,
         cancel_requested_by = NULL, updated_at = :now, seq = seq + 1
   WHERE id = :id AND tenant = :tenant AND status = ANY(:from_states)
  RETURNING *, (SELECT status FROM jobs WHERE id = :id) AS previous_status
), """
    + EVENT_INSERT.replace(":previous", "moved.previous_status")
    + """
SELECT * FROM moved
"""
)


async def replay(
    engine: AsyncEngine,
    job_id: uuid.UUID,
    tenant: str,
    budget: int,
    from_states: Sequence[JobState],
    actor: str | None = None,
) -> Job | None:
    """Queue a failed or dead job again with `budget` more attempts; history is kept,
    naming `actor`, who replayed it."""
    return await _REPLAY.job(
        engine,
        {
            "id": job_id,
            "tenant": tenant,
            "budget": budget,
            "from_states": states(from_states),
            "now": utcnow(),
            "detail": as_json({"reason": "replayed by RetryJob"}),
            "actor": actor,
        },
    )


_RELEASE = sql(
    """
WITH moved AS (
  UPDATE jobs
     SET status = """
    + literal(JobState.PENDING)
    + """, lease_id = NULL, heartbeat_at = NULL, updated_at = :now,
         seq = GREATEST(seq, :seq_floor) + 1, max_attempts = max_attempts + 1
   WHERE id = :id AND lease_id = :lease AND """
    + leaving("hand_back")
    + """
  RETURNING *
), """
    + EVENT_INSERT.replace(":actor", "NULL")
    + """,
  att AS (
    UPDATE job_attempts a SET finished_at = :now, outcome = 'handed_back'
      FROM moved WHERE a.job_id = moved.id AND a.attempt = moved.attempts
  )
SELECT * FROM moved
"""
)


async def release(
    engine: AsyncEngine, job_id: uuid.UUID, lease: uuid.UUID, seq_floor: int = 0
) -> Job | None:
    """Hand a running job back to pending (worker shutdown).

    The interrupted attempt stays in the history as `handed_back`, and the job gets
    one more attempt so that a shutdown does not use up its budget. `seq_floor` is
    the last sequence number the worker used for token deltas (as for `finish`).
    """
    return await _RELEASE.job(
        engine,
        {
            "id": job_id,
            "lease": lease,
            "now": utcnow(),
            "previous": JobState.RUNNING.value,
            "detail": as_json({"reason": "handed back at worker shutdown"}),
            "seq_floor": seq_floor,
        },
    )


# --------------------------------------------------------------------------- grouped writes
# The worker's claims and outcomes, many jobs per statement (services.worker.group_writes):
# the same conditions, columns and history rows as `claim` and `finish`, one row of
# arrays per job. Each result row names the job's place in the group (`ord`), so a job
# listed twice (two deliveries of one job) or refused (no longer pending, lease taken
# over) is told apart per job, not per group.


LOCK_IN_ORDER = """
  SELECT id FROM jobs WHERE id = ANY(:ids) ORDER BY id FOR UPDATE
"""
"""The rows a statement of many jobs changes, locked first and in the order of their ids:
two such statements (a claim group, an outcome group, a heartbeat) that met on rows
locked in the orders their joins happen to take could each wait for the other
(a deadlock, which Postgres breaks after a second by failing one of them)."""


@dataclass(frozen=True)
class ClaimRequest:
    """A delivered job to claim under `lease`; `tenant` is the delivery's."""

    job_id: uuid.UUID
    lease: uuid.UUID
    tenant: str


@dataclass(frozen=True)
class Claimed:
    """What `claim_many` made of each request, in the requests' order."""

    jobs: list[Job | None]
    """The claimed job, or None (not pending, a cancel requested, claimed by its twin)."""
    limited: list[bool]
    """Not tried: the tenant has a concurrency limit, which only `claim` checks."""


# A tenant with a limit is left out: several claims of one limited tenant in one statement
# would each see the count before the others (the trigger moves it row by row); `claim`
# locks the tenant row and checks it, one job at a time.
_CLAIM_MANY = (
    """
WITH i AS (
  SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::text[]) WITH ORDINALITY AS i(id, lease, tenant, ord)
), limited AS (
  SELECT i.ord FROM i JOIN tenants t ON t.tenant = i.tenant WHERE t.max_running IS NOT NULL
), locked AS MATERIALIZED ("""
    + LOCK_IN_ORDER.replace(":ids", "$2::uuid[]")
    + """), moved AS (
  UPDATE jobs
     SET status = """
    + literal(JobState.RUNNING)
    + """, attempts = jobs.attempts + 1, lease_id = i.lease, heartbeat_at = $1::timestamptz,
         started_at = $1::timestamptz, updated_at = $1::timestamptz, seq = jobs.seq + 1, error = NULL
    FROM i JOIN locked ON locked.id = i.id
   WHERE jobs.id = i.id AND jobs."""
    + leaving("claim")
    + """ AND jobs.cancel_requested_at IS NULL
     AND i.ord NOT IN (SELECT ord FROM limited)
  RETURNING jobs.*, i.ord
), ev AS (
  INSERT INTO job_events (job_id, seq, status, previous, attempt, detail, created_at, actor)
  SELECT id, seq, status, """
    + literal(JobState.PENDING)
    + """, attempts, NULL, updated_at, NULL FROM moved
), att AS (
  INSERT INTO job_attempts (job_id, attempt, lease_id, worker, started_at)
  SELECT id, attempts, lease_id, $5, started_at FROM moved
)
SELECT l.limited_ords, moved.*
  FROM (SELECT coalesce(array_agg(ord), '{}') AS limited_ords FROM limited) l
  LEFT JOIN moved ON true
"""
)


async def claim_many(engine: AsyncEngine, requests: Sequence[ClaimRequest], worker: str) -> Claimed:
    """Claim many pending jobs in one statement, as `claim` claims one; the jobs of
    tenants with a concurrency limit are not tried (`Claimed.limited`)."""
    rows = await fetch(
        engine,
        _CLAIM_MANY,
        (
            utcnow(),
            [r.job_id for r in requests],
            [r.lease for r in requests],
            [r.tenant for r in requests],
            worker,
        ),
    )
    jobs: list[Job | None] = [None] * len(requests)
    limited = [False] * len(requests)
    for row in rows:
        for ord_ in row["limited_ords"]:
            limited[ord_ - 1] = True
        if row["id"] is not None:
            jobs[row["ord"] - 1] = Job.from_row(row)
    return Claimed(jobs, limited)


@dataclass(frozen=True)
class FinishRequest:
    """An attempt's outcome to write under `lease` (see `finish`)."""

    job_id: uuid.UUID
    lease: uuid.UUID
    outcome: Outcome
    seq_floor: int = 0


_FINISH_MANY = (
    """
WITH i AS (
  SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::bool[], $6::text[], $7::text[],
                       $8::int4[], $9::int4[], $10::int4[], $11::int4[], $12::text[], $13::int8[],
                       $14::text[], $15::text[], $16::timestamptz[], $17::int8[])
    WITH ORDINALITY AS i(id, lease, status, terminal, result_text, stop_reason, input_tokens,
                         output_tokens, cache_creation, cache_read, result, cost, error,
                         dead_reason, run_at, seq_floor, ord)
), locked AS MATERIALIZED ("""
    + LOCK_IN_ORDER.replace(":ids", "$2::uuid[]")
    + """), moved AS (
  UPDATE jobs
     SET status = i.status, result_text = i.result_text, stop_reason = i.stop_reason,
         input_tokens = i.input_tokens, output_tokens = i.output_tokens,
         cache_creation_input_tokens = i.cache_creation, cache_read_input_tokens = i.cache_read,
         result = CAST(i.result AS jsonb),
         cost_micros = CASE WHEN i.cost IS NULL THEN NULL
                            ELSE coalesce(jobs.cost_micros, 0) + i.cost END,
         error = CAST(i.error AS jsonb), dead_reason = i.dead_reason,
         finished_at = CASE WHEN i.terminal THEN $1::timestamptz ELSE NULL END,
         run_at = i.run_at,
         published_at = CASE WHEN i.terminal THEN jobs.published_at ELSE NULL END,
         lease_id = NULL, heartbeat_at = NULL, updated_at = $1::timestamptz,
         seq = GREATEST(jobs.seq, i.seq_floor) + 1
    FROM i JOIN locked ON locked.id = i.id
   WHERE jobs.id = i.id AND jobs.lease_id = i.lease AND jobs."""
    + leaving("succeed")
    + """
  RETURNING jobs.*, i.ord
), ev AS (
  INSERT INTO job_events (job_id, seq, status, previous, attempt, detail, created_at, actor)
  SELECT id, seq, status, """
    + literal(JobState.RUNNING)
    + """, attempts, error, updated_at, """
    + _CANCELLER
    + """
    FROM moved
), att AS (
  UPDATE job_attempts a
     SET finished_at = $1::timestamptz, outcome = moved.status, error = moved.error,
         input_tokens = moved.input_tokens, output_tokens = moved.output_tokens
    FROM moved WHERE a.job_id = moved.id AND a.attempt = moved.attempts
)
SELECT * FROM moved
"""
)


async def finish_many(engine: AsyncEngine, requests: Sequence[FinishRequest]) -> list[Job | None]:
    """Write many attempts' outcomes in one statement, each as `finish` writes one: the
    job as written, or None where its lease no longer held; in the requests' order."""
    now = utcnow()
    usages = [r.outcome.usage or {} for r in requests]
    outcomes = [r.outcome for r in requests]
    rows = await fetch(
        engine,
        _FINISH_MANY,
        (
            now,
            [r.job_id for r in requests],
            [r.lease for r in requests],
            [o.status.value for o in outcomes],
            [o.status.terminal for o in outcomes],
            [o.result_text for o in outcomes],
            [o.stop_reason for o in outcomes],
            [u.get("input_tokens") for u in usages],
            [u.get("output_tokens") for u in usages],
            [u.get("cache_creation_input_tokens") for u in usages],
            [u.get("cache_read_input_tokens") for u in usages],
            [as_json(o.result) for o in outcomes],
            [o.cost_micros for o in outcomes],
            [as_json(o.error) for o in outcomes],
            [o.dead_reason for o in outcomes],
            [
                None if o.retry_in_s is None else now + timedelta(seconds=o.retry_in_s)
                for o in outcomes
            ],
            [r.seq_floor for r in requests],
        ),
    )
    jobs: list[Job | None] = [None] * len(requests)
    for row in rows:
        jobs[row["ord"] - 1] = Job.from_row(row)
    return jobs
