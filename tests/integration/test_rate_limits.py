"""Provider rate limits: the workers learn them from the provider's headers, share one
budget in Postgres, and wait for it instead of calling and getting 429. With the
simulator enforcing limits, a burst of jobs at several times the limit all succeed,
with few 429s (the count is printed)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2
from devtools import devstack
from tests.stack import Stack

pytestmark = pytest.mark.integration

REQUESTS_PER_MINUTE = 600  # 10 a second
INPUT_TOKENS_PER_MINUTE = 48_000  # 8 prompts of 100 tokens a second: the tighter one
OUTPUT_TOKENS_PER_MINUTE = 12_000
JOBS = 120  # submitted at once: ~12 s of budget, offered in well under a second
MOST_429S = JOBS // 6
"""Typically 0. The provider counts calls when they arrive, so a process stalled for
a second or more on a busy shared machine can deliver budget granted over several
seconds at once; CI has seen 12. Without the shared budget the count is in the hundreds."""


async def _simulator(stack: Stack, method: str, path: str, body: Any = None) -> dict[str, Any]:
    url = f"{stack.simulator_url}{path}"
    async with aiohttp.ClientSession() as http, http.request(method, url, json=body) as resp:
        resp.raise_for_status()
        result: dict[str, Any] = await resp.json()
        return result


@pytest.fixture
async def enforcing(stack: Stack) -> AsyncIterator[None]:
    """The simulator enforces limits (burst: two seconds' worth) until the test ends."""
    await _simulator(
        stack,
        "POST",
        "/control",
        {
            "limit_requests_per_minute": REQUESTS_PER_MINUTE,
            "limit_input_tokens_per_minute": INPUT_TOKENS_PER_MINUTE,
            "limit_output_tokens_per_minute": OUTPUT_TOKENS_PER_MINUTE,
            "limit_burst_s": 2,
            "reset_stats": True,
        },
    )
    try:
        yield
    finally:
        off = {
            "limit_requests_per_minute": 0,
            "limit_input_tokens_per_minute": 0,
            "limit_output_tokens_per_minute": 0,
        }
        await _simulator(stack, "POST", "/control", off)


@pytest.fixture
def second_worker(stack: Stack) -> Iterator[None]:
    """Another worker process, so that the budget is shared by two."""
    stack.start_extra(devstack.Service("worker-2", "services.worker", "log"))
    try:
        yield
    finally:
        stack.stop("worker-2")


async def test_jobs_at_several_times_the_limit_all_succeed_with_few_429s(
    client: ConveyorClient, stack: Stack, db: AsyncEngine, enforcing: None, second_worker: None
) -> None:
    model = f"claude-limited-{uuid.uuid4().hex[:6]}"  # no worker knows its limits yet
    prompt = "x" * 400  # 100 input tokens, as both sides estimate them
    jobs = await client.submit_many(
        [
            jobs_pb2.SubmitJobRequest(
                model=model,
                max_tokens=16,
                messages=[jobs_pb2.Message(role="user", content=prompt)],
                max_attempts=10,
            )
            for _ in range(JOBS)
        ]
    )
    done = [await client.wait(job.id, 120) for job in jobs]
    stats = await _simulator(stack, "GET", "/stats")
    throttled = stats["rate_limited"]
    retries = sum(j.attempts - 1 for j in done)
    print(f"{JOBS} jobs, {throttled} answered 429 by the provider, {retries} retries")

    assert all(j.status == jobs_pb2.JOB_STATUS_SUCCEEDED for j in done)
    assert throttled <= MOST_429S
    assert stats["completed"] >= JOBS
    async with db.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT bucket, limit_per_min, source FROM rate_buckets WHERE bucket LIKE :m"
                ),
                {"m": f"model:{model}:%"},
            )
        ).all()
    learnt = {r.bucket.rsplit(":", 1)[1]: (r.limit_per_min, r.source) for r in rows}
    assert learnt == {
        "requests": (REQUESTS_PER_MINUTE, "learned"),
        "input_tokens": (INPUT_TOKENS_PER_MINUTE, "learned"),
        "output_tokens": (OUTPUT_TOKENS_PER_MINUTE, "learned"),
    }
    # Both workers ran some of them: one budget, two processes.
    async with db.connect() as conn:
        workers = (
            await conn.execute(
                sa.text(
                    "SELECT count(DISTINCT a.worker) FROM job_attempts a"
                    " JOIN jobs j ON j.id = a.job_id WHERE j.model = :m"
                ),
                {"m": model},
            )
        ).scalar_one()
    assert workers == 2


async def test_a_configured_limit_is_kept_before_the_provider_says_anything(
    client: ConveyorClient, stack: Stack, db: AsyncEngine, enforcing: None
) -> None:
    model = f"claude-configured-{uuid.uuid4().hex[:6]}"
    limits = {
        model: {
            "requests_per_minute": REQUESTS_PER_MINUTE,
            "input_tokens_per_minute": INPUT_TOKENS_PER_MINUTE,
        }
    }
    stack.stop("worker")
    stack.start("worker", CONVEYOR_RATE_LIMITS=json.dumps(limits))
    try:
        jobs = await client.submit_many(
            [
                jobs_pb2.SubmitJobRequest(
                    model=model,
                    max_tokens=16,
                    messages=[jobs_pb2.Message(role="user", content="y" * 400)],
                    max_attempts=10,
                )
                for _ in range(40)
            ]
        )
        done = [await client.wait(job.id, 120) for job in jobs]
    finally:
        stack.stop("worker")
        stack.start("worker")
    stats = await _simulator(stack, "GET", "/stats")
    print(f"40 jobs with configured limits: {stats['rate_limited']} answered 429")
    assert all(j.status == jobs_pb2.JOB_STATUS_SUCCEEDED for j in done)
    assert stats["rate_limited"] <= 40 // 6  # see MOST_429S
