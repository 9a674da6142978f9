"""Lane pauses and worker rows, as stored in Postgres.

Retention and erasure are in conveyor/db/retention.py, bulk actions and priority
changes in conveyor/db/bulk.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.db.schema import lane_pauses, workers

Row = Mapping[str, Any]

ALL_TENANTS = "*"
"""The tenant of a lane pause that applies to every tenant."""


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
