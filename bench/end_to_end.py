"""end-to-end: jobs through the whole system against a simulator with a fixed latency.

Run 0 (one at a time): `single_jobs` jobs in turn, the simulator at 0 ms, each
submitted with SubmitJob and awaited through WatchJob: what a user waiting on one
job sees, from the call to the finished job in hand (median and p95).

Run 1 (saturating): `e2e_jobs` jobs submitted at once in SubmitJobs batches to one
worker process, the simulator answering after `latency_ms` with its tokens at
once (tokens_per_second=0, so the model time is the latency). Reported: makespan
(first created → last finished), jobs/s, the peak number of calls the worker held
open at the simulator, and per job the overhead

    overhead = (finished − created) − latency

split into the queue wait (started − created: the job waited for a free slot)
and the worker's own part (finished − started − latency: claim, the HTTP call's
overhead, token events, the outcome write).

Run 2 (unsaturated): `paced_jobs` single SubmitJob calls at `paced_rate` jobs/s,
well below what the machine completes, so the overhead is what a job pays when
nothing waits — DESIGN.md's "overhead p50 under 5 ms when not saturated". Then
`idle_jobs` at `idle_rate` jobs/s, nearer idle: on a virtual machine that overhead
is larger, not smaller, as every process goes idle between jobs and waking it
takes longer (`python -m bench.floors`, "loopback round trip … after … idle").

Run 3 (held open): `hold_jobs` jobs at once against a slow model
(`hold_latency_ms`, as real calls take seconds), run by a worker started for this
run at `hold_concurrency`: how many calls one worker process holds open at the same
time, and its peak resident memory (VmHWM) while it does. Run 1's peak is bounded
by throughput instead (with a 1 s model, calls in flight = jobs/s × 1 s).
"""

from __future__ import annotations

import math
import time

from bench.harness import (
    Context,
    JobTimes,
    Result,
    memory_kb,
    rounded,
    submit_load,
    summarize,
)
from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2

NAME = "end-to-end"
TITLE = "end-to-end, simulator latency fixed, one worker"

OVERHEAD_P50_TARGET_MS = 5.0
IN_FLIGHT_TARGET = 5_000
HELD_MEMORY_TARGET_MIB = 600


def overheads(times: list[JobTimes], latency_s: float) -> dict[str, dict[str, float]]:
    """Distributions (ms) of total overhead, queue wait and worker overhead of finished jobs."""
    done = [t for t in times if t.finished is not None and t.started is not None]
    return {
        "overhead": summarize(((t.finished or 0) - t.created - latency_s for t in done), 1000.0),
        "queue_wait": summarize(((t.started or 0) - t.created for t in done), 1000.0),
        "worker": summarize(
            ((t.finished or 0) - (t.started or 0) - latency_s for t in done), 1000.0
        ),
        "total": summarize(((t.finished or 0) - t.created for t in done), 1000.0),
    }


def makespan_s(times: list[JobTimes]) -> float:
    finished = [t.finished for t in times if t.finished is not None]
    if not finished or not times:
        return math.nan
    return max(finished) - min(t.created for t in times)


async def run(ctx: Context) -> Result:
    c = ctx.counts
    result = Result(NAME, TITLE)
    latency_s = c.latency_ms / 1000.0
    result.extra.update(
        latency_ms=c.latency_ms, jobs=c.e2e_jobs, worker_concurrency=ctx.worker_concurrency
    )

    await _one_at_a_time(ctx, result)

    # Run 1: everything at once.
    await ctx.reset(worker=True)
    await ctx.sim_set(latency_ms=c.latency_ms, tokens_per_second=0)
    reqs = [ctx.request(label="e2e") for _ in range(c.e2e_jobs)]
    async with ctx.in_flight_sampler() as seen:
        load = await submit_load(ctx.gateway, reqs, 10, batch_size=100)
        done = await ctx.wait_finished(load.jobs)
    times = await ctx.job_times()
    span = makespan_s(times)
    dist = overheads(times, latency_s)
    succeeded = sum(1 for t in times if t.status == "succeeded")
    ideal = math.ceil(c.e2e_jobs / ctx.worker_concurrency) * latency_s
    result.add(f"{c.e2e_jobs} jobs, {c.latency_ms:g} ms model: makespan", rounded(span, 2), "s")
    result.add("  (lower bound: batches of the worker's concurrency)", rounded(ideal, 2), "s")
    result.add("  throughput", rounded(c.e2e_jobs / span, 0), "jobs/s")
    result.add("  peak calls in flight (bounded by throughput)", seen["peak"], "calls")
    result.add(
        "  overhead p50 (incl. queue wait)", rounded(dist["overhead"].get("p50", math.nan)), "ms"
    )
    result.add(
        "  overhead p99 (incl. queue wait)", rounded(dist["overhead"].get("p99", math.nan)), "ms"
    )
    result.add(
        "  worker overhead p50 (finished−started−model)",
        rounded(dist["worker"].get("p50", math.nan)),
        "ms",
    )
    result.add("  worker overhead p99", rounded(dist["worker"].get("p99", math.nan)), "ms")
    result.add(
        "  succeeded", succeeded, f"of {c.e2e_jobs}", target="all", met=succeeded == c.e2e_jobs
    )
    result.extra["saturated"] = {
        "makespan_s": span,
        "finished": done,
        "submit_s": load.elapsed_s,
        "peak_in_flight": seen["peak"],
        "distributions_ms": dist,
        "statuses": await ctx.counts_by_status(),
        "simulator": await ctx.sim_stats(),
    }

    # Run 2: paced below capacity, then nearer idle.
    result.extra["paced"] = await _paced(ctx, result, c.paced_rate, c.paced_jobs, judged=True)
    result.extra["paced_idle"] = await _paced(ctx, result, c.idle_rate, c.idle_jobs, judged=False)
    await _held_open(ctx, result)
    result.notes.append(
        "model time is the simulator's fixed latency (tokens sent at once); "
        "overhead = finished − created − latency, from the database's timestamps"
    )
    return result


