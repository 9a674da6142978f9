"""fairness: how long tenant B's jobs wait behind tenant A's bulk backlog, with fair
tenant queues (the default) and without them (CONVEYOR_FAIR_TENANTS=false: one
shared queue per lane).

For each mode: the worker runs with `SLOTS` slots; tenant A submits a backlog of
`backlog` bulk jobs (each a `LATENCY_MS` model call), then tenant B submits
`B_JOBS` jobs to the same lane at the same priority. Reported: B's wait (submit to
start; p50 and max) and how many of A's jobs started between B's submit and B's
last start. Without fairness B waits for the whole backlog (backlog x latency /
slots), so that run is capped at `unfair_cap_s`.

    python -m bench.fairness [--backlog 5000] [--quick]

runs it on its own stack (like `python -m bench`); as a harness scenario it is
`NAME`/`TITLE`/`run(ctx)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aio_pika

from bench.harness import Context, Result, rounded, summarize
from conveyor.bus import broker
from conveyor.client import ConveyorClient, FailedPrecondition
from conveyor.db.admin import create_api_key
from conveyor.db.engine import create_engine
from conveyor.v1 import jobs_pb2
from devtools import sandbox

NAME = "fairness"
TITLE = "tenant B's wait behind tenant A's bulk backlog, fair queues vs one shared queue"

MODEL = "claude-sonnet-4-5"
SLOTS = 16
LATENCY_MS = 200
B_JOBS = 5
BATCH = 500


def _request(prompt: str, latency_ms: int | None) -> jobs_pb2.SubmitJobRequest:
    labels = {"x-sim-latency-ms": str(latency_ms)} if latency_ms is not None else {}
    return jobs_pb2.SubmitJobRequest(
        model=MODEL,
        max_tokens=8,
        lane="bulk",
        messages=[jobs_pb2.Message(role="user", content=prompt)],
        labels=labels,
    )


def _restart(stack: sandbox.Stack, name: str, **env: str) -> None:
    if stack.pid(name) is not None:
        stack.stop(name)
    stack.start(name, **env)


async def _clients(stack: sandbox.Stack, tenants: list[str]) -> list[ConveyorClient]:
    engine = create_engine(stack.backing.database_url, pool_size=1, pre_ping=True)
    try:
        keys = [(await create_api_key(engine, t, f"bench-{t}", "member"))[0] for t in tenants]
    finally:
        await engine.dispose()
    return [ConveyorClient(stack.gateway, stack.notifier, api_key=k) for k in keys]


async def measure(
    stack: sandbox.Stack, *, fair: bool, backlog: int, unfair_cap_s: float
) -> dict[str, float | int]:
    """One run in one mode; B's waits in seconds and how much of A ran meanwhile."""
    mode = "true" if fair else "false"
    for name in ("dispatcher", "gateway"):
        await asyncio.to_thread(_restart, stack, name, CONVEYOR_FAIR_TENANTS=mode)
    await asyncio.to_thread(_restart, stack, "worker", CONVEYOR_WORKER_CONCURRENCY=str(SLOTS))
    tag = uuid.uuid4().hex[:6]
    a_tenant, b_tenant = f"bulk-{tag}", f"team-{tag}"
    a, b = await _clients(stack, [a_tenant, b_tenant])
    try:
        for start in range(0, backlog, BATCH):
            count = min(BATCH, backlog - start)
            await a.submit_many([_request(f"bulk {start + i}", LATENCY_MS) for i in range(count)])
        jobs = await b.submit_many([_request(f"team {i}", None) for i in range(B_JOBS)])
        submitted = time.monotonic()
        started: dict[str, jobs_pb2.Job] = {}
        deadline = submitted + (unfair_cap_s if not fair else 120.0)
        while len(started) < len(jobs) and time.monotonic() < deadline:
            for job in jobs:
                if job.id not in started:
                    current = await b.get(job.id)
                    if current.HasField("started_at"):
                        started[job.id] = current
            await asyncio.sleep(0.1)
        waits = [
            (j.started_at.ToDatetime() - j.created_at.ToDatetime()).total_seconds()
            for j in started.values()
        ]
        # Jobs that did not start by the cap waited at least that long.
        waits += [time.monotonic() - submitted] * (len(jobs) - len(started))
        b_created = min(j.created_at.ToDatetime(tzinfo=UTC) for j in jobs)
        last_start = (
            max(j.started_at.ToDatetime(tzinfo=UTC) for j in started.values())
            if len(started) == len(jobs)
            else datetime.now(UTC)
        )
        ahead = 0
        async for job in a.iter_jobs(lane="bulk", page_size=1000):
            if job.HasField("started_at"):
                when = job.started_at.ToDatetime(tzinfo=UTC)
                ahead += b_created <= when < last_start
        summary = summarize(waits)
        return {
            "b_wait_p50_s": summary["p50"],
            "b_wait_max_s": summary["max"],
            "b_started": len(started),
            "a_started_meanwhile": ahead,
            "capped": int(len(started) < len(jobs)),
        }
    finally:
        await asyncio.to_thread(stack.stop, "worker")
        await _drop_backlog(stack, a, a_tenant)
        for client in (a, b):
            await client.close()
        await asyncio.to_thread(stack.start, "worker")


