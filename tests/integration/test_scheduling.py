"""Urgent work first: priorities order a lane's backlog, and lanes get their own workers."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2
from tests.stack import Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"


async def test_a_high_priority_job_submitted_last_runs_before_the_backlog(
    client: ConveyorClient, stack: Stack
) -> None:
    stack.stop("worker")
    try:
        backlog = [
            await client.submit(MODEL, f"bulk {i}", max_tokens=8, lane="bulk", priority=0)
            for i in range(30)
        ]
        urgent = await client.submit(MODEL, "urgent", max_tokens=8, lane="bulk", priority=9)
    finally:
        # One job at a time, so the order of starts is the order of delivery.
        stack.start("worker", CONVEYOR_WORKER_CONCURRENCY="1")
    try:
        urgent_done = await client.wait(urgent.id, 30)
        finished = [await client.wait(job.id, 60) for job in backlog]
    finally:
        stack.stop("worker")
        stack.start("worker")
    assert urgent_done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert all(j.status == jobs_pb2.JOB_STATUS_SUCCEEDED for j in finished)
    first_bulk_start = min(j.started_at.ToDatetime() for j in finished)
    assert urgent_done.started_at.ToDatetime() < first_bulk_start


async def test_a_worker_pool_runs_only_its_lanes(client: ConveyorClient, stack: Stack) -> None:
    stack.stop("worker")
    stack.start("worker", CONVEYOR_WORKER_LANES='["interactive"]')
    try:
        bulk = await client.submit(MODEL, "bulk work", max_tokens=8, lane="bulk")
        interactive = await client.submit(MODEL, "chat", max_tokens=8, lane="interactive")
        assert (await client.wait(interactive.id, 30)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
        await asyncio.sleep(1)
        assert (await client.get(bulk.id)).status == jobs_pb2.JOB_STATUS_PENDING
    finally:
        stack.stop("worker")
        stack.start("worker")
    assert (await client.wait(bulk.id, 30)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
