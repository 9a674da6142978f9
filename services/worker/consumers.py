"""The worker's consumers: the shared lane queues and every tenant's queue of its lanes.

All of them run on one channel whose prefetch is the worker's concurrency, so when
a slot frees up RabbitMQ offers it to the non-empty queues in turn: each tenant
with work waiting gets its share of the worker (see conveyor.bus.broker).

Tenants are learnt three ways: the tenants table at start and every
`tenant_refresh_s`, the announcements publishers make when they declare a new
tenant's queues, and the answers to the query this worker sends at start. A
tenant at its concurrency limit is paused here (its consumers cancelled) for a
backoff that grows while it keeps hitting the limit.

A paused lane (conveyor.db.operations lane pauses, of one tenant or of every
tenant) is not consumed: its jobs wait in their queues, pending. The pauses are
read from Postgres at start, with the tenant list, and when a control message
says they changed (conveyor.bus.control), so a restarted worker respects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.db.operations import ALL_TENANTS, lane_pause_rows
from conveyor.db.tenants import tenant_names
from conveyor.server.auth import TENANT_NAME

log = logging.getLogger(__name__)

PAUSE_MIN_S = 0.25
PAUSE_MAX_S = 2.0
PAUSE_QUIET_S = 10.0

OnMessage = Callable[[AbstractIncomingMessage], Awaitable[None]]


class TenantConsumers:
    def __init__(
        self,
        channel: AbstractChannel,
        lanes: tuple[str, ...],
        max_priority: int,
        on_message: OnMessage,
    ) -> None:
        self.channel = channel
        self.lanes = lanes
        self.max_priority = max_priority
        self.on_message = on_message
        self.tenants: set[str] = set()
        self._queues: dict[str, dict[str, AbstractQueue]] = {}
        self._tags: dict[str, list[tuple[AbstractQueue, str]]] = {}
        self._paused: dict[str, asyncio.TimerHandle] = {}
        self._backoff: dict[str, tuple[float, float]] = {}
        """tenant -> (when it was last paused, that pause)."""
        self._lock = asyncio.Lock()
        self._shared: list[tuple[AbstractQueue, str]] = []
        self._shared_queues: dict[str, AbstractQueue] = {}
        self.lane_pauses: frozenset[tuple[str, str]] = frozenset()
        """(tenant or ALL_TENANTS, lane) pairs not consumed."""
        self.stopped = False

    async def consume_shared(self, queues: dict[str, AbstractQueue]) -> None:
        """Consume the shared lane queues (jobs published with fairness off)."""
        for lane in self.lanes:
            queue = queues[lane]
            self._shared_queues[lane] = queue
            if not self.lane_paused(lane, ALL_TENANTS):
                self._shared.append((queue, await queue.consume(self.on_message)))

    def lane_paused(self, lane: str, tenant: str) -> bool:
        """Whether a tenant's lane is paused (its own pause or the every-tenant one)."""
        return (ALL_TENANTS, lane) in self.lane_pauses or (tenant, lane) in self.lane_pauses

    async def add(self, tenant: str) -> None:
        """Start consuming a tenant's lane queues (declaring them); idempotent."""
        if tenant in self.tenants or self.stopped:
            return
        if not TENANT_NAME.match(tenant):
            log.warning("ignoring an invalid tenant name", extra={"tenant": tenant[:80]})
            return
        async with self._lock:
            if tenant in self.tenants or self.stopped:
                return
            self._queues[tenant] = await broker.declare_tenant_lanes(
                self.channel, tenant, self.lanes, self.max_priority
            )
            await self._consume(tenant)
            self.tenants.add(tenant)
        log.info("consuming tenant queues", extra={"tenant": tenant, "lanes": list(self.lanes)})

    async def _consume(self, tenant: str) -> None:
        tags = []
        for lane, queue in self._queues[tenant].items():
            if not self.lane_paused(lane, tenant):
                tags.append((queue, await queue.consume(self.on_message)))
        self._tags[tenant] = tags

    async def refresh_pauses(self, engine: AsyncEngine) -> None:
        """Read the lane pauses and start or stop consuming the lanes they name."""
        async with engine.connect() as conn:
            rows = await lane_pause_rows(conn)
        await self.set_lane_pauses(frozenset((r["tenant"], r["lane"]) for r in rows))

    async def set_lane_pauses(self, pauses: frozenset[tuple[str, str]]) -> None:
        """Consume exactly the lanes not paused (a tenant paused for its concurrency
        limit stays paused: its resume consumes the lanes not paused then)."""
        if pauses == self.lane_pauses or self.stopped:
            self.lane_pauses = pauses
            return
        async with self._lock:
            before, self.lane_pauses = self.lane_pauses, pauses
            # The shared lane queues follow the every-tenant pauses.
            for lane, queue in self._shared_queues.items():
                await self._follow(self._shared, lane, queue, self.lane_paused(lane, ALL_TENANTS))
            for tenant in self.tenants:
                if tenant in self._paused:
                    continue
                tags = self._tags.setdefault(tenant, [])
                for lane, queue in self._queues[tenant].items():
                    await self._follow(tags, lane, queue, self.lane_paused(lane, tenant))
        log.info(
            "lane pauses",
            extra={
                "paused": sorted(f"{t}/{lane}" for t, lane in pauses),
                "lifted": sorted(f"{t}/{lane}" for t, lane in before - pauses),
            },
        )

    async def _follow(
        self, tags: list[tuple[AbstractQueue, str]], lane: str, queue: AbstractQueue, paused: bool
    ) -> None:
        """Cancel or start the consumer of one queue so that it matches `paused`."""
        current = [(q, tag) for q, tag in tags if q is queue]
        if paused:
            for item in current:
                tags.remove(item)
                with contextlib.suppress(Exception):  # a closed channel consumes nothing
                    await queue.cancel(item[1])
        elif not current:
            tags.append((queue, await queue.consume(self.on_message)))

    async def refresh(self, engine: AsyncEngine) -> None:
        """Consume every tenant of the tenants table."""
        async with engine.connect() as conn:
            names = await tenant_names(conn)
        for tenant in names:
            await self.add(tenant)
        await self.refresh_pauses(engine)  # catches a control message that was lost

    async def pause(self, tenant: str) -> float:
        """Stop taking a tenant's jobs for a while (it is at its concurrency limit).

        Returns the pause. It doubles while the tenant keeps hitting its limit, and
        starts short again after a quiet while.
        """
        now = time.monotonic()
        last, previous = self._backoff.get(tenant, (0.0, PAUSE_MIN_S / 2))
        if now - last > PAUSE_QUIET_S:
            previous = PAUSE_MIN_S / 2
        delay = min(PAUSE_MAX_S, previous * 2)
        self._backoff[tenant] = (now, delay)
        if tenant in self._paused or tenant not in self.tenants:
            return delay
        async with self._lock:
            for queue, tag in self._tags.pop(tenant, []):
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
            loop = asyncio.get_running_loop()
            self._paused[tenant] = loop.call_later(
                delay, lambda: asyncio.ensure_future(self._resume(tenant))
            )
        log.info(
            "tenant at its concurrency limit: paused", extra={"tenant": tenant, "for_s": delay}
        )
        return delay

    async def _resume(self, tenant: str) -> None:
        async with self._lock:
            if self._paused.pop(tenant, None) is None or self.stopped:
                return
            try:
                await self._consume(tenant)
            except Exception as exc:  # the channel is away; the robust channel recovers
                log.warning(
                    "resuming a tenant failed", extra={"tenant": tenant, "error": repr(exc)}
                )

    async def listen(self, channel: AbstractChannel, events: AbstractExchange) -> None:
        """Consume tenant announcements on the events exchange, then ask for them all."""
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(events, broker.TENANT_ANNOUNCE_BINDING)

        async def on_announce(message: AbstractIncomingMessage) -> None:
            tenant = message.body.decode(errors="replace")
            try:
                await self.add(tenant)
            except Exception as exc:  # the periodic refresh picks it up
                log.warning("cannot consume an announced tenant", extra={"error": repr(exc)})

        await queue.consume(on_announce, no_ack=True)
        await broker.ask_for_tenants(events)

    async def stop(self) -> None:
        """Stop consuming everything (graceful shutdown)."""
        self.stopped = True
        async with self._lock:
            for handle in self._paused.values():
                handle.cancel()
            self._paused.clear()
            consumers = [*self._shared, *(c for tags in self._tags.values() for c in tags)]
            self._tags.clear()
            self._shared.clear()
        for queue, tag in consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)


async def refresh_forever(
    consumers: TenantConsumers, engine: AsyncEngine, every_s: float, stop: asyncio.Event
) -> None:
    """Re-read the tenants table every `every_s` (announcements are not durable)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            return
        try:
            await consumers.refresh(engine)
        except Exception as exc:  # Postgres or RabbitMQ away: next time
            log.warning("tenant refresh failed", extra={"error": repr(exc)})