async def _paced(
    ctx: Context, result: Result, rate: float, jobs: int, judged: bool
) -> dict[str, object]:
    """Run 2: `jobs` single SubmitJob calls at `rate` jobs/s; the target is read on the
    `judged` run."""
    latency_s = ctx.counts.latency_ms / 1000.0
    await ctx.reset(worker=True)
    await ctx.sim_set(latency_ms=ctx.counts.latency_ms, tokens_per_second=0)
    reqs = [ctx.request(label="e2e-paced") for _ in range(jobs)]
    async with ctx.in_flight_sampler() as seen:
        load = await submit_load(ctx.gateway, reqs, 10, rate=rate)
        await ctx.wait_finished(load.jobs)
    dist = overheads(await ctx.job_times(), latency_s)
    p50 = dist["overhead"].get("p50", math.nan)
    result.add(
        f"paced {rate:g} jobs/s ({jobs} jobs): overhead p50",
        rounded(p50),
        "ms",
        target=f"< {OVERHEAD_P50_TARGET_MS:g} ms" if judged else "",
        met=p50 < OVERHEAD_P50_TARGET_MS if judged else None,
    )
    result.add("  overhead p99", rounded(dist["overhead"].get("p99", math.nan)), "ms")
    result.add("  of which queue wait p50", rounded(dist["queue_wait"].get("p50", math.nan)), "ms")
    result.add("  of which worker p50", rounded(dist["worker"].get("p50", math.nan)), "ms")
    return {
        "rate": rate,
        "jobs": jobs,
        "peak_in_flight": seen["peak"],
        "distributions_ms": dist,
        "statuses": await ctx.counts_by_status(),
    }


async def _one_at_a_time(ctx: Context, result: Result) -> None:
    """Run 0: one job at a time, simulator at 0 ms: submit to finished job, as a client sees it."""
    c = ctx.counts
    await ctx.reset(worker=True)
    await ctx.sim_set(latency_ms=0, tokens_per_second=0)
    took_ms: list[float] = []
    async with ConveyorClient(ctx.gateway, ctx.notifier) as client:
        for _ in range(c.single_jobs):
            began = time.perf_counter()
            submitted = await client.submit_request(ctx.request(label="e2e-one"))
            job = await client.wait(submitted.job.id, c.job_timeout_s)
            took_ms.append((time.perf_counter() - began) * 1000)
            if job.status != jobs_pb2.JOB_STATUS_SUCCEEDED:
                raise RuntimeError(f"job {job.id} ended {job.status}")
    took = summarize(took_ms)
    result.add(
        f"one job at a time, 0 ms model ({c.single_jobs} in turn): submit → finished, median",
        rounded(took.get("p50", math.nan)),
        "ms",
    )
    result.add("  p95", rounded(took.get("p95", math.nan)), "ms")
    result.extra["one_at_a_time_ms"] = took


async def _held_open(ctx: Context, result: Result) -> None:
    """Run 3: many jobs against a slow model, run by a worker of its own at
    `hold_concurrency`; the peak of calls it holds open and its peak memory."""
    c = ctx.counts
    await ctx.reset(worker=False)
    await ctx.start_worker(concurrency=c.hold_concurrency)
    try:
        await ctx.sim_set(latency_ms=c.hold_latency_ms, tokens_per_second=0)
        worker = ctx.pids()["worker"]
        rss_before = memory_kb(worker).get("VmRSS", 0)
        reqs = [ctx.request(label="e2e-held") for _ in range(c.hold_jobs)]
        async with ctx.in_flight_sampler() as seen:
            load = await submit_load(ctx.gateway, reqs, 10, batch_size=100)
            done = await ctx.wait_finished(load.jobs)
        rss = memory_kb(worker)
    finally:
        # The scenarios after this one get a worker with the bench's own settings.
        await ctx.stop_worker()
    times = await ctx.job_times()
    succeeded = sum(1 for t in times if t.status == "succeeded")
    enough = c.hold_jobs >= IN_FLIGHT_TARGET and c.hold_concurrency >= IN_FLIGHT_TARGET
    peak_mib = rss.get("VmHWM", 0) / 1024
    result.add(
        f"held open: {c.hold_jobs} jobs, {c.hold_latency_ms / 1000:g} s model, worker at "
        f"concurrency {c.hold_concurrency}: peak calls in flight (one worker)",
        seen["peak"],
        "calls",
        target=f">= {IN_FLIGHT_TARGET}",
        met=(seen["peak"] >= IN_FLIGHT_TARGET) if enough else None,
    )
    result.add(
        "  worker resident memory, peak (VmHWM)",
        rounded(peak_mib),
        "MiB",
        target=f"<= {HELD_MEMORY_TARGET_MIB} MiB" if enough else "",
        met=(peak_mib <= HELD_MEMORY_TARGET_MIB) if enough else None,
    )
    result.add(
        "  succeeded", succeeded, f"of {c.hold_jobs}", target="all", met=succeeded == c.hold_jobs
    )
    result.extra["held_open"] = {
        "jobs": c.hold_jobs,
        "worker_concurrency": c.hold_concurrency,
        "latency_ms": c.hold_latency_ms,
        "finished": done,
        "peak_in_flight": seen["peak"],
        "worker_rss_kib_before": rss_before,
        "worker_memory_kib_after": rss,
        "makespan_s": makespan_s(times),
    }
