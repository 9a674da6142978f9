"""`python -m bench.chaos` (`make chaos`): proof under faults.

Starts a RabbitMQ node and a Postgres cluster of its own (never the machine's
servers, which other runs use), the simulator and the four services as processes,
then injects each fault while jobs run and checks what became of every job:

| fault            | what                                                              |
| kill -9 worker   | 10 rounds, each with at least 50 calls in flight                  |
| broker outage    | RabbitMQ stop_app / start_app during 1,000 submits                 |
| database restart | Postgres restart (immediate, as a crash) under load                |
| notifier kill    | kill -9 of a notifier with 100 open watches; they resume on another |
|                  | notifier, and every sequence number arrives exactly once            |
| broker loss      | the lane queues deleted with 1,000 jobs waiting; Postgres is the    |
|                  | source of truth, so every job still runs once                       |

For each: accepted (submits answered OK), lost (accepted jobs that did not
succeed; must be 0), finished twice (a job with two terminal transitions in its
history or two succeeded attempts; must be 0), duplicate model calls (calls the
simulator received beyond one per succeeded job; at most the calls in flight at the
fault, as the simulator counted them), and recovery (seconds from the end of the
fault until every job accepted by then had finished; for the notifier, until every
watch had resumed). The exit status is 1 when a figure breaks its bound, so CI fails.

Everything it started is stopped and removed on the way out, on Ctrl-C or SIGTERM
too; what a run killed outright left behind is removed by the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import math
import os
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import grpc
import grpc.aio

from bench.__main__ import raise_keyboard_interrupt, signals_ignored
from bench.harness import gateway_clients
from conveyor.v1 import events_pb2, events_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from devtools import devstack, sandbox

ROOT = Path(__file__).resolve().parent.parent
RUN_ROOT = ROOT / "run" / "chaos"
SERVERS_PREFIX = "conveyor-chaos-"
"""The private servers live in /tmp/conveyor-chaos-<pid>-*/ (the postgres user must
be able to reach its data directory, which a home or work directory may not allow)."""
KEEP_RUN_DIRS = 3
TIME_LIMIT_S = 570.0
"""The whole run, setup included, stays under 10 minutes: a scenario gets what is left."""
TEARDOWN_RESERVE_S = 30.0

MODEL = "claude-sonnet-4-5"
TENANT = "chaos"
TERMINAL = ("succeeded", "failed", "cancelled", "dead")

CHAOS_ENV = {
    # Short timers, so recovery paths run within the time box. The lease leaves a
    # starved machine's heartbeats room (a worker aborts a call whose lease it could
    # not renew for lease - heartbeat seconds; at 4 s, 90 calls were aborted so on a
    # machine loaded 7 times over its cores).
    "CONVEYOR_LEASE_S": "8",
    "CONVEYOR_WORKER_HEARTBEAT_S": "1",
    "CONVEYOR_RETRY_BASE_S": "0.2",
    "CONVEYOR_RETRY_CAP_S": "1",
    "CONVEYOR_OUTBOX_AFTER_S": "1",
    "CONVEYOR_DISPATCHER_INTERVAL_S": "0.2",
    # A job still pending this long after its publish is published again (its message
    # may be gone): the broker-loss fault relies on it.
    "CONVEYOR_PENDING_REPUBLISH_S": "10",
    "CONVEYOR_WORKER_SHUTDOWN_GRACE_S": "5",
    # Room for 100 calls in flight in one worker.
    "CONVEYOR_WORKER_CONCURRENCY": "128",
    "CONVEYOR_LOG_JSON": "1",
    # Listeners are on loopback: key-less calls act as this tenant.
    "CONVEYOR_ANONYMOUS_TENANT": TENANT,
}
MAX_ATTEMPTS = 6
"""Each job may take this many attempts: a fault costs one, a bad run several."""


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One fault's figures; `failures` says what broke a bound."""

    fault: str
    accepted: int = 0
    lost: int = 0
    finished_twice: int = 0
    duplicate_calls: int = 0
    in_flight: int = 0
    """Calls in flight at the fault (the bound of duplicate_calls)."""
    recovery_s: float = math.nan
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def check(self) -> None:
        """Record the bounds this row breaks."""
        if self.lost:
            self.failures.append(f"{self.lost} accepted jobs lost")
        if self.finished_twice:
            self.failures.append(f"{self.finished_twice} jobs finished twice")
        if self.duplicate_calls > self.in_flight:
            self.failures.append(
                f"{self.duplicate_calls} duplicate model calls, more than the"
                f" {self.in_flight} in flight at the fault"
            )

    @property
    def ok(self) -> bool:
        return not self.failures


