"""Submit load on the gateway: closed-loop or paced clients, each on its own
connection, with every call timed."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from bench.result import Result, rounded, summarize
from conveyor.client import error_from_rpc
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc


@dataclass
class LoadResult:
    """What a load run saw from the client side."""

    calls: int = 0
    jobs: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    """Per call; for paced runs measured from the call's scheduled start."""
    service_s: list[float] = field(default_factory=list)
    """Per call, from the moment it was actually sent."""
    elapsed_s: float = 0.0
    job_ids: list[str] = field(default_factory=list)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.elapsed_s if self.elapsed_s > 0 else math.nan

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@contextlib.asynccontextmanager
async def gateway_clients(target: str, n: int) -> AsyncIterator[list[jobs_pb2_grpc.JobServiceStub]]:
    """`n` clients of the gateway, each with its own connection, connected before use."""
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 30)
        yield [jobs_pb2_grpc.JobServiceStub(c) for c in channels]
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


async def submit_load(
    target: str,
    requests: Sequence[jobs_pb2.SubmitJobRequest],
    clients: int,
    *,
    batch_size: int = 0,
    rate: float | None = None,
    keep_ids: bool = False,
) -> LoadResult:
    """Submit `requests` from `clients` concurrent clients and time every call.

    `batch_size` > 0 sends SubmitJobs batches of that size instead of SubmitJob.
    Closed loop (each client sends its next call when the last returns) unless a
    `rate` (calls/s, over all clients) is given: then call i is due at i / rate and
    its latency counts from then, so a stall is not hidden by the clients slowing
    down (no coordinated omission).
    """
    if batch_size > 0:
        calls: list[Any] = [
            jobs_pb2.SubmitJobsRequest(jobs=requests[i : i + batch_size])
            for i in range(0, len(requests), batch_size)
        ]
    else:
        calls = list(requests)
    result = LoadResult()
    next_call = iter(range(len(calls)))

    async def client(stub: jobs_pb2_grpc.JobServiceStub, t0: float) -> None:
        for i in next_call:
            due = t0 + i / rate if rate else None
            if due is not None:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent = time.perf_counter()
            try:
                if batch_size > 0:
                    response = await stub.SubmitJobs(calls[i], timeout=60)
                    jobs = len(response.results)
                    if keep_ids:
                        result.job_ids.extend(r.job.id for r in response.results)
                else:
                    one = await stub.SubmitJob(calls[i], timeout=60)
                    jobs = 1
                    if keep_ids:
                        result.job_ids.append(one.job.id)
            except grpc.aio.AioRpcError as exc:
                err = error_from_rpc(exc)
                result.errors[err.code.name] = result.errors.get(err.code.name, 0) + 1
                continue
            end = time.perf_counter()
            result.calls += 1
            result.jobs += jobs
            result.service_s.append(end - sent)
            result.latencies_s.append(end - (due if due is not None else sent))

    async with gateway_clients(target, clients) as stubs:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(stub, t0) for stub in stubs))
        result.elapsed_s = time.perf_counter() - t0
    return result


def latency_figures(
    result: Result, load: LoadResult, prefix: str, *, p99_target_ms: float | None = None
) -> None:
    """Add p50/p95/p99 (ms) of a load's latencies to `result`."""
    lat = summarize(load.latencies_s, 1000.0)
    result.add(f"{prefix} latency p50", rounded(lat.get("p50", math.nan)), "ms")
    result.add(f"{prefix} latency p95", rounded(lat.get("p95", math.nan)), "ms")
    p99 = lat.get("p99", math.nan)
    if p99_target_ms is None:
        result.add(f"{prefix} latency p99", rounded(p99), "ms")
    else:
        result.add(
            f"{prefix} latency p99",
            rounded(p99),
            "ms",
            target=f"< {p99_target_ms:g} ms",
            met=p99 < p99_target_ms,
        )
