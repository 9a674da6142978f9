"""The client's ScheduleService calls (gateway): recurring jobs by cron or interval."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from conveyor.v1 import jobs_pb2, schedules_pb2

from .channel import Connection
from .messages import aware

Schedules: TypeAlias = list[schedules_pb2.Schedule]

CATCH_UP_VALUES: dict[str, schedules_pb2.CatchUp.ValueType] = {
    "skip": schedules_pb2.CATCH_UP_SKIP,
    "once": schedules_pb2.CATCH_UP_ONCE,
    "all": schedules_pb2.CATCH_UP_ALL,
}
"""A schedule's catch-up policy by name (create_schedule's `catch_up`)."""


class ScheduleCalls(Connection):
    """ScheduleService: create, read, list, pause, resume and delete schedules."""

    async def create_schedule(
        self,
        template: jobs_pb2.SubmitJobRequest,
        *,
        cron: str = "",
        time_zone: str = "",
        interval: timedelta | None = None,
        name: str = "",
        catch_up: str = "skip",
        max_catch_up: int = 0,
        start_time: datetime | None = None,
        paused: bool = False,
    ) -> schedules_pb2.Schedule:
        """A schedule submitting `template` at each occurrence: a cron expression (in
        `time_zone`, default UTC) or an `interval`. `catch_up`: skip, once or all."""
        request = schedules_pb2.CreateScheduleRequest(
            name=name,
            cron=cron,
            time_zone=time_zone,
            template=template,
            catch_up=CATCH_UP_VALUES[catch_up],
            max_catch_up=max_catch_up,
            paused=paused,
        )
        if interval is not None:
            request.interval.FromTimedelta(interval)
        if start_time is not None:
            request.start_time.FromDatetime(aware(start_time))
        return await self._schedule(self._schedules.CreateSchedule, request)

    async def _schedule(
        self, method: Callable[..., Awaitable[Any]], request: Any
    ) -> schedules_pb2.Schedule:
        """The `schedule` of a call's response."""
        schedule: schedules_pb2.Schedule = (await self._call(method, request)).schedule
        return schedule

    async def get_schedule(self, schedule_id: str) -> schedules_pb2.Schedule:
        request = schedules_pb2.GetScheduleRequest(id=schedule_id)
        return await self._schedule(self._schedules.GetSchedule, request)

    async def list_schedules(
        self, page_size: int = 100, page_token: str = ""
    ) -> tuple[Schedules, str]:
        """One page of the tenant's schedules, oldest first, and the next page's token."""
        request = schedules_pb2.ListSchedulesRequest(page_size=page_size, page_token=page_token)
        response: schedules_pb2.ListSchedulesResponse = await self._call(
            self._schedules.ListSchedules, request
        )
        return list(response.schedules), response.next_page_token

    async def pause_schedule(self, schedule_id: str) -> schedules_pb2.Schedule:
        request = schedules_pb2.PauseScheduleRequest(id=schedule_id)
        return await self._schedule(self._schedules.PauseSchedule, request)

    async def resume_schedule(self, schedule_id: str) -> schedules_pb2.Schedule:
        request = schedules_pb2.ResumeScheduleRequest(id=schedule_id)
        return await self._schedule(self._schedules.ResumeSchedule, request)

    async def delete_schedule(self, schedule_id: str) -> None:
        request = schedules_pb2.DeleteScheduleRequest(id=schedule_id)
        await self._call(self._schedules.DeleteSchedule, request)
