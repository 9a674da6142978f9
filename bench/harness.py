"""What every benchmark scenario shares: the stack under test, load generators,
process accounting (CPU, memory), the database queries that time jobs, and the
shape of a scenario's result.

A scenario is a module with `NAME` (its command-line name), `TITLE`, and

    async def run(ctx: Context) -> Result

`ctx` gives it the isolated stack (`ctx.stack`: gateway, notifier and simulator
addresses, start and stop of single services), the counts to use (`ctx.counts`,
smaller under `--quick`), the simulator's `/control` (`ctx.sim_set`), a
`ctx.reset()` that empties queues and tables between scenarios, a pool on the
run's database (`ctx.db`), and helpers to submit load and wait for the jobs.
The harness measures the CPU time of every process during `run` by itself.

Its parts: `bench.result` (Result, Figure, statistics), `bench.resources` (CPU and
memory of the processes), `bench.load` (submit load); the scenarios import them
from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiohttp
import asyncpg

from bench.load import LoadResult, gateway_clients, latency_figures, submit_load
from bench.resources import (
    SERVICES,
    ResourceMeter,
    cpu_ticks,
    memory_kb,
    postgres_ticks,
    rabbit_memory,
    rabbit_pid,
    system_cpu_ms,
)
from bench.result import Figure, Result, Verdict, median_of, percentile, rounded, summarize
from conveyor.bus import broker
from conveyor.core import lifecycle
from conveyor.v1 import jobs_pb2
from devtools import sandbox

__all__ = [
    "MODEL",
    "SERVICES",
    "SIM_DEFAULTS",
    "TERMINAL",
    "Context",
    "Counts",
    "Figure",
    "JobTimes",
    "LoadResult",
    "ResourceMeter",
    "Result",
    "Verdict",
    "cpu_ticks",
    "gateway_clients",
    "latency_figures",
    "median_of",
    "memory_kb",
    "percentile",
    "postgres_ticks",
    "rabbit_memory",
    "rabbit_pid",
    "rounded",
    "submit_load",
    "summarize",
    "system_cpu_ms",
]

MODEL = "claude-sonnet-4-5"
TERMINAL = tuple(sorted(str(state) for state in lifecycle.TERMINAL))
"""The terminal states, as the database spells them."""
SIM_DEFAULTS: dict[str, Any] = {
    "latency_ms": 0.0,
    "tokens_per_second": 0.0,
    "output_tokens": 24,
    "rate_429": 0.0,
    "rate_529": 0.0,
    "rate_500": 0.0,
    "rate_drop": 0.0,
    "rate_error_event": 0.0,
    "retry_after_s": 1.0,
    "seed": 1234,
}
"""The simulator's configuration at the start of every scenario."""


# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class Counts:
    """How much work each scenario does; `quick()` is the smoke-test size."""

    submit_jobs: int = 5_000
    submit_clients: int = 50
    submit_rate: float = 1_500.0
    """Offered load of the second paced SubmitJob run (jobs/s, spread over the clients)."""
    submit_target_rate: float = 1_000.0
    """Offered load of the paced SubmitJob run whose p99 is judged (issue 19: p99 ≤ 10 ms
    at 1,000/s)."""
    batch_size: int = 100
    e2e_jobs: int = 2_000
    latency_ms: float = 1_000.0
    """Simulator latency (time to first token) of end-to-end, storm and paced runs."""
    paced_rate: float = 50.0
    """Jobs/s of the unsaturated end-to-end run: well below what a 2-core machine
    completes with every service on it, so no job waits for CPU."""
    paced_jobs: int = 500
    idle_rate: float = 10.0
    """Jobs/s of a second unsaturated run, nearer idle: on a virtual machine the
    overhead grows as the load falls, each process having gone idle between jobs."""
    idle_jobs: int = 200
    single_jobs: int = 100
    """Jobs of the one-at-a-time end-to-end run (simulator at 0 ms)."""
    hold_jobs: int = 5_000
    """Jobs of the held-open end-to-end run: as many as its worker holds at once."""
    hold_concurrency: int = 5_000
    """The worker concurrency of the held-open run, which starts a worker of its own for
    it (DESIGN.md: one worker holds 5,000 calls); the other runs keep the bench's."""
    hold_latency_ms: float = 60_000.0
    """A slow model (as real calls are), so the worker fills up before the first ends:
    claiming 5,000 jobs takes one worker tens of seconds on a 2-core machine."""
    storm_jobs: int = 2_000
    storm_max_attempts: int = 10
    stream_jobs: int = 200
    backlog_jobs: int = 100_000
    backlog_clients: int = 8
    drain_limit_s: float = 120.0
    cost_jobs: int = 2_000
    job_timeout_s: float = 600.0
    """Longest a scenario waits for its jobs to finish."""

    @classmethod
    def quick(cls) -> Counts:
        return cls(
            submit_jobs=300,
            submit_clients=20,
            batch_size=20,
            e2e_jobs=100,
            latency_ms=200.0,
            paced_rate=50.0,
            paced_jobs=25,
            idle_jobs=5,
            single_jobs=10,
            hold_jobs=40,
            hold_concurrency=40,
            hold_latency_ms=1_000.0,
            storm_jobs=20,
            stream_jobs=10,
            backlog_jobs=300,
            backlog_clients=4,
            drain_limit_s=3.0,
            cost_jobs=100,
            job_timeout_s=60.0,
        )


