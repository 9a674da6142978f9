"""What the fault scenarios share: the stack's settings for chaos, the `Chaos` rig
(time budget, the simulator's call counts, database queries, submit loads, service
control) and the accounting of what became of every job."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import grpc
import grpc.aio

from bench.harness import gateway_clients
from conveyor.core import lifecycle
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc
from devtools import sandbox

from .results import Row

TEARDOWN_RESERVE_S = 30.0
"""Seconds of the run's time limit kept for stopping everything."""
MODEL = "claude-sonnet-4-5"
TENANT = "chaos"
TERMINAL = tuple(sorted(str(state) for state in lifecycle.TERMINAL))
"""The terminal states, as the database spells them."""

CHAOS_ENV = {
    # Short timers, so recovery paths run within the time box. The lease leaves a
    # starved machine's heartbeats room: a worker aborts a call whose lease it could
    # not renew for lease - heartbeat seconds (bench/README.md: why 8 s).
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
