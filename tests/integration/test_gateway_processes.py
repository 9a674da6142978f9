"""A gateway of several processes on one port (CONVEYOR_GATEWAY_PROCESSES): the
kernel spreads connections over them, each accepted job is stored and runs once,
their metrics add up on the supervisor's endpoint, a process that dies is
replaced, and stopping the supervisor stops them all."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc
from devtools import devstack
from tests.conftest import eventually, job_history
from tests.stack import Stack, free_ports

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
PROCESSES = 2


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(c) for c in task.read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


ESTABLISHED, LISTEN = "01", "0A"


def connections_on(pid: int, port: int, state: str = ESTABLISHED) -> int:
    """TCP sockets of process `pid` in `state` whose local port is `port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, inode = fields[1], fields[9]
            if fields[3] == state and inode in inodes and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


@pytest.fixture
async def gateway(stack: Stack, api_key: str) -> AsyncIterator[tuple[str, int, int]]:
    """An extra gateway of PROCESSES processes: (address, supervisor pid, metrics port)."""
    port, metrics = free_ports(2)
    name = "gateway-processes"
    stack.start_extra(
        devstack.Service(name, "services.gateway", "grpc", f"127.0.0.1:{port}", "JobService"),
        CONVEYOR_GATEWAY_PORT=str(port),
        CONVEYOR_GATEWAY_PROCESSES=str(PROCESSES),
        CONVEYOR_GATEWAY_METRICS_PORT=str(metrics),
    )
    pid = stack.pid(name)
    assert pid is not None
    # The stack calls it ready when one process answers; connections made before the
    # others listen stay with that one, so wait until every process listens.
    await eventually(lambda: _ready(pid, port), within_s=20)
    try:
        yield f"127.0.0.1:{port}", pid, metrics
    finally:
        if name in stack.procs:
            stack.stop(name)


async def _ready(pid: int, port: int) -> bool:
    serving = [c for c in children(pid) if alive(c) and connections_on(c, port, LISTEN)]
    return len(serving) == PROCESSES


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def test_the_processes_share_the_port_and_every_job_they_accept_runs_once(
    gateway: tuple[str, int, int], stack: Stack, api_key: str, db: AsyncEngine
) -> None:
    address, pid, metrics = gateway
    port = int(address.rsplit(":", 1)[1])
    # Callers of their own: a connection each (no shared subchannel pool).
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(16)
    ]
    auth = (("authorization", f"Bearer {api_key}"),)
    try:
        submitted = await asyncio.gather(
            *(
                jobs_pb2_grpc.JobServiceStub(ch).SubmitJob(
                    jobs_pb2.SubmitJobRequest(
                        model=MODEL,
                        messages=[jobs_pb2.Message(role="user", content=f"spread {i}")],
                        max_tokens=8,
                    ),
                    metadata=auth,
                )
                for i, ch in enumerate(channels)
            )
        )
        served = {child: connections_on(child, port) for child in children(pid)}
        assert all(n > 0 for n in served.values()), f"connections per process: {served}"
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    async with ConveyorClient(address, stack.notifier, api_key=api_key) as client:
        for response in submitted:
            done = await client.wait(response.job.id, 30)
            assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 1
            assert await job_history(db, done.id) == ["pending", "running", "succeeded"]
    # Each process counts its own submits; the supervisor's endpoint adds them up.
    assert _metric(metrics, "conveyor_jobs_submitted_total") == len(submitted)


async def test_a_process_that_dies_is_replaced(
    gateway: tuple[str, int, int], stack: Stack, api_key: str
) -> None:
    address, pid, _ = gateway
    victim = children(pid)[0]
    os.kill(victim, signal.SIGKILL)
    port = int(address.rsplit(":", 1)[1])
    await eventually(lambda: _replaced(pid, victim, port), within_s=20)
    async with ConveyorClient(address, stack.notifier, api_key=api_key) as c:
        job = await c.submit(MODEL, "after a loss", max_tokens=8)
        assert (await c.wait(job.id, 30)).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def _replaced(pid: int, victim: int, port: int) -> bool:
    return victim not in children(pid) and await _ready(pid, port)


async def test_stopping_the_supervisor_stops_every_process(
    gateway: tuple[str, int, int], stack: Stack
) -> None:
    _, pid, _ = gateway
    processes = children(pid)
    assert stack.stop("gateway-processes") == "stopped"
    assert not any(alive(p) for p in [pid, *processes])
