"""token_latency: the time from the simulator writing a token to a WatchJob client
receiving it — the whole hot path of a token: simulator → worker (anthropic SDK) →
RabbitMQ → notifier → gRPC → client.

How it is measured. Each job carries the label `x-sim-emit-log: <key>`; the worker
forwards `x-sim-*` labels to the simulator as headers, and the simulator notes when
it wrote each delta (`time.time_ns()`, served by `GET /emissions/<key>`). A watcher
opened before the first token notes when each TokenDelta arrives (`time.time_ns()`,
same machine, same clock). A TokenDelta's `output_tokens` counts the simulator's
deltas so far (the worker sends pieces that arrive together as one event), so the
latency of every token is the arrival of the event that carried it minus the time
the simulator wrote it. Jobs whose watch was not open before their first token are
left out (their first tokens would come from catch-up, not live).

    python -m bench.token_latency                 # its own isolated stack
    python -m bench.token_latency --jobs 40 --tokens 200 --rate 50
    python -m bench.token_latency --gateway 127.0.0.1:50051 --notifier 127.0.0.1:50052 \\
        --simulator http://127.0.0.1:8765        # a running stack (`make up`)

`bench.streaming` runs it as the `streaming` scenario of `python -m bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import Context, Result, rounded, summarize
from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2

MODEL = "claude-sonnet-4-5"
NAME = "streaming"
TITLE = "token delivery: simulator emits → WatchJob client receives"
P50_TARGET_MS = 5.0
FIRST_TOKEN_MS = 1000
"""Simulator latency to the first token: time for the watch to be open before it."""
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    """One job's tokens: arrival times by delta count, and the simulator's write times."""

    job_id: str
    key: str
    opened_ns: int = 0
    arrivals: list[tuple[int, int]] = field(default_factory=list)
    """(output_tokens of the event, arrival ns)."""
    emitted_ns: list[int] = field(default_factory=list)
    status: int = 0


def latencies_ms(sample: Sample) -> list[float]:
    """Per token: arrival of the event carrying it minus when the simulator wrote it."""
    out: list[float] = []
    before = 0
    for count, arrived in sample.arrivals:
        for index in range(before, min(count, len(sample.emitted_ns))):
            out.append((arrived - sample.emitted_ns[index]) / 1e6)
        before = max(before, count)
    return out


async def _follow(client: ConveyorClient, sample: Sample) -> None:
    async for event in client.watch(sample.job_id):
        now = time.time_ns()
        kind = event.WhichOneof("payload")
        if kind == "snapshot" and not sample.opened_ns:
            sample.opened_ns = now
        elif kind == "token_delta":
            sample.arrivals.append((int(event.token_delta.output_tokens), now))
        elif kind == "status_changed":
            sample.status = event.status_changed.status


async def probe(
    client: ConveyorClient,
    http: aiohttp.ClientSession,
    simulator_url: str,
    follow: Callable[[Sample], Awaitable[None]],
    *,
    tokens: int,
    rate: float,
) -> Sample:
    """One job whose simulator notes when it writes each token; `follow` records when
    a watcher receives them, then the simulator's times are fetched."""
    key = f"lat-{uuid.uuid4().hex}"
    job = await client.submit(
        MODEL,
        f"latency probe {key}",
        max_tokens=tokens + 16,
        labels={
            "x-sim-emit-log": key,
            "x-sim-tokens": str(tokens),
            "x-sim-tokens-per-second": f"{rate:g}",
            "x-sim-latency-ms": str(FIRST_TOKEN_MS),
        },
    )
    sample = Sample(job.id, key)
    await follow(sample)
    async with http.get(f"{simulator_url}/emissions/{key}") as resp:
        if resp.status == 200:
            sample.emitted_ns = list((await resp.json())["times_ns"])
    return sample


async def measure(
    client: ConveyorClient,
    http: aiohttp.ClientSession,
    simulator_url: str,
    *,
    jobs: int = 20,
    tokens: int = 150,
    rate: float = 50.0,
) -> dict[str, Any]:
    """Run `jobs` concurrent jobs of `tokens` tokens at `rate` tokens/s each, watched
    live; returns the latency distribution (ms) and what was left out."""

    async def one() -> Sample:
        return await probe(
            client, http, simulator_url, lambda s: _follow(client, s), tokens=tokens, rate=rate
        )

    samples = await asyncio.gather(*(one() for _ in range(jobs)))
    values: list[float] = []
    late = failed = 0
    for sample in samples:
        if sample.status != jobs_pb2.JOB_STATUS_SUCCEEDED or not sample.emitted_ns:
            failed += 1
        elif sample.opened_ns >= sample.emitted_ns[0]:
            late += 1
        else:
            values.extend(latencies_ms(sample))
    return {
        "latency_ms": summarize(values),
        "jobs": jobs,
        "tokens_per_job": tokens,
        "rate_per_job": rate,
        "jobs_watched_late": late,
        "jobs_failed": failed,
    }