# --------------------------------------------------------------------------- the context


@dataclass
class JobTimes:
    """A finished job's timestamps (epoch seconds, the database's clock) and attempts."""

    status: str
    attempts: int
    created: float
    started: float | None
    finished: float | None


class Context:
    """The running stack and what scenarios need around it (see the module docstring)."""

    def __init__(
        self,
        stack: sandbox.Stack,
        counts: Counts,
        quick: bool,
        db: asyncpg.Pool,
        http: aiohttp.ClientSession,
    ) -> None:
        self.stack = stack
        self.counts = counts
        self.quick = quick
        self.db = db
        self.http = http
        self.results: dict[str, Result] = {}
        """Results of the scenarios that ran before, by name (storm compares to end-to-end)."""
        self._ids = itertools.count(1)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, stack: sandbox.Stack, counts: Counts, quick: bool
    ) -> AsyncIterator[Context]:
        """A context for `stack`, with its database pool and HTTP session, closed after."""
        dsn = stack.backing.database_url.replace("postgresql+asyncpg://", "postgresql://")
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                yield cls(stack, counts, quick, pool, http)
        finally:
            await pool.close()

    # -- addresses

    @property
    def gateway(self) -> str:
        return self.stack.gateway

    @property
    def notifier(self) -> str:
        return self.stack.notifier

    @property
    def simulator_url(self) -> str:
        return self.stack.simulator_url

    @property
    def vhost(self) -> str:
        return self.stack.backing.vhost

    @property
    def worker_concurrency(self) -> int:
        return self.stack.settings.worker_concurrency

    def pids(self) -> dict[str, int]:
        """Pids of the simulator and the services running now."""
        return {n: p for n in ("simulator", *SERVICES) if (p := self.stack.pid(n)) is not None}

    # -- services

    def worker_running(self) -> bool:
        return self.stack.pid("worker") is not None

    async def start_worker(self, concurrency: int | None = None) -> None:
        """Start the worker if it is not running; `concurrency` overrides its
        CONVEYOR_WORKER_CONCURRENCY for this process only."""
        if not self.worker_running():
            env = {} if concurrency is None else {"CONVEYOR_WORKER_CONCURRENCY": str(concurrency)}
            await asyncio.to_thread(lambda: self.stack.start("worker", **env))

    async def stop_worker(self) -> None:
        if self.worker_running():
            await asyncio.to_thread(self.stack.stop, "worker")

    # -- simulator

    async def sim_set(self, **changes: Any) -> dict[str, Any]:
        """Change the simulator's configuration (POST /control); returns the new one."""
        async with self.http.post(f"{self.simulator_url}/control", json=changes) as resp:
            body: dict[str, Any] = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"simulator /control refused {changes}: {body}")
            return body

    async def sim_stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.simulator_url}/stats") as resp:
            stats: dict[str, Any] = await resp.json()
            return stats

    # -- between scenarios

    async def reset(self, *, worker: bool) -> None:
        """Empty the lanes and the tables, restore the simulator's defaults, and leave
        the worker running (`worker=True`) or stopped.

        A running worker is restarted only if jobs are unfinished (their messages may
        be unacked in it, out of reach of a purge)."""
        if not worker or (self.worker_running() and await self.unfinished_count() > 0):
            await self.stop_worker()
        async with self.db.acquire() as conn:
            tenants = [r["tenant"] for r in await conn.fetch("SELECT tenant FROM tenants")]
        lanes = self.stack.settings.lanes
        connection = await aio_pika.connect(self.stack.backing.amqp_url)
        try:
            await broker.purge_queues(
                connection,
                [
                    *map(broker.lane_queue, lanes),
                    *(broker.tenant_lane_queue(lane, t) for lane in lanes for t in tenants),
                    broker.DEAD_LETTER_QUEUE,
                ],
            )
        finally:
            await connection.close()
        async with self.db.acquire() as conn:
            # Tenants and keys stay: the gateway registers a tenant (and its queues) once
            # per process, and the next reset finds the tenant queues to purge by them.
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename NOT IN ('alembic_version', 'tenants', 'api_keys')"
            )
            if tables:
                # jobs first: a statement still running on it (an outbox stamp) locks it
                # before the tables its triggers write; locked after them, it deadlocked.
                ordered = sorted((t["tablename"] for t in tables), key=lambda t: t != "jobs")
                names = ", ".join(f'"{t}"' for t in ordered)
                await _truncate(conn, names)
            await conn.execute("UPDATE tenants SET running = 0")
        await self.sim_set(**SIM_DEFAULTS, reset_stats=True)
        if worker:
            await self.start_worker()

    # -- jobs

    def request(
        self, *, label: str, max_attempts: int = 0, labels: Mapping[str, str] | None = None
    ) -> jobs_pb2.SubmitJobRequest:
        """A small, distinct job (one user message, up to 64 output tokens)."""
        n = next(self._ids)
        return jobs_pb2.SubmitJobRequest(
            model=MODEL,
            messages=[jobs_pb2.Message(role="user", content=f"benchmark job {n}: say something")],
            max_tokens=64,
            max_attempts=max_attempts,
            labels={"bench": label, **(labels or {})},
        )

    async def counts_by_status(self) -> dict[str, int]:
        async with self.db.acquire() as conn:
            rows = await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    async def unfinished_count(self) -> int:
        async with self.db.acquire() as conn:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status <> ALL($1::text[])", list(TERMINAL)
            )
        return int(n)

    async def finished_count(self) -> int:
        async with self.db.acquire() as conn:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status = ANY($1::text[])", list(TERMINAL)
            )
        return int(n)

    async def wait_finished(
        self,
        expected: int,
        timeout_s: float | None = None,
        poll_s: float = 0.1,
        on_poll: Callable[[], Any] | None = None,
    ) -> int:
        """Wait until `expected` jobs are terminal (or the timeout); returns how many are."""
        deadline = time.monotonic() + (timeout_s or self.counts.job_timeout_s)
        done = 0
        while time.monotonic() < deadline:
            done = await self.finished_count()
            if on_poll is not None:
                on_poll()
            if done >= expected:
                return done
            await asyncio.sleep(poll_s)
        return done

    async def job_times(self) -> list[JobTimes]:
        async with self.db.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT status, attempts,
                       extract(epoch FROM created_at)::float8 AS c,
                       extract(epoch FROM started_at)::float8 AS s,
                       extract(epoch FROM finished_at)::float8 AS f
                  FROM jobs
                """
            )
        return [JobTimes(r["status"], r["attempts"], r["c"], r["s"], r["f"]) for r in rows]

    @contextlib.asynccontextmanager
    async def in_flight_sampler(self, every_s: float = 0.05) -> AsyncIterator[dict[str, int]]:
        """Polls the simulator's open streams; the dict's `peak` is the most seen at once."""
        seen = {"peak": 0, "samples": 0}

        async def poll() -> None:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    stats = await self.sim_stats()
                    seen["peak"] = max(seen["peak"], int(stats.get("active_streams", 0)))
                    seen["samples"] += 1
                await asyncio.sleep(every_s)

        task = asyncio.create_task(poll())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _truncate(conn: asyncpg.Connection, names: str, tries: int = 5) -> None:
    """TRUNCATE the tables `names`, tried again if Postgres ends it for a deadlock: the
    services' own statements lock the same tables in other orders (the dispatcher's
    batcher reads batches, then jobs; an outbox stamp writes jobs, then the tables of
    its triggers), so no order of the TRUNCATE's avoids them all."""
    for attempt in range(1, tries + 1):
        try:
            await conn.execute(f"TRUNCATE {names} CASCADE")
            return
        except asyncpg.exceptions.DeadlockDetectedError:
            if attempt == tries:
                raise
            await asyncio.sleep(0.1 * attempt)
