"""backlog: `backlog_jobs` queued jobs — memory of every process, then the drain rate.

With the worker stopped, the jobs are submitted in SubmitJobs batches of 100. The
resident memory (VmRSS) of each service and RabbitMQ's memory are read before and
after; RabbitMQ is shared with other vhosts, so its node-wide figures are
reported as the change, next to the memory of this vhost's queues. Then one
worker starts with the simulator at 0 ms and drains the queue for at most
`drain_limit_s`; the drain rate is finished jobs over that time, and the peak
memory of each process during the drain is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from bench.harness import (
    Context,
    Result,
    memory_kb,
    rabbit_memory,
    rabbit_pid,
    rounded,
    submit_load,
)

NAME = "backlog"
TITLE = "100k queued jobs: memory, then drain rate"

MB = 1024 * 1024


def _rss_mb(ctx: Context) -> dict[str, float]:
    out = {name: memory_kb(pid).get("VmRSS", 0) / 1024 for name, pid in ctx.pids().items()}
    rabbit = rabbit_pid()
    if rabbit is not None:
        out["rabbitmq (rss)"] = memory_kb(rabbit).get("VmRSS", 0) / 1024
    return out


async def run(ctx: Context) -> Result:
    c = ctx.counts
    result = Result(NAME, TITLE)
    await ctx.reset(worker=False)
    before = _rss_mb(ctx)
    rabbit_before = await rabbit_memory(ctx.vhost)

    # Fill.
    reqs = [ctx.request(label="backlog") for _ in range(c.backlog_jobs)]
    fill = await submit_load(ctx.gateway, reqs, c.backlog_clients, batch_size=100)
    del reqs
    await asyncio.sleep(1.0)  # let the notifier and the dispatcher settle
    after = _rss_mb(ctx)
    rabbit_after = await rabbit_memory(ctx.vhost)
    queued = rabbit_after.get("vhost_messages", 0)
    # Labels without run-dependent numbers, so that `bench compare` pairs them up.
    result.add(
        f"fill in batches of 100 ({c.backlog_clients} clients)",
        rounded(fill.jobs_per_s, 0),
        "jobs/s",
    )
    result.add("  jobs submitted", fill.jobs, "jobs")
    result.add("  messages queued", queued, "msgs", target=f"{fill.jobs}", met=queued == fill.jobs)
    for name in ("gateway", "notifier", "dispatcher"):
        if name in after:
            result.add(
                f"  {name} RSS (before → after fill)",
                f"{before.get(name, 0):.0f} → {after[name]:.0f}",
                "MB",
            )
    result.add(
        "  RabbitMQ: this vhost's queues",
        rounded(rabbit_after.get("vhost_queue_bytes", 0) / MB, 1),
        "MB",
    )
    node_delta = rabbit_after.get("node_erlang_bytes", 0) - rabbit_before.get(
        "node_erlang_bytes", 0
    )
    result.add("  RabbitMQ: node memory change", rounded(node_delta / MB, 1), "MB")
    if "rabbitmq (rss)" in after:
        result.add("  RabbitMQ RSS before fill", rounded(before.get("rabbitmq (rss)", 0), 0), "MB")
        result.add("  RabbitMQ RSS after fill", rounded(after["rabbitmq (rss)"], 0), "MB")

    # Drain.
    await ctx.sim_set(latency_ms=0, tokens_per_second=0)
    await ctx.start_worker()
    peaks: dict[str, float] = dict(after)

    async def watch_memory() -> None:
        while True:
            for name, mb in _rss_mb(ctx).items():
                peaks[name] = max(peaks.get(name, 0.0), mb)
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(watch_memory())
    t0 = time.monotonic()
    try:
        finished = await ctx.wait_finished(fill.jobs, timeout_s=c.drain_limit_s, poll_s=0.5)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    window = time.monotonic() - t0
    async with ctx.db.acquire() as conn:
        row = await conn.fetchrow(
            """
            SELECT count(*) AS n,
                   extract(epoch FROM max(finished_at) - min(started_at))::float8 AS span
              FROM jobs WHERE finished_at IS NOT NULL
            """
        )
    span = float(row["span"] or 0.0)
    rate = int(row["n"]) / span if span > 0 else 0.0
    rabbit_drain = await rabbit_memory(ctx.vhost)
    result.add(f"drain at 0 ms (at most {c.drain_limit_s:g} s)", rounded(rate, 0), "jobs/s")
    result.add("  jobs finished", finished, "jobs")
    for name in ("worker", "gateway", "notifier", "dispatcher"):
        if name in peaks:
            result.add(f"  {name} peak RSS during drain", rounded(peaks[name], 0), "MB")
    if "rabbitmq (rss)" in peaks:
        result.add("  RabbitMQ peak RSS", rounded(peaks["rabbitmq (rss)"], 0), "MB")
    extra: dict[str, Any] = {
        "jobs": fill.jobs,
        "fill_s": fill.elapsed_s,
        "fill_errors": fill.errors,
        "rss_mb_before": before,
        "rss_mb_after_fill": after,
        "rss_mb_peak_during_drain": peaks,
        "rabbit_before": rabbit_before,
        "rabbit_after_fill": rabbit_after,
        "rabbit_after_drain": rabbit_drain,
        "drain_window_s": window,
        "drained": finished,
        "drain_rate_jobs_per_s": rate,
    }
    result.extra.update(extra)
    if finished < fill.jobs:
        result.notes.append(
            f"drain stopped after {c.drain_limit_s:g} s (bounded run time); the rate is over that span"
        )
    await ctx.reset(worker=False)
    return result
