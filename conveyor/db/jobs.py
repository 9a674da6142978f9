"""Job rows: inserting new jobs, reading and listing them, and their history.

The transitions are in conveyor/db/transitions.py and the statistics in
conveyor/db/job_stats.py; all three write their SQL in one style
(conveyor/db/statements.py) and return typed `Job` records.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.lifecycle import Job, JobState
from conveyor.db.engine import fetch
from conveyor.db.schema import jobs
from conveyor.db.statements import Row, sql, utcnow

__all__ = ["NewJob", "Row", "utcnow"]


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


def _status(job: NewJob, now: datetime) -> JobState:
    """A new job's first status (the table's `submit`): scheduled when its run_at lies
    ahead."""
    scheduled = job.run_at is not None and job.run_at > now
    return JobState.SCHEDULED if scheduled else JobState.PENDING


def values(job: NewJob, now: datetime) -> dict[str, Any]:
    return {
        "id": job.id,
        "tenant": job.tenant,
        "status": _status(job, now).value,
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


# Positional ($n) rather than `:name` like the rest of the job SQL: one array per column,
# sent as they are; bench/floors.py runs this very statement to measure the floor.
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


def as_stored(job: NewJob, now: datetime) -> Job:
    """The job `insert_jobs` stores for `job` at `now`, every column included (those
    not named here are NULL, the Job's defaults)."""
    return Job(
        id=job.id,
        tenant=job.tenant,
        status=_status(job, now),
        lane=job.lane,
        model=job.model,
        priority=job.priority,
        request=job.request,
        labels=job.labels,
        idempotency_key=job.idempotency_key,
        request_hash=job.request_hash,
        max_attempts=job.max_attempts,
        attempts=0,
        timeout_ms=job.timeout_ms,
        webhook_url=job.webhook_url,
        webhook_all_events=job.webhook_all_events,
        run_at=job.run_at,
        trace_id=job.trace_id,
        traceparent=job.traceparent,
        seq=1,
        created_at=now,
        updated_at=now,
        budget_micros=job.budget_micros,
        budget_day=job.budget_day,
    )


def insert_params(
    new_jobs: Sequence[NewJob], actors: Sequence[str | None], now: datetime
) -> tuple[Any, ...]:
    """The positional parameters of `_INSERT` for `new_jobs` (one array per column)."""
    return (
        now,
        [j.id for j in new_jobs],
        [j.tenant for j in new_jobs],
        [_status(j, now).value for j in new_jobs],
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
) -> list[Job]:
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
    return [as_stored(j, now) for j in new_jobs if j.id in inserted]


_GET_BY_KEY = sql("SELECT * FROM jobs WHERE tenant = :tenant AND idempotency_key = :key")


async def get_by_idempotency_key(conn: AsyncConnection, tenant: str, key: str) -> Job | None:
    return await _GET_BY_KEY.job(conn, {"tenant": tenant, "key": key})


_GET = sql(
    "SELECT * FROM jobs WHERE id = :id AND (CAST(:tenant AS text) IS NULL OR tenant = :tenant)"
)


async def get_job(
    conn: AsyncConnection, job_id: uuid.UUID, tenant: str | None = None
) -> Job | None:
    """The job, or None; with a tenant, another tenant's job is None too."""
    return await _GET.job(conn, {"id": job_id, "tenant": tenant})


# Only rows still pending: the outbox looks at no other, and a job claimed meanwhile
# (most of them, under load) is not written again for nothing.
_PENDING = f"status = '{JobState.PENDING.value}'"
_MARK_PUBLISHED = sql(
    # Every scan of `jobs` here finds its rows by id, through the primary key: the
    # conditions on status and stamp are checked on rows already found, never handed to
    # the scans, where the partial indexes of pending jobs (jobs_pending_lane,
    # jobs_unpublished) would match them. Statistics taken while few jobs were pending
    # make those indexes look nearly empty, and a stamp given them after a burst of
    # submits scanned every unstamped job once per row it locked: seconds for 5,000
    # jobs, the stamps fell behind and the outbox published thousands of jobs again
    # (bench/README.md). The rows are locked in the order of their ids, as the worker's
    # claim groups lock them (transitions.LOCK_IN_ORDER): locked in a scan's order, a
    # stamp and a claim group deadlocked. Only rows still pending, unstamped, are locked
    # and written: under load most jobs are claimed before their stamp.
    "WITH listed AS MATERIALIZED ("
    " SELECT id, status, published_at FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"
    "), locked AS MATERIALIZED ("
    " SELECT jobs.id, jobs.status, jobs.published_at FROM listed JOIN jobs ON jobs.id = listed.id"
    f" WHERE listed.{_PENDING} AND listed.published_at IS NULL"
    " ORDER BY jobs.id FOR UPDATE OF jobs)"
    " UPDATE jobs SET published_at = now() FROM locked"
    f" WHERE jobs.id = locked.id AND locked.{_PENDING} AND locked.published_at IS NULL"
)


async def mark_published(engine: AsyncEngine, job_ids: Sequence[uuid.UUID]) -> None:
    """Record that the broker confirmed these jobs' messages (the outbox is cleared);
    a job no longer pending is left as it is."""
    if not job_ids:
        return
    await _MARK_PUBLISHED.fetch(engine, {"ids": list(job_ids)})


@dataclass(frozen=True)
class ListFilter:
    tenant: str
    statuses: Sequence[str] = ()
    lane: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def where(self) -> tuple[str, dict[str, Any]]:
        """The conditions on the filter's tenant, lane, created range and labels (`:name`
        parameters, named as its fields) and the values of those it uses. The statuses
        are each caller's: ListJobs takes none as any, bulk actions never have none."""
        conditions = ["tenant = :tenant"]
        params: dict[str, Any] = {"tenant": self.tenant}
        if self.lane:
            conditions.append("lane = :lane")
            params["lane"] = self.lane
        if self.created_after is not None:
            conditions.append("created_at >= CAST(:created_after AS timestamptz)")
            params["created_after"] = self.created_after
        if self.created_before is not None:
            conditions.append("created_at < CAST(:created_before AS timestamptz)")
            params["created_before"] = self.created_before
        if self.labels:
            conditions.append("labels @> CAST(:labels AS jsonb)")
            params["labels"] = orjson.dumps(dict(self.labels)).decode()
        return " AND ".join(conditions), params


_BULKY = ("request", "result")
"""Columns a BASIC listing leaves out."""

_LEAN_COLUMNS = ", ".join(c.name for c in jobs.c if c.name not in _BULKY)


async def list_jobs(
    conn: AsyncConnection,
    flt: ListFilter,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    full: bool = True,
) -> list[Job]:
    """A page of jobs, newest first, keyset-paginated after (created_at, id); without
    `full`, the bulky request body and final message are not read (None)."""
    where, params = flt.where()
    if flt.statuses:
        where += " AND status = ANY(CAST(:statuses AS text[]))"
    if after is not None:
        where += (
            " AND (created_at, id) < (CAST(:after_created AS timestamptz), CAST(:after_id AS uuid))"
        )
    statement = sql(
        f"SELECT {'*' if full else _LEAN_COLUMNS} FROM jobs WHERE {where}"
        " ORDER BY created_at DESC, id DESC LIMIT :limit"
    )
    after_created, after_id = after or (None, None)
    params.update(
        statuses=list(flt.statuses), after_created=after_created, after_id=after_id, limit=limit
    )
    return await statement.jobs(conn, params)


_HISTORY = sql("SELECT * FROM job_events WHERE job_id = :id AND seq > :after ORDER BY seq")


async def history(conn: AsyncConnection, job_id: uuid.UUID, after_seq: int = 0) -> list[Row]:
    """The job's stored transitions after a sequence number, in order."""
    return await _HISTORY.fetch(conn, {"id": job_id, "after": after_seq})


# The transitions, sweeps and statistics, importable from here as before the split.
from conveyor.db.job_stats import CostRow, Stats, cost_rows, stats  # noqa: E402
from conveyor.db.sweeps import release_due, requeue_stalled, stale_pending, unpublished  # noqa: E402
from conveyor.db.transitions import (  # noqa: E402
    LOST_ATTEMPT_SEQ_GAP,
    Outcome,
    Renewal,
    claim,
    finish,
    heartbeat,
    release,
    replay,
    request_cancel,
    transition,
)

__all__ += [
    "LOST_ATTEMPT_SEQ_GAP",
    "CostRow",
    "Outcome",
    "Renewal",
    "Stats",
    "claim",
    "cost_rows",
    "finish",
    "heartbeat",
    "release",
    "release_due",
    "replay",
    "request_cancel",
    "requeue_stalled",
    "stale_pending",
    "stats",
    "transition",
    "unpublished",
]
