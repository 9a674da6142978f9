"""OperationsService: bulk cancel and replay (audited), lane pauses, workers.

Bulk actions act on the caller's tenant (RedriveDeadJobs on another tenant needs an
operator key); pausing a lane of every tenant or of another tenant, and anything
about workers, needs an operator key.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from aio_pika.abc import AbstractExchange
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker, control
from conveyor.bus.events import EventPublisher
from conveyor.bus.outbox import JobQueue
from conveyor.contract.convert import check_text, timestamp
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument, NotFound, PermissionDenied
from conveyor.core.lifecycle import CANCELLABLE, RETRYABLE, Job, JobState
from conveyor.db import bulk as bulk_db
from conveyor.db import operations as db
from conveyor.server.auth import Principal, check_tenant_name, principal
from conveyor.v1 import jobs_pb2, operations_pb2, operations_pb2_grpc

from .filters import filter_fields

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MAX_REASON_CHARS = 1024
MAX_MODEL_CHARS = 256


def _limit(value: int) -> int:
    if not 0 <= value <= MAX_LIMIT:
        raise InvalidArgument("limit", f"must be 0..{MAX_LIMIT} (0: {DEFAULT_LIMIT})")
    return value or DEFAULT_LIMIT


def _reason(value: str) -> str:
    check_text(value, "reason")
    if len(value) > MAX_REASON_CHARS:
        raise InvalidArgument("reason", f"at most {MAX_REASON_CHARS} characters")
    return value


def _response(
    result: bulk_db.BulkResult | None, matched: int, dry_run: bool
) -> operations_pb2.BulkActionResponse:
    if result is None:
        return operations_pb2.BulkActionResponse(matched=matched, dry_run=dry_run)
    return operations_pb2.BulkActionResponse(
        action_id=str(result.action_id),
        matched=result.matched,
        changed=len(result.moved),
        cancel_requested=len(result.cancel_requested),
    )


def _worker(row: Mapping[str, Any]) -> operations_pb2.Worker:
    return operations_pb2.Worker(
        id=row["id"],
        host=row["host"],
        pid=row["pid"],
        lanes=list(row["lanes"]),
        in_flight=row["in_flight"],
        concurrency=row["concurrency"],
        started_at=timestamp(row["started_at"]),
        heartbeat_at=timestamp(row["heartbeat_at"]),
        draining=row["drain_requested_at"] is not None,
    )


def _pause(row: Mapping[str, Any]) -> operations_pb2.LanePause:
    return operations_pb2.LanePause(
        lane=row["lane"],
        tenant=row["tenant"],
        paused_by=row["paused_by"],
        paused_at=timestamp(row["paused_at"]),
        reason=row["reason"],
    )


class OperationsServiceServicer(operations_pb2_grpc.OperationsServiceServicer):
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        queue: JobQueue,
        events: EventPublisher,
        events_exchange: AbstractExchange,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.queue = queue
        self.events = events
        self.events_exchange = events_exchange

    def _filter(
        self,
        request: operations_pb2.JobFilter,
        tenant: str,
        allowed: Sequence[JobState],
        verb: str,
    ) -> bulk_db.JobFilter:
        fields = filter_fields(request, self.settings, "filter.", allowed, verb)
        check_text(request.model, "filter.model")
        if len(request.model) > MAX_MODEL_CHARS:
            raise InvalidArgument("filter.model", f"at most {MAX_MODEL_CHARS} characters")
        fields["statuses"] = fields["statuses"] or [a.value for a in allowed]
        return bulk_db.JobFilter(tenant=tenant, model=request.model, **fields)

    async def _announce(self, moved: Sequence[Job]) -> None:
        """Publish the moved jobs' transitions (grouped by the status they left)."""
        by_previous: dict[str | None, list[Job]] = defaultdict(list)
        for job in moved:
            by_previous[job.previous_status].append(job)
        for previous, group in by_previous.items():
            try:
                await self.events.publish_statuses(group, previous)
            except Exception as exc:  # events are advisory; the rows are the record
                log.warning("event publish failed", extra={"jobs": len(group), "error": repr(exc)})

    async def CancelJobs(
        self, request: operations_pb2.CancelJobsRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.BulkActionResponse:
        caller = principal(context)
        flt = self._filter(request.filter, caller.tenant, CANCELLABLE, "cancelled")
        limit = _limit(request.limit)
        reason = _reason(request.reason) or "cancelled by CancelJobs"
        if request.dry_run:
            return _response(None, await bulk_db.count_matching(self.engine, flt, limit), True)
        result = await bulk_db.bulk_cancel(
            self.engine, flt, limit, caller.actor, reason, datetime.now(UTC)
        )
        await self._announce(result.moved)
        for row in result.cancel_requested:
            try:
                await broker.publish_cancel(self.events_exchange, row["id"], row["tenant"])
            except Exception as exc:  # the worker's heartbeat sees the request anyway
                log.warning(
                    "cancel publish failed", extra={"job_id": str(row["id"]), "error": repr(exc)}
                )
        log.info(
            "bulk cancel",
            extra={
                "action_id": str(result.action_id),
                "actor": caller.actor,
                "matched": result.matched,
            },
        )
        return _response(result, result.matched, False)

    async def _replay(
        self, flt: bulk_db.JobFilter, limit: int, dry_run: bool, caller: Principal, action: str
    ) -> operations_pb2.BulkActionResponse:
        if dry_run:
            return _response(None, await bulk_db.count_matching(self.engine, flt, limit), True)
        result = await bulk_db.bulk_replay(
            self.engine,
            flt,
            limit,
            caller.actor,
            self.settings.default_max_attempts,
            datetime.now(UTC),
            action=action,
        )
        await self.queue.enqueue(result.moved)
        await self._announce(result.moved)
        log.info(
            f"bulk {action}",
            extra={
                "action_id": str(result.action_id),
                "actor": caller.actor,
                "matched": result.matched,
            },
        )
        return _response(result, result.matched, False)

    async def RetryJobs(
        self, request: operations_pb2.RetryJobsRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.BulkActionResponse:
        caller = principal(context)
        flt = self._filter(request.filter, caller.tenant, RETRYABLE, "retried")
        return await self._replay(flt, _limit(request.limit), request.dry_run, caller, "retry")

    async def RedriveDeadJobs(
        self, request: operations_pb2.RedriveDeadJobsRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.BulkActionResponse:
        caller = principal(context)
        tenant = self._tenant(request.tenant, caller, "redrives another tenant's dead jobs")
        flt = bulk_db.JobFilter(tenant=tenant, statuses=[JobState.DEAD.value])
        return await self._replay(flt, _limit(request.limit), request.dry_run, caller, "redrive")

    def _tenant(self, requested: str, caller: Principal, what: str) -> str:
        """The tenant a call names (the caller's when empty); another needs an operator."""
        if not requested or requested == caller.tenant:
            return caller.tenant
        try:
            check_tenant_name(requested)
        except ValueError as exc:
            raise InvalidArgument("tenant", str(exc)) from None
        if not caller.operator:
            raise PermissionDenied(f"only an operator key {what}")
        return requested

    def _lane_target(
        self, lane: str, all_tenants: bool, tenant: str, caller: Principal
    ) -> tuple[str, str]:
        if not lane:
            raise InvalidArgument("lane", "is required")
        if lane not in self.settings.lanes:
            raise InvalidArgument("lane", f"must be one of {', '.join(self.settings.lanes)}")
        if all_tenants:
            if tenant:
                raise InvalidArgument("tenant", "give a tenant or all_tenants, not both")
            if not caller.operator:
                raise PermissionDenied("only an operator key pauses a lane of every tenant")
            return db.ALL_TENANTS, lane
        return self._tenant(tenant, caller, "pauses another tenant's lane"), lane

    async def _tell_workers(self, tenant: str) -> None:
        try:
            await control.publish_lanes_changed(self.events_exchange, tenant)
        except Exception as exc:  # workers re-read the pauses periodically anyway
            log.warning("lane control publish failed", extra={"error": repr(exc)})

    async def PauseLane(
        self, request: operations_pb2.PauseLaneRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.PauseLaneResponse:
        caller = principal(context)
        tenant, lane = self._lane_target(request.lane, request.all_tenants, request.tenant, caller)
        reason = _reason(request.reason)
        row = await db.pause_lane(
            self.engine, tenant, lane, caller.actor, reason, datetime.now(UTC)
        )
        await self._tell_workers(tenant)
        log.info("lane paused", extra={"lane": lane, "tenant": tenant, "actor": caller.actor})
        return operations_pb2.PauseLaneResponse(pause=_pause(row))

    async def ResumeLane(
        self, request: operations_pb2.ResumeLaneRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.ResumeLaneResponse:
        caller = principal(context)
        tenant, lane = self._lane_target(request.lane, request.all_tenants, request.tenant, caller)
        resumed = await db.resume_lane(self.engine, tenant, lane)
        if resumed:
            await self._tell_workers(tenant)
            log.info("lane resumed", extra={"lane": lane, "tenant": tenant, "actor": caller.actor})
        return operations_pb2.ResumeLaneResponse(resumed=resumed)

    async def ListLanePauses(
        self, request: operations_pb2.ListLanePausesRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.ListLanePausesResponse:
        caller = principal(context)
        async with self.engine.connect() as conn:
            rows = await db.lane_pause_rows(conn, None if caller.operator else caller.tenant)
        return operations_pb2.ListLanePausesResponse(pauses=[_pause(r) for r in rows])

    def _operator(self, caller: Principal, what: str) -> None:
        if not caller.operator:
            raise PermissionDenied(f"only an operator key {what}")

    async def ListWorkers(
        self, request: operations_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.ListWorkersResponse:
        self._operator(principal(context), "lists workers")
        since = datetime.now(UTC) - timedelta(seconds=self.settings.lease_s)
        async with self.engine.connect() as conn:
            rows = await db.live_workers(conn, since)
        return operations_pb2.ListWorkersResponse(workers=[_worker(r) for r in rows])

    async def DrainWorker(
        self, request: operations_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.DrainWorkerResponse:
        self._operator(principal(context), "drains workers")
        if not request.id:
            raise InvalidArgument("id", "is required")
        check_text(request.id, "id")
        row = await db.request_drain(self.engine, request.id[:256], datetime.now(UTC))
        if row is None:
            raise NotFound(f"worker {request.id[:256]} not found")
        try:
            await control.publish_drain(self.events_exchange, row["id"])
        except Exception as exc:  # the worker's next heartbeat reads the request
            log.warning("drain publish failed", extra={"error": repr(exc)})
        return operations_pb2.DrainWorkerResponse(worker=_worker(row))


__all__ = ["OperationsServiceServicer", "jobs_pb2"]
