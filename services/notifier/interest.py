"""Which attempts' token deltas this notifier needs, told to the workers.

A worker publishes an attempt's deltas only while some notifier watches it
(services.worker.interest). This notifier registers a watch of an attempt when a
stream needs it: a watch that opens on a running attempt asks its worker for the
text so far, which registers it (conveyor.bus.catchup); a stream of one job or a
list of jobs that sees the RUNNING event of a new attempt registers it without
asking (its deltas, all of them, come on the bus). A stream over every job of a
tenant with some labels holds a lease on the tenant's deltas instead, renewed
while it lasts. A watch of a job that no stream here follows any more is released
after `RELEASE_AFTER_S` (a reader that reconnects within it resumes from this
notifier's log); one whose attempt is over is simply forgotten, as the worker
forgets it.

Streams of any kind register: those without token deltas need the count of the
pieces for their progress reports. What a notifier registered and could not
release (it died) ends with the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from conveyor.bus.catchup import TextSoFarClient

from .hub import Hub

log = logging.getLogger(__name__)

RELEASE_AFTER_S = 5.0
"""A registered attempt of a job no stream here follows is released after this long."""
LEASE_S = 6.0
"""How long a tenant lease holds at a worker without renewal."""
RENEW_S = 2.0
"""How often a tenant lease is renewed while a tenant-wide stream is open."""
TICK_S = 1.0


@dataclass
class Registration:
    tenant: str
    attempt: int
    wanted_at: float
    """time.monotonic() when a stream here last followed the job."""


class Interest:
    """The watches this notifier registered with the workers (see the module docstring)."""

    def __init__(self, hub: Hub, client: TextSoFarClient | None) -> None:
        self.hub = hub
        self.client = client
        self.registered: dict[str, Registration] = {}
        self.leased: dict[str, float] = {}
        """tenant -> time.monotonic() when its lease was last sent."""

    def has(self, job_id: str, attempt: int) -> bool:
        """Whether this notifier registered the attempt (its deltas are all published)."""
        found = self.registered.get(job_id)
        return found is not None and found.attempt == attempt

    def note(self, job_id: str, tenant: str, attempt: int) -> None:
        """The worker took this notifier's watch of the attempt (it answered)."""
        found = self.registered.get(job_id)
        if found is None or found.attempt <= attempt:
            self.registered[job_id] = Registration(tenant, attempt, time.monotonic())

    async def want(self, job_id: str, tenant: str, attempt: int) -> None:
        """Register the attempt (no answer is asked: its RUNNING event was seen here)."""
        if self.client is None or self.has(job_id, attempt):
            return
        try:
            await self.client.register(tenant, job_id, attempt)
        except Exception as exc:  # the bus is away: streams end and resume, asking again
            log.warning("watch not registered", extra={"job_id": job_id, "error": repr(exc)})
            return
        self.note(job_id, tenant, attempt)

    def leased_for(self, tenant: str) -> bool:
        return tenant in self.leased

    async def lease(self, tenant: str) -> None:
        """Send the tenant's lease now (a tenant-wide stream opened, or to renew it)."""
        if self.client is None:
            return
        self.leased[tenant] = time.monotonic()
        try:
            await self.client.lease(tenant, LEASE_S)
        except Exception as exc:  # renewed at the next tick
            log.warning("tenant lease not sent", extra={"tenant": tenant, "error": repr(exc)})

    async def tick(self) -> None:
        """Renew the leases of tenant-wide streams; release what no stream follows."""
        now = time.monotonic()
        for tenant in list(self.leased):
            if not self.hub.tenant_watchers.get(tenant):
                del self.leased[tenant]
        for tenant, watchers in list(self.hub.tenant_watchers.items()):
            if watchers and now - self.leased.get(tenant, float("-inf")) >= RENEW_S:
                await self.lease(tenant)
        for job_id, reg in list(self.registered.items()):
            held = self.hub.logs.get(job_id)
            if held is not None and (
                held.attempt > reg.attempt
                or (held.attempt == reg.attempt and held.ended is not None)
            ):
                del self.registered[job_id]  # the attempt is over: its worker forgot it
            elif self.hub.watchers.get(job_id):
                reg.wanted_at = now
            elif now - reg.wanted_at > RELEASE_AFTER_S:
                del self.registered[job_id]
                if self.client is not None:
                    with contextlib.suppress(Exception):  # it ends with the attempt anyway
                        await self.client.unwatch(reg.tenant, job_id, reg.attempt)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)
            try:
                await self.tick()
            except Exception as exc:
                log.warning("interest tick failed", extra={"error": repr(exc)})
