"""Start-up and shutdown of the gateway: database, broker, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from conveyor.bus import broker
from conveyor.bus.events import EventPublisher
from conveyor.bus.outbox import JobQueue, TenantLanes
from conveyor.contract import request_body
from conveyor.core.config import Settings
from conveyor.server.runtime import backing_services, freeze_startup_heap, serving
from conveyor.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    schedules_pb2,
    schedules_pb2_grpc,
)

from .operations import OperationsServiceServicer
from .quota import SubmitQuota
from .schedules import ScheduleServiceServicer
from .servicer import JobServiceServicer

log = logging.getLogger(__name__)
SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
SCHEDULES_NAME = schedules_pb2.DESCRIPTOR.services_by_name["ScheduleService"].full_name
OPERATIONS_NAME = operations_pb2.DESCRIPTOR.services_by_name["OperationsService"].full_name


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the gateway until `stop` is set."""
    request_body.warm_up()  # build the body validator now, not on the first body's submit
    async with backing_services(settings, "gateway") as (engine, connection):
        jobs_channel = await connection.channel(publisher_confirms=True)
        topology = await broker.declare_topology(
            jobs_channel, settings.lanes, settings.max_priority
        )
        events_channel = await connection.channel(publisher_confirms=False)
        events_exchange = await events_channel.get_exchange(broker.EVENTS_EXCHANGE)
        tenants = None
        if settings.fair_tenants:
            tenants = TenantLanes(
                engine, jobs_channel, events_exchange, settings.lanes, settings.max_priority
            )
            await tenants.answer_queries(events_channel)
        queue = JobQueue(engine, topology.jobs, tenants=tenants, batch_lanes=settings.batch_lanes)
        quota = SubmitQuota(
            engine, settings.tenant_submit_per_minute, batch_s=settings.rate_limit_batch_s
        )
        servicer = JobServiceServicer(
            settings,
            engine,
            queue,
            EventPublisher(events_exchange),
            events_exchange,
            connection,
            quota,
        )
        schedules = ScheduleServiceServicer(settings, engine)
        operations = OperationsServiceServicer(
            settings, engine, queue, EventPublisher(events_exchange), events_exchange
        )

        def add_services(s: grpc.aio.Server) -> None:
            jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, s)
            schedules_pb2_grpc.add_ScheduleServiceServicer_to_server(schedules, s)
            operations_pb2_grpc.add_OperationsServiceServicer_to_server(operations, s)

        async with serving(
            [SERVICE_NAME, SCHEDULES_NAME, OPERATIONS_NAME],
            add_services,
            f"{settings.gateway_host}:{settings.gateway_port}",
            settings=settings,
            engine=engine,
            grace_s=5,
        ) as port:
            freeze_startup_heap()
            log.info(
                "gateway ready",
                extra={"address": f"{settings.gateway_host}:{port}", "tls": settings.tls},
            )
            returning = asyncio.create_task(_return_unused_quota(quota, stop))
            await stop.wait()
        await servicer.close()
        await queue.close()
        await returning
        await quota.budget.return_all()


async def _return_unused_quota(quota: SubmitQuota, stop: asyncio.Event) -> None:
    """Hand back the quota this gateway holds for tenants that stopped submitting."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        await quota.return_idle()
