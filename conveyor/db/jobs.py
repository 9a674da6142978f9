"""Job rows and their state transitions.

Every transition is one conditional statement (`WHERE id = :id AND status = ANY(...)`,
plus the lease for a worker's writes), issued together with its history row in
the same round trip, so a redelivered message or a worker whose lease was taken
over cannot move a job it does not own.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.lifecycle import JobState
from conveyor.db.engine import fetch
from conveyor.db.schema import job_events, jobs

Row = Mapping[str, Any]


LOST_ATTEMPT_SEQ_GAP = 1_000_000
"""Sequence numbers skipped when a running attempt ends without its worker (stalled-job
recovery, a dead letter): the worker numbered its token deltas after the RUNNING event
without telling Postgres, so the next event must come after any of them (an attempt
sends at most max_tokens <= 128,000 deltas)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class NewJob:
    """A validated job, ready to insert."""

    tenant: str
    model: str
    request: dict[str, Any]
    lane: str
    priority: int
    max_attempts: int
    timeout_ms: int
    request_hash: str
    idempotency_key: str | None = None
    webhook_url: str | None = None
    webhook_all_events: bool = False
    """POST every status change to webhook_url, not only terminal ones."""
    labels: dict[str, str] = field(default_factory=dict)
    run_at: datetime | None = None
    trace_id: str | None = None
    traceparent: str | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    budget_micros: int | None = None
    """Reserved in the tenant's budget ledger at submit (services.gateway.budgets)."""
    budget_day: date | None = None
    """The UTC day (and so month) the reservation counts in."""


@dataclass(frozen=True)
class Outcome:
    """What an attempt produced, written by the worker under its lease."""

    status: JobState
    result_text: str | None = None
    stop_reason: str | None = None
    usage: Mapping[str, int] | None = None
    result: Mapping[str, Any] | None = None
    """The final message but its text: id, model, content blocks, stop_sequence, usage."""
    error: Mapping[str, Any] | None = None
    dead_reason: str | None = None
    retry_in_s: float | None = None
    """For a retry: the wait, counted from the moment this outcome is written."""
    cost_micros: int | None = None
    """What this attempt cost (conveyor.core.pricing.cost_micros: 0 without usage); None:
    the model is unpriced. Attempts' costs add up on the job."""


def _status(job: NewJob, now: datetime) -> str:
    """A new job's first status: scheduled when its run_at lies ahead."""
    scheduled = job.run_at is not None and job.run_at > now
    return (JobState.SCHEDULED if scheduled else JobState.PENDING).value


def _values(job: NewJob, now: datetime) -> dict[str, Any]:
    return {
        "id": job.id,
        "tenant": job.tenant,
        "status": _status(job, now),
        "lane": job.lane,
        "priority": job.priority,
        "model": job.model,
        "request": job.request,
        "labels": job.labels,
        "idempotency_key": job.idempotency_key,
        "request_hash": job.request_hash,
        "max_attempts": job.max_attempts,
        "timeout_ms": job.timeout_ms,
        "webhook_url": job.webhook_url,
        "webhook_all_events": job.webhook_all_events,
        "run_at": job.run_at,
        "trace_id": job.trace_id,
        "traceparent": job.traceparent,
        "budget_micros": job.budget_micros,
        "budget_day": job.budget_day,
        "seq": 1,
        "created_at": now,
        "updated_at": now,
    }


