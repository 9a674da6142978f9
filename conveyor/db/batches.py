"""Batches of the batch lane (services/dispatcher/batcher.py) in Postgres.

A batch moves `recorded` (its row and its jobs' links written, nothing sent yet) →
`created` (the API accepted it; its jobs went pending → running under the batch's id
as their lease) → `ended` (results written). Recording, creating and reading results
each happen under a row lock (FOR UPDATE SKIP LOCKED) or an advisory lock, so several
dispatchers never work on the same batch or pick the same job twice.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.lifecycle import Job
from conveyor.db.engine import driver_connection, fetch
from conveyor.db.jobs import utcnow
from conveyor.db.transitions import leaving

Row = Mapping[str, Any]

RECORD_LOCK = 0x636F6E76_62617401
"""Advisory lock held while jobs are picked into a new batch: one recorder at a time,
so a job can never be linked to two recorded batches."""
SUBMIT_LOCK = 0x636F6E76_62617402
"""Advisory lock held while a recorded batch is looked up at the API and created: a
batch another dispatcher created is noted before anyone looks for orphans."""

REQUEST_OVERHEAD_BYTES = 64
"""Bytes counted per request besides its params (custom_id, keys, separators)."""

_OPEN_LINK = """
  EXISTS (SELECT 1 FROM batch_jobs bj JOIN batches b ON b.id = bj.batch_id
           WHERE bj.job_id = j.id AND b.status = 'recorded')
"""
"""A pending job linked to a batch not yet created is taken (after creation it runs)."""


@dataclass(frozen=True)
class Waiting:
    """Jobs of one model waiting for a batch."""

    model: str
    jobs: int
    bytes: int
    oldest: datetime


async def waiting(engine: AsyncEngine, lanes: Sequence[str]) -> list[Waiting]:
    """Per model, the pending jobs of the batch lanes not in a batch yet."""
    rows = await fetch(
        engine,
        f"""
        SELECT model, count(*) AS n, sum(octet_length(request::text)) AS bytes,
               min(created_at) AS oldest
          FROM jobs j
         WHERE status = 'pending' AND lane = ANY($1::text[]) AND cancel_requested_at IS NULL
           AND NOT {_OPEN_LINK}
         GROUP BY model
        """,
        (list(lanes),),
    )
    return [Waiting(r["model"], int(r["n"]), int(r["bytes"] or 0), r["oldest"]) for r in rows]


def marker_of(job_ids: Sequence[uuid.UUID]) -> str:
    """The batch's identity: a hash of its job ids (its custom_ids), in order."""
    return hashlib.sha256(",".join(str(i) for i in sorted(job_ids)).encode()).hexdigest()


def params_of(model: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """The Messages API body of a job (its stored request has no model), not streamed."""
    return {**{k: v for k, v in request.items() if k != "stream"}, "model": model}


async def record(
    engine: AsyncEngine,
    lanes: Sequence[str],
    model: str,
    max_requests: int,
    max_bytes: int,
    traceparent: str | None = None,
) -> tuple[uuid.UUID, int] | None:
    """Pick the oldest waiting jobs of `model` (within the size limits) into a new
    `recorded` batch; (batch id, jobs), or None when there were none or another
    dispatcher is recording."""
    async with driver_connection(engine) as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RECORD_LOCK):
            return None
        rows = await conn.fetch(
            f"""
            SELECT id, octet_length(request::text) AS size FROM jobs j
             WHERE status = 'pending' AND lane = ANY($1::text[]) AND model = $2
               AND cancel_requested_at IS NULL AND NOT {_OPEN_LINK}
             ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED
            """,
            list(lanes),
            model,
            max_requests,
        )
        picked: list[uuid.UUID] = []
        total = 0
        for r in rows:
            size = int(r["size"]) + len(model) + REQUEST_OVERHEAD_BYTES
            if picked and total + size > max_bytes:
                break
            picked.append(r["id"])
            total += size
        if not picked:
            return None
        batch_id = uuid.uuid4()
        await conn.execute(
            """
            INSERT INTO batches (id, model, status, marker, request_count, request_bytes,
                                 traceparent, recorded_at)
            VALUES ($1, $2, 'recorded', $3, $4, $5, $6, $7)
            """,
            batch_id,
            model,
            marker_of(picked),
            len(picked),
            total,
            traceparent,
            utcnow(),
        )
        await conn.execute(
            "INSERT INTO batch_jobs (batch_id, job_id) SELECT $1, unnest($2::uuid[])",
            batch_id,
            picked,
        )
        return batch_id, len(picked)