def _result(figures: dict[str, Any]) -> Result:
    result = Result(NAME, TITLE)
    lat = figures["latency_ms"]
    if not lat.get("count"):
        result.status = "error"
        result.notes.append("no token was measured")
        return result
    result.add(
        "token delivery p50",
        rounded(lat["p50"]),
        "ms",
        target=f"< {P50_TARGET_MS:g} ms",
        met=lat["p50"] < P50_TARGET_MS,
    )
    result.add("token delivery p99", rounded(lat["p99"]), "ms")
    result.add("token delivery max", rounded(lat["max"]), "ms")
    result.add("tokens measured", lat["count"])
    result.extra = figures
    result.notes.append(
        f"{figures['jobs']} concurrent jobs × {figures['tokens_per_job']} tokens at"
        f" {figures['rate_per_job']:g} tokens/s each, every job watched live"
    )
    return result


async def run(ctx: Context) -> Result:
    """The benchmark harness's entry (`python -m bench streaming`)."""
    quick = ctx.quick
    async with ConveyorClient(ctx.gateway, ctx.notifier) as client:
        figures = await measure(
            client,
            ctx.http,
            ctx.simulator_url,
            jobs=5 if quick else 20,
            tokens=60 if quick else 150,
        )
    return _result(figures)


# --------------------------------------------------------------------------- standalone


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.token_latency",
        description="Measure token delivery latency (simulator write → WatchJob client).",
    )
    parser.add_argument("--jobs", type=int, default=20, help="concurrent jobs (default 20)")
    parser.add_argument("--tokens", type=int, default=150, help="tokens per job (default 150)")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per job (default 50)")
    parser.add_argument("--gateway", help="use a running stack: its gateway host:port")
    parser.add_argument("--notifier", help="... its notifier host:port")
    parser.add_argument("--simulator", help="... its simulator URL, e.g. http://127.0.0.1:8765")
    return parser.parse_args(argv)


async def _measure_at(
    gateway: str, notifier: str, simulator_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    async with (
        ConveyorClient(gateway, notifier) as client,
        aiohttp.ClientSession() as http,
    ):
        return await measure(
            client, http, simulator_url, jobs=args.jobs, tokens=args.tokens, rate=args.rate
        )


def _print(figures: dict[str, Any]) -> None:
    lat = figures["latency_ms"]
    print(
        f"{lat.get('count', 0)} tokens ({figures['jobs']} jobs × {figures['tokens_per_job']}"
        f" at {figures['rate_per_job']:g}/s; watched late: {figures['jobs_watched_late']},"
        f" failed: {figures['jobs_failed']})"
    )
    if lat.get("count"):
        print(
            f"simulator write → WatchJob client: p50 {lat['p50']:.2f} ms  p95 {lat['p95']:.2f} ms"
            f"  p99 {lat['p99']:.2f} ms  max {lat['max']:.2f} ms  mean {lat['mean']:.2f} ms"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gateway or args.notifier or args.simulator:
        if not (args.gateway and args.notifier and args.simulator):
            print("error: give --gateway, --notifier and --simulator together", file=sys.stderr)
            return 2
        figures = asyncio.run(_measure_at(args.gateway, args.notifier, args.simulator, args))
        _print(figures)
        return 0 if figures["latency_ms"].get("count") else 1

    from devtools import sandbox

    with sandbox.backing_services(f"conveyor-bench-latency-{os.getpid()}") as backing:
        stack = sandbox.Stack(
            backing,
            ROOT / "run" / "bench-latency" / str(os.getpid()),
            {"CONVEYOR_LOG_JSON": "1"},
        )
        try:
            print(f"starting an isolated stack (logs in {stack.run.path}) ...", flush=True)
            stack.start_all()
            figures = asyncio.run(
                _measure_at(stack.gateway, stack.notifier, stack.simulator_url, args)
            )
        finally:
            stack.stop_all()
    _print(figures)
    return 0 if figures["latency_ms"].get("count") else 1


if __name__ == "__main__":
    sys.exit(main())
