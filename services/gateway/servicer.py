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
import base64
import logging
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.bus.events import EventPublisher
from conveyor.bus.outbox import JobQueue
from conveyor.contract.convert import (
    check_text,
    job_to_proto,
    parse_job_id,
    timestamp,
    to_datetime,
)
from conveyor.contract.validation import check_strings, validate_submit
from conveyor.core.config import Settings
from conveyor.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from conveyor.core.lifecycle import CANCELLABLE, RETRYABLE, JobState
from conveyor.core.metrics import JOBS_SUBMITTED, RETENTION_PURGED
from conveyor.core.pricing import cache_saved_micros
from conveyor.core.telemetry import context_from_headers, current_ids, tracer
from conveyor.db import jobs as db
from conveyor.db import operations as ops_db
from conveyor.db import tenants as tenants_db
from conveyor.db.engine import DATABASE_ERRORS, is_data_error, once_more_on_disconnect
from conveyor.server.auth import Principal, principal
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc

from .budgets import TenantBudgets
from .group_insert import GroupInsert
from .quota import SubmitQuota

log = logging.getLogger(__name__)

MAX_BATCH = 500
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_REASON_CHARS = 1024
"""The longest CancelJob reason (it is stored in the job's history)."""


def _encode_page_token(row: Mapping[str, Any]) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    # Anything but what _encode_page_token wrote is refused here, before the query: an
    # extreme or zoneless time would fail it (the driver's conversion to UTC overflows).
    try:
        created, job_id = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        after = datetime.fromisoformat(created)
        if after.tzinfo is None:
            raise ValueError("no time zone")
        return after.astimezone(UTC), uuid.UUID(job_id)
    except (ValueError, OverflowError):  # binascii.Error and UnicodeError are ValueErrors
        raise InvalidArgument("page_token", "is not a token from ListJobs") from None


def _token_totals(tokens: Mapping[str, int]) -> jobs_pb2.Usage:
    """Usage of token totals by field name (input_tokens, output_tokens, cache_...)."""
    usage = jobs_pb2.Usage()
    for name, value in tokens.items():
        setattr(usage, name, value)
    return usage


COST_WINDOW = timedelta(hours=24)
"""GetStats's cost window when the request names none: the last 24 hours."""


def _cost_stats(row: db.CostRow) -> jobs_pb2.CostStats:
    """A cost row with its prompt cache report: the share of input read from the cache
    and what those reads saved against the input price."""
    tokens = row.tokens
    read = tokens["cache_read_input_tokens"]
    total_in = read + tokens["input_tokens"] + tokens["cache_creation_input_tokens"]
    return jobs_pb2.CostStats(
        tenant=row.tenant,
        model=row.model,
        lane=row.lane,
        jobs=row.jobs,
        unpriced_jobs=row.unpriced_jobs,
        cost_micros=row.cost_micros,
        tokens=_token_totals(tokens),
        cache_read_ratio=read / total_in if total_in else 0.0,
        cache_saved_micros=cache_saved_micros(row.model, read) or 0,
    )


