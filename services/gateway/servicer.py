"""JobService: submit, read, list, cancel and replay jobs.

Accepted means durable: SubmitJob returns once the row is committed. The
publish to RabbitMQ follows with confirms; if it fails the job is still
accepted and the dispatcher's outbox reconciler publishes it.

Every call acts for the tenant of its API key (`conveyor.server.auth`): another
tenant's job is NOT_FOUND. Submits count against the tenant's quota, and the
history of a job names who submitted, cancelled or replayed it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime

import grpc
from aio_pika.abc import AbstractConnection, AbstractExchange
from google.protobuf.struct_pb2 import Struct
from opentelemetry import propagate, trace
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.bus.events import EventPublisher
from conveyor.bus.outbox import JobQueue
from conveyor.contract.convert import (
    check_text,
    job_to_proto,
    parse_job_id,
    timestamp,
)
from conveyor.contract.validation import validate_submit
from conveyor.core.config import Settings
from conveyor.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from conveyor.core.lifecycle import CANCELLABLE, QUEUED, RETRYABLE, Job, JobState
from conveyor.core.metrics import JOBS_SUBMITTED, RETENTION_PURGED
from conveyor.core.telemetry import context_from_headers, current_ids, tracer
from conveyor.db import bulk as bulk_db
from conveyor.db import jobs as db
from conveyor.db import retention as retention_db
from conveyor.db import transitions
from conveyor.db.engine import DATABASE_ERRORS, is_data_error, once_more_on_disconnect
from conveyor.server.auth import Principal, principal
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc

from .budgets import TenantBudgets
from .filters import decode_page_token, encode_page_token, filter_fields
from .group_insert import GroupInsert
from .quota import SubmitQuota
from .stats import get_stats

log = logging.getLogger(__name__)

MAX_BATCH = 500
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_REASON_CHARS = 1024
"""The longest CancelJob reason (it is stored in the job's history)."""


class JobServiceServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        queue: JobQueue,
        events: EventPublisher,
        events_exchange: AbstractExchange,
        connection: AbstractConnection,
        quota: SubmitQuota | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.queue = queue
        self.events = events
        self.events_exchange = events_exchange
        self.connection = connection
        self.inserts = GroupInsert(
            engine,
            after_commit=self._announce,
            interval_s=settings.gateway_group_interval_ms / 1000,
            max_waiting=settings.gateway_max_waiting_jobs,
        )
        self.quota = quota or SubmitQuota(
            engine, settings.tenant_submit_per_minute, batch_s=settings.rate_limit_batch_s
        )
        self.budgets = TenantBudgets(engine)
        # The metadata keys the installed propagators read a caller's trace context from.
        self._trace_keys = frozenset(propagate.get_global_textmap().fields)

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant, from its API key (see conveyor.server.auth)."""
        return principal(context).tenant

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return principal(context)

    async def _insert(
        self,
        requests: Sequence[jobs_pb2.SubmitJobRequest],
        tenant: str,
        batch: bool,
        context: grpc.aio.ServicerContext,
    ) -> list[jobs_pb2.SubmitJobResponse]:
        # The caller's trace when it sent one (the instrumented server has already
        # made it current when exporting); else this call starts the job's trace.
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            metadata = context.invocation_metadata() or ()
            if any(key in self._trace_keys for key, _ in metadata):  # else nothing to extract
                parent = context_from_headers(dict(metadata))
        with tracer().start_as_current_span("submit", context=parent) as span:
            span.set_attribute("conveyor.jobs.count", len(requests))
            trace_id, traceparent = current_ids()
            new = [
                validate_submit(r, self.settings, tenant, prefix=f"jobs[{i}]." if batch else "")
                for i, r in enumerate(requests)
            ]
            for job in new:
                job.trace_id, job.traceparent = trace_id, traceparent
            if len(new) == 1:
                span.set_attribute("conveyor.job.id", str(new[0].id))
            # A full group-commit queue or over quota: refused whole, before anything is
            # written (and before the quota is spent).
            self.inserts.check_room(len(new))
            await self.quota.admit(tenant, len(new))
            # Over budget: refused whole, nothing written (services.gateway.budgets).
            reservation = await self.budgets.reserve(tenant, new)
            if reservation is None:
                return await self._store_and_enqueue(
                    new, tenant, batch, self._principal(context).actor
                )
            try:
                results = await self._store_and_enqueue(
                    new, tenant, batch, self._principal(context).actor
                )
            except BaseException:
                await asyncio.shield(self.budgets.release(reservation, [j.id for j in new]))
                raise
            # A replayed idempotency key answers with the first job: no new spend.
            replayed = [j.id for j, r in zip(new, results, strict=True) if r.idempotent_replay]
            await self.budgets.release(reservation, replayed)
            return results

    async def _store_and_enqueue(
        self, new: Sequence[db.NewJob], tenant: str, batch: bool, actor: str | None = None
    ) -> list[jobs_pb2.SubmitJobResponse]:
        keys = [j.idempotency_key for j in new if j.idempotency_key]
        if len(keys) != len(set(keys)):
            raise InvalidArgument("jobs", "idempotency keys repeat within the batch")

        async def store() -> list[tuple[Job, bool]]:
            # One statement inserts the jobs (with other submits' jobs when busy); lookups
            # of colliding keys see the first jobs once they commit (ON CONFLICT waits
            # for them), so no transaction.
            inserted = await self.inserts.insert(new, actor)
            if len(inserted) == len(new):
                return [(inserted[job.id], False) for job in new]
            async with self.engine.connect() as conn:
                results: list[tuple[Job, bool]] = []
                for i, job in enumerate(new):
                    if job.id in inserted:
                        results.append((inserted[job.id], False))
                        continue
                    # Its idempotency key collided: the first job with that key answers.
                    assert job.idempotency_key is not None
                    first = await db.get_by_idempotency_key(conn, tenant, job.idempotency_key)
                    if first is None:  # the other submit was rolled back meanwhile
                        raise Unavailable("idempotency key in flux, try again")
                    if first.request_hash != job.request_hash:
                        field = f"jobs[{i}].idempotency_key" if batch else "idempotency_key"
                        raise AlreadyExists(
                            f"{field}: used before by job {first.id} with a different request"
                        )
                    results.append((first, True))
                return results

        try:
            results = await once_more_on_disconnect(store)
        except DATABASE_ERRORS as exc:
            if is_data_error(exc):  # a value of these jobs that Postgres refuses (GroupInsert)
                log.warning("jobs refused by the job store", extra={"error": repr(exc)})
                raise InvalidArgument(
                    "jobs" if batch else "request",
                    "holds a value the job store cannot take; nothing was accepted",
                ) from exc
            log.error("cannot make jobs durable", extra={"error": repr(exc)})
            raise Unavailable("the job store is unavailable; nothing was accepted") from exc
        return [
            jobs_pb2.SubmitJobResponse(job=job_to_proto(job), idempotent_replay=replay)
            for job, replay in results
        ]

    def _announce(self, jobs: list[Job]) -> Awaitable[object]:
        """New jobs are committed: queue them and publish their events; done when both are.

        Both start now, in that order, ahead of what is scheduled after this call (the
        answers to their submits, GroupInsert): a worker waits for the jobs' messages,
        only watchers for the events. Accepted means committed: SubmitJob does not wait
        for them, and a job whose publish fails (or never happens, the gateway dying
        first) is the outbox reconciler's to publish.
        """
        for lane, n in Counter(job.lane for job in jobs).items():
            JOBS_SUBMITTED.labels(lane).inc(n)
        queued = asyncio.create_task(
            self.queue.enqueue([j for j in jobs if j.status == JobState.PENDING])
        )
        return asyncio.gather(queued, asyncio.create_task(self._publish_events(jobs)))

    async def _publish_events(self, jobs: list[Job]) -> None:
        try:
            await self.events.publish_statuses(jobs, None)
        except Exception as exc:  # events are advisory; the rows are the record
            log.warning("event publish failed", extra={"jobs": len(jobs), "error": repr(exc)})

    async def close(self) -> None:
        """Finish the inserts under way and announce the jobs committed so far."""
        await self.inserts.close()

    async def _emit(self, job: Job) -> None:
        """Publish the transition `job` has just made (from its previous_status)."""
        try:
            await self.events.publish_status(job, job.previous_status)
        except Exception as exc:  # events are advisory; the row is the record
            log.warning("event publish failed", extra={"job_id": str(job.id), "error": repr(exc)})

    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        (result,) = await self._insert([request], self._tenant(context), False, context)
        return result

    async def SubmitJobs(
        self, request: jobs_pb2.SubmitJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobsResponse:
        if not 0 < len(request.jobs) <= MAX_BATCH:
            raise InvalidArgument("jobs", f"give 1..{MAX_BATCH} jobs")
        results = await self._insert(list(request.jobs), self._tenant(context), True, context)
        return jobs_pb2.SubmitJobsResponse(results=results)

    async def _get(self, job_id: uuid.UUID, tenant: str) -> Job:
        async def read() -> Job | None:
            async with self.engine.connect() as conn:
                return await db.get_job(conn, job_id, tenant)

        row = await once_more_on_disconnect(read)
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return row

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        row = await self._get(parse_job_id(request.id), self._tenant(context))
        return jobs_pb2.GetJobResponse(job=job_to_proto(row, request=True))

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        if not 0 <= request.page_size <= MAX_PAGE:
            raise InvalidArgument("page_size", f"must be 0..{MAX_PAGE}")
        size = request.page_size or DEFAULT_PAGE
        flt = db.ListFilter(tenant=self._tenant(context), **filter_fields(request, self.settings))
        after = decode_page_token(request.page_token, "ListJobs") if request.page_token else None
        if request.view not in jobs_pb2.JobView.values():
            raise InvalidArgument("view", "is not a JobView value")
        full = request.view == jobs_pb2.JOB_VIEW_FULL
        async with self.engine.connect() as conn:
            rows = await db.list_jobs(conn, flt, size + 1, after, full=full)
        page, more = rows[:size], len(rows) > size
        return jobs_pb2.ListJobsResponse(
            jobs=[job_to_proto(r, content=full, request=full) for r in page],
            next_page_token=encode_page_token(page[-1].created_at, page[-1].id) if more else "",
        )

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.CancelJobResponse:
        job_id = parse_job_id(request.id)
        check_text(request.reason, "reason")
        if len(request.reason) > MAX_REASON_CHARS:
            raise InvalidArgument("reason", f"at most {MAX_REASON_CHARS} characters")
        caller = self._principal(context)
        tenant = caller.tenant
        detail = {"reason": request.reason or "cancelled by CancelJob"}
        row = await transitions.transition(
            self.engine,
            job_id,
            QUEUED,
            JobState.CANCELLED,
            tenant=tenant,
            detail=detail,
            actor=caller.actor,
        )
        if row is not None:
            await self._emit(row)
            return jobs_pb2.CancelJobResponse(job=job_to_proto(row))
        row = await transitions.request_cancel(self.engine, job_id, tenant, caller.actor)
        if row is not None:
            await broker.publish_cancel(self.events_exchange, job_id, tenant)
            return jobs_pb2.CancelJobResponse(job=job_to_proto(row))
        current = await self._get(job_id, tenant)
        if current.status in CANCELLABLE:  # it moved between our two updates
            return await self.CancelJob(request, context)
        raise FailedPrecondition(f"job {job_id} is already {current.status}")

    async def RetryJob(
        self, request: jobs_pb2.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.RetryJobResponse:
        job_id = parse_job_id(request.id)
        caller = self._principal(context)
        tenant = caller.tenant
        row = await transitions.replay(
            self.engine,
            job_id,
            tenant,
            self.settings.default_max_attempts,
            RETRYABLE,
            actor=caller.actor,
        )
        if row is None:
            current = await self._get(job_id, tenant)
            raise FailedPrecondition(
                f"job {job_id} is {current.status}; only failed or dead jobs can be retried"
            )
        await self.queue.enqueue([row])
        await self._emit(row)
        return jobs_pb2.RetryJobResponse(job=job_to_proto(row))

    async def GetStats(
        self, request: jobs_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetStatsResponse:
        return await get_stats(
            self.engine, self.connection, self.settings, self._principal(context), request
        )

    async def GetJobHistory(
        self, request: jobs_pb2.GetJobHistoryRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobHistoryResponse:
        job_id = parse_job_id(request.id)
        await self._get(job_id, self._tenant(context))  # NOT_FOUND for another tenant's job
        async with self.engine.connect() as conn:
            rows = await db.history(conn, job_id)
        response = jobs_pb2.GetJobHistoryResponse()
        for row in rows:
            entry = jobs_pb2.JobHistoryEntry(
                sequence=row["seq"],
                status=JobState(row["status"]).to_proto(),
                attempt=row["attempt"],
                time=timestamp(row["created_at"]),
                actor=row["actor"] or "",
            )
            if row["previous"]:
                entry.previous = JobState(row["previous"]).to_proto()
            if isinstance(row["detail"], dict):
                detail = Struct()
                detail.update(row["detail"])
                entry.detail.CopyFrom(detail)
            response.entries.append(entry)
        return response

    async def DeleteJob(
        self, request: jobs_pb2.DeleteJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.DeleteJobResponse:
        job_id = parse_job_id(request.id)
        caller = self._principal(context)
        try:
            deleted = await retention_db.delete_job(self.engine, job_id, caller.tenant)
        except retention_db.JobNotFound:
            raise NotFound(f"job {job_id} not found") from None
        except retention_db.JobLive as exc:
            raise FailedPrecondition(
                f"job {job_id} is {exc.status}; only a finished job can be deleted"
                " (cancel it first)"
            ) from None
        for table, n in deleted.items():
            if n:
                RETENTION_PURGED.labels(table).inc(n)
        log.info("job deleted", extra={"job_id": str(job_id), "actor": caller.actor})
        return jobs_pb2.DeleteJobResponse()

    async def UpdateJobPriority(
        self, request: jobs_pb2.UpdateJobPriorityRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.UpdateJobPriorityResponse:
        job_id = parse_job_id(request.id)
        if not 0 <= request.priority <= self.settings.max_priority:
            raise InvalidArgument("priority", f"must be 0..{self.settings.max_priority}")
        tenant = self._tenant(context)
        row = await bulk_db.set_priority(
            self.engine, job_id, tenant, request.priority, datetime.now(UTC)
        )
        if row is None:
            current = await self._get(job_id, tenant)
            raise FailedPrecondition(
                f"job {job_id} is {current.status}; only a pending or scheduled job's"
                " priority can change"
            )
        if row.status == JobState.PENDING:
            # Queued again at the new priority; the old message is a duplicate, which
            # the conditional claim makes harmless (the README says what that means).
            await self.queue.enqueue([row])
        return jobs_pb2.UpdateJobPriorityResponse(job=job_to_proto(row))
