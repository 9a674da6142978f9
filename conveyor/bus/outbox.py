"""Putting jobs on their lane queues and recording that the broker has them.

A job row starts with `published_at` NULL. `enqueue` publishes with
confirms and stamps the rows the broker confirmed; a row whose publish failed
stays NULL and the dispatcher's outbox reconciler publishes it again later.
Used by the gateway right after insert, and by the dispatcher for due,
recovered and unconfirmed jobs.

With fair tenants (the default), a job goes to its tenant's queue of its lane;
`TenantLanes` declares a tenant's queues before its first publish in this
process, registers the tenant in Postgres and announces it to the workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from opentelemetry.trace import Span, SpanKind, StatusCode, set_span_in_context
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.bus.broker import (
    JOBS_EXCHANGE,
    PUBLISHED_AT_HEADER,
    JobMessage,
    JobPublish,
    job_routing_key,
    publish_jobs,
)
from conveyor.core.lifecycle import Job
from conveyor.core.telemetry import exporting, inject_headers, traceparent_context, tracer
from conveyor.db.jobs import mark_published
from conveyor.db.tenants import ensure_tenant

log = logging.getLogger(__name__)

STAMP_DELAY_S = 0.1
"""How long confirmed publishes gather before one UPDATE stamps them all. The stamps
only keep the outbox from republishing (after CONVEYOR_OUTBOX_AFTER_S), so they can
wait; gathering 2 ms instead spent a tenth of a busy gateway's CPU on these UPDATEs."""


class TenantLanes:
    """A tenant's lane queues, declared once per process before its first job is published.

    The first time a tenant is seen here, its queues are declared (idempotent), the
    tenant is registered in Postgres (where a starting worker finds it) and announced
    on the events exchange (so running workers start consuming at once). Publishers
    also answer a starting worker's query by announcing every tenant they know.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        channel: AbstractChannel,
        events: AbstractExchange,
        lanes: tuple[str, ...],
        max_priority: int,
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.events = events
        self.lanes = lanes
        self.max_priority = max_priority
        self._ready: set[str] = set()
        self._pending: dict[str, asyncio.Future[None]] = {}

    def declared(self, tenant: str) -> bool:
        """Whether this process has declared the tenant's queues already."""
        return tenant in self._ready

    async def ensure(self, tenant: str) -> None:
        """Make sure the tenant's queues exist; a set lookup once they do."""
        if tenant in self._ready:
            return
        pending = self._pending.get(tenant)
        if pending is not None:  # another publish is declaring them: wait for it
            await asyncio.wait([pending])
            if tenant not in self._ready:
                raise ConnectionError(f"the lane queues of tenant {tenant} could not be declared")
            return
        done = asyncio.get_running_loop().create_future()
        self._pending[tenant] = done
        try:
            await broker.declare_tenant_lanes(self.channel, tenant, self.lanes, self.max_priority)
            async with self.engine.connect() as conn:
                await ensure_tenant(conn, tenant)
            await broker.announce_tenant(self.events, tenant)
            self._ready.add(tenant)
        finally:
            del self._pending[tenant]
            done.set_result(None)

    async def answer_queries(self, channel: AbstractChannel) -> None:
        """Announce every known tenant whenever a worker asks (it is starting)."""
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self.events, broker.TENANTS_QUERY_KEY)

        async def on_query(message: AbstractIncomingMessage) -> None:
            for tenant in list(self._ready):
                try:
                    await broker.announce_tenant(self.events, tenant)
                except Exception as exc:  # the worker also reads the tenants table
                    log.warning("tenant announcement failed", extra={"error": repr(exc)})
                    return

        await queue.consume(on_query, no_ack=True)


