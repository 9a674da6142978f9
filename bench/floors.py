"""floors: what each building block of a job costs on this machine, alone.

The speed targets are bounded by per-call costs that Conveyor's own code does not
set: a gRPC call in Python, a persistent AMQP publish with confirm, a Postgres
commit, an anthropic SDK call. This measures each one by itself, on the same
local servers as `make bench`, so the bounds quoted in the README can be
reproduced:

- grpc.aio server: CPU per unary call of a server that does nothing (h2load,
  else Python clients, 50 connections, closed loop);
- grpc.aio client: CPU per call of the Python clients the bench also uses;
- aio-pika publish: CPU per persistent message with confirm, in the publisher and
  in RabbitMQ (a durable priority queue like a lane's, in a vhost of its own);
- Postgres: CPU per job of the gateway's INSERT (with the job's history row and
  the triggers), one job per statement and 50; of a claim's and a finish's status
  UPDATEs (with the triggers), one job per statement and 50; and the client's CPU per small
  statement through SQLAlchemy's Connection against the pool's asyncpg connection
  itself (conveyor.db.engine.fetch, used on every job's path);
- anthropic SDK: CPU per streamed call against the simulator at 0 ms, beside a
  plain aiohttp request for the same answer;
- request body validation (conveyor.contract.request_body): CPU per check of a 10-message
  body with one tool against the anthropic SDK's types (target: at most 300 µs);
- waking a process: the round trip of a byte between two processes over loopback
  TCP (median), back to back and after the other side sat idle for 2 and 20 ms.
  A job crosses such a hop about ten times before its model call starts; on a
  virtual machine a vCPU that went idle takes far longer to wake than a busy one;
- RabbitMQ memory for a backlog (bench.backlog_floor, on nodes of its own): the
  idle node's RSS, and the memory per queued message of a lane queue and of the
  smallest persistent message in a lazy queue;
- the latency targets' paths built from these blocks alone and timed
  (bench.latency_floors): SubmitJob offered 1,000/s, a job's overhead at 50/s.

    python -m bench.floors [--calls N] [--out FILE]   # prints the figures and writes them
                                                       # (default bench/results/floors-<UTC>.json)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg
import grpc

from bench import backlog_floor, h2load, report
from bench.harness import (
    cpu_ticks,
    gateway_clients,
    postgres_ticks,
    rabbit_pid,
    submit_load,
)
from conveyor.bus import broker
from conveyor.core.config import Settings
from conveyor.db import jobs as db
from conveyor.db.engine import create_engine, fetch
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc
from devtools import sandbox

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 50
MODEL = "claude-sonnet-4-5"
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


def _request(i: int = 0) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        model=MODEL,
        messages=[jobs_pb2.Message(role="user", content=f"benchmark job {i}: say something")],
        max_tokens=64,
    )


def _own_cpu_ms() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1000.0


async def _per_call_us(
    n: int, run: Callable[[], Awaitable[None]], *others: Callable[[], int]
) -> tuple[float, ...]:
    """µs of CPU per call: this process's, then each of `others` (tick counters)."""
    before = [f() for f in others]
    mine = _own_cpu_ms()
    await run()
    own = (_own_cpu_ms() - mine) * 1000.0 / n
    return (own, *((f() - b) * TICK_MS * 1000.0 / n for f, b in zip(others, before, strict=True)))


# --------------------------------------------------------------------------- gRPC


class _Nothing(jobs_pb2_grpc.JobServiceServicer):
    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        return jobs_pb2.SubmitJobResponse(job=jobs_pb2.Job(id=str(uuid.UUID(int=1))))


