"""The faults on the worker, the broker and the database: kill -9 of a worker, a
broker outage, a database restart, the lane queues lost."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import aio_pika

from .results import Row
from .rig import Chaos, Submitted, sim_labels


async def worker_kill(chaos: Chaos, rounds: int = 10, jobs: int = 60, want: int = 50) -> Row:
    """kill -9 of the worker with at least `want` calls in flight, `rounds` times."""
    row = Row("kill -9 of a worker")
    all_accepted: dict[str, float] = {}
    calls = 0
    recoveries: list[float] = []
    for n in range(rounds):
        before = await chaos.calls()
        sub = await chaos.submit_batches(f"worker-kill-{n}", jobs, sim_labels(3000), batch=jobs)
        until = chaos.budget(30)
        in_flight = 0
        while time.monotonic() < until:
            in_flight = await chaos.in_flight_now()
            if in_flight >= want:
                break
            await asyncio.sleep(0.05)
        if in_flight < want:
            row.failures.append(f"round {n + 1}: only {in_flight} calls in flight, not {want}")
        polled_at = time.time()
        await chaos.kill("worker")
        killed_at = time.time()
        # Calls that started between the poll and the kill were in flight too; so was
        # every job the dead worker had claimed (its call may have been on its way).
        claimed = await chaos.query(
            "SELECT count(*)::int AS n FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'running'",
            list(sub.accepted),
        )
        in_flight = max(
            in_flight, chaos.in_flight_between(polled_at, killed_at), int(claimed[0]["n"])
        )
        row.in_flight += in_flight
        await chaos.start("worker")
        done = await chaos.settle(list(sub.accepted), chaos.budget(60))
        calls += await chaos.calls() - before
        all_accepted.update(sub.accepted)
        ends = await chaos.query(
            "SELECT max(extract(epoch FROM finished_at))::float8 AS t FROM jobs"
            " WHERE id = ANY($1::uuid[])",
            list(sub.accepted),
        )
        if done and ends[0]["t"] is not None:
            recoveries.append(ends[0]["t"] - killed_at)
        if not done:
            row.failures.append(f"round {n + 1}: jobs still unfinished")
            break
    await chaos.account(row, [f"worker-kill-{n}" for n in range(rounds)], all_accepted, calls, None)
    if recoveries:
        row.recovery_s = max(recoveries)
        row.notes.append(
            f"{len(recoveries)} rounds of {jobs} jobs (3 s calls); recovery is the slowest"
            f" round's, kill to last job finished (median {statistics.median(recoveries):.1f} s)"
        )
    return row


async def fault_during_submits(
    chaos: Chaos,
    title: str,
    scenario: str,
    load: tuple[int, float, int],
    lead_s: float,
    fault: Callable[[], Awaitable[None]],
    what: Callable[[float], str],
) -> Row:
    """Submit `load` = (jobs, jobs per second, model latency in ms) paced; `lead_s` into
    it, run `fault`; wait for the jobs and account for them, recovery counted from the
    fault's end. `what` describes the fault from its duration, for the row's note."""
    row = Row(title)
    count, rate, latency_ms = load
    before = await chaos.calls()
    submitting = asyncio.create_task(
        chaos.submit_paced(scenario, count, rate, 10, sim_labels(latency_ms))
    )
    await asyncio.sleep(lead_s)
    down_at = time.time()
    await fault()
    up_at = time.time()
    sub = await submitting
    await chaos.settle(list(sub.accepted), chaos.budget(90))
    row.in_flight = chaos.in_flight_between(down_at, up_at)
    await chaos.account(row, [scenario], sub.accepted, await chaos.calls() - before, up_at)
    row.notes.append(
        f"{count} submits at {rate:g}/s; {what(up_at - down_at)}; refused: {refusals(sub)}"
    )
    return row


async def broker_outage(chaos: Chaos, count: int = 1000, rate: float = 125.0) -> Row:
    """RabbitMQ's stop_app / start_app while `count` jobs are being submitted."""

    async def outage() -> None:
        await asyncio.to_thread(chaos.rabbit.stop_app)
        await asyncio.sleep(3.0)
        await asyncio.to_thread(chaos.rabbit.start_app)

    return await fault_during_submits(
        chaos,
        "broker outage",
        "broker-outage",
        (count, rate, 200),
        2.0,
        outage,
        lambda down_s: f"RabbitMQ down {down_s:.1f} s (stop_app to start_app done)",
    )


async def database_restart(chaos: Chaos, count: int = 600, rate: float = 60.0) -> Row:
    """Postgres restarted (immediate shutdown, as a crash) while jobs are submitted and run."""

    async def restart() -> None:
        await asyncio.to_thread(chaos.pg.restart, "immediate")

    return await fault_during_submits(
        chaos,
        "database restart",
        "database-restart",
        (count, rate, 500),
        3.0,
        restart,
        lambda down_s: (
            f"pg_ctl restart -m immediate took {down_s:.1f} s (UNAVAILABLE refusals are expected)"
        ),
    )


async def broker_loss(chaos: Chaos, count: int = 1000) -> Row:
    """The lane queues deleted (a broker node's disk lost) with `count` jobs waiting in
    them; the worker then starts on empty queues."""
    row = Row("broker loss")
    await chaos.stop("worker")
    before = await chaos.calls()
    sub = await chaos.submit_batches("broker-loss", count, sim_labels(50))
    ids = list(sub.accepted)
    until = chaos.budget(30)
    while time.monotonic() < until:
        rows = await chaos.query(
            "SELECT count(*) AS n FROM jobs WHERE id = ANY($1::uuid[]) AND published_at IS NULL",
            ids,
        )
        if rows[0]["n"] == 0:
            break
        await asyncio.sleep(0.2)
    connection = await aio_pika.connect(chaos.rabbit.amqp_url)
    waiting = 0
    try:
        listing = await asyncio.to_thread(chaos.rabbit.ctl, "-q", "list_queues", "name", "messages")
        lanes = [
            line.split("\t") for line in listing.splitlines() if line.startswith("conveyor.lane.")
        ]
        names = [name for name, _ in lanes]
        waiting = sum(int(n) for _, n in lanes)
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await connection.close()
    lost_at = time.time()
    await chaos.start("worker")
    await chaos.settle(ids, chaos.budget(120))
    await chaos.account(row, ["broker-loss"], sub.accepted, await chaos.calls() - before, lost_at)
    row.notes.append(
        f"{count} jobs submitted with the worker stopped; {waiting} messages were waiting"
        f" in {len(names)} lane queues when they were deleted"
    )
    return row


def refusals(sub: Submitted) -> str:
    return ", ".join(f"{n} {code}" for code, n in sorted(sub.refused.items())) or "none"
