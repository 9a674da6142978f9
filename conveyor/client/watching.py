"""The client's JobEvents streams (notifier): watch one job or many, resuming a broken
stream after the last sequence number seen; and `wait` for a job's end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import timedelta

import grpc
import grpc.aio

from conveyor.core.errors import ConveyorError, Unavailable, error_from_rpc
from conveyor.v1 import events_pb2, jobs_pb2

from .jobs import JobCalls
from .statuses import TERMINAL_STATUSES, terminal_job

WATCH_FELL_BEHIND = "WATCH_FELL_BEHIND"
"""ErrorInfo reason of a watch cut off because its reader fell too far behind."""


def _resumable(error: ConveyorError) -> bool:
    """Whether a broken watch is worth reopening from the last sequence seen."""
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return True
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == WATCH_FELL_BEHIND


def _one_more_try(error: ConveyorError, resume: bool, failures: int, max_reconnects: int) -> int:
    """The count of failures in a row with this one, or `error` raised when the stream
    is not to be reopened (not resuming, not resumable, or too many failures)."""
    if not resume or not _resumable(error) or failures + 1 > max_reconnects:
        raise error from None
    return failures + 1


async def _pause(failures: int) -> None:
    """Back off before reopening a stream: 0.2 s, 0.4 s, ... up to 5 s."""
    await asyncio.sleep(min(0.1 * 2**failures, 5.0))


def _is_event(event: events_pb2.JobEvent) -> bool:
    """Status changes and token deltas are numbered events (snapshots and progress are not)."""
    return event.WhichOneof("payload") in ("status_changed", "token_delta")


def _terminal_change(event: events_pb2.JobEvent) -> bool:
    return (
        event.WhichOneof("payload") == "status_changed"
        and event.status_changed.status in TERMINAL_STATUSES
    )


class Watching(JobCalls):
    """JobEvents: live streams of one job or many."""

    async def watch(
        self,
        job_id: str,
        after_sequence: int = 0,
        *,
        resume: bool = True,
        max_reconnects: int = 10,
        progress_interval: timedelta | None = None,
    ) -> AsyncIterator[events_pb2.JobEvent]:
        """The job's events: a snapshot first, then status changes, token deltas and
        progress reports, from `after_sequence` on (see JobEvents.WatchJob).

        The iterator ends after the event that reports a terminal status; a fresh
        watch (`after_sequence` 0) of a finished job ends with its snapshot. With
        `resume`, a stream that breaks (notifier restart, UNAVAILABLE, or cut off
        because this reader fell behind) is reopened after the last sequence number
        seen, up to `max_reconnects` times in a row without progress; each reopened
        stream starts with a fresh snapshot, and no event is repeated or skipped.
        Other errors raise ConveyorError (NotFound for an unknown job).
        """
        last = after_sequence
        failures = 0
        while True:
            request = events_pb2.WatchJobRequest(id=job_id, after_sequence=last)
            if progress_interval is not None:
                request.progress_interval.FromTimedelta(progress_interval)
            call = self._events.WatchJob(request, metadata=self._metadata())
            ended_terminal = False
            try:
                async for event in call:
                    if _is_event(event) and event.sequence <= last:
                        continue  # already seen before a reconnect
                    if _is_event(event):
                        last = event.sequence
                        failures = 0
                    yield event
                    if _terminal_change(event):
                        return
                    if event.WhichOneof("payload") == "snapshot":
                        ended_terminal = event.snapshot.status in TERMINAL_STATUSES
                        if ended_terminal and last == 0:
                            return  # a finished job: its snapshot says it all
            except grpc.aio.AioRpcError as exc:
                failures = _one_more_try(error_from_rpc(exc), resume, failures, max_reconnects)
            else:
                if ended_terminal or not resume:
                    return  # finished before the resume point: nothing more to say
                # The stream ended without a terminal event: the notifier went away.
                ended = Unavailable(f"watch of job {job_id} kept ending before the job finished")
                failures = _one_more_try(ended, resume, failures, max_reconnects)
            finally:
                call.cancel()
            await _pause(failures)

    async def watch_jobs(
        self,
        ids: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        *,
        token_deltas: bool = False,
        after_sequences: Mapping[str, int] | None = None,
        resume: bool = True,
        max_reconnects: int = 10,
        progress_interval: timedelta | None = None,
    ) -> AsyncIterator[events_pb2.JobEvent]:
        """Many jobs on one stream: the jobs `ids`, or every job of the caller's tenant
        carrying all `labels` (see JobEvents.WatchJobs). Each job's events come in
        sequence order after its snapshot; with `token_deltas`, the tokens too.

        With ids, the iterator ends when every job is terminal; with labels, when the
        caller stops iterating. With `resume`, a broken stream is reopened from the last
        sequence number seen of each job, as `watch` does.
        """
        wanted = list(dict.fromkeys(ids))
        last: dict[str, int] = dict(after_sequences or {})
        failures = 0
        while True:
            request = events_pb2.WatchJobsRequest(
                ids=wanted,
                labels=dict(labels or {}),
                after_sequences=last,
                token_deltas=token_deltas,
            )
            if progress_interval is not None:
                request.progress_interval.FromTimedelta(progress_interval)
            call = self._events.WatchJobs(request, metadata=self._metadata())
            try:
                async for event in call:
                    if _is_event(event):
                        if event.sequence <= last.get(event.job_id, 0):
                            continue
                        last[event.job_id] = event.sequence
                        failures = 0
                    yield event
                return
            except grpc.aio.AioRpcError as exc:
                failures = _one_more_try(error_from_rpc(exc), resume, failures, max_reconnects)
            finally:
                call.cancel()
            await _pause(failures)

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - part of the public API
    ) -> jobs_pb2.Job:
        """Watch the job until it reaches a terminal status and return the final job.

        Raises TimeoutError after `timeout` seconds (None waits as long as it takes).
        """
        async with asyncio.timeout(timeout):
            async for event in self.watch(job_id):
                job = terminal_job(event)
                if job is None:
                    continue
                change = event.status_changed
                if event.WhichOneof("payload") == "status_changed" and not change.HasField("job"):
                    return await self.get(job_id)  # a terminal transition without the full job
                return job
            return await self.get(job_id)
