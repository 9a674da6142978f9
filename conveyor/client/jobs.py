"""The client's JobService calls (gateway): submit, read, list, cancel, retry, erase."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from conveyor.v1 import jobs_pb2

from .channel import Connection
from .messages import MessagesArg, aware, build_messages, json_bytes, set_timing
from .statuses import JobStatus

JobList: TypeAlias = list[jobs_pb2.Job]
History: TypeAlias = list[jobs_pb2.JobHistoryEntry]

MAX_BATCH = 500
"""Most jobs one SubmitJobs call takes; `submit_many` splits longer lists."""


class JobCalls(Connection):
    """JobService: jobs one by one, by the page, and in batches."""

    async def submit(
        self,
        model: str,
        messages: MessagesArg,
        *,
        max_tokens: int = 1024,
        system: str = "",
        temperature: float | None = None,
        stop_sequences: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        priority: int = 0,
        lane: str = "",
        idempotency_key: str = "",
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        max_attempts: int = 0,
        timeout: timedelta | None = None,  # noqa: ASYNC109 - the job's limit, not this call's
        webhook_url: str = "",
        labels: Mapping[str, str] | None = None,
        webhook_events: jobs_pb2.WebhookEvents.ValueType = jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED,
    ) -> jobs_pb2.Job:
        """Submit one LLM call as a job and return it as stored (usually pending).

        `messages` is the conversation, or a string for one user message. With an
        `idempotency_key` seen before, the first job is returned. `webhook_url` is
        POSTed on terminal statuses, or on every status change with
        `webhook_events=WEBHOOK_EVENTS_ALL`.
        """
        request = jobs_pb2.SubmitJobRequest(
            model=model,
            system=system,
            messages=build_messages(messages),
            max_tokens=max_tokens,
            stop_sequences=list(stop_sequences),
            metadata=dict(metadata or {}),
            priority=priority,
            lane=lane,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            webhook_url=webhook_url,
            labels=dict(labels or {}),
            webhook_events=webhook_events,
        )
        if temperature is not None:
            request.temperature = temperature
        response = await self.submit_request(set_timing(request, run_at, delay, timeout))
        return response.job

    async def create(
        self,
        *,
        model: str,
        max_tokens: int,
        messages: Iterable[Mapping[str, Any]],
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109 - the job's limit
        priority: int = 0,
        lane: str = "",
        idempotency_key: str = "",
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        max_attempts: int = 0,
        webhook_url: str = "",
        labels: Mapping[str, str] | None = None,
        webhook_events: jobs_pb2.WebhookEvents.ValueType = jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED,
        **params: Any,
    ) -> jobs_pb2.Job:
        """Submit a Messages API call as a job, with the keyword arguments of
        `anthropic.AsyncAnthropic().messages.create` (tools, tool_choice, thinking,
        system blocks, output_config, cache_control, metadata, ...; `extra_body` merged
        into the body as the SDK does), plus Conveyor's own as keyword-only extras.

        The body travels whole (`request_json`) and is checked by the gateway against
        its SDK's types. `timeout` (seconds or a timedelta) is the limit on the job's
        model call. `stream` is Conveyor's (it always streams): watch the job instead.
        The answer: `await wait(job.id)`, then `message_of(job)` for an SDK Message.
        """
        for name in ("stream", "extra_headers", "extra_query"):
            if name in params:
                raise TypeError(f"create() does not take {name!r}: Conveyor owns it")
        body = {"model": model, "max_tokens": max_tokens, "messages": messages, **params}
        body.update(extra_body or {})
        request = jobs_pb2.SubmitJobRequest(
            request_json=json_bytes(body),
            priority=priority,
            lane=lane,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            webhook_url=webhook_url,
            labels=dict(labels or {}),
            webhook_events=webhook_events,
        )
        limit = timedelta(seconds=timeout) if isinstance(timeout, int | float) else timeout
        response = await self.submit_request(set_timing(request, run_at, delay, limit))
        return response.job

    async def submit_request(self, req: jobs_pb2.SubmitJobRequest) -> jobs_pb2.SubmitJobResponse:
        """Send a prepared SubmitJobRequest; the response tells an idempotent replay apart."""
        response: jobs_pb2.SubmitJobResponse = await self._call(self._jobs.SubmitJob, req)
        return response

    async def submit_many(self, reqs: Iterable[jobs_pb2.SubmitJobRequest]) -> JobList:
        """Submit jobs in batches of up to 500 (each batch all or none); jobs in request order."""
        pending = list(reqs)
        jobs: JobList = []
        for start in range(0, len(pending), MAX_BATCH):
            batch = jobs_pb2.SubmitJobsRequest(jobs=pending[start : start + MAX_BATCH])
            response: jobs_pb2.SubmitJobsResponse = await self._call(self._jobs.SubmitJobs, batch)
            jobs.extend(result.job for result in response.results)
        return jobs

    async def _job(self, method: Callable[..., Awaitable[Any]], request: Any) -> jobs_pb2.Job:
        """The `job` of a call's response."""
        job: jobs_pb2.Job = (await self._call(method, request)).job
        return job

    async def get(self, job_id: str) -> jobs_pb2.Job:
        """The job with this id; NotFound if there is none (for this tenant)."""
        return await self._job(self._jobs.GetJob, jobs_pb2.GetJobRequest(id=job_id))

    async def list(
        self,
        statuses: Iterable[JobStatus] = (),
        lane: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
        page_token: str = "",
        *,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        full: bool = False,
    ) -> tuple[JobList, str]:
        """One page of jobs, newest first, and the token of the next page ("" on the last).

        Without `full` (the BASIC view) the jobs come without content_json and
        request_json; with it, as GetJob returns them."""
        request = jobs_pb2.ListJobsRequest(
            statuses=list(statuses),
            lane=lane,
            labels=dict(labels or {}),
            page_size=page_size,
            page_token=page_token,
            view=jobs_pb2.JOB_VIEW_FULL if full else jobs_pb2.JOB_VIEW_BASIC,
        )
        if created_after is not None:
            request.created_after.FromDatetime(aware(created_after))
        if created_before is not None:
            request.created_before.FromDatetime(aware(created_before))
        response: jobs_pb2.ListJobsResponse = await self._call(self._jobs.ListJobs, request)
        return list(response.jobs), response.next_page_token

    async def iter_jobs(
        self,
        statuses: Iterable[JobStatus] = (),
        lane: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
        *,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> AsyncIterator[jobs_pb2.Job]:
        """Every matching job, newest first, fetching pages as needed."""
        wanted = tuple(statuses)
        token = ""
        while True:
            jobs, token = await self.list(
                wanted,
                lane,
                labels,
                page_size,
                token,
                created_after=created_after,
                created_before=created_before,
            )
            for job in jobs:
                yield job
            if not token:
                return

    async def cancel(self, job_id: str, reason: str = "") -> jobs_pb2.Job:
        """Cancel a job; returns it (a running job may still show running until it stops).

        FailedPrecondition if the job has already finished.
        """
        request = jobs_pb2.CancelJobRequest(id=job_id, reason=reason)
        return await self._job(self._jobs.CancelJob, request)

    async def retry(self, job_id: str) -> jobs_pb2.Job:
        """Replay a failed or dead job as a new attempt; returns the requeued job."""
        return await self._job(self._jobs.RetryJob, jobs_pb2.RetryJobRequest(id=job_id))

    async def stats(
        self,
        tenant: str = "",
        *,
        all_tenants: bool = False,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> jobs_pb2.GetStatsResponse:
        """Counts by status and lane, queue depths, run-time percentiles and token totals,
        and cost per tenant, model and lane of the jobs finished in [since, until)
        (default: the last 24 hours).

        Of the caller's tenant; another `tenant`'s, or `all_tenants`, need an admin key.
        """
        request = jobs_pb2.GetStatsRequest(tenant=tenant, all_tenants=all_tenants)
        if since is not None:
            request.since.FromDatetime(since)
        if until is not None:
            request.until.FromDatetime(until)
        response: jobs_pb2.GetStatsResponse = await self._call(self._jobs.GetStats, request)
        return response

    async def history(self, job_id: str) -> History:
        """The job's stored transitions, oldest first, each naming who caused it."""
        request = jobs_pb2.GetJobHistoryRequest(id=job_id)
        response: jobs_pb2.GetJobHistoryResponse = await self._call(
            self._jobs.GetJobHistory, request
        )
        return list(response.entries)

    async def delete(self, job_id: str) -> None:
        """Erase a finished job with its history and deliveries (NotFound afterwards);
        FailedPrecondition for a job not finished."""
        await self._call(self._jobs.DeleteJob, jobs_pb2.DeleteJobRequest(id=job_id))

    async def set_priority(self, job_id: str, priority: int) -> jobs_pb2.Job:
        """Change a pending or scheduled job's priority; returns the job."""
        request = jobs_pb2.UpdateJobPriorityRequest(id=job_id, priority=priority)
        return await self._job(self._jobs.UpdateJobPriority, request)