_INSERT = """
WITH ins AS (
  INSERT INTO jobs (id, tenant, status, lane, priority, model, request, labels, idempotency_key,
                    request_hash, max_attempts, timeout_ms, webhook_url, run_at, trace_id,
                    traceparent, webhook_all_events, budget_micros, budget_day, seq, created_at,
                    updated_at)
  SELECT j.id, j.tenant, j.status, j.lane, j.priority, j.model, j.request::jsonb, j.labels::jsonb,
         j.idempotency_key, j.request_hash, j.max_attempts, j.timeout_ms, j.webhook_url, j.run_at,
         j.trace_id, j.traceparent, j.webhook_all_events, j.budget_micros, j.budget_day, 1, $1, $1
    FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::int2[], $13::int4[],
                $14::text[], $15::timestamptz[], $16::text[], $17::text[], $18::bool[],
                $20::int8[], $21::date[])
      AS j(id, tenant, status, lane, priority, model, request, labels, idempotency_key,
           request_hash, max_attempts, timeout_ms, webhook_url, run_at, trace_id, traceparent,
           webhook_all_events, budget_micros, budget_day)
  ON CONFLICT ON CONSTRAINT jobs_tenant_idempotency_key DO NOTHING
  RETURNING id
), ev AS (
  INSERT INTO job_events (job_id, seq, status, previous, attempt, detail, created_at, actor)
  SELECT a.id, 1, a.status, NULL, 0, NULL, $1, a.actor
    FROM unnest($2::uuid[], $4::text[], $19::text[]) AS a(id, status, actor) JOIN ins USING (id)
)
SELECT id FROM ins
"""

_COLUMNS = tuple(jobs.c.keys())


def new_row(job: NewJob, now: datetime) -> Row:
    """The row `insert_jobs` stores for `job` at `now`, every column included."""
    row: dict[str, Any] = dict.fromkeys(_COLUMNS)
    row.update(_values(job, now), attempts=0)
    return row


def insert_params(
    new_jobs: Sequence[NewJob], actors: Sequence[str | None], now: datetime
) -> tuple[Any, ...]:
    """The positional parameters of `_INSERT` for `new_jobs` (one array per column)."""
    return (
        now,
        [j.id for j in new_jobs],
        [j.tenant for j in new_jobs],
        [_status(j, now) for j in new_jobs],
        [j.lane for j in new_jobs],
        [j.priority for j in new_jobs],
        [j.model for j in new_jobs],
        [orjson.dumps(j.request).decode() for j in new_jobs],
        [orjson.dumps(j.labels).decode() for j in new_jobs],
        [j.idempotency_key for j in new_jobs],
        [j.request_hash for j in new_jobs],
        [j.max_attempts for j in new_jobs],
        [j.timeout_ms for j in new_jobs],
        [j.webhook_url for j in new_jobs],
        [j.run_at for j in new_jobs],
        [j.trace_id for j in new_jobs],
        [j.traceparent for j in new_jobs],
        [j.webhook_all_events for j in new_jobs],
        list(actors),
        [j.budget_micros for j in new_jobs],
        [j.budget_day for j in new_jobs],
    )


async def insert_jobs(
    engine: AsyncEngine, new_jobs: Sequence[NewJob], actors: Sequence[str | None]
) -> list[Row]:
    """Insert jobs and their first history rows (naming each job's actor, who submitted
    it) in one statement, skipping those whose (tenant, idempotency key) exists, in the
    table or earlier in `new_jobs`.

    Returns the rows inserted (in no particular order); a job absent from the
    result collided with an earlier job's idempotency key. One statement of a fixed
    shape whatever the batch size, so it is prepared once; its parameters go to the
    driver as they are (SQLAlchemy's per-element processing of array parameters cost
    more than the statement), and only the ids come back: the rest is known here.
    """
    now = utcnow()
    params = insert_params(new_jobs, actors, now)
    inserted = {r["id"] for r in await fetch(engine, _INSERT, params)}
    return [new_row(j, now) for j in new_jobs if j.id in inserted]


async def get_by_idempotency_key(conn: AsyncConnection, tenant: str, key: str) -> Row | None:
    stmt = sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == key)
    row = (await conn.execute(stmt)).mappings().first()
    return dict(row) if row else None


async def get_job(
    conn: AsyncConnection, job_id: uuid.UUID, tenant: str | None = None
) -> Row | None:
    """The job, or None; with a tenant, another tenant's job is None too."""
    stmt = sa.select(jobs).where(jobs.c.id == job_id)
    if tenant is not None:
        stmt = stmt.where(jobs.c.tenant == tenant)
    row = (await conn.execute(stmt)).mappings().first()
    return dict(row) if row else None