async def _serve_nothing(port: int) -> None:
    server = grpc.aio.server()
    # Only SubmitJob is called; the stubs' other methods answer UNIMPLEMENTED.
    jobs_pb2_grpc.add_JobServiceServicer_to_server(_Nothing(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def grpc_floors(calls: int) -> dict[str, float]:
    port = sandbox.free_port()
    target = f"127.0.0.1:{port}"
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.floors", "--serve-grpc", str(port), cwd=ROOT
    )
    try:
        async with gateway_clients(target, 1):
            pass  # it is up
        out: dict[str, float] = {}
        if h2load.available():
            _, server_us = await _per_call_us(
                calls, lambda: _h2(target, calls), lambda: cpu_ticks(server.pid)
            )
            out["grpc.aio server, CPU per call (h2load)"] = server_us
        requests = [_request(i) for i in range(calls)]

        async def python_load() -> None:
            await submit_load(target, requests, CLIENTS)

        client_us, server_us = await _per_call_us(calls, python_load, lambda: cpu_ticks(server.pid))
        out["grpc.aio client (Python), CPU per call"] = client_us
        out["grpc.aio server, CPU per call (Python clients)"] = server_us
        return out
    finally:
        server.terminate()
        await server.wait()


async def _h2(target: str, calls: int) -> None:
    await h2load.submit_load(target, _request(), calls, CLIENTS)


# --------------------------------------------------------------------------- RabbitMQ


async def amqp_floors(url: str, messages: int) -> dict[str, float]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"floors-{uuid.uuid4().hex[:8]}",
            durable=True,
            arguments=broker._lane_arguments(9),
        )
        body = broker.JobMessage(uuid.uuid4(), "default").encode()
        headers = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}

        async def publish() -> None:
            for _ in range(0, messages, CLIENTS):
                await asyncio.gather(
                    *(
                        channel.default_exchange.publish(
                            aio_pika.Message(
                                body,
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                priority=1,
                                headers={**headers, broker.PUBLISHED_AT_HEADER: time.time_ns()},
                            ),
                            routing_key=queue.name,
                        )
                        for _ in range(CLIENTS)
                    )
                )
            await asyncio.sleep(0.5)  # let RabbitMQ settle what it still writes

        rabbit = rabbit_pid()
        client_us, rabbit_us = await _per_call_us(
            messages, publish, lambda: cpu_ticks(rabbit) if rabbit else 0
        )
        await queue.delete(if_unused=False, if_empty=False)
        return {
            "aio-pika publish (persistent, confirmed), publisher CPU per message": client_us,
            "RabbitMQ CPU per persistent message (priority queue)": rabbit_us,
        }
    finally:
        await connection.close()


# --------------------------------------------------------------------------- Postgres


def _floor_jobs(n: int) -> list[db.NewJob]:
    """`n` small jobs of the default tenant, as the Postgres floors insert them."""
    return [
        db.NewJob(
            tenant="default",
            model=MODEL,
            request={"max_tokens": 64, "messages": []},
            lane="default",
            priority=0,
            max_attempts=3,
            timeout_ms=600_000,
            request_hash="0" * 64,
        )
        for _ in range(n)
    ]


