"""Start-up, consuming and graceful shutdown of a worker process.

Prefetch is the concurrency: the broker hands this process at most
`worker_concurrency` unacked jobs, so priority still orders the backlog that
waits in RabbitMQ instead of a backlog buffered here. The worker consumes the
shared lane queues and every tenant's queue of its lanes (services.worker.consumers),
and waits for provider budget before each call (services.worker.limiter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPError

from conveyor import broker
from conveyor.catchup import serve_text_requests
from conveyor.config import Settings
from conveyor.db import jobs as db
from conveyor.db.engine import is_disconnect
from conveyor.events import EventPublisher
from conveyor.runtime import backing_services
from services.worker.consumers import TenantConsumers, refresh_forever
from services.worker.limiter import ProviderLimiter
from services.worker.provider import Provider
from services.worker.runner import JobRunner

log = logging.getLogger(__name__)


async def _heartbeat(runner: JobRunner, interval_s: float) -> None:
    """Renew the leases of running jobs; abort those whose cancel was requested."""
    while True:
        await asyncio.sleep(interval_s)
        leases = [e.lease for e in list(runner.inflight.values())]
        try:
            for job_id in await db.heartbeat(runner.engine, leases):
                runner.cancel(job_id)
        except Exception as exc:
            log.warning("heartbeat failed", extra={"error": repr(exc)})


async def _guarded(runner: JobRunner, message: AbstractIncomingMessage) -> None:
    """Run a job. A lost database or broker connection hands the message back (the
    job is not at fault); any other unexpected error dead-letters it instead of
    leaving it stuck."""
    try:
        await runner.handle(message)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if is_disconnect(exc) or isinstance(exc, AMQPError):
            log.warning(
                "job handed back after a lost connection",
                extra={"message_id": message.message_id, "error": repr(exc)},
            )
            await asyncio.sleep(1)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        log.exception(
            "job handling failed; message dead-lettered", extra={"message_id": message.message_id}
        )
        with contextlib.suppress(Exception):
            await message.reject(requeue=False)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    provider = Provider(settings)
    tasks: set[asyncio.Task[None]] = set()
    try:
        async with backing_services(settings, "worker") as (engine, connection):
            channel = await connection.channel()
            # global_: one limit for the whole channel, however many lanes it consumes.
            await channel.set_qos(prefetch_count=settings.worker_concurrency, global_=True)
            topology = await broker.declare_topology(channel, settings.lanes, settings.max_priority)
            events_channel = await connection.channel(publisher_confirms=False)
            events_exchange = await events_channel.get_exchange(broker.EVENTS_EXCHANGE)
            limiter = ProviderLimiter(engine, settings)
            consumers: TenantConsumers | None = None

            async def on_tenant_full(tenant: str) -> float:
                return await consumers.pause(tenant) if consumers is not None else 1.0

            runner = JobRunner(
                settings,
                engine,
                provider,
                EventPublisher(events_exchange),
                limiter=limiter,
                on_tenant_full=on_tenant_full,
            )

            async def on_job(message: AbstractIncomingMessage) -> None:
                task = asyncio.create_task(_guarded(runner, message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            async def on_cancel(message: AbstractIncomingMessage) -> None:
                with contextlib.suppress(ValueError):
                    if runner.cancel(uuid.UUID(message.body.decode())):
                        log.info("cancel received", extra={"job_id": message.body.decode()})

            control = await events_channel.declare_queue(exclusive=True, auto_delete=True)
            await control.bind(events_exchange, broker.CANCEL_BINDING)
            await control.consume(on_cancel, no_ack=True)
            # Notifiers catching a watcher up ask for a running attempt's text so far.
            await serve_text_requests(events_channel, events_exchange, runner.text_so_far)

            consumers = TenantConsumers(
                channel, settings.worker_lanes, settings.max_priority, on_job
            )
            await consumers.consume_shared(topology.lanes)
            await consumers.listen(events_channel, events_exchange)
            await consumers.refresh(engine)
            refreshing = asyncio.create_task(
                refresh_forever(consumers, engine, settings.tenant_refresh_s, stop)
            )
            limiting = asyncio.create_task(limiter.run(stop))
            heartbeat = asyncio.create_task(_heartbeat(runner, settings.worker_heartbeat_s))
            log.info(
                "worker ready",
                extra={
                    "lanes": list(settings.worker_lanes),
                    "concurrency": settings.worker_concurrency,
                    "tenants": len(consumers.tenants),
                },
            )
            await stop.wait()

            log.info(
                "stopping: no new jobs; waiting for in-flight ones", extra={"in_flight": len(tasks)}
            )
            await consumers.stop()
            if tasks:
                _, pending = await asyncio.wait(
                    set(tasks), timeout=settings.worker_shutdown_grace_s
                )
                runner.stopping = True
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=10)
                    log.info("handed back unfinished jobs", extra={"count": len(pending)})
            heartbeat.cancel()
            await refreshing
            await limiting
    finally:
        await provider.close()
