"""http: the HTTP/JSON API (services/http) against gRPC.

1. SubmitJob, the submit scenario's shape, workers stopped: `submit_jobs` jobs from
   `submit_clients` concurrent clients in a closed loop, first over gRPC (Python
   grpc.aio clients, a connection each), then as POST /v1/jobs (Python aiohttp
   clients, a keep-alive connection each). Both load generators are Python on the
   same machine, so the ratio compares the two paths, not two generators. Issue 17
   asks HTTP to reach at least half of gRPC's rate.
2. Token delivery over Server-Sent Events (GET /v1/jobs/{id}/events), measured as
   bench.token_latency measures WatchJob: simulator write → SSE reader, p50 < 5 ms.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from google.protobuf import json_format

from bench.harness import (
    Context,
    LoadResult,
    Result,
    latency_figures,
    rounded,
    submit_load,
    summarize,
)
from bench.token_latency import P50_TARGET_MS, Sample, latencies_ms, probe
from conveyor.client import ConveyorClient

NAME = "http"
TITLE = "HTTP/JSON API: SubmitJob vs gRPC (workers stopped), SSE token delivery"
RATIO_TARGET = 0.5


async def http_submit_load(base_url: str, bodies: list[bytes], clients: int) -> LoadResult:
    """POST each body to /v1/jobs from `clients` concurrent keep-alive connections."""
    result = LoadResult()
    next_call = iter(range(len(bodies)))
    headers = {"Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        for i in next_call:
            sent = time.perf_counter()
            try:
                async with session.post("/v1/jobs", data=bodies[i], headers=headers) as r:
                    answer = await r.read()
                    if r.status != 200:
                        code = orjson.loads(answer).get("error", {}).get("code", str(r.status))
                        result.errors[code] = result.errors.get(code, 0) + 1
                        continue
            except aiohttp.ClientError as exc:
                name = type(exc).__name__
                result.errors[name] = result.errors.get(name, 0) + 1
                continue
            end = time.perf_counter()
            result.calls += 1
            result.jobs += 1
            result.service_s.append(end - sent)
            result.latencies_s.append(end - sent)

    sessions = [
        aiohttp.ClientSession(base_url, connector=aiohttp.TCPConnector(limit=1))
        for _ in range(clients)
    ]
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(s) for s in sessions))
        result.elapsed_s = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    return result


async def run(ctx: Context) -> Result:
    c = ctx.counts
    result = Result(NAME, TITLE)
    result.extra["clients"] = c.submit_clients
    result.extra["jobs_per_run"] = c.submit_jobs

    await ctx.reset(worker=False)
    reqs = [ctx.request(label="http-submit-grpc") for _ in range(c.submit_jobs)]
    over_grpc = await submit_load(ctx.gateway, reqs, c.submit_clients)
    result.add(
        f"gRPC SubmitJob x{c.submit_clients} clients (Python): accepted",
        rounded(over_grpc.jobs_per_s, 0),
        "jobs/s",
    )

    await ctx.reset(worker=False)
    bodies: list[bytes] = []
    for _ in range(c.submit_jobs):
        body: dict[str, Any] = json_format.MessageToDict(ctx.request(label="http-submit-http"))
        bodies.append(orjson.dumps(body))
    over_http = await http_submit_load(ctx.stack.http_url, bodies, c.submit_clients)
    counts = await ctx.counts_by_status()
    stored = sum(counts.values())
    if stored != over_http.jobs:
        result.notes.append(f"HTTP: {over_http.jobs} jobs accepted but {stored} rows stored")
    result.add(
        f"HTTP POST /v1/jobs x{c.submit_clients} clients (Python): accepted",
        rounded(over_http.jobs_per_s, 0),
        "jobs/s",
    )
    latency_figures(result, over_http, "  HTTP closed loop")
    ratio = over_http.jobs_per_s / over_grpc.jobs_per_s if over_grpc.jobs_per_s else 0.0
    result.add(
        "HTTP / gRPC SubmitJob throughput",
        rounded(ratio, 2),
        "x",
        target=f">= {RATIO_TARGET:g}",
        met=ratio >= RATIO_TARGET,
    )
    errors = over_grpc.error_count + over_http.error_count
    result.extra["errors"] = {"grpc": over_grpc.errors, "http": over_http.errors}
    result.add("errors", errors, "calls", target="0", met=errors == 0)
    await ctx.reset(worker=True)
    lat = await sse_token_latency(ctx, jobs=5 if ctx.quick else 20, tokens=60 if ctx.quick else 150)
    if lat.get("count"):
        result.add(
            "SSE token delivery p50",
            rounded(lat["p50"]),
            "ms",
            target=f"< {P50_TARGET_MS:g} ms",
            met=lat["p50"] < P50_TARGET_MS,
        )
        result.add("SSE token delivery p99", rounded(lat["p99"]), "ms")
        result.add("SSE tokens measured", lat["count"])
    else:
        result.notes.append("SSE: no token was measured")
    result.extra["sse_latency_ms"] = lat
    await ctx.reset(worker=False)
    return result


async def _follow_sse(session: aiohttp.ClientSession, sample: Sample) -> None:
    """Read a job's SSE stream, noting when each token delta arrives."""
    async with session.get(f"/v1/jobs/{sample.job_id}/events") as r:
        async for line in r.content:
            now = time.time_ns()
            if line.startswith(b"event: end"):
                return
            if not line.startswith(b"data: "):
                continue
            event = orjson.loads(line[6:])
            if "snapshot" in event and not sample.opened_ns:
                sample.opened_ns = now
            elif "tokenDelta" in event:
                sample.arrivals.append((int(event["tokenDelta"]["outputTokens"]), now))
            elif "statusChanged" in event:
                sample.status = (
                    1 if event["statusChanged"]["status"] == "JOB_STATUS_SUCCEEDED" else 0
                )


async def sse_token_latency(
    ctx: Context, *, jobs: int, tokens: int, rate: float = 50.0
) -> dict[str, Any]:
    """bench.token_latency's measurement with SSE readers instead of WatchJob."""

    async def one(client: ConveyorClient, session: aiohttp.ClientSession) -> Sample:
        return await probe(
            client,
            ctx.http,
            ctx.simulator_url,
            lambda s: _follow_sse(session, s),
            tokens=tokens,
            rate=rate,
        )

    async with (
        ConveyorClient(ctx.gateway, ctx.notifier) as client,
        aiohttp.ClientSession(ctx.stack.http_url) as session,
    ):
        samples = await asyncio.gather(*(one(client, session) for _ in range(jobs)))
    values: list[float] = []
    for sample in samples:
        if sample.status and sample.emitted_ns and sample.opened_ns < sample.emitted_ns[0]:
            values.extend(latencies_ms(sample))
    return summarize(values)
