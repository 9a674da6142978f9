"""The client's OperationsService calls (gateway): bulk actions over a job filter,
lane pauses, and workers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeAlias

from conveyor.v1 import operations_pb2

from .channel import Connection
from .messages import aware
from .statuses import JobStatus

LanePauses: TypeAlias = list[operations_pb2.LanePause]
Workers: TypeAlias = list[operations_pb2.Worker]


class OperationCalls(Connection):
    """OperationsService: cancel, retry and redrive in bulk; pause lanes; drain workers."""

    @staticmethod
    def job_filter(
        statuses: Iterable[JobStatus] = (),
        lane: str = "",
        labels: Mapping[str, str] | None = None,
        model: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> operations_pb2.JobFilter:
        """A JobFilter for cancel_jobs and retry_jobs."""
        flt = operations_pb2.JobFilter(
            statuses=list(statuses), lane=lane, labels=dict(labels or {}), model=model
        )
        if created_after is not None:
            flt.created_after.FromDatetime(aware(created_after))
        if created_before is not None:
            flt.created_before.FromDatetime(aware(created_before))
        return flt

    async def _bulk(
        self, method: Callable[..., Awaitable[Any]], request: Any
    ) -> operations_pb2.BulkActionResponse:
        """A bulk action's response (what it changed, or would with a dry run)."""
        response: operations_pb2.BulkActionResponse = await self._call(method, request)
        return response

    async def cancel_jobs(
        self,
        flt: operations_pb2.JobFilter | None = None,
        *,
        dry_run: bool = False,
        limit: int = 0,
        reason: str = "",
    ) -> operations_pb2.BulkActionResponse:
        """Cancel the live jobs a filter matches (see `job_filter`); a dry run counts them."""
        request = operations_pb2.CancelJobsRequest(
            filter=flt, dry_run=dry_run, limit=limit, reason=reason
        )
        return await self._bulk(self._operations.CancelJobs, request)

    async def retry_jobs(
        self, flt: operations_pb2.JobFilter | None = None, *, dry_run: bool = False, limit: int = 0
    ) -> operations_pb2.BulkActionResponse:
        """Replay the failed and dead jobs a filter matches; a dry run counts them."""
        request = operations_pb2.RetryJobsRequest(filter=flt, dry_run=dry_run, limit=limit)
        return await self._bulk(self._operations.RetryJobs, request)

    async def redrive_dead(
        self, tenant: str = "", *, dry_run: bool = False, limit: int = 0
    ) -> operations_pb2.BulkActionResponse:
        """Replay every dead job of the tenant (another tenant's with an operator key)."""
        request = operations_pb2.RedriveDeadJobsRequest(tenant=tenant, dry_run=dry_run, limit=limit)
        return await self._bulk(self._operations.RedriveDeadJobs, request)

    async def pause_lane(
        self, lane: str, *, tenant: str = "", all_tenants: bool = False, reason: str = ""
    ) -> operations_pb2.LanePause:
        """Stop workers taking a lane's jobs (they wait, pending)."""
        request = operations_pb2.PauseLaneRequest(
            lane=lane, tenant=tenant, all_tenants=all_tenants, reason=reason
        )
        response: operations_pb2.PauseLaneResponse = await self._call(
            self._operations.PauseLane, request
        )
        return response.pause

    async def resume_lane(self, lane: str, *, tenant: str = "", all_tenants: bool = False) -> bool:
        """Let workers take a paused lane's jobs again; False if it was not paused."""
        request = operations_pb2.ResumeLaneRequest(
            lane=lane, tenant=tenant, all_tenants=all_tenants
        )
        response: operations_pb2.ResumeLaneResponse = await self._call(
            self._operations.ResumeLane, request
        )
        return response.resumed

    async def lane_pauses(self) -> LanePauses:
        response: operations_pb2.ListLanePausesResponse = await self._call(
            self._operations.ListLanePauses, operations_pb2.ListLanePausesRequest()
        )
        return list(response.pauses)

    async def workers(self) -> Workers:
        """The live workers (operator keys)."""
        response: operations_pb2.ListWorkersResponse = await self._call(
            self._operations.ListWorkers, operations_pb2.ListWorkersRequest()
        )
        return list(response.workers)

    async def drain_worker(self, worker_id: str) -> operations_pb2.Worker:
        """Ask a worker to finish its calls and exit (operator keys)."""
        request = operations_pb2.DrainWorkerRequest(id=worker_id)
        response: operations_pb2.DrainWorkerResponse = await self._call(
            self._operations.DrainWorker, request
        )
        return response.worker
