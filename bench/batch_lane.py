"""batch: the batch lane (Message Batches API) against the interactive path.

`batch_jobs` jobs of the same kind are submitted, half to the default lane (a worker
streams them from the simulator) and half to the `batch` lane (the dispatcher's
batcher sends them as Message Batches; the simulator ends a batch after
BATCH_PROCESSING_S). Reported: the batch lane's throughput, the latency it adds on
top of the simulator's batch time (created → finished, minus that time), and the
dollars of each half (conveyor.core.pricing through each job's cost), with the batch half
checked to cost 50% of the same usage at the interactive price, allowing for rounding.
"""

from __future__ import annotations

import json
from typing import Any

from bench.harness import Context, Result, percentile, rounded, submit_load
from conveyor.core import pricing

NAME = "batch"
TITLE = "Batch lane: throughput, added latency, dollars against interactive"
BATCH_LANE = "batch"
BATCH_PROCESSING_S = 2.0
ROUNDING_MICROS_PER_JOB = 1
"""Each job's cost is rounded once: the halves may differ by this much per job."""


async def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE)
    if BATCH_LANE not in ctx.stack.settings.batch_lanes:
        result.status = "skipped"
        result.notes.append(f"the stack has no `{BATCH_LANE}` batch lane (CONVEYOR_BATCH_LANES)")
        return result
    n = 200 if ctx.quick else 1_000
    await ctx.reset(worker=True)
    await ctx.sim_set(latency_ms=0, tokens_per_second=0, batch_processing_s=BATCH_PROCESSING_S)
    reqs = []
    for i in range(n):
        req = ctx.request(label=NAME)
        if i % 2:
            req.lane = BATCH_LANE
        reqs.append(req)
    load = await submit_load(ctx.gateway, reqs, 20)
    done = await ctx.wait_finished(load.jobs)
    async with ctx.db.acquire() as conn:
        rows = await conn.fetch(
            """
            SELECT lane, status, model, cost_micros, result->'usage' AS usage,
                   extract(epoch FROM created_at)::float8 AS c,
                   extract(epoch FROM finished_at)::float8 AS f
              FROM jobs
            """
        )
        batches = await conn.fetchval("SELECT count(*) FROM batches")
    batch = [r for r in rows if r["lane"] == BATCH_LANE]
    interactive = [r for r in rows if r["lane"] != BATCH_LANE]
    ok = [r for r in batch if r["status"] == "succeeded" and r["f"] is not None]
    result.add("jobs finished", done)
    result.add("batch-lane jobs succeeded", len(ok))
    result.add("batches created", int(batches or 0))
    if ok:
        span = max(r["f"] for r in ok) - min(r["c"] for r in ok)
        result.add("batch-lane throughput", rounded(len(ok) / max(span, 1e-9), 1), "jobs/s")
        added = sorted((r["f"] - r["c"] - BATCH_PROCESSING_S) * 1000 for r in ok)
        result.add("added latency p50", rounded(percentile(added, 0.5), 0), "ms")
        result.add("added latency p95", rounded(percentile(added, 0.95), 0), "ms")
        result.notes.append(
            f"added latency = created → finished minus the simulator's batch time "
            f"({BATCH_PROCESSING_S:g} s); it includes CONVEYOR_BATCH_MAX_WAIT_S "
            f"({ctx.stack.settings.batch_max_wait_s:g} s) and the polling backoff"
        )
    batch_usd = _usd(batch)
    result.add("interactive jobs, dollars", _usd(interactive), "USD")
    result.add("batch-lane jobs, dollars", batch_usd, "USD")
    full = sum(_full_price(r) for r in ok)
    paid = sum(int(r["cost_micros"] or 0) for r in ok)
    if full:
        ratio = paid / full
        result.add(
            "batch cost / same usage at interactive price",
            rounded(ratio, 4),
            target="0.5 (± rounding)",
            met=abs(paid * 2 - full) <= 2 * ROUNDING_MICROS_PER_JOB * len(ok),
        )
    return result


def _usd(rows: list[Any]) -> float:
    return rounded(sum(int(r["cost_micros"] or 0) for r in rows) / 1e6, 6)


def _full_price(row: Any) -> int:
    usage = row["usage"]
    if isinstance(usage, str):  # asyncpg without a jsonb codec
        usage = json.loads(usage)
    return pricing.cost_micros(row["model"], usage or {}) or 0
