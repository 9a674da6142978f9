"""Job statistics: counts and token totals (from the trigger-kept `job_counts`
counters, not the jobs table), run-time percentiles, and cost per tenant, model
and lane. One query builder serves one tenant's statistics and every tenant's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.core.lifecycle import JobState
from conveyor.db.statements import Row, Statement, sql

TOKEN_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)

RECENT = 1000
"""The run-time percentiles cover this many of the latest successes (an index range)."""


@dataclass(frozen=True)
class Stats:
    counts: dict[tuple[str, str], int]
    """Jobs per (lane, status)."""
    tokens: dict[str, int]
    run_time_p50_s: float | None
    run_time_p95_s: float | None


@dataclass(frozen=True)
class TenantSummary:
    """One tenant's job counts per status and token totals (for admins' GetStats)."""

    counts: dict[str, int]
    tokens: dict[str, int]


def _queries(one_tenant: bool) -> tuple[Statement, Statement]:
    """The counts (per tenant, lane and status) and percentile statements, of one tenant
    (`:tenant`) or of all."""
    where = "WHERE tenant = :tenant" if one_tenant else ""
    sums = ", ".join(f"sum({k}) AS {k}" for k in TOKEN_KEYS)
    counts = sql(
        f"SELECT tenant, lane, status, sum(jobs) AS n, {sums}"
        f" FROM job_counts {where} GROUP BY tenant, lane, status"
    )
    and_tenant = "AND tenant = :tenant" if one_tenant else ""
    percentiles = sql(
        f"""
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY d) AS p95
  FROM (SELECT extract(epoch FROM finished_at - started_at) AS d
          FROM jobs WHERE status = '{JobState.SUCCEEDED.value}' {and_tenant}
         ORDER BY finished_at DESC LIMIT {RECENT}) recent
"""
    )
    return counts, percentiles


_ONE = _queries(one_tenant=True)
_ALL = _queries(one_tenant=False)


def _seconds(value: float | None) -> float | None:
    return None if value is None else float(value)


async def _stats(
    conn: AsyncConnection, tenant: str | None
) -> tuple[Stats, dict[str, TenantSummary]]:
    counts_sql, percentiles_sql = _ALL if tenant is None else _ONE
    params = {"tenant": tenant}
    counts: dict[tuple[str, str], int] = {}
    tokens = dict.fromkeys(TOKEN_KEYS, 0)
    per_tenant: dict[str, TenantSummary] = {}
    for row in await counts_sql.fetch(conn, params):
        summary = per_tenant.setdefault(
            row["tenant"], TenantSummary(counts={}, tokens=dict.fromkeys(TOKEN_KEYS, 0))
        )
        n = int(row["n"] or 0)
        if n:
            key = (row["lane"], row["status"])
            counts[key] = counts.get(key, 0) + n
            summary.counts[row["status"]] = summary.counts.get(row["status"], 0) + n
        for k in TOKEN_KEYS:
            tokens[k] += int(row[k] or 0)
            summary.tokens[k] += int(row[k] or 0)
    (perf,) = await percentiles_sql.fetch(conn, params)
    stats = Stats(counts, tokens, _seconds(perf["p50"]), _seconds(perf["p95"]))
    return stats, per_tenant


async def stats(conn: AsyncConnection, tenant: str) -> Stats:
    """A tenant's counts, token totals and run-time percentiles."""
    return (await _stats(conn, tenant))[0]


async def stats_all(conn: AsyncConnection) -> tuple[Stats, dict[str, TenantSummary]]:
    """Statistics over every tenant, and each tenant's summary."""
    return await _stats(conn, None)


@dataclass(frozen=True)
class CostRow:
    """Jobs of one tenant, model and lane finished in a window, and what they cost."""

    tenant: str
    model: str
    lane: str
    jobs: int
    unpriced_jobs: int
    cost_micros: int
    tokens: dict[str, int]


_COSTS = sql(
    """
SELECT tenant, model, lane, count(*) AS jobs,
       count(*) FILTER (WHERE cost_micros IS NULL) AS unpriced_jobs,
       coalesce(sum(cost_micros), 0) AS cost_micros, """
    + ", ".join(f"coalesce(sum({k}), 0) AS {k}" for k in TOKEN_KEYS)
    + """
  FROM jobs
 WHERE finished_at >= CAST(:since AS timestamptz) AND finished_at < CAST(:until AS timestamptz)
   AND (CAST(:tenant AS text) IS NULL OR tenant = :tenant)
 GROUP BY tenant, model, lane
 ORDER BY tenant, model, lane
"""
)


def _cost_row(r: Row) -> CostRow:
    return CostRow(
        tenant=r["tenant"],
        model=r["model"],
        lane=r["lane"],
        jobs=int(r["jobs"]),
        unpriced_jobs=int(r["unpriced_jobs"]),
        cost_micros=int(r["cost_micros"]),
        tokens={k: int(r[k]) for k in TOKEN_KEYS},
    )


async def cost_rows(
    conn: AsyncConnection, tenant: str | None, since: datetime, until: datetime
) -> list[CostRow]:
    """Cost per tenant, model and lane of the jobs finished in [since, until) (of one
    tenant, or of all with None); an unpriced job counts in `unpriced_jobs`, not in
    the cost. Reads the jobs table (the retention purge bounds what it covers)."""
    rows = await _COSTS.fetch(conn, {"since": since, "until": until, "tenant": tenant})
    return [_cost_row(r) for r in rows]
