"""ScheduleService: create, read, pause, resume and delete recurring jobs.

A schedule belongs to the tenant of the key that created it (another tenant's is
NOT_FOUND). Its template is checked as SubmitJob checks a job, so a schedule that
is accepted makes valid jobs; the dispatcher fires it (services.dispatcher.schedules).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contract.convert import check_text, timestamp, to_datetime, to_timedelta
from conveyor.contract.validation import validate_submit
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument, NotFound
from conveyor.db import schedules as db
from conveyor.server.auth import principal
from conveyor.v1 import jobs_pb2, schedules_pb2, schedules_pb2_grpc

from .filters import decode_page_token, encode_page_token

MAX_NAME_CHARS = 200
MAX_CRON_CHARS = 256
MAX_ZONE_CHARS = 64
MIN_INTERVAL = timedelta(seconds=1)
MAX_INTERVAL = timedelta(days=366)
MAX_CATCH_UP = 1000
DEFAULT_PAGE = 100
MAX_PAGE = 1000

_CATCH_UP = {
    schedules_pb2.CATCH_UP_UNSPECIFIED: "skip",
    schedules_pb2.CATCH_UP_SKIP: "skip",
    schedules_pb2.CATCH_UP_ONCE: "once",
    schedules_pb2.CATCH_UP_ALL: "all",
}
_CATCH_UP_PROTO = {
    "skip": schedules_pb2.CATCH_UP_SKIP,
    "once": schedules_pb2.CATCH_UP_ONCE,
    "all": schedules_pb2.CATCH_UP_ALL,
}


def parse_schedule_id(value: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument("id", "is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument("id", "is not a schedule id (a UUID)") from None


def schedule_to_proto(row: Mapping[str, Any]) -> schedules_pb2.Schedule:
    schedule = schedules_pb2.Schedule(
        id=str(row["id"]),
        tenant=row["tenant"],
        name=row["name"],
        cron=row["cron"] or "",
        time_zone=row["time_zone"] if row["cron"] else "",
        template=jobs_pb2.SubmitJobRequest.FromString(row["template"]),
        catch_up=_CATCH_UP_PROTO[row["catch_up"]],
        max_catch_up=row["max_catch_up"],
        paused=row["paused"],
        last_job_id=str(row["last_job_id"]) if row["last_job_id"] else "",
        created_at=timestamp(row["created_at"]),
        updated_at=timestamp(row["updated_at"]),
        created_by=row["created_by"] or "",
    )
    if row["interval_ms"] is not None:
        schedule.interval.FromTimedelta(timedelta(milliseconds=row["interval_ms"]))
    if row["next_fire_at"] is not None:
        schedule.next_fire_time.CopyFrom(timestamp(row["next_fire_at"]))
    if row["last_fire_at"] is not None:
        schedule.last_fire_time.CopyFrom(timestamp(row["last_fire_at"]))
    return schedule


class ScheduleServiceServicer(schedules_pb2_grpc.ScheduleServiceServicer):
    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine

    def _recurrence(
        self, request: schedules_pb2.CreateScheduleRequest, start: datetime
    ) -> db.Recurrence:
        has_interval = request.HasField("interval")
        if bool(request.cron) == has_interval:
            field = "interval" if has_interval else "cron"
            raise InvalidArgument(field, "give either a cron expression or an interval")
        if has_interval:
            if request.time_zone:
                raise InvalidArgument("time_zone", "applies to a cron expression only")
            interval = to_timedelta(request.interval, "interval")
            if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
                raise InvalidArgument("interval", "must be between 1 second and 366 days")
            if interval % timedelta(milliseconds=1):
                raise InvalidArgument("interval", "must be a whole number of milliseconds")
            return db.Recurrence(start=start, interval=interval)
        zone = request.time_zone or "UTC"
        check_text(zone, "time_zone")
        if len(zone) > MAX_ZONE_CHARS:
            raise InvalidArgument("time_zone", f"at most {MAX_ZONE_CHARS} characters")
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidArgument(
                "time_zone", "is not an IANA time zone, e.g. Europe/Paris"
            ) from None
        check_text(request.cron, "cron")
        if len(request.cron) > MAX_CRON_CHARS:
            raise InvalidArgument("cron", f"at most {MAX_CRON_CHARS} characters")
        why = db.check_cron(request.cron, zone)
        if why is not None:
            raise InvalidArgument("cron", f"is not a valid cron expression: {why}")
        return db.Recurrence(start=start, cron=request.cron, zone=zone)

    async def CreateSchedule(
        self, request: schedules_pb2.CreateScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.CreateScheduleResponse:
        caller = principal(context)
        check_text(request.name, "name")
        if len(request.name) > MAX_NAME_CHARS:
            raise InvalidArgument("name", f"at most {MAX_NAME_CHARS} characters")
        now = datetime.now(UTC)
        start = (
            to_datetime(request.start_time, "start_time") if request.HasField("start_time") else now
        )
        recurrence = self._recurrence(request, start)
        if not request.HasField("template"):
            raise InvalidArgument("template", "is required")
        template = request.template
        if template.HasField("run_at"):
            raise InvalidArgument("template.run_at", "is not allowed (use template.delay)")
        if template.idempotency_key:
            raise InvalidArgument(
                "template.idempotency_key", "is not allowed (each occurrence gets its own)"
            )
        validate_submit(template, self.settings, caller.tenant, prefix="template.")
        if request.catch_up not in _CATCH_UP:
            raise InvalidArgument("catch_up", "is not a CatchUp value")
        if not 0 <= request.max_catch_up <= MAX_CATCH_UP:
            raise InvalidArgument("max_catch_up", f"must be 0..{MAX_CATCH_UP}")
        row = await db.create(
            self.engine,
            db.NewSchedule(
                tenant=caller.tenant,
                name=request.name,
                recurrence=recurrence,
                template=template.SerializeToString(deterministic=True),
                catch_up=_CATCH_UP[request.catch_up],
                max_catch_up=request.max_catch_up or self.settings.schedule_max_catch_up,
                paused=request.paused,
                created_by=caller.actor,
                id=uuid.uuid4(),
                # With a start time, an occurrence at that very time is the first.
                first_after=start - timedelta(microseconds=1)
                if request.HasField("start_time")
                else now,
            ),
            now,
        )
        return schedules_pb2.CreateScheduleResponse(schedule=schedule_to_proto(row))

    async def _get(self, raw_id: str, tenant: str) -> Mapping[str, Any]:
        schedule_id = parse_schedule_id(raw_id)
        async with self.engine.connect() as conn:
            row = await db.get(conn, schedule_id, tenant)
        if row is None:
            raise NotFound(f"schedule {schedule_id} not found")
        return row

    async def GetSchedule(
        self, request: schedules_pb2.GetScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.GetScheduleResponse:
        row = await self._get(request.id, principal(context).tenant)
        return schedules_pb2.GetScheduleResponse(schedule=schedule_to_proto(row))

    async def ListSchedules(
        self, request: schedules_pb2.ListSchedulesRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.ListSchedulesResponse:
        if not 0 <= request.page_size <= MAX_PAGE:
            raise InvalidArgument("page_size", f"must be 0..{MAX_PAGE}")
        size = request.page_size or DEFAULT_PAGE
        after = (
            decode_page_token(request.page_token, "ListSchedules") if request.page_token else None
        )
        async with self.engine.connect() as conn:
            rows = await db.list_page(conn, principal(context).tenant, size + 1, after)
        page, more = rows[:size], len(rows) > size
        return schedules_pb2.ListSchedulesResponse(
            schedules=[schedule_to_proto(r) for r in page],
            next_page_token=encode_page_token(page[-1]["created_at"], page[-1]["id"])
            if more
            else "",
        )

    async def _set_paused(self, raw_id: str, paused: bool) -> schedules_pb2.Schedule:
        schedule_id = parse_schedule_id(raw_id)
        row = await db.set_paused(
            self.engine, schedule_id, principal().tenant, paused, datetime.now(UTC)
        )
        if row is None:
            raise NotFound(f"schedule {schedule_id} not found")
        return schedule_to_proto(row)

    async def PauseSchedule(
        self, request: schedules_pb2.PauseScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.PauseScheduleResponse:
        return schedules_pb2.PauseScheduleResponse(
            schedule=await self._set_paused(request.id, True)
        )

    async def ResumeSchedule(
        self, request: schedules_pb2.ResumeScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.ResumeScheduleResponse:
        return schedules_pb2.ResumeScheduleResponse(
            schedule=await self._set_paused(request.id, False)
        )

    async def DeleteSchedule(
        self, request: schedules_pb2.DeleteScheduleRequest, context: grpc.aio.ServicerContext
    ) -> schedules_pb2.DeleteScheduleResponse:
        schedule_id = parse_schedule_id(request.id)
        if not await db.delete(self.engine, schedule_id, principal(context).tenant):
            raise NotFound(f"schedule {schedule_id} not found")
        return schedules_pb2.DeleteScheduleResponse()