async def _drop_backlog(stack: sandbox.Stack, client: ConveyorClient, tenant: str) -> None:
    """Cancel what is left of A's backlog and purge its messages."""
    ids = [
        j.id
        async for j in client.iter_jobs(
            statuses=[jobs_pb2.JOB_STATUS_PENDING, jobs_pb2.JOB_STATUS_RUNNING], page_size=1000
        )
    ]

    async def cancel(job_id: str) -> None:
        with contextlib.suppress(FailedPrecondition):
            await client.cancel(job_id, reason="end of the fairness benchmark")

    for start in range(0, len(ids), 200):
        await asyncio.gather(*(cancel(j) for j in ids[start : start + 200]))
    connection = await aio_pika.connect(stack.backing.amqp_url)
    async with connection:
        await broker.purge_queues(
            connection, (broker.tenant_lane_queue("bulk", tenant), broker.lane_queue("bulk"))
        )


async def figures(
    stack: sandbox.Stack, result: Result, backlog: int, unfair_cap_s: float
) -> Result:
    for fair in (True, False):
        got = await measure(stack, fair=fair, backlog=backlog, unfair_cap_s=unfair_cap_s)
        mode = "fair queues" if fair else "one shared queue"
        more = " (or more: capped)" if got["capped"] else ""
        result.add(f"{mode}: B's wait p50", rounded(float(got["b_wait_p50_s"]), 2), "s")
        result.add(f"  B's wait max{more}", rounded(float(got["b_wait_max_s"]), 2), "s")
        result.add("  A's jobs started meanwhile", int(got["a_started_meanwhile"]), "jobs")
        result.extra["fair" if fair else "shared"] = got
    result.notes.append(
        f"A: {backlog} bulk jobs of {LATENCY_MS} ms; B: {B_JOBS} jobs after them, same lane and"
        f" priority; worker with {SLOTS} slots"
    )
    return result


async def run(ctx: Context) -> Result:
    """As a harness scenario: the backlog is a tenth of `backlog_jobs` (5,000 normally)."""
    await ctx.reset(worker=True)
    backlog = max(200, ctx.counts.backlog_jobs // 20)
    cap = 10.0 if ctx.quick else 120.0
    return await figures(ctx.stack, Result(NAME, TITLE), backlog, cap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=TITLE)
    parser.add_argument("--backlog", type=int, default=5000, help="tenant A's bulk jobs")
    parser.add_argument("--quick", action="store_true", help="a backlog of 300, capped waits")
    args = parser.parse_args(argv)
    backlog = 300 if args.quick else args.backlog
    cap = 10.0 if args.quick else max(60.0, backlog * LATENCY_MS / 1000 / SLOTS * 1.5)
    run_dir = Path("run") / "bench" / str(os.getpid())  # cleaned up like `python -m bench` runs
    with sandbox.backing_services(f"conveyor-bench-{os.getpid()}") as backing:
        stack = sandbox.Stack(backing, run_dir, {"CONVEYOR_LOG_JSON": "1"})
        try:
            stack.start_all()
            result = asyncio.run(figures(stack, Result(NAME, TITLE), backlog, cap))
        finally:
            stack.stop_all()
    print(f"\n{TITLE}")
    for fig in result.figures:
        value = fig.value if not isinstance(fig.value, float) or math.isfinite(fig.value) else "-"
        print(f"  {fig.label:<40} {value} {fig.unit}")
    for note in result.notes:
        print(f"  ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
