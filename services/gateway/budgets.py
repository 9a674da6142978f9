"""Tenants' budgets: daily and monthly limits in dollars, checked at submit.

A tenant with a budget (`tenants.daily_budget_micros` / `monthly_budget_micros`,
set with `conveyor tenants set --daily-budget-usd X --monthly-budget-usd Y`) has a
ledger row, `tenant_spend`: the spend of its current UTC day and month,
reservations of unfinished jobs included. A submit reserves its jobs' worst case
(estimated input tokens at the input price plus `max_tokens` of output at the
output price, conveyor.core.pricing.worst_case_micros) with ONE conditional statement
on that row, so the limit is exact however many gateways submit at once: the
statement adds the reservation only if the day's and the month's totals stay
within the limits, and a new period starts from zero. Over the limit, the call is
refused whole with RESOURCE_EXHAUSTED, a google.rpc.ErrorInfo (reason
BUDGET_EXHAUSTED) and a google.rpc.RetryInfo until the next UTC day or month.

Finished jobs settle in Postgres (the `jobs_budget` trigger, migration 0009): the
ledger then counts the job's real cost instead of its reservation, whatever
finished it. Jobs already accepted run to the end, so a real cost above its
estimate may pass the limit by that much. A tenant with a budget cannot submit to
an unpriced model (FAILED_PRECONDITION): nothing could be counted for it.

Whether a tenant has a budget at all is cached for `config_ttl_s` (tenants
without one cost no extra statement); the limits themselves are read by the
reservation statement, so a changed limit applies at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contract.request_body import estimate_input_tokens
from conveyor.core.errors import FailedPrecondition, ResourceExhausted, Unavailable
from conveyor.core.pricing import worst_case_micros
from conveyor.db import jobs as jobs_db
from conveyor.db import tenants as tenants_db
from conveyor.db.engine import DATABASE_ERRORS, fetch, once_more_on_disconnect

log = logging.getLogger(__name__)

BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"


class BudgetExhausted(ResourceExhausted):
    """Over a budget: RESOURCE_EXHAUSTED with ErrorInfo (reason BUDGET_EXHAUSTED, the
    period and figures as metadata) and RetryInfo until the period ends."""

    def __init__(self, message: str, retry_after_s: float, metadata: dict[str, str]) -> None:
        super().__init__(message, retry_after_s)
        self.reason, self.info = BUDGET_EXHAUSTED, metadata


# One statement: insert the ledger row or move it, only if both periods' totals stay
# within the limits (a period that is over starts from zero). The row lock it takes
# orders concurrent reservations; each re-checks the committed totals.
_RESERVE = """
WITH lim AS (
  SELECT daily_budget_micros AS daily, monthly_budget_micros AS monthly
    FROM tenants WHERE tenant = $1
), period AS (
  SELECT (now() AT TIME ZONE 'UTC')::date AS day,
         date_trunc('month', now() AT TIME ZONE 'UTC')::date AS month
)
INSERT INTO tenant_spend AS s (tenant, day, day_micros, month, month_micros)
SELECT $1, period.day, $2::int8, period.month, $2::int8
  FROM lim, period
 WHERE (lim.daily IS NULL OR $2::int8 <= lim.daily)
   AND (lim.monthly IS NULL OR $2::int8 <= lim.monthly)
ON CONFLICT (tenant) DO UPDATE
   SET day = EXCLUDED.day,
       day_micros = CASE WHEN s.day = EXCLUDED.day THEN s.day_micros ELSE 0 END + $2::int8,
       month = EXCLUDED.month,
       month_micros = CASE WHEN s.month = EXCLUDED.month THEN s.month_micros ELSE 0 END
                      + $2::int8
 WHERE ((SELECT daily FROM lim) IS NULL
        OR CASE WHEN s.day = EXCLUDED.day THEN s.day_micros ELSE 0 END + $2::int8
           <= (SELECT daily FROM lim))
   AND ((SELECT monthly FROM lim) IS NULL
       OR CASE WHEN s.month = EXCLUDED.month THEN s.month_micros ELSE 0 END + $2::int8
          <= (SELECT monthly FROM lim))
RETURNING s.day
"""

_RELEASE = """
UPDATE tenant_spend
   SET day_micros = day_micros - CASE WHEN day = $2::date THEN $3::int8 ELSE 0 END,
       month_micros = month_micros
                      - CASE WHEN month = date_trunc('month', $2::date)::date THEN $3::int8
                             ELSE 0 END
 WHERE tenant = $1
"""

_STATE = """
SELECT t.daily_budget_micros AS daily, t.monthly_budget_micros AS monthly,
       (now() AT TIME ZONE 'UTC')::date AS today,
       date_trunc('month', now() AT TIME ZONE 'UTC')::date AS this_month,
       s.day, s.day_micros, s.month, s.month_micros, now() AS now
  FROM tenants t LEFT JOIN tenant_spend s USING (tenant)
 WHERE t.tenant = $1