async def open_batches(engine: AsyncEngine, status: str, due_only: bool = True) -> list[Row]:
    """Batches in `status` (`recorded`, or `created` and due for a poll)."""
    return await fetch(
        engine,
        """
        SELECT * FROM batches
         WHERE status = $1 AND ($2 = false OR next_poll_at IS NULL OR next_poll_at <= now())
         ORDER BY recorded_at LIMIT 100
        """,
        (status, due_only),
    )


@asynccontextmanager
async def locked(
    engine: AsyncEngine, batch_id: uuid.UUID, status: str, advisory: int | None = None
) -> AsyncIterator[tuple[asyncpg.Connection, Row | None]]:
    """A transaction holding the batch's row (None: it is not in `status` any more, or
    another dispatcher holds it) and, if given, an advisory lock (None without it)."""
    async with driver_connection(engine) as conn, conn.transaction():
        if advisory is not None and not await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock($1)", advisory
        ):
            yield conn, None
            return
        row = await conn.fetchrow(
            "SELECT * FROM batches WHERE id = $1 AND status = $2 FOR UPDATE SKIP LOCKED",
            batch_id,
            status,
        )
        yield conn, row


async def batch_jobs(conn: asyncpg.Connection, batch_id: uuid.UUID) -> list[Job]:
    """The jobs of a batch, in the order they were linked."""
    rows = await conn.fetch(
        """
        SELECT j.id, j.model, j.request, j.labels, j.status, j.attempts, j.max_attempts,
               j.lease_id, j.cancel_requested_at, j.traceparent, j.tenant, j.lane
          FROM batch_jobs bj JOIN jobs j ON j.id = bj.job_id
         WHERE bj.batch_id = $1 ORDER BY j.created_at, j.id
        """,
        batch_id,
    )
    return [Job.from_row(dict(r)) for r in rows]


async def registered_provider_ids(conn: asyncpg.Connection, ids: Sequence[str]) -> set[str]:
    """Which of these provider batch ids some batch row already owns."""
    rows = await conn.fetch(
        "SELECT provider_batch_id FROM batches WHERE provider_batch_id = ANY($1::text[])",
        list(ids),
    )
    return {r["provider_batch_id"] for r in rows}


_CLAIM = (
    """
WITH moved AS (
  UPDATE jobs j
     SET status = 'running', attempts = attempts + 1, lease_id = $1, heartbeat_at = $2,
         started_at = $3, updated_at = $3, seq = seq + 1, error = NULL
    FROM batch_jobs bj
   WHERE bj.batch_id = $1 AND j.id = bj.job_id AND j."""
    + leaving("claim")
    + """
     AND j.cancel_requested_at IS NULL
  RETURNING j.*
), ev AS (
  INSERT INTO job_events (job_id, seq, status, previous, attempt, detail, created_at, actor)
  SELECT id, seq, status, 'pending', attempts, CAST($4 AS jsonb), updated_at, NULL FROM moved
), att AS (
  INSERT INTO job_attempts (job_id, attempt, lease_id, worker, started_at)
  SELECT id, attempts, lease_id, $5, started_at FROM moved
)
SELECT * FROM moved
"""
)


