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
import os
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPError
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.bus.catchup import serve_text_requests
from conveyor.bus.control import DRAIN_KEY, LANES_BINDING
from conveyor.bus.events import EventPublisher
from conveyor.bus.settle import REJECT, Outcome, consumer, requeue
from conveyor.core.config import Settings
from conveyor.db import operations as ops_db
from conveyor.db.engine import is_transient
from conveyor.llm.provider import Provider
from conveyor.server.runtime import backing_services, freeze_startup_heap

from .consumers import TenantConsumers, refresh_forever
from .inflight import lease_hold_s
from .limiter import ProviderLimiter
from .runner import JobRunner

log = logging.getLogger(__name__)


async def _heartbeat(runner: JobRunner, interval_s: float, lease_s: float) -> None:
    """Renew the leases of running jobs once per interval; abort the calls whose lease
    was lost or whose cancel was requested.

    A renewal runs in a task of its own, so that one held up by an unreachable database
    does not hold up the check that aborts the calls whose lease can no longer be
    proven (no renewal within `lease_hold_s`): the sweeper may requeue those jobs.
    """
    hold_s = lease_hold_s(lease_s, interval_s)
    renewing: asyncio.Task[None] | None = None
    try:
        while True:
            await asyncio.sleep(interval_s)
            runner.abort_unrenewed(hold_s)
            if renewing is None or renewing.done():
                renewing = asyncio.create_task(_renew(runner))
    finally:
        if renewing is not None:
            renewing.cancel()


async def _renew(runner: JobRunner) -> None:
    try:
        await runner.renew_leases()
    except Exception as exc:
        log.warning("heartbeat failed", extra={"error": repr(exc)})


PAUSED_HOLD_S = 1.0
"""A delivery of a paused lane from a shared queue (which cannot be paused per tenant)
waits this long before it goes back, so that it does not circle at full speed."""


def _delivery_tenant(message: AbstractIncomingMessage) -> tuple[str, str, bool]:
    """(lane, tenant, from a shared queue) of a job delivery; tenant "" if unreadable."""
    lane, _, tenant = (message.routing_key or "").partition(".")
    if tenant:
        return lane, tenant, False
    try:
        return lane, broker.JobMessage.decode(message.body).tenant, True
    except ValueError:
        return lane, "", True


async def _register(
    engine: AsyncEngine,
    worker_id: str,
    settings: Settings,
    in_flight: Callable[[], int],
    drain: Callable[[], None],
) -> None:
    """Upsert this worker's row every heartbeat (ListWorkers reads them); a drain
    requested in the row starts the drain (the control message may have been lost)."""
    started = datetime.now(UTC)
    while True:
        try:
            if await ops_db.worker_heartbeat(
                engine,
                worker_id,
                socket.gethostname(),
                os.getpid(),
                settings.worker_lanes,
                in_flight(),
                settings.worker_concurrency,
                started,
                datetime.now(UTC),
            ):
                drain()
        except Exception as exc:  # Postgres away: the next heartbeat writes it
            log.warning("worker row not written", extra={"error": repr(exc)})
        await asyncio.sleep(settings.worker_heartbeat_s)


LOST_CONNECTION_HOLD_S = 1.0
"""A job message whose handling lost its database or broker connection waits this long
before it goes back to its queue."""


