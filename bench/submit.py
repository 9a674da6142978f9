"""submit: how fast the gateway accepts jobs, workers stopped.

Each run sends `ctx.counts.submit_jobs` jobs from `submit_clients` concurrent
clients, each on its own connection:

1. SubmitJob, closed loop (every client sends its next call when the last
   returns): the most jobs/s the gateway accepts, and the latency at that load;
2. SubmitJob paced over the same clients (open loop), at `submit_target_rate`
   (1,000 jobs/s, whose p99 the latency budget asks to stay within 10 ms), then at
   `submit_rate` (1,500 jobs/s, the rate of the earlier figures);
3. SubmitJobs in batches of `batch_size`, closed loop.

Runs 1 and 2 use h2load (bench.h2load) when it is installed, so that the load
generator's CPU does not come out of the two cores the system runs on; they are
repeated with Python grpc.aio clients, the figures a Python caller on the same
machine sees. (A closed loop of 50 clients cannot show a p99 under 10 ms
unless it runs above 5,000 calls/s: 50 calls are always in flight. The
latency target is read on the paced run.)

Accepted means durable: after each run the rows are counted in Postgres; for
h2load, which does not see gRPC statuses, the rows are the accepted calls.
"""

from __future__ import annotations

from bench import h2load
from bench.harness import Context, LoadResult, Result, latency_figures, rounded, submit_load

NAME = "submit"
TITLE = "SubmitJob / SubmitJobs, workers stopped"

P99_TARGET_MS = 10.0
RATE_TARGET = 1_500.0


async def _stored(ctx: Context, result: Result, load: LoadResult, key: str, exact: bool) -> None:
    """Count the rows; for a load that cannot see gRPC statuses, they are its jobs."""
    counts = await ctx.counts_by_status()
    stored = sum(counts.values())
    result.extra[f"{key}_rows"] = counts
    if not exact:
        if stored < load.jobs:
            load.errors["not_stored"] = load.jobs - stored
        load.jobs = stored
    elif stored != load.jobs:
        result.notes.append(f"{key}: {load.jobs} jobs accepted but {stored} rows stored")


async def _closed_and_paced(ctx: Context, result: Result, generator: str, headline: bool) -> int:
    """Runs 1 and 2 with one load generator; returns the errors seen."""
    c = ctx.counts
    label = "h2load" if generator == "h2load" else "Python clients"

    async def load(tag: str, rate: float | None) -> LoadResult:
        await ctx.reset(worker=False)
        if generator == "h2load":
            done = await h2load.submit_load(
                ctx.gateway, ctx.request(label=tag), c.submit_jobs, c.submit_clients, rate=rate
            )
        else:
            reqs = [ctx.request(label=tag) for _ in range(c.submit_jobs)]
            done = await submit_load(ctx.gateway, reqs, c.submit_clients, rate=rate)
        await _stored(ctx, result, done, f"{tag}", exact=generator != "h2load")
        return done

    closed = await load(f"{generator}-closed", None)
    result.add(
        f"SubmitJob x{c.submit_clients} clients ({label}): accepted",
        rounded(closed.jobs_per_s, 0),
        "jobs/s",
        target=f">= {RATE_TARGET:g} jobs/s" if headline else "",
        met=closed.jobs_per_s >= RATE_TARGET if headline else None,
    )
    latency_figures(result, closed, f"  closed loop ({label})")
    paced: list[LoadResult] = []
    for rate in (c.submit_target_rate, c.submit_rate):
        run = await load(f"{generator}-paced-{rate:g}", rate)
        judged = headline and rate == c.submit_target_rate
        result.add(
            f"SubmitJob paced at {rate:g}/s ({label}): achieved",
            rounded(run.jobs_per_s, 0),
            "jobs/s",
        )
        latency_figures(
            result,
            run,
            f"  paced {rate:g}/s ({label})",
            p99_target_ms=P99_TARGET_MS if judged else None,
        )
        paced.append(run)
    result.extra[f"{generator}_errors"] = {
        "closed": closed.errors,
        "paced": [run.errors for run in paced],
    }
    return closed.error_count + sum(run.error_count for run in paced)


async def run(ctx: Context) -> Result:
    c = ctx.counts
    result = Result(NAME, TITLE)
    result.extra["clients"] = c.submit_clients
    result.extra["jobs_per_run"] = c.submit_jobs
    generators = ["h2load", "python"] if h2load.available() else ["python"]
    result.extra["load_generators"] = generators
    if len(generators) == 1:
        result.notes.append("h2load is not installed: the Python clients' figures are the headline")

    errors = 0
    for i, generator in enumerate(generators):
        errors += await _closed_and_paced(ctx, result, generator, headline=i == 0)

    await ctx.reset(worker=False)
    reqs = [ctx.request(label="submit-batch") for _ in range(c.submit_jobs)]
    batched = await submit_load(ctx.gateway, reqs, c.submit_clients, batch_size=c.batch_size)
    result.add(
        f"SubmitJobs batches of {c.batch_size}: accepted", rounded(batched.jobs_per_s, 0), "jobs/s"
    )
    latency_figures(result, batched, f"  SubmitJobs x{c.batch_size} call")
    result.extra["batch_errors"] = batched.errors
    await _stored(ctx, result, batched, "batches", exact=True)
    errors += batched.error_count

    result.add("errors", errors, "calls", target="0", met=errors == 0)
    await ctx.reset(worker=False)
    return result