class JobQueue:
    def __init__(
        self,
        engine: AsyncEngine,
        exchange: AbstractExchange,
        timeout_s: float = 5.0,
        tenants: TenantLanes | None = None,
        batch_lanes: Collection[str] = (),
    ):
        """`tenants`: route each job to its tenant's lane queue (fair sharing);
        without it, jobs go to the shared lane queues. Jobs of `batch_lanes` are not
        published: they wait, pending, for the batcher (services.dispatcher.batcher),
        and are only stamped so the outbox does not take them for lost publishes."""
        self.batch_lanes = frozenset(batch_lanes)
        self.engine = engine
        self.exchange = exchange
        self.timeout_s = timeout_s
        self.tenants = tenants
        self._to_stamp: list[Any] = []
        self._stamping: asyncio.Task[None] | None = None

    def _span(self, job: Job) -> Span | None:
        """The job's PRODUCER span, a child of its submit (a republish after a retry,
        recovery or the outbox joins that trace too). Only when spans are exported:
        otherwise the stored traceparent travels as it is, which keeps the job's trace
        id without making a span per message."""
        if not exporting():
            return None
        return tracer().start_span(
            f"{JOBS_EXCHANGE} publish",
            context=traceparent_context(job.traceparent),
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "publish",
                "messaging.destination.name": JOBS_EXCHANGE,
                "messaging.rabbitmq.destination.routing_key": job.lane,
                "conveyor.job.id": str(job.id),
            },
        )

    async def _publish(self, jobs: Sequence[Job], ready: set[str]) -> list[bool]:
        """Publish the jobs together (conveyor.bus.broker.publish_jobs); for each, whether
        the broker confirmed it. A job whose tenant's queues are not declared is not
        published: the outbox publishes it later."""
        spans = [self._span(job) for job in jobs]
        publishes: list[JobPublish] = []
        sent: list[int] = []
        results: list[BaseException | None] = [None] * len(jobs)
        now_ns = time.time_ns()
        fair = self.tenants is not None
        for i, (job, span) in enumerate(zip(jobs, spans, strict=True)):
            tenant = job.tenant
            if tenant not in ready:
                results[i] = ConnectionError(f"the lane queues of tenant {tenant} are not declared")
                continue
            if span is not None:
                headers: dict[str, Any] = inject_headers(set_span_in_context(span))
            else:
                traceparent = job.traceparent
                headers = {"traceparent": traceparent} if traceparent else {}
            headers[PUBLISHED_AT_HEADER] = now_ns
            publishes.append(
                JobPublish(
                    JobMessage(job_id=job.id, tenant=tenant),
                    job_routing_key(job.lane, tenant if fair else None),
                    job.priority,
                    headers,
                )
            )
            sent.append(i)
        try:
            outcomes = await publish_jobs(self.exchange, publishes, self.timeout_s)
        except Exception as exc:  # broker down, channel closed: the outbox retries
            outcomes = [exc] * len(publishes)
        for i, outcome in zip(sent, outcomes, strict=True):
            results[i] = outcome
        for job, span, error in zip(jobs, spans, results, strict=True):
            if error is not None:
                log.warning(
                    "publish failed; left to the outbox",
                    extra={"job_id": str(job.id), "error": repr(error)},
                )
            if span is not None:
                if error is not None:
                    span.set_status(StatusCode.ERROR, repr(error))
                span.end()
        return [error is None for error in results]

    async def _ready_tenants(self, tenants: set[str]) -> set[str]:
        """The tenants among `tenants` whose lane queues are declared (all of them, unless
        the broker is unreachable)."""
        if self.tenants is None:
            return tenants
        ready = {t for t in tenants if self.tenants.declared(t)}
        for tenant in tenants - ready:
            try:
                await asyncio.wait_for(self.tenants.ensure(tenant), self.timeout_s)
                ready.add(tenant)
            except Exception as exc:  # the outbox publishes its jobs later
                log.warning(
                    "cannot declare a tenant's queues", extra={"tenant": tenant, "error": repr(exc)}
                )
        return ready

    async def enqueue(self, jobs: Sequence[Job]) -> int:
        """Publish pending jobs; those the broker confirmed are stamped shortly after.

        Returns how many were confirmed. The stamps of concurrent calls share one
        UPDATE: until it lands the outbox may publish a job twice, which the
        worker's conditional claim makes harmless.
        """
        if not jobs:
            return 0
        if self.batch_lanes:
            held = [j.id for j in jobs if j.lane in self.batch_lanes]
            if held:
                self._to_stamp.extend(held)
                if self._stamping is None or self._stamping.done():
                    self._stamping = asyncio.create_task(self._stamp())
                jobs = [j for j in jobs if j.lane not in self.batch_lanes]
                if not jobs:
                    return len(held)
        ready = await self._ready_tenants({j.tenant for j in jobs})
        results = await self._publish(jobs, ready)
        confirmed = [j.id for j, ok in zip(jobs, results, strict=True) if ok]
        if confirmed:
            self._to_stamp.extend(confirmed)
            if self._stamping is None or self._stamping.done():
                self._stamping = asyncio.create_task(self._stamp())
        return len(confirmed)

    async def _stamp(self) -> None:
        while self._to_stamp:
            # Every UPDATE waits to gather, not only the first: under a steady stream of
            # confirms a loop without it ran one UPDATE per job or two, back to back.
            await asyncio.sleep(STAMP_DELAY_S)
            ids, self._to_stamp = self._to_stamp, []
            try:
                await mark_published(self.engine, ids)
            except Exception as exc:  # the jobs are queued; at worst the outbox republishes them
                log.warning("could not stamp published jobs", extra={"error": repr(exc)})

    async def close(self) -> None:
        """Write the stamps still waiting."""
        if self._stamping is not None:
            await self._stamping