"""


@dataclass(frozen=True)
class Reservation:
    """What one submit reserved: released for the jobs that were not inserted."""

    tenant: str
    day: date
    amounts: dict[object, int]
    """Micro-dollars per job id."""


def _usd(micros: int) -> str:
    return f"${micros / 1e6:,.2f}"


def _next_month(day: date) -> date:
    return date(day.year + (day.month == 12), day.month % 12 + 1, 1)


class TenantBudgets:
    def __init__(self, engine: AsyncEngine, *, config_ttl_s: float = 10.0) -> None:
        self.engine = engine
        self.config_ttl_s = config_ttl_s
        self._has_budget: dict[str, tuple[float, bool]] = {}

    async def _budgeted(self, tenant: str) -> bool:
        cached = self._has_budget.get(tenant)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.engine.connect() as conn:
            row = await tenants_db.get_tenant(conn, tenant)
        budgeted = row is not None and (
            row.get("daily_budget_micros") is not None
            or row.get("monthly_budget_micros") is not None
        )
        self._has_budget[tenant] = (now + self.config_ttl_s, budgeted)
        return budgeted

    async def reserve(self, tenant: str, jobs: Sequence[jobs_db.NewJob]) -> Reservation | None:
        """Reserve the jobs' worst case in the tenant's budget, marking each job with its
        share; None when the tenant has no budget. BudgetExhausted over a limit (nothing
        reserved), FailedPrecondition for an unpriced model, Unavailable without Postgres."""
        try:
            return await once_more_on_disconnect(lambda: self._reserve(tenant, jobs))
        except DATABASE_ERRORS as exc:
            raise Unavailable("the budget store is unavailable; nothing was accepted") from exc

    async def _reserve(self, tenant: str, jobs: Sequence[jobs_db.NewJob]) -> Reservation | None:
        if not await self._budgeted(tenant):
            return None
        amounts: dict[object, int] = {}
        for job in jobs:
            worst = worst_case_micros(
                job.model,
                estimate_input_tokens(job.request),
                int(job.request.get("max_tokens") or 0),
            )
            if worst is None:
                raise FailedPrecondition(
                    f"model {job.model!r} has no price, so tenant {tenant}'s budget cannot"
                    " count it; nothing was accepted (an operator can price it with"
                    " CONVEYOR_PRICES)"
                )
            amounts[job.id] = worst
        total = sum(amounts.values())
        rows = await fetch(self.engine, _RESERVE, (tenant, total))
        if not rows:
            raise await self._exhausted(tenant, total)
        day: date = rows[0]["day"]
        for job in jobs:
            job.budget_micros, job.budget_day = amounts[job.id], day
        return Reservation(tenant=tenant, day=day, amounts=amounts)

    async def release(self, reservation: Reservation, job_ids: Sequence[object]) -> None:
        """Give back the reservations of jobs that were not inserted (an idempotent
        replay, a failed insert). Best effort: a lost release only lowers what the
        tenant may spend until the period ends."""
        amount = sum(reservation.amounts.get(i, 0) for i in job_ids)
        if amount <= 0:
            return
        try:
            await fetch(self.engine, _RELEASE, (reservation.tenant, reservation.day, amount))
        except DATABASE_ERRORS as exc:
            log.warning(
                "budget reservation not released",
                extra={"tenant": reservation.tenant, "micros": amount, "error": repr(exc)},
            )

    async def _exhausted(self, tenant: str, amount: int) -> BudgetExhausted:
        """The refusal: which period's limit the reservation would pass, and when it ends."""
        rows = await fetch(self.engine, _STATE, (tenant,))
        state = rows[0]
        now: datetime = state["now"]
        today: date = state["today"]
        day_used = state["day_micros"] if state["day"] == today else 0
        month_used = state["month_micros"] if state["month"] == state["this_month"] else 0
        daily, monthly = state["daily"], state["monthly"]
        if monthly is not None and (month_used or 0) + amount > monthly:
            period, limit, used = "monthly", monthly, month_used or 0
            ends = datetime.combine(_next_month(today), datetime.min.time(), UTC)
        else:
            period, limit, used = "daily", daily or 0, day_used or 0
            ends = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
        retry = max(1.0, (ends - now).total_seconds())
        return BudgetExhausted(
            f"tenant {tenant} would pass its {period} budget of {_usd(limit)}"
            f" ({_usd(used)} spent or reserved, this submit needs up to {_usd(amount)});"
            f" the budget renews at {ends.isoformat()}",
            retry,
            {
                "period": period,
                "limit_micros": str(limit),
                "used_micros": str(used),
                "requested_micros": str(amount),
                "renews_at": ends.isoformat(),
            },
        )
