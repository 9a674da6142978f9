"""Webhook deliveries (migration 0002): the relay's outbox reads and the attempts'
bookkeeping. A trigger writes a delivery row in the transaction of the status change
it reports; the notifier (services.notifier.webhooks) puts due rows on the
`conveyor.webhooks` queue and records each attempt here, so retry timers live in
Postgres, not in unacknowledged messages.

A delivery is `pending` (due at `next_attempt_at`), `succeeded` or `failed` (gave up,
or the URL was refused). `published_at` is set while it is on the queue;
`locked_until` while a notifier makes an attempt.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

PENDING = "pending"
SUCCEEDED = "succeeded"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook delivery as stored (a row of `webhook_deliveries`)."""

    id: uuid.UUID
    job_id: uuid.UUID
    tenant: str
    url: str
    seq: int
    event: str
    """The status the job changed to."""
    previous: str | None
    job: Mapping[str, Any]
    """The job's JSON as it was at that change."""
    status: str
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime
    published_at: datetime | None = None
    locked_until: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Delivery:
        return cls(**{name: row[name] for name in _FIELDS if name in row})


_FIELDS = tuple(f.name for f in fields(Delivery))

_DUE = sa.text(
    """
UPDATE webhook_deliveries SET published_at = now()
 WHERE id IN (SELECT id FROM webhook_deliveries
               WHERE status = 'pending' AND next_attempt_at <= now()
                 AND (published_at IS NULL OR published_at < now() - make_interval(secs => :stale_s))
               ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED)
RETURNING id
"""
)
_UNPUBLISH = sa.text(
    "UPDATE webhook_deliveries SET published_at = NULL WHERE id = ANY(:ids) AND status = 'pending'"
).bindparams(sa.bindparam("ids", type_=sa.ARRAY(sa.Uuid())))
_READ = sa.text("SELECT * FROM webhook_deliveries WHERE id = :id").bindparams(
    sa.bindparam("id", type_=sa.Uuid())
)
_CLAIM = sa.text(
    """
UPDATE webhook_deliveries
   SET attempts = attempts + 1, locked_until = now() + make_interval(secs => :lock_s),
       updated_at = now()
 WHERE id = :id AND status = 'pending' AND (locked_until IS NULL OR locked_until < now())
RETURNING *
"""
).bindparams(sa.bindparam("id", type_=sa.Uuid()))
_DEFER = sa.text(
    """
UPDATE webhook_deliveries
   SET published_at = NULL, next_attempt_at = now() + make_interval(secs => :wait_s),
       updated_at = now()
 WHERE id = :id AND status = 'pending'
"""
).bindparams(sa.bindparam("id", type_=sa.Uuid()))
_RECORD = sa.text(
    """
WITH att AS (
  INSERT INTO webhook_attempts
    (delivery_id, attempt, started_at, status_code, latency_ms, error, notifier)
  VALUES (:id, :attempt, :started_at, :status_code, :latency_ms, :error, :notifier)
)
UPDATE webhook_deliveries
   SET status = :status, last_status_code = :status_code, last_error = :error,
       next_attempt_at = COALESCE(:next_at, next_attempt_at),
       published_at = CASE WHEN :status = 'pending' THEN NULL ELSE published_at END,
       locked_until = NULL, updated_at = now(),
       delivered_at = CASE WHEN :status = 'succeeded' THEN now() ELSE NULL END
 WHERE id = :id
"""
).bindparams(
    sa.bindparam("id", type_=sa.Uuid()),
    sa.bindparam("started_at", type_=sa.DateTime(timezone=True)),
    sa.bindparam("next_at", type_=sa.DateTime(timezone=True)),
    sa.bindparam("status_code", type_=sa.Integer()),
    sa.bindparam("error", type_=sa.Text()),
    sa.bindparam("status", type_=sa.Text()),
)
_GIVE_UP = sa.text(
    """
UPDATE webhook_deliveries
   SET status = 'failed', last_error = :error, locked_until = NULL, updated_at = now()
 WHERE id = :id AND status = 'pending'
"""
).bindparams(sa.bindparam("id", type_=sa.Uuid()))


@dataclass(frozen=True)
class Attempt:
    """What one attempt at a delivery came to, as recorded."""

    delivery_id: uuid.UUID
    attempt: int
    started_at: datetime
    status_code: int | None
    latency_ms: float
    error: str | None
    notifier: str
    status: str
    """The delivery's status after it: succeeded, failed, or pending (retried at next_at)."""
    next_at: datetime | None


async def take_due(engine: AsyncEngine, stale_s: float, limit: int) -> list[uuid.UUID]:
    """Due deliveries, stamped as published now (rows on the queue for longer than
    `stale_s` count as lost and are taken again); at most `limit`, oldest due first."""
    async with engine.connect() as conn:
        result = await conn.execute(_DUE, {"stale_s": stale_s, "limit": limit})
        return [r[0] for r in result]


async def unpublish(engine: AsyncEngine, ids: Sequence[uuid.UUID]) -> None:
    """Deliveries whose publish failed: due again at the next relay round."""
    async with engine.connect() as conn:
        await conn.execute(_UNPUBLISH, {"ids": list(ids)})


async def get(engine: AsyncEngine, delivery_id: uuid.UUID) -> Delivery | None:
    async with engine.connect() as conn:
        row = (await conn.execute(_READ, {"id": delivery_id})).mappings().first()
    return Delivery.from_row(dict(row)) if row is not None else None


async def claim(engine: AsyncEngine, delivery_id: uuid.UUID, lock_s: float) -> Delivery | None:
    """Count an attempt and lock the delivery for `lock_s`; None if it is no longer
    pending or another notifier holds it."""
    async with engine.connect() as conn:
        row = (await conn.execute(_CLAIM, {"id": delivery_id, "lock_s": lock_s})).mappings().first()
    return Delivery.from_row(dict(row)) if row is not None else None


async def defer(engine: AsyncEngine, delivery_id: uuid.UUID, wait_s: float) -> None:
    """Due again in `wait_s`, without counting an attempt (its host or tenant is busy)."""
    async with engine.connect() as conn:
        await conn.execute(_DEFER, {"id": delivery_id, "wait_s": wait_s})


async def record(engine: AsyncEngine, attempt: Attempt) -> None:
    """Store an attempt and the delivery's status after it."""
    async with engine.connect() as conn:
        await conn.execute(
            _RECORD,
            {
                "id": attempt.delivery_id,
                "attempt": attempt.attempt,
                "started_at": attempt.started_at,
                "status_code": attempt.status_code,
                "latency_ms": attempt.latency_ms,
                "error": attempt.error,
                "notifier": attempt.notifier,
                "status": attempt.status,
                "next_at": attempt.next_at,
            },
        )


async def give_up(engine: AsyncEngine, delivery_id: uuid.UUID, error: str) -> None:
    """A pending delivery fails for good with `error`."""
    async with engine.connect() as conn:
        await conn.execute(_GIVE_UP, {"id": delivery_id, "error": error})