def table(rows: Sequence[Row], markdown: bool = False) -> str:
    head = [
        "fault",
        "accepted",
        "lost",
        "finished twice",
        "dup. model calls",
        "in flight at fault",
        "recovery",
        "result",
    ]
    body = [
        [
            r.fault,
            str(r.accepted),
            str(r.lost),
            str(r.finished_twice),
            str(r.duplicate_calls),
            str(r.in_flight),
            f"{r.recovery_s:.1f} s" if math.isfinite(r.recovery_s) else "-",
            "ok" if r.ok else "FAILED",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *map(line, body)])


# --------------------------------------------------------------------------- the run


def job_request(scenario: str, n: int, labels: dict[str, str]) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        model=MODEL,
        messages=[jobs_pb2.Message(role="user", content=f"chaos {scenario} {n}: say something")],
        max_tokens=64,
        max_attempts=MAX_ATTEMPTS,
        labels={"chaos": scenario, **labels},
    )


def sim_labels(latency_ms: int, tokens: int = 8, per_second: int = 0) -> dict[str, str]:
    """Labels the worker turns into the simulator's x-sim-* headers."""
    labels = {"x-sim-latency-ms": str(latency_ms), "x-sim-tokens": str(tokens)}
    if per_second:
        labels["x-sim-tokens-per-second"] = str(per_second)
    return labels


@dataclass
class Submitted:
    """What a load of submits got: job ids with when each was accepted, refusals by code."""

    accepted: dict[str, float] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)