def _duration(seconds: float | None) -> Duration:
    d = Duration()
    d.FromTimedelta(timedelta(seconds=seconds or 0.0))
    return d


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
            parent = context_from_headers(dict(context.invocation_metadata() or ()))
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

        async def store() -> list[tuple[Mapping[str, Any], bool]]:
            # One statement inserts the jobs (with other submits' jobs when busy); lookups
            # of colliding keys see the first jobs once they commit (ON CONFLICT waits
            # for them), so no transaction.
            inserted = await self.inserts.insert(new, actor)
            if len(inserted) == len(new):
                return [(inserted[job.id], False) for job in new]
            async with self.engine.connect() as conn:
                results: list[tuple[Mapping[str, Any], bool]] = []
                for i, job in enumerate(new):
                    if job.id in inserted:
                        results.append((inserted[job.id], False))
                        continue
                    # Its idempotency key collided: the first job with that key answers.
                    assert job.idempotency_key is not None
                    first = await db.get_by_idempotency_key(conn, tenant, job.idempotency_key)
                    if first is None:  # the other submit was rolled back meanwhile
                        raise Unavailable("idempotency key in flux, try again")
                    if first["request_hash"] != job.request_hash:
                        field = f"jobs[{i}].idempotency_key" if batch else "idempotency_key"
                        raise AlreadyExists(
                            f"{field}: used before by job {first['id']} with a different request"
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
            jobs_pb2.SubmitJobResponse(job=job_to_proto(row), idempotent_replay=replay)
            for row, replay in results
        ]

    async def _announce(self, rows: list[db.Row]) -> None:
        """New jobs are committed: publish their events and queue them.

        SubmitJob has answered already (GroupInsert): accepted means committed, and a
        job whose publish fails (or never happens, the gateway dying first) is the
        outbox reconciler's to publish.
        """
        for lane, n in Counter(row["lane"] for row in rows).items():
            JOBS_SUBMITTED.labels(lane).inc(n)
        # The jobs' messages first: a worker waits for them; the events only tell watchers.
        queued = asyncio.create_task(
            self.queue.enqueue([r for r in rows if r["status"] == JobState.PENDING])
        )
        try:
            await self.events.publish_statuses(rows, None)
        except Exception as exc:  # events are advisory; the rows are the record
            log.warning("event publish failed", extra={"jobs": len(rows), "error": repr(exc)})
        await queued

    async def close(self) -> None:
        """Finish the inserts under way and announce the jobs committed so far."""
        await self.inserts.close()

    async def _emit(self, row: Mapping[str, Any], previous: str | None) -> None:
        try:
            await self.events.publish_status(row, previous)
        except Exception as exc:  # events are advisory; the row is the record
            log.warning(
                "event publish failed", extra={"job_id": str(row["id"]), "error": repr(exc)}
            )

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

    async def _get(self, job_id: uuid.UUID, tenant: str) -> Mapping[str, Any]:
        async def read() -> Mapping[str, Any] | None:
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
        statuses = []
        for i, s in enumerate(request.statuses):
            if s not in range(1, 8):
                raise InvalidArgument(f"statuses[{i}]", "is not a job status")
            statuses.append(JobState.from_proto(s).value)
        if request.lane and request.lane not in self.settings.lanes:
            raise InvalidArgument("lane", f"must be one of {', '.join(self.settings.lanes)}")
        labels = dict(request.labels)
        check_strings(labels, "labels")
        flt = db.ListFilter(
            tenant=self._tenant(context),
            statuses=statuses,
            lane=request.lane,
            created_after=to_datetime(request.created_after, "created_after")
            if request.HasField("created_after")
            else None,
            created_before=to_datetime(request.created_before, "created_before")
            if request.HasField("created_before")
            else None,
            labels=labels,
        )
        after = _decode_page_token(request.page_token) if request.page_token else None
        if request.view not in jobs_pb2.JobView.values():
            raise InvalidArgument("view", "is not a JobView value")
        full = request.view == jobs_pb2.JOB_VIEW_FULL
        async with self.engine.connect() as conn:
            rows = await db.list_jobs(conn, flt, size + 1, after, full=full)
        page, more = rows[:size], len(rows) > size
        return jobs_pb2.ListJobsResponse(
            jobs=[job_to_proto(r, content=full, request=full) for r in page],
            next_page_token=_encode_page_token(page[-1]) if more else "",
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
        queued = (JobState.PENDING, JobState.SCHEDULED)
        row = await db.transition(
            self.engine,
            job_id,
            queued,
            JobState.CANCELLED,
            tenant=tenant,
            detail=detail,
            actor=caller.actor,
        )
        if row is not None:
            await self._emit(row, row["previous_status"])
            return jobs_pb2.CancelJobResponse(job=job_to_proto(row))
        row = await db.request_cancel(self.engine, job_id, tenant, caller.actor)
        if row is not None:
            await broker.publish_cancel(self.events_exchange, job_id, tenant)
            return jobs_pb2.CancelJobResponse(job=job_to_proto(row))
        current = await self._get(job_id, tenant)
        if JobState(current["status"]) in CANCELLABLE:  # it moved between our two updates
            return await self.CancelJob(request, context)
        raise FailedPrecondition(f"job {job_id} is already {current['status']}")

    async def RetryJob(
        self, request: jobs_pb2.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.RetryJobResponse:
        job_id = parse_job_id(request.id)
        caller = self._principal(context)
        tenant = caller.tenant
        row = await db.replay(
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
                f"job {job_id} is {current['status']}; only failed or dead jobs can be retried"
            )
        await self.queue.enqueue([row])
        await self._emit(row, row["previous_status"])
        return jobs_pb2.RetryJobResponse(job=job_to_proto(row))

    async def GetStats(
        self, request: jobs_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetStatsResponse:
        caller = self._principal(context)
        tenant = request.tenant or caller.tenant
        check_text(tenant, "tenant")
        if (request.all_tenants or tenant != caller.tenant) and not caller.operator:
            raise PermissionDenied("only an operator key reads other tenants' statistics")
        until = to_datetime(request.until, "until") if request.HasField("until") else None
        until = until or datetime.now(UTC)
        since = (
            to_datetime(request.since, "since")
            if request.HasField("since")
            else until - COST_WINDOW
        )
        if since >= until:
            raise InvalidArgument("since", "must lie before `until`")
        per_tenant: dict[str, tenants_db.TenantSummary] = {}
        async with self.engine.connect() as conn:
            if request.all_tenants:
                summary, per_tenant = await tenants_db.stats_all(conn)
                names = await tenants_db.tenant_names(conn)
            else:
                summary = await db.stats(conn, tenant)
                names = [tenant]
            costs = await db.cost_rows(conn, None if request.all_tenants else tenant, since, until)
        response = jobs_pb2.GetStatsResponse(
            run_time_p50=_duration(summary.run_time_p50_s),
            run_time_p95=_duration(summary.run_time_p95_s),
            tokens=_token_totals(summary.tokens),
            tenant="*" if request.all_tenants else tenant,
            costs=[_cost_stats(row) for row in costs],
            since=timestamp(since),
            until=timestamp(until),
        )
        lanes: dict[str, jobs_pb2.LaneStats] = {
            lane: jobs_pb2.LaneStats(lane=lane) for lane in self.settings.lanes
        }
        for (lane, status), n in summary.counts.items():
            response.counts[status] = response.counts[status] + n
            lanes.setdefault(lane, jobs_pb2.LaneStats(lane=lane)).counts[status] = n
        for name, part in sorted(per_tenant.items()):
            response.tenants.append(
                jobs_pb2.TenantStats(
                    tenant=name, counts=part.counts, tokens=_token_totals(part.tokens)
                )
            )
        # A tenant's statistics count its own queues only. The shared lane queues and
        # the dead-letter queue hold every tenant's messages: only an operator sees
        # their depths (all-tenant statistics, or any tenant's with fairness off);
        # anyone else gets them left out (0), never other tenants' figures.
        shared = caller.operator and (request.all_tenants or not self.settings.fair_tenants)
        wanted: list[tuple[str, str]] = []
        for lane in lanes:
            if self.settings.fair_tenants:
                wanted += [(lane, broker.tenant_lane_queue(lane, name)) for name in names]
            if shared:
                wanted.append((lane, broker.lane_queue(lane)))
        extra = [broker.DEAD_LETTER_QUEUE] if caller.operator else []
        depths = await queue_depths(self.connection, [q for _, q in wanted] + extra)
        for lane, queue in wanted:
            lanes[lane].queue_depth += depths.get(queue, 0)
        if caller.operator:
            response.dead_letter_depth = depths.get(broker.DEAD_LETTER_QUEUE, 0)
        response.lanes.extend(lanes.values())
        return response

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
            deleted = await ops_db.delete_job(self.engine, job_id, caller.tenant)
        except ops_db.JobNotFound:
            raise NotFound(f"job {job_id} not found") from None
        except ops_db.JobLive as exc:
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
        row = await ops_db.set_priority(
            self.engine, job_id, tenant, request.priority, datetime.now(UTC)
        )
        if row is None:
            current = await self._get(job_id, tenant)
            raise FailedPrecondition(
                f"job {job_id} is {current['status']}; only a pending or scheduled job's"
                " priority can change"
            )
        if row["status"] == JobState.PENDING:
            # Queued again at the new priority; the old message is a duplicate, which
            # the conditional claim makes harmless (the README says what that means).
            await self.queue.enqueue([row])
        return jobs_pb2.UpdateJobPriorityResponse(job=job_to_proto(row))


async def queue_depths(connection: AbstractConnection, queues: Sequence[str]) -> dict[str, int]:
    """Messages ready in each queue that exists (a passive declare reads the count).

    A channel of its own: a passive declare of a missing queue (a tenant that never
    submitted to a lane) closes the channel it ran on, so the next one opens another.
    """
    depths: dict[str, int] = {}
    channel: AbstractChannel | None = None
    try:
        for queue in queues:
            try:
                if channel is None or channel.is_closed:
                    channel = await connection.channel()
                result = await channel.declare_queue(queue, passive=True)
                depths[queue] = int(result.declaration_result.message_count or 0)
            except Exception as exc:  # a depth is advisory; never fail GetStats for it
                log.debug("queue depth unavailable", extra={"queue": queue, "error": repr(exc)})
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()
    return depths
