"""Schedules: when they recur, their rows, and firing their occurrences exactly once.

A schedule recurs by a cron expression read in an IANA time zone (parsed and
iterated by the `cronsim` library; `zoneinfo` for the zone, so daylight-saving
changes follow the zone's rules) or by a fixed interval counted from its start.

Firing (`fire_due`, run by every dispatcher): the due schedules are locked with
FOR UPDATE SKIP LOCKED, and for each occurrence to fire a `schedule_fires` row
(primary key: schedule, occurrence time) and its job are inserted in one
transaction, with the schedule's next occurrence. Two dispatchers never fire the
same occurrence: they skip each other's locked schedules, and the primary key
refuses a second row for an occurrence whatever happens (a restart that reads an
old next_fire_at, a clock that differs).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from cronsim import CronSim, CronSimError
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.lifecycle import Job
from conveyor.db.jobs import NewJob, as_stored, values
from conveyor.db.schema import job_events, jobs, schedule_fires, schedules

Row = Mapping[str, Any]

CATCH_UP = ("skip", "once", "all")

_SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class Recurrence:
    """When a schedule's occurrences fall: cron in a zone, or start + k * interval."""

    start: datetime
    cron: str | None = None
    zone: str = "UTC"
    interval: timedelta | None = None

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("a recurrence has a cron expression or an interval")
        if self.cron is not None:
            # Parsing happens on the first step; CronSimError names what is wrong.
            next(CronSim(self.cron, self.start.astimezone(ZoneInfo(self.zone))))

    @classmethod
    def of(cls, row: Row) -> Recurrence:
        interval = row["interval_ms"]
        return cls(
            start=row["start_at"],
            cron=row["cron"],
            zone=row["time_zone"],
            interval=None if interval is None else timedelta(milliseconds=interval),
        )

    def next_after(self, t: datetime) -> datetime:
        """The first occurrence strictly after `t` (and not before the start)."""
        if self.interval is not None:
            if t < self.start:
                return self.start
            k = (t - self.start) // self.interval + 1
            return self.start + k * self.interval
        assert self.cron is not None
        # An occurrence at the start itself counts: begin just before it.
        begin = max(t, self.start - timedelta(microseconds=1))
        return next(CronSim(self.cron, begin.astimezone(ZoneInfo(self.zone)))).astimezone(UTC)

    def latest(self, low: datetime, high: datetime, limit: int) -> list[datetime]:
        """The latest `limit` occurrences in [low, high], oldest first."""
        low = max(low, self.start)
        if high < low or limit <= 0:
            return []
        if self.interval is not None:
            last = (high - self.start) // self.interval
            first = -(-(low - self.start) // self.interval)  # ceiling
            first = max(first, last - limit + 1)
            return [self.start + k * self.interval for k in range(first, last + 1)]
        assert self.cron is not None
        found: list[datetime] = []
        # cronsim steps back strictly before its start: begin at the next whole second.
        begin = high.replace(microsecond=0) + _SECOND
        for when in CronSim(self.cron, begin.astimezone(ZoneInfo(self.zone)), reverse=True):
            when = when.astimezone(UTC)
            if when < low or len(found) >= limit:
                break
            if when <= high:
                found.append(when)
        return found[::-1]


def check_cron(expression: str, zone: str) -> str | None:
    """Why a cron expression cannot be used, or None."""
    try:
        next(CronSim(expression, datetime.now(ZoneInfo(zone))))
    except CronSimError as exc:
        return str(exc)
    except (ValueError, KeyError, OverflowError) as exc:  # what cronsim may raise besides
        return f"cannot be read: {exc}"
    return None


@dataclass(frozen=True)
class NewSchedule:
    tenant: str
    name: str
    recurrence: Recurrence
    template: bytes
    catch_up: str
    max_catch_up: int
    paused: bool
    created_by: str | None
    id: uuid.UUID
    first_after: datetime
    """The first occurrence is the first one strictly after this time."""


async def create(engine: AsyncEngine, new: NewSchedule, now: datetime) -> Row:
    """Store a schedule; its next occurrence is the first one after `new.first_after`
    (a time in the past makes the occurrences since then missed ones)."""
    rec = new.recurrence
    first = rec.next_after(new.first_after)
    async with engine.connect() as conn:
        row = (
            (
                await conn.execute(
                    sa.insert(schedules)
                    .values(
                        id=new.id,
                        tenant=new.tenant,
                        name=new.name,
                        cron=rec.cron,
                        time_zone=rec.zone,
                        interval_ms=None
                        if rec.interval is None
                        else int(rec.interval / timedelta(milliseconds=1)),
                        start_at=rec.start,
                        template=new.template,
                        catch_up=new.catch_up,
                        max_catch_up=new.max_catch_up,
                        paused=new.paused,
                        next_fire_at=None if new.paused else first,
                        created_by=new.created_by,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(*schedules.c)
                )
            )
            .mappings()
            .one()
        )
    return dict(row)


async def get(conn: AsyncConnection, schedule_id: uuid.UUID, tenant: str) -> Row | None:
    row = (
        (
            await conn.execute(
                sa.select(schedules).where(
                    schedules.c.id == schedule_id, schedules.c.tenant == tenant
                )
            )
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


async def list_page(
    conn: AsyncConnection,
    tenant: str,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    """A page of a tenant's schedules, oldest first, after (created_at, id)."""
    stmt = sa.select(schedules).where(schedules.c.tenant == tenant)
    if after is not None:
        stmt = stmt.where(sa.tuple_(schedules.c.created_at, schedules.c.id) > sa.tuple_(*after))
    stmt = stmt.order_by(schedules.c.created_at, schedules.c.id).limit(limit)
    return [dict(r) for r in (await conn.execute(stmt)).mappings()]


async def set_paused(
    engine: AsyncEngine, schedule_id: uuid.UUID, tenant: str, paused: bool, now: datetime
) -> Row | None:
    """Pause or resume (idempotent); a resumed schedule goes on from its next occurrence
    after now. None if the tenant has no such schedule."""
    async with engine.execution_options(isolation_level="READ COMMITTED").begin() as conn:
        row = (
            (
                await conn.execute(
                    sa.select(schedules)
                    .where(schedules.c.id == schedule_id, schedules.c.tenant == tenant)
                    .with_for_update()
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        if row["paused"] == paused:
            return dict(row)
        values: dict[str, Any] = {"paused": paused, "updated_at": now}
        values["next_fire_at"] = None if paused else Recurrence.of(dict(row)).next_after(now)
        updated = (
            (
                await conn.execute(
                    sa.update(schedules)
                    .where(schedules.c.id == schedule_id)
                    .values(**values)
                    .returning(*schedules.c)
                )
            )
            .mappings()
            .one()
        )
        return dict(updated)


async def delete(engine: AsyncEngine, schedule_id: uuid.UUID, tenant: str) -> bool:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.delete(schedules)
            .where(schedules.c.id == schedule_id, schedules.c.tenant == tenant)
            .returning(schedules.c.id)
        )
        return result.first() is not None


def occurrences_to_fire(
    rec: Recurrence,
    next_fire_at: datetime,
    now: datetime,
    catch_up: str,
    max_catch_up: int,
    grace: timedelta,
) -> list[tuple[datetime, bool]]:
    """The occurrences a due schedule fires now, oldest first, each with whether it is
    late (missed: found more than `grace` after its time).

    On time ones always fire. Missed ones: none (skip), the latest one (once), or the
    latest `max_catch_up` (all).
    """
    due = rec.latest(next_fire_at, now, max(max_catch_up, 1) + _ON_TIME_MAX)
    on_time = [t for t in due if now - t <= grace]
    missed = [t for t in due if now - t > grace]
    if catch_up == "skip":
        chosen: list[datetime] = []
    elif catch_up == "once":
        chosen = missed[-1:]
    else:
        chosen = missed[-max_catch_up:]
    return [(t, True) for t in chosen] + [(t, False) for t in on_time[-_ON_TIME_MAX:]]


_ON_TIME_MAX = 100
"""The most on-time occurrences one pass fires for a schedule (a 1-second cron
found a little late has a few; more means the dispatcher is far behind)."""


@dataclass(frozen=True)
class Fired:
    schedule_id: uuid.UUID
    fire_at: datetime
    job: Job
    late: bool


JobMaker = Callable[[Row, datetime], NewJob]
"""Makes the job of a schedule's occurrence (raises when the template is refused)."""


async def fire_due(
    engine: AsyncEngine,
    make_job: JobMaker,
    now: datetime,
    grace: timedelta,
    limit: int = 50,
) -> tuple[list[Fired], list[tuple[uuid.UUID, str]]]:
    """Fire the occurrences of due schedules (at most `limit` schedules a pass).

    Returns what was fired, and the schedules whose template could not make a job
    (id, why) — they are paused, so they do not fail every pass.
    """
    fired: list[Fired] = []
    broken: list[tuple[uuid.UUID, str]] = []
    async with engine.execution_options(isolation_level="READ COMMITTED").begin() as conn:
        due = (
            (
                await conn.execute(
                    sa.select(schedules)
                    .where(sa.not_(schedules.c.paused), schedules.c.next_fire_at <= now)
                    .order_by(schedules.c.next_fire_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            .mappings()
            .all()
        )
        for found in due:
            row: Row = dict(found)
            rec = Recurrence.of(row)
            times = occurrences_to_fire(
                rec, row["next_fire_at"], now, row["catch_up"], row["max_catch_up"], grace
            )
            last_fire, last_job = row["last_fire_at"], row["last_job_id"]
            try:
                made = [(t, late, make_job(row, t)) for t, late in times]
            except Exception as exc:  # a template the current settings refuse
                broken.append((row["id"], str(exc)))
                await conn.execute(
                    sa.update(schedules)
                    .where(schedules.c.id == row["id"])
                    .values(paused=True, next_fire_at=None, updated_at=now)
                )
                continue
            for fire_at, late, job in made:
                inserted = await _fire_one(conn, row, fire_at, late, job, now)
                if inserted is not None:
                    fired.append(Fired(row["id"], fire_at, inserted, late))
                    last_fire, last_job = fire_at, job.id
            await conn.execute(
                sa.update(schedules)
                .where(schedules.c.id == row["id"])
                .values(
                    next_fire_at=rec.next_after(now),
                    last_fire_at=last_fire,
                    last_job_id=last_job,
                )
            )
    return fired, broken


async def _fire_one(
    conn: AsyncConnection, schedule: Row, fire_at: datetime, late: bool, job: NewJob, now: datetime
) -> Job | None:
    """Insert an occurrence's row and its job; None if the occurrence was fired before."""
    claimed = await conn.execute(
        insert(schedule_fires)
        .values(
            schedule_id=schedule["id"], fire_at=fire_at, job_id=job.id, late=late, created_at=now
        )
        .on_conflict_do_nothing()
        .returning(schedule_fires.c.job_id)
    )
    if claimed.first() is None:
        return None
    row = values(job, now)
    await conn.execute(sa.insert(jobs).values(**row))
    await conn.execute(
        sa.insert(job_events).values(
            job_id=job.id,
            seq=1,
            status=row["status"],
            previous=None,
            attempt=0,
            detail={"schedule_id": str(schedule["id"]), "fire_time": fire_at.isoformat()},
            created_at=now,
            actor=schedule["created_by"],
        )
    )
    return as_stored(job, now)
