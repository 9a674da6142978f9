"""The shared token buckets in Postgres: however many processes take from one, together
they never get more than its capacity plus its refill, and a block stops them all."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.budget import BucketStore, LocalBudget

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
