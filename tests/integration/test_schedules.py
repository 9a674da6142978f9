"""Schedules on the real stack: a schedule's occurrences become jobs, each exactly once
with two dispatchers running and across a dispatcher restart; missed occurrences
follow the catch-up policy; bad input is refused naming the field, and another
tenant's schedule is NOT_FOUND."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient, InvalidArgument, NotFound
from conveyor.v1 import jobs_pb2, schedules_pb2
from devtools import devstack
from services.dispatcher.schedules import SCHEDULE_LABEL
from tests.conftest import TenantClient, eventually, finished
from tests.stack import Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"


def template(**fields: Any) -> jobs_pb2.SubmitJobRequest:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 16}
    return jobs_pb2.SubmitJobRequest(
        messages=[jobs_pb2.Message(role="user", content="Say hi.")], **{**base, **fields}
    )


async def fires(db: AsyncEngine, schedule_id: str) -> list[Any]:
    """A schedule's fired occurrences, oldest first: fire_at, job_id, late."""
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT fire_at, job_id, late FROM schedule_fires WHERE schedule_id = :id"
                " ORDER BY fire_at"
            ),
            {"id": uuid.UUID(schedule_id)},
        )
        return list(rows)


async def schedule_jobs(db: AsyncEngine, schedule_id: str) -> list[Any]:
    """The jobs carrying the schedule's label: id, idempotency key, status."""
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT id, idempotency_key, status FROM jobs WHERE labels @> CAST(:l AS jsonb)"
            ),
            {"l": f'{{"{SCHEDULE_LABEL}": "{schedule_id}"}}'},
        )
        return list(rows)


async def stored_schedules(db: AsyncEngine, tenant: str) -> int:
    async with db.connect() as conn:
        return int(
            (
                await conn.execute(
                    sa.text("SELECT count(*) FROM schedules WHERE tenant = :t"), {"t": tenant}
                )
            ).scalar_one()
        )


def _request(**fields: Any) -> schedules_pb2.CreateScheduleRequest:
    return schedules_pb2.CreateScheduleRequest(**fields)


def _seconds(s: float) -> Duration:
    d = Duration()
    d.FromTimedelta(timedelta(seconds=s))
    return d


