"""cost: CPU milliseconds per completed job, per service and in total.

`cost_jobs` jobs go the whole way — SubmitJob from 50 clients, the worker runs
them against the simulator at 0 ms (24 tokens), the notifier receives every status
event (nobody watches these jobs, so the worker publishes no token delta: see
services/worker/interest.py) — and the CPU time (utime + stime from /proc) each process
spent from the first submit until a second after the last job finished is divided
by the jobs. RabbitMQ and Postgres are measured whole (they are shared with
anything else running on this machine); the simulator and the benchmark client
are shown but not counted in the total.
"""

from __future__ import annotations

import asyncio

from bench.harness import SERVICES, Context, ResourceMeter, Result, rounded, submit_load

NAME = "cost"
TITLE = "CPU per completed job (submit → run → events)"


async def run(ctx: Context) -> Result:
    c = ctx.counts
    result = Result(NAME, TITLE)
    await ctx.reset(worker=True)
    await ctx.sim_set(latency_ms=0, tokens_per_second=0)
    reqs = [ctx.request(label="cost") for _ in range(c.cost_jobs)]
    meter = ResourceMeter(ctx.pids())
    meter.start()
    load = await submit_load(ctx.gateway, reqs, min(50, c.submit_clients))
    finished = await ctx.wait_finished(load.jobs)
    await asyncio.sleep(1.0)  # the events still in flight to the notifier
    cpu = meter.stop()
    statuses = await ctx.counts_by_status()
    succeeded = statuses.get("succeeded", 0)
    per_job = {name: ms / max(1, succeeded) for name, ms in cpu.items() if name != "wall"}
    total = 0.0
    for name in (*SERVICES, "rabbitmq", "postgres"):
        value = per_job.get(name, 0.0)
        total += value
        result.add(f"{name}", rounded(value, 3), "CPU ms/job")
    result.add("total (services + RabbitMQ + Postgres)", rounded(total, 3), "CPU ms/job")
    result.add("  simulator (not counted)", rounded(per_job.get("simulator", 0.0), 3), "CPU ms/job")
    result.add(
        "  benchmark client (not counted)", rounded(per_job.get("client", 0.0), 3), "CPU ms/job"
    )
    wall_s = cpu["wall"] / 1000.0
    result.add(f"  {succeeded} jobs in", rounded(wall_s, 2), "s wall")
    result.extra.update(
        jobs=c.cost_jobs,
        finished=finished,
        statuses=statuses,
        cpu_ms=cpu,
        cpu_ms_per_job=per_job,
        submit_errors=load.errors,
        jobs_per_cpu_second=1000.0 / total if total > 0 else None,
    )
    return result
