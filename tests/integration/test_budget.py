"""The shared token buckets in Postgres: however many processes take from one, together
they never get more than its capacity plus its refill, and a block stops them all.
A provider's 429 pauses a model in every worker, until its retry-after or until an
answer shows the provider with budget to spare."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.config import Settings
from conveyor.db.buckets import BucketStore, LocalBudget
from services.worker.limiter import Permit, ProviderLimiter

pytestmark = pytest.mark.integration

PER_MINUTE = 1_200.0  # 20 a second
CAPACITY = 10.0


async def test_processes_sharing_a_bucket_never_take_more_than_it_refills(
    db: AsyncEngine,
) -> None:
    name = f"test:{uuid.uuid4().hex}"
    # Four "processes", each with its own pool, taking one unit at a time for two seconds.
    budgets = [LocalBudget(BucketStore(db), batch_s=0.25) for _ in range(4)]
    for budget in budgets:
        await budget.define(name, PER_MINUTE, CAPACITY, source="config")
    taken = [0] * len(budgets)
    began = time.monotonic()

    async def spend(i: int) -> None:
        budget = budgets[i]
        while time.monotonic() - began < 2.0:
            need = {name: 1.0}
            if not budget.has(need):
                wait = await budget.fill(need)
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
            budget.spend(need)
            taken[i] += 1

    await asyncio.gather(*(spend(i) for i in range(len(budgets))))
    elapsed = time.monotonic() - began
    granted = sum(taken) + sum(max(0.0, b.pool.get(name, 0.0)) for b in budgets)
    assert granted <= CAPACITY + PER_MINUTE / 60 * elapsed + 1
    assert all(taken), "every process got its share"
    assert sum(taken) >= PER_MINUTE / 60 * 1.5, "and together they used the budget"


async def test_a_block_stops_every_process_and_returns_budget_is_taken_again(
    db: AsyncEngine,
) -> None:
    name = f"test:{uuid.uuid4().hex}"
    store = BucketStore(db)
    first, second = LocalBudget(store), LocalBudget(store)
    for budget in (first, second):
        await budget.define(name, PER_MINUTE, CAPACITY, source="config")
    assert await first.fill({name: 4.0}) == 0 and first.has({name: 4.0})

    await store.block([name], 0.5, drain=[name])
    wait = await second.fill({name: 1.0})
    assert 0 < wait <= 0.5 and not second.has({name: 1.0})
    await asyncio.sleep(wait + 0.1)
    assert await second.fill({name: 1.0}) == 0

    await first.return_all()  # what `first` held goes back to the bucket
    assert await second.fill({name: CAPACITY}) == 0


def _answer_headers(remaining_share: float) -> dict[str, str]:
    """An answer's rate-limit headers (600 requests and 600,000 tokens a minute), with
    this share of each limit left."""
    headers = {}
    for name, limit in (("requests", 600), ("input-tokens", 600_000), ("output-tokens", 600_000)):
        headers[f"anthropic-ratelimit-{name}-limit"] = str(limit)
        headers[f"anthropic-ratelimit-{name}-remaining"] = str(int(limit * remaining_share))
    return headers


@pytest.mark.parametrize(
    ("share_left", "lifted"), [(0.9, True), (0.02, False)], ids=["budget to spare", "shortage"]
)
async def test_a_429_pauses_every_worker_until_an_answer_shows_budget_to_spare(
    db: AsyncEngine, share_left: float, lifted: bool
) -> None:
    model = f"claude-paused-{uuid.uuid4().hex[:6]}"
    body = {"max_tokens": 16, "messages": [{"role": "user", "content": "x" * 400}]}
    settings = Settings(known_models=(model,))  # its own state, not the `other` model's
    first, second = ProviderLimiter(db, settings), ProviderLimiter(db, settings)
    probe = await first.acquire(model, body)  # nobody knows the limits: a probe learns them
    await first.observe(probe, _answer_headers(0.05))  # and the provider has little left
    first.settle(probe, {"input_tokens": 100, "output_tokens": 16})

    throttled = await first.acquire(model, body)
    await first.throttled(throttled, 60.0, {"anthropic-ratelimit-requests-remaining": "0"})
    first.settle(throttled, None)
    waiting = asyncio.create_task(second.acquire(model, body))
    await asyncio.sleep(0.5)
    assert not waiting.done(), "the other worker waits out the pause"

    # An answer of a call that was in flight arrives with the provider's word on budget.
    await first.observe(
        Permit(model=model, input_tokens=0, output_tokens=0), _answer_headers(share_left)
    )
    if lifted:
        permit = await asyncio.wait_for(waiting, 10)  # long before the 60 s retry-after
        second.settle(permit, None)
    else:
        await asyncio.sleep(3)  # longer than a waiting worker's recheck of the bucket
        assert not waiting.done(), "a real shortage keeps the pause"
        waiting.cancel()


async def test_a_429_right_after_an_answer_with_budget_to_spare_pauses_nothing(
    db: AsyncEngine,
) -> None:
    model = f"claude-overloaded-{uuid.uuid4().hex[:6]}"
    body = {"max_tokens": 16, "messages": [{"role": "user", "content": "x" * 400}]}
    settings = Settings(known_models=(model,))  # its own state, not the `other` model's
    first, second = ProviderLimiter(db, settings), ProviderLimiter(db, settings)
    probe = await first.acquire(model, body)
    await first.observe(probe, _answer_headers(0.9))
    first.settle(probe, {"input_tokens": 100, "output_tokens": 16})

    throttled = await first.acquire(model, body)
    await first.throttled(throttled, 60.0, {"anthropic-ratelimit-requests-remaining": "0"})
    first.settle(throttled, None)
    for limiter in (first, second):  # neither this worker nor another waits
        permit = await asyncio.wait_for(limiter.acquire(model, body), 10)
        limiter.settle(permit, None)