def _on_job_error(message: AbstractIncomingMessage, exc: Exception) -> Outcome:
    """What becomes of a job message whose handling raised. A lost database or broker
    connection, or a database statement that timed out, hands the message back (the job
    is not at fault); any other unexpected error dead-letters it instead of leaving it
    stuck."""
    if is_transient(exc) or isinstance(exc, AMQPError):
        log.warning(
            "job handed back after a lost connection",
            extra={"message_id": message.message_id, "error": repr(exc)},
        )
        return requeue(LOST_CONNECTION_HOLD_S)
    log.error(
        "job handling failed; message dead-lettered",
        extra={"message_id": message.message_id},
        exc_info=exc,
    )
    return REJECT


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    provider = Provider(settings)
    tasks: set[asyncio.Task[None]] = set()
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
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

            async def handle(message: AbstractIncomingMessage) -> Outcome:
                if consumers is not None and consumers.lane_pauses:
                    lane, tenant, shared = _delivery_tenant(message)
                    if consumers.lane_paused(lane, tenant):
                        # Delivered just before its lane was paused: back to the queue,
                        # still pending.
                        return requeue(PAUSED_HOLD_S if shared else 0.0)
                return await runner.handle(message)

            run_job = consumer(handle, _on_job_error)

            async def on_job(message: AbstractIncomingMessage) -> None:
                task = asyncio.create_task(run_job(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            async def on_cancel(message: AbstractIncomingMessage) -> None:
                with contextlib.suppress(ValueError):
                    if runner.cancel(uuid.UUID(message.body.decode())):
                        log.info("cancel received", extra={"job_id": message.body.decode()})

            control = await events_channel.declare_queue(exclusive=True, auto_delete=True)
            await control.bind(events_exchange, broker.CANCEL_BINDING)
            await control.consume(on_cancel, no_ack=True)
            # Notifiers ask for a running attempt's text so far and register their watches.
            await serve_text_requests(events_channel, events_exchange, runner)

            consumers = TenantConsumers(
                channel, settings.worker_lanes, settings.max_priority, on_job
            )
            await consumers.refresh_pauses(engine)  # before consuming anything
            await consumers.consume_shared(topology.lanes)

            draining: asyncio.Task[None] | None = None

            async def drain_then_stop() -> None:
                """Take no new jobs, let the calls in flight finish, then stop."""
                assert consumers is not None
                log.info("draining: no new jobs", extra={"in_flight": len(tasks)})
                await consumers.stop()
                while tasks and not stop.is_set():
                    await asyncio.wait(set(tasks), timeout=1.0)
                log.info("drained")
                stop.set()

            def drain() -> None:
                nonlocal draining
                if draining is None:
                    draining = asyncio.create_task(drain_then_stop())

            async def on_operations(message: AbstractIncomingMessage) -> None:
                if message.routing_key == DRAIN_KEY:
                    if message.body.decode(errors="replace") == worker_id:
                        drain()
                    return
                try:
                    assert consumers is not None
                    await consumers.refresh_pauses(engine)
                except Exception as exc:  # the periodic refresh reads them again
                    log.warning("lane pauses not read", extra={"error": repr(exc)})

            operations = await events_channel.declare_queue(exclusive=True, auto_delete=True)
            await operations.bind(events_exchange, LANES_BINDING)
            await operations.bind(events_exchange, DRAIN_KEY)
            await operations.consume(on_operations, no_ack=True)
            registering = asyncio.create_task(
                _register(engine, worker_id, settings, lambda: len(runner.inflight), drain)
            )
            await consumers.listen(events_channel, events_exchange)
            await consumers.refresh(engine)
            refreshing = asyncio.create_task(
                refresh_forever(consumers, engine, settings.tenant_refresh_s, stop)
            )
            limiting = asyncio.create_task(limiter.run(stop))
            heartbeat = asyncio.create_task(
                _heartbeat(runner, settings.worker_heartbeat_s, settings.lease_s)
            )
            freeze_startup_heap()
            log.info(
                "worker ready",
                extra={
                    "worker_id": worker_id,
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
            registering.cancel()
            await runner.writes.close()
            claims, finishes = runner.writes.claims, runner.writes.finishes
            log.info(
                "writes and status events",
                extra={
                    "claim_statements": claims.statements,
                    "claims": claims.rows,
                    "outcome_statements": finishes.statements,
                    "outcomes": finishes.rows,
                    "status_messages": runner.status_events.messages,
                },
            )
            if draining is not None:
                await draining
            with contextlib.suppress(Exception):  # it ages out of ListWorkers anyway
                await ops_db.forget_worker(engine, worker_id)
            await refreshing
            await limiting
    finally:
        await provider.close()