_MARK_PUBLISHED = (
    "UPDATE jobs SET published_at = now() WHERE id = ANY($1::uuid[]) AND published_at IS NULL"
)


async def mark_published(engine: AsyncEngine, job_ids: Sequence[uuid.UUID]) -> None:
    """Record that the broker confirmed these jobs' messages (the outbox is cleared)."""
    if not job_ids:
        return
    await fetch(engine, _MARK_PUBLISHED, (list(job_ids),))


@dataclass(frozen=True)
class ListFilter:
    tenant: str
    statuses: Sequence[str] = ()
    lane: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


def filtered(stmt: sa.Select[Any], flt: ListFilter) -> sa.Select[Any]:
    """`stmt` narrowed to the filter's tenant, lane, created range and labels (the
    statuses are each caller's: ListJobs takes none as any, bulk actions never have none)."""
    stmt = stmt.where(jobs.c.tenant == flt.tenant)
    if flt.lane:
        stmt = stmt.where(jobs.c.lane == flt.lane)
    if flt.created_after is not None:
        stmt = stmt.where(jobs.c.created_at >= flt.created_after)
    if flt.created_before is not None:
        stmt = stmt.where(jobs.c.created_at < flt.created_before)
    if flt.labels:
        stmt = stmt.where(jobs.c.labels.contains(dict(flt.labels)))
    return stmt


async def list_jobs(
    conn: AsyncConnection,
    flt: ListFilter,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    full: bool = True,
) -> list[Row]:
    """A page of jobs, newest first, keyset-paginated after (created_at, id); without
    `full`, the bulky request body and final message are not read (null)."""
    columns = jobs.c if full else [c for c in jobs.c if c.name not in _BULKY]
    stmt = filtered(sa.select(*columns), flt)
    if flt.statuses:
        stmt = stmt.where(jobs.c.status.in_(list(flt.statuses)))
    if after is not None:
        stmt = stmt.where(sa.tuple_(jobs.c.created_at, jobs.c.id) < sa.tuple_(*after))
    stmt = stmt.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    left_out = dict.fromkeys(() if full else _BULKY)
    return [{**r, **left_out} for r in (await conn.execute(stmt)).mappings()]


_BULKY = ("request", "result")
"""Columns a BASIC listing leaves out."""


_PARAM_CASTS: dict[str, str] = {
    "id": "uuid",
    "lease": "uuid",
    "now": "timestamptz",
    "run_at": "timestamptz",
    "stale_before": "timestamptz",
    "terminal": "boolean",
    "from_states": "text[]",
    "tenant": "text",
    "status": "text",
    "dead_reason": "text",
    "previous": "text",
    "actor": "text",
    "cost": "int8",
}
"""Types of the parameters Postgres cannot infer where they stand (in CASE, IS NULL)."""

_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


@dataclass(frozen=True)
class Statement:
    """A statement written with `:name` parameters and sent to the driver with
    positional ones, as it is (conveyor.db.engine.fetch): SQLAlchemy's compilation
    and per-parameter processing of a text() statement cost about as much client
    CPU as Postgres spends running it, on the path of every job (claim, finish)."""

    sql: str
    names: tuple[str, ...]

    async def fetch(self, engine: AsyncEngine, params: Mapping[str, Any]) -> list[Row]:
        return await fetch(engine, self.sql, [params[n] for n in self.names])