async def postgres_floors(database_url: str, rows: int) -> dict[str, float]:
    pool = await asyncpg.create_pool(database_url.replace("+asyncpg", ""), min_size=4, max_size=4)
    out: dict[str, float] = {}
    try:
        for batch in (1, 50):

            async def insert(size: int = batch) -> None:
                jobs = _floor_jobs(size)
                params = db.insert_params(jobs, ["floors"] * size, datetime.now(UTC))
                async with pool.acquire() as conn:
                    await conn.fetch(db._INSERT, *params)

            statements = max(1, rows // batch)

            async def run(n: int = statements, one: Callable[[], Awaitable[None]] = insert) -> None:
                sem = asyncio.Semaphore(4)

                async def go() -> None:
                    async with sem:
                        await one()

                await asyncio.gather(*(go() for _ in range(n)))

            _, pg_us = await _per_call_us(statements * batch, run, postgres_ticks)
            out[f"Postgres CPU per job, INSERTs of {batch} job(s) each"] = pg_us
    finally:
        await pool.close()
    out |= await _status_floors(database_url, rows)
    return out | await _client_statement_floors(database_url, rows)


# A claim and a finish reduced to their status change (no history rows, no lease
# check): what Postgres spends per job on the row, its indexes and the jobs triggers.
_CLAIM_LIKE = (
    "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_id = gen_random_uuid(),"
    " heartbeat_at = now(), started_at = now(), updated_at = now(), seq = seq + 1"
    " WHERE id = ANY($1::uuid[]) AND status = 'pending'"
)
_FINISH_LIKE = (
    "UPDATE jobs SET status = 'succeeded', result_text = 'Hi', input_tokens = 10,"
    " output_tokens = 20, finished_at = now(), lease_id = NULL, heartbeat_at = NULL,"
    " updated_at = now(), seq = seq + 1 WHERE id = ANY($1::uuid[]) AND status = 'running'"
)


async def _status_floors(database_url: str, rows: int) -> dict[str, float]:
    """Postgres CPU per job of its two status UPDATEs (claim, finish), one job per
    statement and 50, over 4 connections."""
    url = database_url.replace("+asyncpg", "")
    pool = await asyncpg.create_pool(url, min_size=4, max_size=4)
    out: dict[str, float] = {}
    try:
        for batch in (1, 50):
            jobs = _floor_jobs(rows)
            for i in range(0, rows, 500):
                chunk = jobs[i : i + 500]
                params = db.insert_params(chunk, ["floors"] * len(chunk), datetime.now(UTC))
                await pool.fetch(db._INSERT, *params)
            groups = [[j.id for j in jobs[i : i + batch]] for i in range(0, rows, batch)]

            async def run(groups: list[list[uuid.UUID]] = groups) -> None:
                sem = asyncio.Semaphore(4)

                async def go(stmt: str, ids: list[uuid.UUID]) -> None:
                    async with sem:
                        await pool.execute(stmt, ids)

                for stmt in (_CLAIM_LIKE, _FINISH_LIKE):
                    await asyncio.gather(*(go(stmt, ids) for ids in groups))

            _, pg_us = await _per_call_us(rows, run, postgres_ticks)
            out[f"Postgres CPU per job, claim and finish UPDATEs of {batch} job(s) each"] = pg_us
    finally:
        await pool.close()
    return out


async def _client_statement_floors(database_url: str, statements: int) -> dict[str, float]:
    engine = create_engine(database_url)
    sql, args = "SELECT $1::uuid AS id, now() AS at", (uuid.uuid4(),)
    try:

        async def sqlalchemy() -> None:
            for _ in range(statements):
                async with engine.connect() as conn:
                    (await conn.exec_driver_sql(sql, args)).mappings().all()

        async def driver() -> None:
            for _ in range(statements):
                await fetch(engine, sql, args)

        await driver()  # the pool's first connection and the prepared statement
        via_sqlalchemy, *_ = await _per_call_us(statements, sqlalchemy)
        via_driver, *_ = await _per_call_us(statements, driver)
    finally:
        await engine.dispose()
    return {
        "one-row statement, client CPU through SQLAlchemy's Connection": via_sqlalchemy,
        "one-row statement, client CPU on the pool's asyncpg connection": via_driver,
    }


# --------------------------------------------------------------------------- SDK


async def sdk_floors(calls: int) -> dict[str, float]:
    from conveyor.llm.provider import Provider

    settings = Settings()
    simulator = settings.provider_base_url
    body = {"max_tokens": 64, "messages": [{"role": "user", "content": "say something"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{simulator}/control", json={"latency_ms": 0}) as resp:
            await resp.json()

        async def raw() -> None:
            for _ in range(calls):
                async with http.post(
                    f"{simulator}/v1/messages",
                    json={**body, "model": MODEL, "stream": True},
                    headers={"x-api-key": "simulator", "anthropic-version": "2023-06-01"},
                ) as resp:
                    await resp.read()

        raw_us, *_ = await _per_call_us(calls, raw)
    provider = Provider(settings)
    try:

        async def sdk() -> None:
            for _ in range(calls):
                await provider.stream(MODEL, body, lambda *piece: None)

        sdk_us, *_ = await _per_call_us(calls, sdk)
    finally:
        await provider.close()
    return {
        "plain aiohttp streamed request to the simulator, CPU per call": raw_us,
        "anthropic SDK streamed call (conveyor.llm.provider), CPU per call": sdk_us,
    }


# --------------------------------------------------------------------------- request bodies


def _ten_message_body() -> dict[str, object]:
    """A 10-message tool-use conversation with one tool, as a client would send it."""
    messages: list[dict[str, object]] = []
    for i in range(5):
        messages.append(
            {"role": "user", "content": [{"type": "text", "text": f"Weather in city {i}?"}]}
        )
        call = {
            "type": "tool_use",
            "id": f"toolu_{i}",
            "name": "get_weather",
            "input": {"city": f"City {i}"},
        }
        messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, call]}
        )
    tool = {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    }
    return {
        "model": MODEL,
        "max_tokens": 1024,
        "system": "Be brief.",
        "messages": messages,
        "tools": [tool],
    }


def body_validation_floors(calls: int) -> dict[str, float]:
    from conveyor.contract.request_body import (
        BodyLimits,
        estimate_input_tokens,
        validate_body,
        warm_up,
    )

    warm_up()
    body, limits = _ten_message_body(), BodyLimits.from_settings(Settings())
    validate_body(body, limits)
    mine = _own_cpu_ms()
    for _ in range(calls):
        validate_body(body, limits)
    validate_us = (_own_cpu_ms() - mine) * 1000.0 / calls
    mine = _own_cpu_ms()
    for _ in range(calls):
        estimate_input_tokens(body)
    estimate_us = (_own_cpu_ms() - mine) * 1000.0 / calls
    return {
        "request body validation, 10 messages and 1 tool, CPU per body": validate_us,
        "request body input-token estimate, same body, CPU per body": estimate_us,
    }


# --------------------------------------------------------------------------- waking up

WAKE_GAPS_MS = (0.0, 2.0, 20.0)


async def _serve_echo(port: int) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64):
            writer.write(data)

    server = await asyncio.start_server(echo, "127.0.0.1", port)
    await server.serve_forever()