def _at(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


BAD_REQUESTS = {
    "cron out of range": (_request(cron="61 * * * *", template=template()), "cron"),
    "cron with four fields": (_request(cron="* * * *", template=template()), "cron"),
    "unknown time zone": (
        _request(cron="0 3 * * *", time_zone="Mars/Olympus_Mons", template=template()),
        "time_zone",
    ),
    "time zone with an interval": (
        _request(interval=_seconds(60), time_zone="UTC", template=template()),
        "time_zone",
    ),
    "interval under a second": (_request(interval=_seconds(0.5), template=template()), "interval"),
    "neither cron nor interval": (_request(template=template()), "cron"),
    "both cron and interval": (
        _request(cron="* * * * *", interval=_seconds(60), template=template()),
        "interval",
    ),
    "no template": (_request(interval=_seconds(60)), "template"),
    "template without max_tokens": (
        _request(interval=_seconds(60), template=template(max_tokens=0)),
        "template.max_tokens",
    ),
    "template with run_at": (
        _request(interval=_seconds(60), template=template(run_at=_at(datetime.now(UTC)))),
        "template.run_at",
    ),
    "template with an idempotency key": (
        _request(interval=_seconds(60), template=template(idempotency_key="k")),
        "template.idempotency_key",
    ),
    "unknown catch-up policy": (
        _request(interval=_seconds(60), template=template(), catch_up=9),
        "catch_up",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_a_bad_schedule_is_refused_naming_the_field_and_nothing_is_stored(
    case: str, tenant_client: TenantClient, db: AsyncEngine
) -> None:
    request, field = BAD_REQUESTS[case]
    tenant = f"sched-bad-{uuid.uuid4().hex[:8]}"
    async with tenant_client(tenant) as client:
        with pytest.raises(InvalidArgument) as refused:
            await client._call(client._schedules.CreateSchedule, request)
    assert refused.value.field_violations[0][0] == field, refused.value.details
    assert await stored_schedules(db, tenant) == 0


async def test_another_tenants_schedule_is_not_found(tenant_client: TenantClient) -> None:
    async with tenant_client("sched-owner") as owner, tenant_client("sched-other") as other:
        mine = await owner.create_schedule(template(), interval=timedelta(hours=1))
        for call in (
            other.get_schedule,
            other.pause_schedule,
            other.resume_schedule,
            other.delete_schedule,
        ):
            with pytest.raises(NotFound):
                await call(mine.id)
        listed, _ = await other.list_schedules()
        assert mine.id not in {s.id for s in listed}
        # Untouched by the other tenant's calls.
        assert not (await owner.get_schedule(mine.id)).paused


async def test_a_cron_schedule_fires_next_at_its_time_in_its_time_zone(
    client: ConveyorClient,
) -> None:
    schedule = await client.create_schedule(
        template(), cron="30 9 * * *", time_zone="America/New_York", paused=False
    )
    next_fire = schedule.next_fire_time.ToDatetime(tzinfo=UTC)
    local = next_fire.astimezone(ZoneInfo("America/New_York"))
    assert (local.hour, local.minute) == (9, 30)
    assert timedelta(0) < next_fire - datetime.now(UTC) <= timedelta(days=1)
    await client.delete_schedule(schedule.id)


def start_second_dispatcher(stack: Stack, **env: str) -> None:
    stack.start_extra(
        devstack.Service("dispatcher-2", "services.dispatcher", "log"),
        CONVEYOR_DISPATCHER_METRICS_PORT="0",
        **env,
    )


@pytest.fixture
def second_dispatcher(stack: Stack) -> Iterator[None]:
    """Another dispatcher beside the stack's own, for the test's length."""
    start_second_dispatcher(stack)
    try:
        yield
    finally:
        with contextlib.suppress(KeyError):
            stack.stop("dispatcher-2")
        # The stack's own dispatcher as it was (the test restarts it with other settings).
        with contextlib.suppress(KeyError):
            stack.stop("dispatcher")
        stack.start("dispatcher")


async def test_each_occurrence_fires_once_with_two_dispatchers_and_a_restart(
    client: ConveyorClient, db: AsyncEngine, stack: Stack, second_dispatcher: None
) -> None:
    interval = timedelta(seconds=1)
    schedule = await client.create_schedule(
        template(), interval=interval, catch_up="all", name="every second"
    )

    async def fired_at_least(n: int) -> bool:
        return len(await fires(db, schedule.id)) >= n

    await eventually(lambda: fired_at_least(3), within_s=30)
    # Both dispatchers down across at least two fire times, then back with a misfire
    # grace shorter than the downtime: the missed occurrences are late, and made up
    # (catch-up "all"), none twice.
    stack.stop("dispatcher")
    stack.stop("dispatcher-2")
    down_at = datetime.now(UTC)
    await asyncio.sleep(2.5)
    grace = {"CONVEYOR_SCHEDULE_MISFIRE_GRACE_S": "0.5"}
    stack.start("dispatcher", **grace)
    start_second_dispatcher(stack, **grace)
    await eventually(lambda: _fired_after(db, schedule.id, down_at, 5), within_s=30)
    await client.pause_schedule(schedule.id)

    fired = await fires(db, schedule.id)
    times = [f.fire_at for f in fired]
    assert len(times) == len(set(times))
    # Every occurrence from the first to the last, none missing, none twice.
    start = times[0]
    assert times == [start + k * interval for k in range(len(times))]
    assert any(f.late for f in fired if f.fire_at > down_at)  # made up after the downtime
    # One job per occurrence, the one its fire row names, with its own idempotency key.
    jobs = await schedule_jobs(db, schedule.id)
    assert sorted(str(j.id) for j in jobs) == sorted(str(f.job_id) for f in fired)
    assert len({j.idempotency_key for j in jobs}) == len(jobs)
    # The jobs run like any other.
    last = await finished(client, str(fired[-1].job_id))
    assert last.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert last.labels[SCHEDULE_LABEL] == schedule.id


async def _fired_after(db: AsyncEngine, schedule_id: str, when: datetime, n: int) -> bool:
    return sum(bool(f.fire_at > when) for f in await fires(db, schedule_id)) >= n


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("skip", 0), ("once", 1), ("all", 3)],
)
async def test_missed_occurrences_follow_the_catch_up_policy(
    policy: str, expected: int, client: ConveyorClient, db: AsyncEngine
) -> None:
    """Five hourly occurrences lie in the past (the schedule starts 4.5 hours ago): they
    are missed ones. skip fires none, once fires the latest, all the latest three
    (max_catch_up). The next occurrence is half an hour ahead."""
    now = datetime.now(UTC)
    start = now - timedelta(hours=4, minutes=30)
    schedule = await client.create_schedule(
        template(),
        interval=timedelta(hours=1),
        start_time=start,
        catch_up=policy,
        max_catch_up=3,
    )

    async def handled() -> bool:
        current = await client.get_schedule(schedule.id)
        return current.next_fire_time.ToDatetime(tzinfo=UTC) > now

    await eventually(handled, within_s=30)
    fired = await fires(db, schedule.id)
    missed = [start + timedelta(hours=k) for k in range(5)]
    assert [f.fire_at for f in fired] == missed[len(missed) - expected :]
    assert all(f.late for f in fired)
    assert len(await schedule_jobs(db, schedule.id)) == expected
    current = await client.get_schedule(schedule.id)
    assert current.next_fire_time.ToDatetime(tzinfo=UTC) == start + timedelta(hours=5)
    await client.delete_schedule(schedule.id)


async def test_a_paused_schedule_fires_nothing_and_resumes_from_now(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    start = datetime.now(UTC) - timedelta(hours=3)
    schedule = await client.create_schedule(
        template(), interval=timedelta(hours=1), start_time=start, catch_up="all", paused=True
    )
    assert schedule.paused and not schedule.HasField("next_fire_time")
    await asyncio.sleep(1.0)  # a few dispatcher passes
    assert await fires(db, schedule.id) == []
    resumed = await client.resume_schedule(schedule.id)
    # The paused time is not caught up: the next occurrence is the first after now.
    assert resumed.next_fire_time.ToDatetime(tzinfo=UTC) == start + timedelta(hours=4)
    await asyncio.sleep(1.0)
    assert await fires(db, schedule.id) == []
    await client.delete_schedule(schedule.id)
    with pytest.raises(NotFound):
        await client.get_schedule(schedule.id)