async def mark_created(
    conn: asyncpg.Connection,
    batch_id: uuid.UUID,
    provider_batch_id: str,
    expires_at: datetime,
    first_poll_s: float,
    hold_s: float,
) -> list[Job]:
    """The API accepted the batch: note it and move its pending jobs to running, with
    the batch's id as their lease and a heartbeat `hold_s` past its expiry (so the
    stalled-job sweeper leaves them to the batcher). Returns the moved job rows."""
    now = utcnow()
    await conn.execute(
        """
        UPDATE batches SET status = 'created', provider_batch_id = $2, submitted_at = $3,
               expires_at = $4, next_poll_at = $5
         WHERE id = $1
        """,
        batch_id,
        provider_batch_id,
        now,
        expires_at,
        now + timedelta(seconds=first_poll_s),
    )
    detail = orjson.dumps(
        {"batch_id": str(batch_id), "provider_batch_id": provider_batch_id}
    ).decode()
    rows = await conn.fetch(
        _CLAIM,
        batch_id,
        expires_at + timedelta(seconds=hold_s),
        now,
        detail,
        f"batch:{provider_batch_id}",
    )
    return [Job.from_row(dict(r)) for r in rows]


async def end_empty(conn: asyncpg.Connection, batch_id: uuid.UUID) -> None:
    """A recorded batch whose jobs were all cancelled before it was created."""
    await conn.execute(
        "UPDATE batches SET status = 'ended', ended_at = now() WHERE id = $1", batch_id
    )


async def next_poll(engine: AsyncEngine, batch_id: uuid.UUID, wait_s: float) -> None:
    await fetch(
        engine,
        """
        UPDATE batches SET polls = polls + 1, next_poll_at = now() + make_interval(secs => $2)
         WHERE id = $1
        """,
        (batch_id, wait_s),
    )


async def mark_ended(
    conn: asyncpg.Connection,
    batch_id: uuid.UUID,
    request_counts: Mapping[str, int],
    cost_micros: int | None,
    outcomes: Mapping[uuid.UUID, str],
) -> None:
    """Results are written: the batch is ended, each link keeps its job's result type.
    On the connection that holds the batch's row."""
    await conn.execute(
        """
        WITH b AS (
          UPDATE batches SET status = 'ended', ended_at = now(), request_counts = $2::jsonb,
                 cost_micros = $3, next_poll_at = NULL
           WHERE id = $1
        )
        UPDATE batch_jobs bj SET outcome = o.outcome
          FROM unnest($4::uuid[], $5::text[]) AS o(job_id, outcome)
         WHERE bj.batch_id = $1 AND bj.job_id = o.job_id
        """,
        batch_id,
        orjson.dumps(dict(request_counts)).decode(),
        cost_micros,
        list(outcomes),
        list(outcomes.values()),
    )


async def mark_cancel_sent(engine: AsyncEngine, batch_id: uuid.UUID) -> None:
    await fetch(
        engine,
        "UPDATE batches SET cancel_sent_at = now(), next_poll_at = now() WHERE id = $1",
        (batch_id,),
    )


async def cancel_requested(engine: AsyncEngine) -> list[Row]:
    """Running jobs of created batches whose cancel was requested (CancelJob)."""
    return await fetch(
        engine,
        """
        SELECT j.id, b.id AS batch_id FROM batches b
          JOIN jobs j ON j.lease_id = b.id
         WHERE b.status = 'created' AND j.status = 'running' AND j.cancel_requested_at IS NOT NULL
        """,
        (),
    )


async def all_cancelled(engine: AsyncEngine) -> list[Row]:
    """Created batches, not yet cancelled at the API, none of whose jobs runs any more
    (every one was cancelled): worth cancelling at the API."""
    return await fetch(
        engine,
        """
        SELECT b.id, b.provider_batch_id FROM batches b
         WHERE b.status = 'created' AND b.cancel_sent_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.lease_id = b.id AND j.status = 'running')
           AND NOT EXISTS (SELECT 1 FROM batch_jobs bj JOIN jobs j ON j.id = bj.job_id
                            WHERE bj.batch_id = b.id AND j.status <> 'cancelled')
        """,
        (),
    )


async def batch_of_job(engine: AsyncEngine, job_id: uuid.UUID) -> list[Row]:
    """The batches a job went through, oldest first."""
    return await fetch(
        engine,
        """
        SELECT b.*, bj.outcome FROM batch_jobs bj JOIN batches b ON b.id = bj.batch_id
         WHERE bj.job_id = $1 ORDER BY b.recorded_at
        """,
        (job_id,),
    )