async def wake_floors(rounds: int) -> dict[str, float]:
    port = sandbox.free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.floors", "--serve-echo", str(port), cwd=ROOT
    )
    try:
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the echo server did not start")
        out: dict[str, float] = {}
        for gap_ms in WAKE_GAPS_MS:
            took: list[float] = []
            for _ in range(rounds):
                began = time.perf_counter()
                writer.write(b"x")
                await reader.read(64)
                took.append((time.perf_counter() - began) * 1e6)
                if gap_ms:
                    await asyncio.sleep(gap_ms / 1000)
            label = "back to back" if not gap_ms else f"after {gap_ms:g} ms idle"
            out[f"loopback round trip between two processes, {label} (median)"] = sorted(took)[
                len(took) // 2
            ]
        writer.close()
        return out
    finally:
        server.terminate()
        await server.wait()


# --------------------------------------------------------------------------- main


async def measure(backing: sandbox.Backing, calls: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    figures |= await grpc_floors(calls)
    figures |= await amqp_floors(backing.amqp_url, calls)
    figures |= await postgres_floors(backing.database_url, calls)
    figures |= await sdk_floors(max(100, calls // 20))
    figures |= await wake_floors(max(50, min(500, calls // 20)))
    figures |= body_validation_floors(calls)
    return figures


@contextlib.contextmanager
def simulator_backing() -> Iterator[tuple[sandbox.Backing, str]]:
    """A vhost and a database of their own, with the simulator running: the backing
    and the simulator's URL."""
    with sandbox.backing_services(f"conveyor-floors-{os.getpid()}") as backing:
        stack = sandbox.Stack(backing, ROOT / "run" / "floors" / str(os.getpid()))
        try:
            stack.start("simulator")
            yield backing, stack.simulator_url
        finally:
            stack.stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floors", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--calls", type=int, default=10_000, help="calls per measurement")
    parser.add_argument(
        "--out", type=Path, help="the JSON file (default: bench/results/floors-<UTC>.json)"
    )
    parser.add_argument(
        "--backlog", type=int, help="messages queued for the memory floor (default: 10 × calls)"
    )
    parser.add_argument("--serve-grpc", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_grpc or args.serve_echo:
        import uvloop

        uvloop.run(
            _serve_nothing(args.serve_grpc) if args.serve_grpc else _serve_echo(args.serve_echo)
        )
        return 0
    from bench import latency_floors  # it builds on this module's pieces

    machine = report.machine(ROOT)
    with simulator_backing() as (backing, simulator):
        import uvloop

        figures = uvloop.run(measure(backing, args.calls))
        latency = latency_floors.measure_sized(backing, simulator, args.calls)
    memory = backlog_floor.measure(args.backlog or 10 * args.calls)
    print(f"Conveyor floors — {report.describe_machine(machine)}")
    for label, value in figures.items():
        print(f"  {label}: {value:,.0f} µs")
    for label, value in memory.items():
        print(f"  {label}: {value:,.1f}")
    latency_floors.print_figures(latency)
    out = args.out or ROOT / "bench" / "results" / f"floors-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "calls": args.calls,
                "us": figures,
                "memory": memory,
                "latency": latency,
            },
            indent=1,
        )
    )
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
