"""SubmitJob load from h2load, nghttp2's HTTP/2 load generator (written in C).

On a small machine the load generator shares the cores with the system it
measures, and a Python gRPC client spends about as much CPU per call as the
gateway's gRPC server does; h2load spends far less (bench/README.md has the
figures). It speaks plain HTTP/2, so
it is given the gRPC framing itself (the 5-byte length prefix before the
serialized request, `content-type: application/grpc`, `te: trailers`) and sends
the same SubmitJob for every call (no idempotency key, so each one makes a job).

It sees HTTP statuses, not gRPC ones (those travel in trailers), so the caller
counts the rows stored to know how many calls were accepted.

Install it with `apt-get install nghttp2-client` (`make bench` does when it can).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import tempfile
from pathlib import Path

from bench.harness import LoadResult
from conveyor.v1 import jobs_pb2

SUBMIT_PATH = "/conveyor.v1.JobService/SubmitJob"
STREAMS_PER_CLIENT = 16
"""Calls one paced client may have open at once, so a slow answer does not hold back
the next call (which would hide the delay: coordinated omission)."""


def available() -> bool:
    return shutil.which("h2load") is not None


def grpc_frame(message: jobs_pb2.SubmitJobRequest) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length, body."""
    body = message.SerializeToString()
    return b"\0" + struct.pack(">I", len(body)) + body


def _parse_summary(out: str) -> tuple[float, dict[str, int]]:
    elapsed = re.search(r"finished in ([\d.]+)(m?s)", out)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    if elapsed is None or counts is None:
        raise RuntimeError(f"h2load gave no summary:\n{out[-2000:]}")
    seconds = float(elapsed.group(1)) / (1000.0 if elapsed.group(2) == "ms" else 1.0)
    names = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    return seconds, dict(zip(names, map(int, counts.groups()), strict=True))


async def submit_load(
    target: str,
    request: jobs_pb2.SubmitJobRequest,
    calls: int,
    clients: int,
    *,
    rate: float | None = None,
) -> LoadResult:
    """`calls` SubmitJob calls from `clients` connections: closed loop (one call at a
    time per client), or paced at `rate` calls/s in all, the clients' schedules
    spread evenly over each period. Latencies are per call, from when it was sent."""
    with tempfile.TemporaryDirectory(prefix="conveyor-h2load-") as tmp:
        body, log = Path(tmp) / "request.bin", Path(tmp) / "calls.log"
        body.write_bytes(grpc_frame(request))
        args = [
            "h2load",
            "-n",
            str(calls),
            "-c",
            str(clients),
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log}",
        ]
        if rate:
            per_client = rate / clients
            # The clients start one after another (h2load counts periods in whole ms), so
            # their ticks interleave instead of arriving together: independent callers.
            stagger_ms = max(1, round(1000 / rate))
            args += ["-m", str(STREAMS_PER_CLIENT), "--rps", f"{per_client:g}"]
            args += ["-r", "1", "--rate-period", f"{stagger_ms}ms"]
        else:
            args += ["-m", "1"]
        proc = await asyncio.create_subprocess_exec(
            *args,
            f"http://{target}{SUBMIT_PATH}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"h2load exited {proc.returncode}:\n{text[-2000:]}")
        elapsed, counts = _parse_summary(text)
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            latencies.append(int(parts[2]) / 1e6)
            statuses[parts[1]] = statuses.get(parts[1], 0) + 1
    result = LoadResult(
        calls=counts["done"],
        jobs=counts["succeeded"],
        latencies_s=latencies,
        service_s=latencies,
        elapsed_s=elapsed,
    )
    for status, n in statuses.items():
        if status != "200":
            result.errors[f"http_{status}"] = n
    if counts["total"] > counts["done"]:
        result.errors["not_done"] = counts["total"] - counts["done"]
    return result
