"""submit: how fast the gateway accepts jobs, workers stopped.

Three runs of `ctx.counts.submit_jobs` jobs from `submit_clients` concurrent
clients, each on its own connection:

1. SubmitJob, closed loop (every client sends its next call when the last
   returns): the most jobs/s the gateway accepts, and the latency at that load;
2. SubmitJob paced at `submit_rate` jobs/s over the same clients (open loop,
   latency counted from when each call was due): latency at the target rate;
3. SubmitJobs in batches of `batch_size`, closed loop.

Accepted means durable: after each run the rows are counted in Postgres.
"""

from __future__ import annotations

from bench.harness import Context, LoadResult, Result, latency_figures, rounded, submit_load

NAME = "submit"
TITLE = "SubmitJob / SubmitJobs, workers stopped"

P99_TARGET_MS = 10.0
RATE_TARGET = 1_500.0


async def _check_durable(ctx: Context, result: Result, load: LoadResult, key: str) -> None:
    counts = await ctx.counts_by_status()
    stored = sum(counts.values())
    result.extra[f"{key}_rows"] = counts
    if stored != load.jobs:
        result.notes.append(f"{key}: {load.jobs} jobs accepted but {stored} rows stored")


async def run(ctx: Context) -> Result:
    c = ctx.counts
    result = Result(NAME, TITLE)
    result.extra["clients"] = c.submit_clients
    result.extra["jobs_per_run"] = c.submit_jobs

    # 1. Closed loop: throughput.
    await ctx.reset(worker=False)
    reqs = [ctx.request(label="submit") for _ in range(c.submit_jobs)]
    closed = await submit_load(ctx.gateway, reqs, c.submit_clients)
    result.add(
        f"SubmitJob x{c.submit_clients} clients: accepted",
        rounded(closed.jobs_per_s, 0),
        "jobs/s",
        target=f">= {RATE_TARGET:g} jobs/s",
        met=closed.jobs_per_s >= RATE_TARGET,
    )
    latency_figures(result, closed, "SubmitJob (closed loop)", p99_target_ms=P99_TARGET_MS)
    result.extra["closed_loop_errors"] = closed.errors
    await _check_durable(ctx, result, closed, "closed_loop")

    # 2. Paced at the target rate: latency when offered 1,500 jobs/s.
    await ctx.reset(worker=False)
    reqs = [ctx.request(label="submit-paced") for _ in range(c.submit_jobs)]
    paced = await submit_load(ctx.gateway, reqs, c.submit_clients, rate=c.submit_rate)
    result.add(
        f"SubmitJob paced at {c.submit_rate:g}/s: achieved",
        rounded(paced.jobs_per_s, 0),
        "jobs/s",
    )
    latency_figures(
        result, paced, f"SubmitJob (paced {c.submit_rate:g}/s)", p99_target_ms=P99_TARGET_MS
    )
    result.extra["paced_errors"] = paced.errors
    await _check_durable(ctx, result, paced, "paced")

    # 3. Batches.
    await ctx.reset(worker=False)
    reqs = [ctx.request(label="submit-batch") for _ in range(c.submit_jobs)]
    batched = await submit_load(ctx.gateway, reqs, c.submit_clients, batch_size=c.batch_size)
    result.add(
        f"SubmitJobs batches of {c.batch_size}: accepted", rounded(batched.jobs_per_s, 0), "jobs/s"
    )
    latency_figures(result, batched, f"SubmitJobs x{c.batch_size} call")
    result.extra["batch_errors"] = batched.errors
    await _check_durable(ctx, result, batched, "batches")

    errors = closed.error_count + paced.error_count + batched.error_count
    result.add("errors", errors, "calls", target="0", met=errors == 0)
    await ctx.reset(worker=False)
    return result
