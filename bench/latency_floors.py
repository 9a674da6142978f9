"""latency_floors: how low the two latency targets of issue 19 can go on this machine,
measured on the same building blocks with none of Conveyor's own work.

`bench.floors` gives what each block costs alone in CPU; this chains them as a job's path
does and times the chain, so a missed latency target can be held against the least
that path takes here:

- SubmitJob offered 1,000/s (target: p99 ≤ 10 ms). h2load paces the calls as
  `bench submit` does (50 connections) against grpc.aio servers, as many processes as
  the bench's gateway, sharing one port, that
  1. answer at once;
  2. insert the job first, then answer: Conveyor's INSERT, in the least group commit
     (the calls that arrive while a statement runs share the next; one job per
     statement costs Postgres too much CPU for 1,000/s on 2 cores: `bench.floors`);
  3. also publish each group's messages once answered, persistent and confirmed, in
     one write (`broker.publish_jobs`, as the gateway does: accepted means committed,
     the message follows).
- Overhead at 50 jobs/s (target: p50 ≤ 5 ms). Each job is inserted and published here,
  paced; another process consumes it, marks it running (a claim's status UPDATE), makes
  a streamed Messages call through the anthropic SDK to the simulator (1,000 ms to the
  first token, as `bench end-to-end`), marks it finished and acks. The overhead is
  finished_at − created_at − 1,000 ms, from the database's clock, as the bench measures
  Conveyor's.

    python -m bench.latency_floors [--quick] [--out FILE]

`python -m bench.floors` runs them too, after the blocks' CPU floors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import anthropic
import asyncpg
import grpc
import uvloop

from bench import h2load, report
from bench.floors import MODEL, _floor_jobs, _request, simulator_backing
from bench.harness import ResourceMeter, gateway_clients, submit_load, summarize
from conveyor.bus import broker
from conveyor.db import jobs as db
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc
from devtools import sandbox

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 50
SUBMIT_RATE = 1_000.0
SUBMIT_MODES = (
    "answer at once",
    "grouped INSERT, then answer",
    "grouped INSERT, answer, the group's confirmed publish",
)
CHAIN_RATE = 50.0
MODEL_LATENCY_MS = 1_000.0
QUEUE_PRIORITIES = 9

_CLAIM_ONE = (
    "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_id = gen_random_uuid(),"
    " heartbeat_at = now(), started_at = now(), updated_at = now(), seq = seq + 1"
    " WHERE id = $1 AND status = 'pending'"
)
_FINISH_ONE = (  # the row keeps the model call's own time ($3, ms) for the chain's figures
    "UPDATE jobs SET status = 'succeeded', result_text = $2, finished_at = now(),"
    " result = jsonb_build_object('call_ms', $3::float8),"
    " lease_id = NULL, heartbeat_at = NULL, updated_at = now(), seq = seq + 1"
    " WHERE id = $1 AND status = 'running'"
)


def _pg(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _insert_one(pool: asyncpg.Pool) -> uuid.UUID:
    """One job inserted by Conveyor's INSERT statement (with its history row and the
    triggers), alone in its statement; its id."""
    (job,) = _floor_jobs(1)
    params = db.insert_params([job], ["floors"], datetime.now(UTC))
    async with pool.acquire() as conn:
        await conn.fetch(db._INSERT, *params)
    return job.id


async def _publish(exchange: aio_pika.abc.AbstractExchange, queue: str, job_id: uuid.UUID) -> None:
    await exchange.publish(
        aio_pika.Message(
            str(job_id).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT, priority=1
        ),
        routing_key=queue,
    )


@asynccontextmanager
async def _amqp(url: str, queue: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A confirming channel, with `queue` declared as a lane is (durable, priorities)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(
            queue, durable=True, arguments=broker._lane_arguments(QUEUE_PRIORITIES)
        )
        yield channel
    finally:
        await connection.close()


# --------------------------------------------------------------------------- SubmitJob


class _GroupInsert:
    """The least group commit: the submits that arrive while a statement runs go
    together in the next one (Conveyor's INSERT), one statement at a time, no pacing;
    with an `exchange`, each group's messages are then published together and
    confirmed (`broker.publish_jobs`: the cheapest publish there is here)."""

    def __init__(
        self, pool: asyncpg.Pool, exchange: aio_pika.abc.AbstractExchange | None, queue: str
    ) -> None:
        self.pool, self.exchange, self.queue = pool, exchange, queue
        self.waiting: list[asyncio.Future[uuid.UUID]] = []
        self.draining: asyncio.Task[None] | None = None
        self.publishing: set[asyncio.Task[Any]] = set()

    async def insert(self) -> uuid.UUID:
        done: asyncio.Future[uuid.UUID] = asyncio.get_running_loop().create_future()
        self.waiting.append(done)
        if self.draining is None:
            self.draining = asyncio.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        while self.waiting:
            group, self.waiting = self.waiting, []
            jobs = _floor_jobs(len(group))
            params = db.insert_params(jobs, ["floors"] * len(jobs), datetime.now(UTC))
            async with self.pool.acquire() as conn:
                await conn.fetch(db._INSERT, *params)
            if self.exchange is not None:  # accepted means committed; the messages follow
                messages = [
                    broker.JobPublish(broker.JobMessage(job.id, job.tenant), self.queue, 1, {})
                    for job in jobs
                ]
                task = asyncio.create_task(broker.publish_jobs(self.exchange, messages))
                self.publishing.add(task)
                task.add_done_callback(self.publishing.discard)
            for done, job in zip(group, jobs, strict=True):
                done.set_result(job.id)
        self.draining = None


class _Submit(jobs_pb2_grpc.JobServiceServicer):
    """SubmitJob reduced to the blocks of its `inserts` (none: it answers at once)."""

    def __init__(self, inserts: _GroupInsert | None) -> None:
        self.inserts = inserts

    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        job_id = uuid.UUID(int=1) if self.inserts is None else await self.inserts.insert()
        return jobs_pb2.SubmitJobResponse(job=jobs_pb2.Job(id=str(job_id)))


async def _serve_submit(port: int, mode: int, database_url: str, amqp_url: str) -> None:
    pool = await asyncpg.create_pool(_pg(database_url), min_size=2, max_size=2)
    queue = "latency-floors-submit"
    async with _amqp(amqp_url, queue) as channel:
        exchange = channel.default_exchange if mode >= 2 else None
        inserts = _GroupInsert(pool, exchange, queue) if mode >= 1 else None
        # Only SubmitJob is called; the stubs' other methods answer UNIMPLEMENTED.
        servicer = _Submit(inserts)  # type: ignore[abstract]
        server = grpc.aio.server()
        jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")  # SO_REUSEPORT: the processes share it
        await server.start()
        await server.wait_for_termination()


async def submit_floors(backing: sandbox.Backing, calls: int, processes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, name in enumerate(SUBMIT_MODES):
        port = sandbox.free_port()
        target = f"127.0.0.1:{port}"
        servers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.latency_floors",
                "--serve-submit",
                str(port),
                str(mode),
                backing.database_url,
                backing.amqp_url,
                cwd=ROOT,
            )
            for _ in range(processes)
        ]
        try:
            async with gateway_clients(target, processes * 2):
                pass  # they are up
            pids = {f"server {i}": s.pid for i, s in enumerate(servers)}
            meter = ResourceMeter(pids)
            meter.start()
            if h2load.available():
                load = await h2load.submit_load(
                    target, _request(), calls, CLIENTS, rate=SUBMIT_RATE
                )
            else:
                requests = [_request(i) for i in range(calls)]
                load = await submit_load(target, requests, CLIENTS, rate=SUBMIT_RATE)
            cpu = meter.stop()
            out[name] = {
                "latency_ms": summarize(load.latencies_s, 1000.0),
                "achieved_per_s": load.jobs_per_s,
                "errors": load.errors,
                "cpu": submit_cpu(cpu, calls, list(pids)),
            }
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                await server.wait()
    out["load_generator"] = "h2load" if h2load.available() else "Python clients"
    out["processes"] = processes
    return out


def submit_cpu(cpu: Mapping[str, float], calls: int, servers: Sequence[str]) -> dict[str, float]:
    """CPU ms per call from a ResourceMeter's figures over a submit load: the whole
    machine's (`machine`, the load generator's included), how busy that kept it
    (`machine_busy`: a share of all its cores over the load's wall time), Postgres',
    RabbitMQ's, and the `servers` processes' together (`servers`)."""
    return {
        "machine": cpu.get("machine", 0.0) / calls,
        "machine_busy": cpu.get("machine", 0.0) / max(1.0, cpu["wall"]) / (os.cpu_count() or 1),
        "postgres": cpu.get("postgres", 0.0) / calls,
        "rabbitmq": cpu.get("rabbitmq", 0.0) / calls,
        "servers": sum(cpu.get(name, 0.0) for name in servers) / calls,
    }


# --------------------------------------------------------------------------- a job's chain


async def _serve_worker(database_url: str, amqp_url: str, queue: str, simulator: str) -> None:
    """Consume `queue`: mark each job running, call the model, mark it finished, ack."""
    pool = await asyncpg.create_pool(_pg(database_url), min_size=4, max_size=10)
    client = anthropic.AsyncAnthropic(
        api_key="simulator",
        base_url=simulator,
        max_retries=0,
        http_client=anthropic.DefaultAioHttpClient(),
    )
    headers = {"x-sim-latency-ms": f"{MODEL_LATENCY_MS:g}", "x-sim-tokens-per-second": "0"}

    async def run(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        job_id = uuid.UUID(message.body.decode())
        async with pool.acquire() as conn:
            await conn.execute(_CLAIM_ONE, job_id)
        text = b""
        called = time.perf_counter()
        async with client.messages.with_streaming_response.create(
            model=MODEL,
            max_tokens=64,
            messages=[{"role": "user", "content": "say something"}],
            stream=True,
            extra_headers=headers,
        ) as response:
            async for chunk in response.http_response.aiter_bytes():
                text += chunk
        call_ms = (time.perf_counter() - called) * 1000.0
        async with pool.acquire() as conn:
            await conn.execute(_FINISH_ONE, job_id, f"{len(text)} bytes", call_ms)
        await message.ack()

    running: set[asyncio.Task[None]] = set()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        task = asyncio.create_task(run(message))
        running.add(task)
        task.add_done_callback(running.discard)

    async with _amqp(amqp_url, queue) as channel:
        await channel.set_qos(prefetch_count=1_000)
        consumed = await channel.get_queue(queue)
        await consumed.consume(on_message)
        print("consuming", flush=True)
        await asyncio.Future()


async def chain_floor(backing: sandbox.Backing, simulator: str, jobs: int) -> dict[str, Any]:
    queue = "latency-floors-chain"
    pool = await asyncpg.create_pool(_pg(backing.database_url), min_size=4, max_size=10)
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.latency_floors",
        "--serve-worker",
        backing.database_url,
        backing.amqp_url,
        queue,
        simulator,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert worker.stdout is not None
        await asyncio.wait_for(worker.stdout.readline(), 60)  # "consuming"
        async with _amqp(backing.amqp_url, queue) as channel:
            ids: list[uuid.UUID] = []

            async def submit() -> None:
                job_id = await _insert_one(pool)
                ids.append(job_id)
                await _publish(channel.default_exchange, queue, job_id)

            loop = asyncio.get_running_loop()
            start = loop.time()
            submits = []
            for i in range(jobs):
                await asyncio.sleep(max(0.0, start + i / CHAIN_RATE - loop.time()))
                submits.append(asyncio.create_task(submit()))
            await asyncio.gather(*submits)
            deadline = time.monotonic() + 60 + MODEL_LATENCY_MS / 1000
            rows: list[asyncpg.Record] = []
            while time.monotonic() < deadline:
                rows = await pool.fetch(
                    "SELECT extract(epoch FROM finished_at - created_at) AS total,"
                    " extract(epoch FROM started_at - created_at) AS queued,"
                    " (result->>'call_ms')::float8 AS call_ms FROM jobs"
                    " WHERE id = ANY($1::uuid[]) AND finished_at IS NOT NULL",
                    ids,
                )
                if len(rows) == len(ids):
                    break
                await asyncio.sleep(0.2)
        model_s = MODEL_LATENCY_MS / 1000
        return {
            "jobs": jobs,
            "finished": len(rows),
            "overhead_ms": summarize((float(r["total"]) - model_s for r in rows), 1000.0),
            "queue_wait_ms": summarize((float(r["queued"]) for r in rows), 1000.0),
            # The SDK's streamed call to the simulator, beyond the model's latency.
            "model_call_ms": summarize((float(r["call_ms"]) - MODEL_LATENCY_MS for r in rows), 1.0),
        }
    finally:
        worker.terminate()
        await worker.wait()
        await pool.close()


# --------------------------------------------------------------------------- main


async def measure(
    backing: sandbox.Backing, simulator: str, calls: int, jobs: int, processes: int
) -> dict[str, Any]:
    return {
        "submit": await submit_floors(backing, calls, processes),
        "chain": await chain_floor(backing, simulator, jobs),
    }


def measure_sized(backing: sandbox.Backing, simulator: str, calls: int) -> dict[str, Any]:
    """`measure` with `calls` SubmitJob calls per server (at least 300) and a tenth of
    them as jobs of the chain (at least 20, at most 500), as many server processes as
    the bench's gateway (bench.__main__.bench_env)."""
    calls = max(300, calls)
    processes = int(os.environ.get("CONVEYOR_GATEWAY_PROCESSES", str(os.cpu_count() or 1)))
    jobs = min(500, max(20, calls // 10))
    return uvloop.run(measure(backing, simulator, calls, jobs, processes))


def print_figures(figures: dict[str, Any]) -> None:
    submit = figures["submit"]
    print(
        f"SubmitJob offered {SUBMIT_RATE:,.0f}/s ({submit['load_generator']}, "
        f"{submit['processes']} server processes):"
    )
    for name in SUBMIT_MODES:
        lat, cpu = submit[name]["latency_ms"], submit[name]["cpu"]
        print(
            f"  {name}: p50 {lat.get('p50', 0):.2f} ms  p99 {lat.get('p99', 0):.2f} ms"
            f"  ({submit[name]['achieved_per_s']:,.0f}/s achieved); CPU per call:"
            f" machine {cpu['machine']:.3f} ms ({cpu['machine_busy']:.0%} busy),"
            f" servers {cpu['servers']:.3f}, Postgres {cpu['postgres']:.3f},"
            f" RabbitMQ {cpu['rabbitmq']:.3f}"
        )
    chain = figures["chain"]
    over, queued, call = chain["overhead_ms"], chain["queue_wait_ms"], chain["model_call_ms"]
    print(
        f"a job's chain at {CHAIN_RATE:g}/s ({chain['finished']} of {chain['jobs']} jobs): "
        f"overhead p50 {over.get('p50', 0):.2f} ms  p99 {over.get('p99', 0):.2f} ms; "
        f"of which queue wait p50 {queued.get('p50', 0):.2f} ms, the model call beyond its"
        f" {MODEL_LATENCY_MS:g} ms p50 {call.get('p50', 0):.2f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency_floors", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument(
        "--out", type=Path, help="the JSON file (default: bench/results/latency-floors-<UTC>.json)"
    )
    parser.add_argument("--serve-submit", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--serve-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_submit:
        port, mode, database_url, amqp_url = args.serve_submit
        uvloop.run(_serve_submit(int(port), int(mode), database_url, amqp_url))
        return 0
    if args.serve_worker:
        uvloop.run(_serve_worker(*args.serve_worker))
        return 0
    machine = report.machine(ROOT)
    with simulator_backing() as (backing, simulator):
        figures = measure_sized(backing, simulator, 300 if args.quick else 5_000)
    print(f"Conveyor latency floors — {report.describe_machine(machine)}")
    print_figures(figures)
    out = args.out or (
        ROOT / "bench" / "results" / f"latency-floors-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.write_text(json.dumps({"machine": machine, **figures}, indent=1))
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