class Chaos:
    """The stack, its private servers and what the scenarios share."""

    def __init__(
        self,
        stack: sandbox.Stack,
        pg: sandbox.PrivatePostgres,
        rabbit: sandbox.PrivateRabbit,
        http: aiohttp.ClientSession,
        deadline: float,
    ) -> None:
        self.stack = stack
        self.pg = pg
        self.rabbit = rabbit
        self.http = http
        self.deadline = deadline
        self.dsn = stack.backing.database_url
        self.samples: list[tuple[float, int]] = []
        """(time.time(), the simulator's open streams), every 50 ms."""

    # -- time

    def budget(self, wanted_s: float) -> float:
        """A deadline (time.monotonic) `wanted_s` from now, or earlier if the run's ends."""
        return min(time.monotonic() + wanted_s, self.deadline - TEARDOWN_RESERVE_S)

    # -- the simulator: calls made and calls in flight

    async def sim_stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.stack.simulator_url}/stats") as resp:
            stats: dict[str, Any] = await resp.json()
            return stats

    async def calls(self) -> int:
        """Model calls the simulator has received (`POST /v1/messages`), ever."""
        return int((await self.sim_stats())["requests"])

    async def sample_in_flight(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                stats = await self.sim_stats()
                self.samples.append((time.time(), int(stats["active_streams"])))
                del self.samples[:-20_000]
            await asyncio.sleep(0.05)

    def in_flight_between(self, t0: float, t1: float) -> int:
        """The most calls seen in flight from `t0` to `t1` (time.time())."""
        seen = [n for t, n in self.samples if t0 - 0.1 <= t <= t1]
        return max(seen, default=0)

    async def in_flight_now(self) -> int:
        return int((await self.sim_stats())["active_streams"])

    # -- the database (a connection each time: a restart ends pooled ones)

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        for attempt in range(30):
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                try:
                    return list(await conn.fetch(sql, *args, timeout=30))
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError):
                if attempt == 29:
                    raise
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def unfinished(self, ids: Sequence[str]) -> int:
        rows = await self.query(
            "SELECT count(*) AS n FROM jobs WHERE id = ANY($1::uuid[]) AND status <> ALL($2)",
            list(ids),
            list(TERMINAL),
        )
        return int(rows[0]["n"])

    async def settle(self, ids: Sequence[str], until: float) -> bool:
        """Wait until every job is terminal or the deadline (monotonic); whether all are."""
        while True:
            if await self.unfinished(ids) == 0:
                return True
            if time.monotonic() > until:
                return False
            await asyncio.sleep(0.25)

    async def account(
        self,
        row: Row,
        scenarios: Sequence[str],
        accepted: dict[str, float],
        calls: int,
        fault_end: float | None,
    ) -> None:
        """Fill lost, finished twice, duplicate calls and recovery for these jobs.

        `calls` is how many model calls the simulator received meanwhile; every job of
        `scenarios` (their `chaos` label) may have caused them, those whose submit was
        answered with an error but written all the same included. `fault_end`
        (time.time()) starts the recovery clock for the jobs accepted before it."""
        rows = await self.query(
            """
            SELECT j.id::text AS id, j.status,
                   extract(epoch FROM j.finished_at)::float8 AS finished,
                   (SELECT count(*) FROM job_events e
                     WHERE e.job_id = j.id AND e.status = ANY($2)) AS terminal_events,
                   (SELECT count(*) FROM job_attempts a
                     WHERE a.job_id = j.id AND a.outcome = 'succeeded') AS wins
              FROM jobs j WHERE j.id = ANY($1::uuid[])
            """,
            list(accepted),
            list(TERMINAL),
        )
        by_id = {r["id"]: r for r in rows}
        row.accepted = len(accepted)
        succeeded = [r for r in rows if r["status"] == "succeeded"]
        row.lost = len(accepted) - len(succeeded)
        missing = len(accepted) - len(by_id)
        if missing:
            row.notes.append(f"{missing} accepted jobs are not in the database at all")
        statuses: dict[str, int] = {}
        for r in rows:
            if r["status"] != "succeeded":
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        if statuses:
            row.notes.append(
                "not succeeded: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
            )
        row.finished_twice = sum(1 for r in rows if r["terminal_events"] > 1 or r["wins"] > 1)
        ran = await self.query(
            "SELECT id::text AS id, status FROM jobs WHERE labels->>'chaos' = ANY($1)",
            list(scenarios),
        )
        phantoms = [r for r in ran if r["id"] not in accepted]
        if phantoms:
            row.notes.append(
                f"{len(phantoms)} submits answered with an error were written all the same"
                f" ({sum(r['status'] == 'succeeded' for r in phantoms)} of them ran)"
            )
        row.duplicate_calls = max(0, calls - sum(r["status"] == "succeeded" for r in ran))
        if fault_end is not None:
            before = [by_id[j] for j, at in accepted.items() if at <= fault_end and j in by_id]
            ends = [r["finished"] for r in before]
            if before and all(e is not None for e in ends):
                row.recovery_s = max(0.0, max(ends) - fault_end)

    # -- load

    async def submit_paced(
        self, scenario: str, count: int, rate: float, clients: int, labels: dict[str, str]
    ) -> Submitted:
        """`count` SubmitJob calls at `rate` per second over `clients` connections (each
        call due at i / rate, so a stall shows as refusals or slow answers, not as
        fewer calls)."""
        out = Submitted()
        due = iter(range(count))

        async def client(stub: jobs_pb2_grpc.JobServiceStub, t0: float) -> None:
            for i in due:
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    answer = await stub.SubmitJob(job_request(scenario, i, labels), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    name = exc.code().name
                    out.refused[name] = out.refused.get(name, 0) + 1
                    continue
                out.accepted[answer.job.id] = time.time()

        async with gateway_clients(self.stack.gateway, clients) as stubs:
            t0 = time.monotonic()
            await asyncio.gather(*(client(s, t0) for s in stubs))
        return out

    async def submit_batches(
        self, scenario: str, count: int, labels: dict[str, str], batch: int = 100
    ) -> Submitted:
        out = Submitted()
        async with gateway_clients(self.stack.gateway, 1) as (stub,):
            for start in range(0, count, batch):
                reqs = [job_request(scenario, i, labels) for i in range(start, start + batch)]
                answer = await stub.SubmitJobs(
                    jobs_pb2.SubmitJobsRequest(jobs=reqs[: count - start]), timeout=60
                )
                now = time.time()
                out.accepted.update((r.job.id, now) for r in answer.results)
        return out

    # -- services

    async def start(self, name: str, **env: str) -> None:
        await asyncio.to_thread(self.stack.start, name, **env)

    async def kill(self, name: str) -> None:
        await asyncio.to_thread(self.stack.kill, name)

    async def stop(self, name: str) -> None:
        await asyncio.to_thread(self.stack.stop, name)


# --------------------------------------------------------------------------- scenarios


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


async def broker_outage(chaos: Chaos, count: int = 1000, rate: float = 125.0) -> Row:
    """RabbitMQ's stop_app / start_app while `count` jobs are being submitted."""
    row = Row("broker outage")
    before = await chaos.calls()
    submitting = asyncio.create_task(
        chaos.submit_paced("broker-outage", count, rate, 10, sim_labels(200))
    )
    await asyncio.sleep(2.0)
    down_at = time.time()
    await asyncio.to_thread(chaos.rabbit.stop_app)
    await asyncio.sleep(3.0)
    await asyncio.to_thread(chaos.rabbit.start_app)
    up_at = time.time()
    sub = await submitting
    await chaos.settle(list(sub.accepted), chaos.budget(90))
    row.in_flight = chaos.in_flight_between(down_at, up_at)
    await chaos.account(row, ["broker-outage"], sub.accepted, await chaos.calls() - before, up_at)
    row.notes.append(
        f"{count} submits at {rate:g}/s; RabbitMQ down {up_at - down_at:.1f} s"
        f" (stop_app to start_app done); refused: {refusals(sub)}"
    )
    return row


async def database_restart(chaos: Chaos, count: int = 600, rate: float = 60.0) -> Row:
    """Postgres restarted (immediate shutdown, as a crash) while jobs are submitted and run."""
    row = Row("database restart")
    before = await chaos.calls()
    submitting = asyncio.create_task(
        chaos.submit_paced("database-restart", count, rate, 10, sim_labels(500))
    )
    await asyncio.sleep(3.0)
    down_at = time.time()
    await asyncio.to_thread(chaos.pg.restart, "immediate")
    up_at = time.time()
    sub = await submitting
    await chaos.settle(list(sub.accepted), chaos.budget(90))
    row.in_flight = chaos.in_flight_between(down_at, up_at)
    await chaos.account(
        row, ["database-restart"], sub.accepted, await chaos.calls() - before, up_at
    )
    row.notes.append(
        f"{count} submits at {rate:g}/s; pg_ctl restart -m immediate took"
        f" {up_at - down_at:.1f} s; refused (UNAVAILABLE is expected): {refusals(sub)}"
    )
    return row


@dataclass
class Watch:
    """What one WatchJob reader received, over every stream it opened."""

    job_id: str
    sequences: list[int] = field(default_factory=list)
    """Sequence numbers of the events proper (status changes, deltas), as received."""
    deltas: list[tuple[int, str]] = field(default_factory=list)
    terminal: int = 0
    streams: int = 0
    resumed_at: float | None = None
    """time.time() of the first event from the second notifier."""


async def follow(
    job_id: str,
    stubs: list[events_pb2_grpc.JobEventsStub],
    switched: asyncio.Event,
    watch: Watch,
) -> None:
    """Watch a job on the first notifier; when its stream breaks, resume after the last
    sequence number received on the second one. Nothing is filtered: a repeated or
    reordered event stays in `watch.sequences`."""
    last = 0
    failures = 0
    while watch.terminal == 0:
        target = 1 if switched.is_set() else 0
        watch.streams += 1
        call = stubs[target].WatchJob(events_pb2.WatchJobRequest(id=job_id, after_sequence=last))
        try:
            async for event in call:
                kind = event.WhichOneof("payload")
                if kind not in ("status_changed", "token_delta"):
                    continue
                if target == 1 and watch.resumed_at is None:
                    watch.resumed_at = time.time()
                watch.sequences.append(event.sequence)
                last = max(last, event.sequence)
                if kind == "token_delta":
                    watch.deltas.append((event.token_delta.attempt, event.token_delta.text))
                elif event.status_changed.status in TERMINAL_STATUSES:
                    watch.terminal += 1
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise
        finally:
            call.cancel()
        failures += 1
        if failures > 40:
            return
        await asyncio.sleep(0.1)


TERMINAL_STATUSES = {
    jobs_pb2.JOB_STATUS_SUCCEEDED,
    jobs_pb2.JOB_STATUS_FAILED,
    jobs_pb2.JOB_STATUS_CANCELLED,
    jobs_pb2.JOB_STATUS_DEAD,
}


async def notifier_kill(chaos: Chaos, count: int = 100) -> Row:
    """kill -9 of a notifier while `count` watches stream from it; each resumes on a
    second notifier after its last sequence number."""
    row = Row("notifier kill")
    port = sandbox.free_port()
    second = f"{chaos.stack.settings.notifier_host}:{port}"
    chaos.stack.services["notifier-2"] = devstack.Service(
        "notifier-2", "services.notifier", "grpc", second, "JobEvents"
    )
    await chaos.start(
        "notifier-2", CONVEYOR_NOTIFIER_PORT=str(port), CONVEYOR_NOTIFIER_METRICS_PORT="0"
    )
    channels = [
        grpc.aio.insecure_channel(t, options=[("grpc.use_local_subchannel_pool", 1)])
        for t in (chaos.stack.notifier, second)
    ]
    try:
        stubs = [events_pb2_grpc.JobEventsStub(c) for c in channels]
        before = await chaos.calls()
        sub = await chaos.submit_batches(
            "notifier-kill", count, sim_labels(300, tokens=48, per_second=8), batch=count
        )
        switched = asyncio.Event()
        watches = {j: Watch(j) for j in sub.accepted}
        readers = [asyncio.create_task(follow(j, stubs, switched, w)) for j, w in watches.items()]
        until = chaos.budget(40)
        while time.monotonic() < until and not all(w.deltas for w in watches.values()):  # noqa: ASYNC110 - 100 readers feed it
            await asyncio.sleep(0.05)
        streaming = sum(1 for w in watches.values() if w.deltas)
        if streaming < count:
            row.failures.append(f"only {streaming} of {count} watches had tokens at the kill")
        row.in_flight = await chaos.in_flight_now()
        switched.set()  # set first: a reader whose stream breaks goes to the second one
        killed_at = time.time()
        await chaos.kill("notifier")
        try:
            await asyncio.wait_for(
                asyncio.gather(*readers), timeout=max(1.0, until - time.monotonic() + 30)
            )
        except TimeoutError:
            row.failures.append("watches still open after the time limit")
        await chaos.settle(list(sub.accepted), chaos.budget(30))
        await chaos.account(
            row, ["notifier-kill"], sub.accepted, await chaos.calls() - before, None
        )
        await check_watches(chaos, row, watches, killed_at)
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        with contextlib.suppress(Exception):
            await chaos.stop("notifier-2")
        if chaos.stack.pid("notifier") is None:
            await chaos.start("notifier")
    return row


async def check_watches(
    chaos: Chaos, row: Row, watches: dict[str, Watch], killed_at: float
) -> None:
    """Every sequence number once, in order; each attempt's text whole; one terminal event."""
    results = {
        r["id"]: (r["result_text"] or "", int(r["attempts"]))
        for r in await chaos.query(
            "SELECT id::text AS id, result_text, attempts FROM jobs WHERE id = ANY($1::uuid[])",
            list(watches),
        )
    }
    repeated = sum(len(w.sequences) - len(set(w.sequences)) for w in watches.values())
    unordered = sum(1 for w in watches.values() if w.sequences != sorted(w.sequences))
    short = 0
    for w in watches.values():
        text, attempt = results.get(w.job_id, ("", 0))
        got = "".join(t for a, t in w.deltas if a == attempt)
        if got != text:
            short += 1
            if short == 1:
                row.notes.append(
                    f"e.g. job {w.job_id}: {len(got)} of {len(text)} characters of its text"
                    f" arrived; sequence numbers received after 10: {w.sequences[10:]}"
                )
    no_end = sum(1 for w in watches.values() if w.terminal == 0)
    twice = sum(1 for w in watches.values() if w.terminal > 1)
    resumed = [w.resumed_at for w in watches.values() if w.resumed_at is not None]
    if resumed:
        row.recovery_s = max(resumed) - killed_at
    row.lost += short + no_end
    row.finished_twice += twice
    if repeated:
        row.failures.append(f"{repeated} sequence numbers arrived twice")
    if unordered:
        row.failures.append(f"{unordered} watches got events out of order")
    row.notes.append(
        f"{len(watches)} watches, {len(resumed)} resumed on the second notifier"
        f" ({sum(w.streams for w in watches.values())} streams opened): {repeated}"
        f" sequence numbers twice, {unordered} out of order, {short} texts not whole,"
        f" {no_end} without their terminal event; recovery is kill to the last watch's"
        " first event from the second notifier"
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


Scenario = Callable[[Chaos], Awaitable[Row]]
SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "worker-kill": ("kill -9 of a worker", worker_kill),
    "broker-outage": ("broker outage", broker_outage),
    "database-restart": ("database restart", database_restart),
    "notifier-kill": ("notifier kill", notifier_kill),
    "broker-loss": ("broker loss", broker_loss),
}


async def run_scenarios(
    stack: sandbox.Stack,
    pg: sandbox.PrivatePostgres,
    rabbit: sandbox.PrivateRabbit,
    names: Sequence[str],
    deadline: float,
    rows: list[Row],
) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        chaos = Chaos(stack, pg, rabbit, http, deadline)
        sampler = asyncio.create_task(chaos.sample_in_flight())
        try:
            for name in names:
                title, scenario = SCENARIOS[name]
                if time.monotonic() > deadline - TEARDOWN_RESERVE_S - 20:
                    row = Row(title, failures=["not run: the time limit was reached"])
                    rows.append(row)
                    continue
                print(f"\n== {title}", flush=True)
                t0 = time.monotonic()
                try:
                    row = await scenario(chaos)
                except Exception as exc:
                    row = Row(title, failures=[f"error: {type(exc).__name__}: {exc}"])
                row.elapsed_s = time.monotonic() - t0
                row.check()
                rows.append(row)
                for note in row.notes:
                    print(f"   {note}", flush=True)
                for failure in row.failures:
                    print(f"   FAILED: {failure}", flush=True)
                print(f"   ({row.elapsed_s:.1f} s)", flush=True)
                for service in ("worker", "notifier"):  # a failed scenario may leave one down
                    if stack.pid(service) is None:
                        try:
                            await chaos.start(service)
                        except Exception as exc:  # the next scenario fails on its own
                            print(f"   could not restart the {service}: {exc}", flush=True)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler


# --------------------------------------------------------------------------- leftovers


def _alive(pid: int) -> bool:
    return pid == os.getpid() or devstack.alive(pid)


def clean_leftovers() -> list[str]:
    """Stop and remove what chaos runs killed outright left behind (their private
    servers and services); returns what was done."""
    done: list[str] = []
    for root in Path("/tmp").glob(f"{SERVERS_PREFIX}*"):
        owner = root.name[len(SERVERS_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        data = root / "postgres" / "data"
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                pid = int((data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        with contextlib.suppress(Exception):
            pid = int((root / "rabbitmq" / "rabbit.pid").read_text().strip())
            if devstack.alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        done.append(f"removed the servers of run {owner}")
    if RUN_ROOT.is_dir():
        runs = sorted(
            (d for d in RUN_ROOT.iterdir() if d.is_dir() and d.name.isdigit()),
            key=lambda d: d.stat().st_mtime,
        )
        for run_dir in runs:
            if _alive(int(run_dir.name)):
                continue
            for pid_file in run_dir.glob("*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pid_file.read_text().strip())
                    module = "services." + pid_file.stem.split("-")[0]
                    if pid_file.stem == "simulator":
                        module = "devtools.simulator"
                    if devstack.alive(pid) and devstack.runs_module(pid, module):
                        devstack.stop_pid(pid)
                        done.append(f"stopped {pid_file.stem} (pid {pid}) of run {run_dir.name}")
                pid_file.unlink(missing_ok=True)
        for old in runs[:-KEEP_RUN_DIRS]:
            if not _alive(int(old.name)):
                shutil.rmtree(old, ignore_errors=True)
    return done


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="Inject faults into a Conveyor of its own and check that no job is lost"
        " or run twice.",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="FAULT",
        help=f"faults to inject (default: all, in this order): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown fault {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(dict.fromkeys(args.scenarios)) or list(SCENARIOS)
    deadline = time.monotonic() + TIME_LIMIT_S
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    for line in clean_leftovers():
        print(f"leftover of an earlier run: {line}")
    for name in [k for k in os.environ if k.startswith("SIM_")]:
        del os.environ[name]
    rows: list[Row] = []
    interrupted = False
    cleanup = contextlib.ExitStack()
    atexit.register(cleanup.close)  # also on an exit this function does not see through
    try:
        servers = Path(f"/tmp/{SERVERS_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}")
        print("starting a private RabbitMQ node and Postgres cluster ...", flush=True)
        backing, pg, rabbit = cleanup.enter_context(
            sandbox.private_backing(servers, f"chaos-{os.getpid()}")
        )
        stack = sandbox.Stack(backing, RUN_ROOT / str(os.getpid()), CHAOS_ENV)
        cleanup.callback(stack.stop_all)
        print(
            f"RabbitMQ {rabbit.node} on port {rabbit.port}, Postgres on port {pg.port};"
            f" service logs in {stack.run.path}",
            flush=True,
        )
        stack.start_all()
        asyncio.run(run_scenarios(stack, pg, rabbit, names, deadline, rows))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping what chaos started ...", file=sys.stderr, flush=True)
    except Exception as exc:  # setup failed: still clean up and report
        print(f"chaos could not run: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        rows.append(Row("setup", failures=[f"{type(exc).__name__}: {exc}"]))
    finally:
        with signals_ignored():
            cleanup.close()
    print()
    print(table(rows, markdown=args.markdown))
    for row in rows:
        for failure in row.failures:
            print(f"FAILED {row.fault}: {failure}")
    print(f"\n({TIME_LIMIT_S - (deadline - time.monotonic()):.0f} s in all)")
    if interrupted:
        return 130
    return 0 if rows and all(r.ok for r in rows) and len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
