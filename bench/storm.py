"""storm: the end-to-end run while the provider throws 429s and 500s.

`storm_jobs` jobs (each allowed `storm_max_attempts` attempts) against the
simulator at `latency_ms` with 20% of calls answered 429 (retry-after 1 s) and 2%
answered 500. Every job must end succeeded, and no job may be completed twice.
Reported: attempts (total, retries, most for one job), makespan and the extra time
over the calm end-to-end run, and the time per job.
"""

from __future__ import annotations

import math
from typing import Any

from bench.end_to_end import makespan_s, overheads
from bench.harness import Context, Result, rounded, submit_load

NAME = "storm"
TITLE = "end-to-end with 20% 429 (retry-after 1 s) and 2% 500"

RATE_429 = 0.20
RATE_500 = 0.02
RETRY_AFTER_S = 1.0


async def run(ctx: Context) -> Result:
    c = ctx.counts
    result = Result(NAME, TITLE)
    latency_s = c.latency_ms / 1000.0
    await ctx.reset(worker=True)
    await ctx.sim_set(
        latency_ms=c.latency_ms,
        tokens_per_second=0,
        rate_429=RATE_429,
        rate_500=RATE_500,
        retry_after_s=RETRY_AFTER_S,
    )
    reqs = [
        ctx.request(label="storm", max_attempts=c.storm_max_attempts) for _ in range(c.storm_jobs)
    ]
    async with ctx.in_flight_sampler() as seen:
        load = await submit_load(ctx.gateway, reqs, 10, batch_size=100)
        done = await ctx.wait_finished(load.jobs)
    times = await ctx.job_times()
    sim = await ctx.sim_stats()
    statuses = await ctx.counts_by_status()
    async with ctx.db.acquire() as conn:
        twice = await conn.fetchval(
            """
            SELECT count(*) FROM (
              SELECT job_id FROM job_attempts WHERE outcome = 'succeeded'
               GROUP BY job_id HAVING count(*) > 1) d
            """
        )
    succeeded = statuses.get("succeeded", 0)
    attempts = [t.attempts for t in times]
    span = makespan_s(times)
    dist = overheads(times, latency_s)

    result.add(
        f"{c.storm_jobs} jobs: succeeded",
        succeeded,
        f"of {c.storm_jobs}",
        target="all",
        met=succeeded == c.storm_jobs,
    )
    result.add("  completed twice", int(twice), "jobs", target="0", met=int(twice) == 0)
    result.add("  attempts", sum(attempts), "total")
    result.add("  retries", sum(attempts) - len(attempts), "attempts")
    result.add("  most attempts for one job", max(attempts, default=0), "attempts")
    result.add("  makespan", rounded(span, 2), "s")
    calm: dict[str, Any] | None = None
    if "end-to-end" in ctx.results:
        calm = ctx.results["end-to-end"].extra.get("saturated")
    if calm and math.isfinite(span):
        result.add(
            "  extra makespan vs calm end-to-end", rounded(span - calm["makespan_s"], 2), "s"
        )
    total = dist["total"]
    result.add(
        "  time per job p50 (created→finished)", rounded(total.get("p50", math.nan) / 1000, 2), "s"
    )
    result.add("  time per job p99", rounded(total.get("p99", math.nan) / 1000, 2), "s")
    if calm:
        calm_p50 = calm["distributions_ms"]["total"].get("p50", math.nan)
        result.add(
            "  extra time per job p50 vs calm",
            rounded((total.get("p50", math.nan) - calm_p50) / 1000, 2),
            "s",
        )
    result.extra.update(
        jobs=c.storm_jobs,
        finished=done,
        statuses=statuses,
        attempts_histogram={str(a): attempts.count(a) for a in sorted(set(attempts))},
        failures_injected=sim.get("failures_injected_by_kind", {}),
        simulator=sim,
        peak_in_flight=seen["peak"],
        distributions_ms=dist,
        max_attempts=c.storm_max_attempts,
    )
    result.notes.append(
        f"jobs allow {c.storm_max_attempts} attempts: with 22% of calls failing, 3 attempts "
        "(the default) would leave about 1% of jobs dead"
    )
    return result
