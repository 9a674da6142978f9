"""Per-tenant submit quotas: jobs per minute, shared by every gateway instance.

A tenant's quota is its `tenants.submit_per_minute`, or CONVEYOR_TENANT_SUBMIT_PER_MINUTE
when that is NULL (0: unlimited). It is a token bucket (`submit:<tenant>`) of one
minute's capacity: a tenant may submit its whole minute at once, then at the
quota's pace. A call over quota is refused whole with RESOURCE_EXHAUSTED, saying
(in the message and a google.rpc.RetryInfo detail) when it would pass; nothing is
written. A tenant's quota setting is re-read every `config_ttl_s`.
"""

from __future__ import annotations

import math
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.errors import ResourceExhausted, Unavailable
from conveyor.db import tenants as db
from conveyor.db.buckets import BucketStore, LocalBudget
from conveyor.db.engine import DATABASE_ERRORS, once_more_on_disconnect


def bucket_name(tenant: str) -> str:
    return f"submit:{tenant}"


class SubmitQuota:
    def __init__(
        self,
        engine: AsyncEngine,
        default_per_minute: int,
        *,
        batch_s: float = 0.25,
        config_ttl_s: float = 10.0,
    ) -> None:
        self.engine = engine
        self.default_per_minute = default_per_minute
        self.config_ttl_s = config_ttl_s
        self.budget = LocalBudget(BucketStore(engine), batch_s)
        self._limits: dict[str, tuple[float, int]] = {}
        """tenant -> (expiry, jobs per minute, 0 = unlimited)."""

    async def _limit(self, tenant: str) -> int:
        cached = self._limits.get(tenant)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.engine.connect() as conn:
            row = await db.get_tenant(conn, tenant)
        configured = row["submit_per_minute"] if row is not None else None
        limit = int(configured if configured is not None else self.default_per_minute)
        name = bucket_name(tenant)
        known = self.budget.definitions.get(name)
        if limit > 0 and (known is None or known.limit_per_min != limit):
            await self.budget.define(name, float(limit), float(limit), source="config")
        elif limit <= 0 and known is not None:
            del self.budget.definitions[name]
        self._limits[tenant] = (now + self.config_ttl_s, limit)
        return limit

    async def admit(self, tenant: str, jobs: int) -> None:
        """Count `jobs` submissions against the tenant's quota, or refuse them all.

        UNAVAILABLE when Postgres cannot be reached (nothing is accepted then anyway).
        """
        try:
            await self._admit(tenant, jobs)
        except DATABASE_ERRORS as exc:
            raise Unavailable("the quota store is unavailable; nothing was accepted") from exc

    async def _admit(self, tenant: str, jobs: int) -> None:
        limit = await once_more_on_disconnect(lambda: self._limit(tenant))
        if limit <= 0:
            return
        name = bucket_name(tenant)
        need = {name: float(jobs)}
        budget = self.budget
        if budget.has(need):
            budget.spend(need)
            return
        async with budget.lock(name):
            if not budget.has(need):
                wait = await budget.fill(need)
                if wait > 0 and not budget.has(need):
                    state = budget.states.get(name)
                    if state is not None and state.refill_per_s > 0:
                        lacking = min(jobs, state.capacity) - state.level
                        wait = max(wait, lacking / state.refill_per_s)
                    retry = math.ceil(wait * 10) / 10
                    raise ResourceExhausted(
                        f"tenant {tenant} is over its submit quota of {limit} jobs per minute;"
                        f" retry in {retry:g} s",
                        retry_after_s=retry,
                    )
            budget.spend(need)

    async def return_idle(self) -> None:
        await self.budget.return_idle()