def _sql(statement: str) -> Statement:
    """`statement` with its `:name` parameters numbered ($1, $2 …, a name reused keeps
    its number) and cast where _PARAM_CASTS says."""
    names: list[str] = []

    def positional(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        cast = _PARAM_CASTS.get(name)
        return f"${names.index(name) + 1}" + (f"::{cast}" if cast else "")

    return Statement(_PARAMETER.sub(positional, statement), tuple(names))


async def _one(engine: AsyncEngine, statement: Statement, params: Mapping[str, Any]) -> Row | None:
    """Run one statement and return its first row, if any."""
    rows = await statement.fetch(engine, params)
    return rows[0] if rows else None


# One statement per transition: the UPDATE and its history row travel together.
_EVENT_INSERT = """
  ev AS (
    INSERT INTO job_events (job_id, seq, status, previous, attempt, detail, created_at, actor)
    SELECT id, seq, status, :previous, attempts, CAST(:detail AS jsonb), updated_at, :actor
      FROM moved
  )
"""
_CANCELLER = "CASE WHEN moved.status = 'cancelled' THEN moved.cancel_requested_by END"
"""The actor of a transition to cancelled that a CancelJob call asked for."""

# A tenant with a concurrency limit: its row is locked (claims of that tenant queue here)
# and, on a committed change, re-read, so `running < max_running` is exact.
_CLAIM = _sql(
    """
WITH slot AS (
  SELECT running < max_running AS free FROM tenants
   WHERE tenant = :tenant AND max_running IS NOT NULL
     FOR UPDATE
), moved AS (
  UPDATE jobs
     SET status = 'running', attempts = attempts + 1, lease_id = :lease, heartbeat_at = :now,
         started_at = :now, updated_at = :now, seq = seq + 1, error = NULL
   WHERE id = :id AND status = 'pending' AND cancel_requested_at IS NULL
     AND coalesce((SELECT free FROM slot), true)
  RETURNING *
), """
    + _EVENT_INSERT.replace(":actor", "NULL")
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
) -> Row | None:
    """Move a pending job to running under a new lease; None if it is not pending, or
    if its tenant (`tenant`, the job's) already runs as many jobs as its limit allows."""
    return await _one(
        engine,
        _CLAIM,
        {
            "id": job_id,
            "tenant": tenant,
            "lease": lease,
            "now": utcnow(),
            "worker": worker,
            "previous": "pending",
            "detail": None,
        },
    )


_FINISH = _sql(
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
   WHERE id = :id AND lease_id = :lease AND status = 'running'
  RETURNING *
), """
    + _EVENT_INSERT.replace(":actor", _CANCELLER)
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


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else orjson.dumps(dict(value)).decode()


async def finish(
    engine: AsyncEngine,
    job_id: uuid.UUID,
    lease: uuid.UUID,
    outcome: Outcome,
    seq_floor: int = 0,
) -> Row | None:
    """Write an attempt's outcome if the lease still holds; None when it was refused.

    `seq_floor` is the last sequence number the worker used for token deltas, so
    the transition's event number comes after them.
    """
    usage = outcome.usage or {}
    now = utcnow()
    run_at = None if outcome.retry_in_s is None else now + timedelta(seconds=outcome.retry_in_s)
    return await _one(
        engine,
        _FINISH,
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
            "result": _json(outcome.result),
            "cost": outcome.cost_micros,
            "error": _json(outcome.error),
            "dead_reason": outcome.dead_reason,
            "run_at": run_at,
            "seq_floor": seq_floor,
            "previous": "running",
            "detail": _json(outcome.error),
        },
    )


_TRANSITION = _sql(
    """
WITH moved AS (
  UPDATE jobs
     SET status = :status, updated_at = :now,
         seq = seq + 1 + CASE WHEN status = 'running' THEN """
    + str(LOST_ATTEMPT_SEQ_GAP)
    + """ ELSE 0 END,
         finished_at = CASE WHEN :terminal THEN :now ELSE finished_at END,
         dead_reason = COALESCE(:dead_reason, dead_reason),
         lease_id = CASE WHEN :terminal THEN NULL ELSE lease_id END
   WHERE id = :id AND status = ANY(:from_states) AND (CAST(:tenant AS text) IS NULL OR tenant = :tenant)
  RETURNING *, (SELECT status FROM jobs WHERE id = :id) AS previous_status
), """
    + _EVENT_INSERT.replace(":previous", "moved.previous_status").replace(
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
) -> Row | None:
    """Move a job from one of `from_states` to `to`; None if it was in none of them.

    `actor` names who asked for it; a move to cancelled defaults to whoever
    requested the cancel.
    """
    return await _one(
        engine,
        _TRANSITION,
        {
            "id": job_id,
            "from_states": [s.value for s in from_states],
            "status": to.value,
            "terminal": to.terminal,
            "tenant": tenant,
            "dead_reason": dead_reason,
            "now": utcnow(),
            "detail": _json(detail),
            "actor": actor,
        },
    )


_REQUEST_CANCEL = _sql(
    """
UPDATE jobs
   SET cancel_requested_at = coalesce(cancel_requested_at, :now),
       cancel_requested_by = coalesce(cancel_requested_by, :actor)
 WHERE id = :id AND tenant = :tenant AND status = 'running'
RETURNING *
"""
)


async def request_cancel(
    engine: AsyncEngine, job_id: uuid.UUID, tenant: str, actor: str | None = None
) -> Row | None:
    """Flag a running job for cancellation (the worker aborts it); None if not running.

    `actor` is kept for the `cancelled` transition that follows.
    """
    return await _one(
        engine,
        _REQUEST_CANCEL,
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


async def heartbeat(engine: AsyncEngine, leases: Sequence[uuid.UUID]) -> Renewal:
    """Renew the leases of running jobs: which ones were lost, which jobs to cancel."""
    if not leases:
        return Renewal(lost=frozenset(), cancel=())
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.update(jobs)
            .where(
                jobs.c.lease_id
                == sa.any_(sa.bindparam("leases", type_=sa.ARRAY(UUID(as_uuid=True)))),
                jobs.c.status == JobState.RUNNING.value,
            )
            .values(heartbeat_at=utcnow())
            .returning(jobs.c.id, jobs.c.lease_id, jobs.c.cancel_requested_at),
            {"leases": list(leases)},
        )
        rows = list(result)
    held = {r.lease_id for r in rows}
    return Renewal(
        lost=frozenset(lease for lease in leases if lease not in held),
        cancel=tuple(r.id for r in rows if r.cancel_requested_at is not None),
    )


_REQUEUE_STALLED = _sql(
    """
WITH stalled AS (
  SELECT id FROM jobs
   WHERE status = 'running' AND heartbeat_at < :stale_before
   ORDER BY heartbeat_at LIMIT :limit FOR UPDATE SKIP LOCKED
), moved AS (
  UPDATE jobs j
     SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'pending' END,
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
    + _EVENT_INSERT.replace(":previous", "'running'").replace(":actor", "NULL")
    + """,
  att AS (
    UPDATE job_attempts a SET finished_at = :now, outcome = 'lost'
      FROM moved WHERE a.job_id = moved.id AND a.attempt = moved.attempts
  )
SELECT * FROM moved
"""
)


async def requeue_stalled(engine: AsyncEngine, lease_s: float, limit: int = 500) -> list[Row]:
    """Recover running jobs whose worker stopped heartbeating.

    Each goes back to pending, or to dead when that was its last attempt (a job
    that keeps killing its worker must not loop). Returns the moved rows.
    """
    now = utcnow()
    return await _REQUEUE_STALLED.fetch(
        engine,
        {
            "stale_before": now - timedelta(seconds=lease_s),
            "now": now,
            "limit": limit,
            "detail": _json({"reason": "stalled: no heartbeat within the lease"}),
        },
    )


_RELEASE_DUE = _sql(
    """
WITH due AS (
  SELECT id FROM jobs
   WHERE status = 'scheduled' AND run_at <= :now
   ORDER BY run_at LIMIT :limit FOR UPDATE SKIP LOCKED
), moved AS (
  UPDATE jobs j SET status = 'pending', published_at = NULL, updated_at = :now, seq = seq + 1
    FROM due WHERE j.id = due.id
  RETURNING j.*
), """
    + _EVENT_INSERT.replace(":previous", "'scheduled'").replace(":actor", "NULL")
    + """
SELECT id, tenant, lane, priority, trace_id, traceparent, status FROM moved
"""
)


async def release_due(engine: AsyncEngine, limit: int = 500) -> list[Row]:
    """Move scheduled jobs whose time has come to pending; returns them to publish."""
    return await _RELEASE_DUE.fetch(engine, {"now": utcnow(), "limit": limit, "detail": None})


async def unpublished(engine: AsyncEngine, older_than_s: float, limit: int = 500) -> list[Row]:
    """Pending jobs whose publish was never confirmed (the outbox), oldest first."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(
                jobs.c.id,
                jobs.c.tenant,
                jobs.c.lane,
                jobs.c.priority,
                jobs.c.trace_id,
                jobs.c.traceparent,
            )
            .where(jobs.c.status == "pending", jobs.c.published_at.is_(None))
            .where(jobs.c.updated_at < cutoff)
            .order_by(jobs.c.created_at)
            .limit(limit)
        )
        return [dict(r) for r in result.mappings()]


_REPUBLISH_STALE = _sql(
    """
WITH stale AS (
  SELECT id FROM jobs
   WHERE status = 'pending' AND published_at IS NOT NULL AND published_at < :stale_before
   ORDER BY published_at LIMIT :limit FOR UPDATE SKIP LOCKED
)
UPDATE jobs j SET published_at = :now
  FROM stale WHERE j.id = stale.id
RETURNING j.id, j.tenant, j.lane, j.priority, j.trace_id, j.traceparent, j.status
"""
)


async def stale_pending(engine: AsyncEngine, older_than_s: float, limit: int = 500) -> list[Row]:
    """Pending jobs whose message went out more than `older_than_s` ago and was never
    claimed (a purged or lost queue), to publish again; each is stamped as published
    now, so it is republished at most once per `older_than_s`. A job whose message is
    merely waiting in a long queue gets a second one, which the conditional claim
    makes harmless."""
    now = utcnow()
    return await _REPUBLISH_STALE.fetch(
        engine,
        {"stale_before": now - timedelta(seconds=older_than_s), "now": now, "limit": limit},
    )


async def history(conn: AsyncConnection, job_id: uuid.UUID, after_seq: int = 0) -> list[Row]:
    """The job's stored transitions after a sequence number, in order."""
    result = await conn.execute(
        sa.select(job_events)
        .where(job_events.c.job_id == job_id, job_events.c.seq > after_seq)
        .order_by(job_events.c.seq)
    )
    return [dict(r) for r in result.mappings()]


_REPLAY = _sql(
    """
WITH moved AS (
  UPDATE jobs
     SET status = 'pending', max_attempts = attempts + :budget, dead_reason = NULL,
         finished_at = NULL, published_at = NULL, run_at = NULL, cancel_requested_at = NULL,
         cancel_requested_by = NULL, updated_at = :now, seq = seq + 1
   WHERE id = :id AND tenant = :tenant AND status = ANY(:from_states)
  RETURNING *, (SELECT status FROM jobs WHERE id = :id) AS previous_status
), """
    + _EVENT_INSERT.replace(":previous", "moved.previous_status")
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
) -> Row | None:
    """Queue a failed or dead job again with `budget` more attempts; history is kept,
    naming `actor`, who replayed it."""
    return await _one(
        engine,
        _REPLAY,
        {
            "id": job_id,
            "tenant": tenant,
            "budget": budget,
            "from_states": [s.value for s in from_states],
            "now": utcnow(),
            "detail": _json({"reason": "replayed by RetryJob"}),
            "actor": actor,
        },
    )


_RELEASE = _sql(
    """
WITH moved AS (
  UPDATE jobs
     SET status = 'pending', lease_id = NULL, heartbeat_at = NULL, updated_at = :now,
         seq = GREATEST(seq, :seq_floor) + 1, max_attempts = max_attempts + 1
   WHERE id = :id AND lease_id = :lease AND status = 'running'
  RETURNING *
), """
    + _EVENT_INSERT.replace(":actor", "NULL")
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
) -> Row | None:
    """Hand a running job back to pending (worker shutdown).

    The interrupted attempt stays in the history as `handed_back`, and the job gets
    one more attempt so that a shutdown does not use up its budget. `seq_floor` is
    the last sequence number the worker used for token deltas (as for `finish`).
    """
    return await _one(
        engine,
        _RELEASE,
        {
            "id": job_id,
            "lease": lease,
            "now": utcnow(),
            "previous": "running",
            "detail": _json({"reason": "handed back at worker shutdown"}),
            "seq_floor": seq_floor,
        },
    )


@dataclass(frozen=True)
class Stats:
    counts: dict[tuple[str, str], int]
    """Jobs per (lane, status)."""
    tokens: dict[str, int]
    run_time_p50_s: float | None
    run_time_p95_s: float | None


async def stats(conn: AsyncConnection, tenant: str) -> Stats:
    """A tenant's counts and token totals (from the trigger-kept counters, not the jobs
    table) and run-time percentiles of its latest 1,000 successes (an index range)."""
    counts = await conn.execute(
        sa.text(
            """
            SELECT lane, status, sum(jobs) AS n, sum(input_tokens) AS input_tokens,
                   sum(output_tokens) AS output_tokens,
                   sum(cache_creation_input_tokens) AS cache_creation_input_tokens,
                   sum(cache_read_input_tokens) AS cache_read_input_tokens
              FROM job_counts WHERE tenant = :t GROUP BY lane, status
            """
        ),
        {"t": tenant},
    )
    by_status: dict[tuple[str, str], int] = {}
    tokens = dict.fromkeys(
        ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"),
        0,
    )
    for row in counts.mappings():
        if row["n"]:
            by_status[(row["lane"], row["status"])] = int(row["n"])
        for key in tokens:
            tokens[key] += int(row[key] or 0)
    perf = (
        await conn.execute(
            sa.text(
                """
                SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50,
                       percentile_cont(0.95) WITHIN GROUP (ORDER BY d) AS p95
                  FROM (SELECT extract(epoch FROM finished_at - started_at) AS d
                          FROM jobs WHERE tenant = :t AND status = 'succeeded'
                         ORDER BY finished_at DESC LIMIT 1000) recent
                """
            ),
            {"t": tenant},
        )
    ).one()
    return Stats(
        counts=by_status,
        tokens=tokens,
        run_time_p50_s=None if perf.p50 is None else float(perf.p50),
        run_time_p95_s=None if perf.p95 is None else float(perf.p95),
    )


@dataclass(frozen=True)
class CostRow:
    """Jobs of one tenant, model and lane finished in a window, and what they cost."""

    tenant: str
    model: str
    lane: str
    jobs: int
    unpriced_jobs: int
    cost_micros: int
    tokens: dict[str, int]


async def cost_rows(
    conn: AsyncConnection, tenant: str | None, since: datetime, until: datetime
) -> list[CostRow]:
    """Cost per tenant, model and lane of the jobs finished in [since, until) (of one
    tenant, or of all with None); an unpriced job counts in `unpriced_jobs`, not in
    the cost. Reads the jobs table (the retention purge bounds what it covers)."""
    result = await conn.execute(
        sa.text(
            """
            SELECT tenant, model, lane, count(*) AS jobs,
                   count(*) FILTER (WHERE cost_micros IS NULL) AS unpriced_jobs,
                   coalesce(sum(cost_micros), 0) AS cost_micros,
                   coalesce(sum(input_tokens), 0) AS input_tokens,
                   coalesce(sum(output_tokens), 0) AS output_tokens,
                   coalesce(sum(cache_creation_input_tokens), 0) AS cache_creation_input_tokens,
                   coalesce(sum(cache_read_input_tokens), 0) AS cache_read_input_tokens
              FROM jobs
             WHERE finished_at >= :since AND finished_at < :until
               AND (CAST(:tenant AS text) IS NULL OR tenant = :tenant)
             GROUP BY tenant, model, lane
             ORDER BY tenant, model, lane
            """
        ),
        {"since": since, "until": until, "tenant": tenant},
    )
    keys = (
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    )
    return [
        CostRow(
            tenant=r["tenant"],
            model=r["model"],
            lane=r["lane"],
            jobs=int(r["jobs"]),
            unpriced_jobs=int(r["unpriced_jobs"]),
            cost_micros=int(r["cost_micros"]),
            tokens={k: int(r[k]) for k in keys},
        )
        for r in result.mappings()
    ]
