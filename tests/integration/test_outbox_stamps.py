"""Stamping confirmed publishes (conveyor.db.jobs.mark_published): a pending job the
broker confirmed is stamped once, nothing else is touched, and the stamp finds its rows
by id whatever Postgres's statistics say, so the stamps keep up with a burst of submits
and the outbox does not publish those jobs again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.lifecycle import JobState
from conveyor.db import jobs as jobs_db

pytestmark = pytest.mark.integration

BURST = 5_000
STAMPED = 1_000


def _jobs(n: int) -> list[jobs_db.NewJob]:
    tenant = f"stamps-{uuid.uuid4().hex[:8]}"
    return [
        jobs_db.NewJob(
            tenant=tenant,
            model="claude-sonnet-4-5",
            request={"max_tokens": 16, "messages": []},
            lane="default",
            priority=0,
            max_attempts=3,
            timeout_ms=60_000,
            request_hash="0" * 64,
        )
        for _ in range(n)
    ]


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


@pytest.fixture
async def rolled_back(db: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a transaction that is rolled back afterwards: the stack's
    dispatcher never sees (nor publishes) the jobs inserted through it."""
    async with db.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        transaction = raw.transaction()
        await transaction.start()
        try:
            yield raw
        finally:
            await transaction.rollback()


async def _burst(conn: asyncpg.Connection) -> list[jobs_db.NewJob]:
    """Statistics taken while few jobs wait for their stamp, then a burst of unstamped
    pending jobs: what a backlog filled at once looks like to the planner."""
    await conn.execute("ANALYZE jobs")
    burst = _jobs(BURST)
    params = jobs_db.insert_params(burst, [None] * BURST, datetime.now(UTC))
    await conn.fetch(jobs_db._INSERT, *params)
    return burst


async def _plans(conn: asyncpg.Connection, ids: list[uuid.UUID]) -> dict[str, list[dict[str, Any]]]:
    """The stamp's plan for `ids`, as planned for these values and as a prepared
    statement's generic plan (which Postgres may switch to after a few runs); each
    as its list of nodes."""
    statement = jobs_db._MARK_PUBLISHED.sql
    custom = await conn.fetchval("EXPLAIN (FORMAT JSON) " + statement, ids)
    await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
    await conn.execute("PREPARE stamp_plan(uuid[]) AS " + statement)
    literal = "{" + ",".join(str(i) for i in ids) + "}"
    generic = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE stamp_plan('{literal}')")
    await conn.execute("DEALLOCATE stamp_plan")
    out = {}
    for name, explained in (("custom", custom), ("generic", generic)):
        (plan,) = orjson.loads(explained) if isinstance(explained, str) else explained
        out[name] = list(_plan_nodes(plan["Plan"]))
    return out


async def test_a_stamp_looks_its_jobs_up_by_id_when_the_statistics_predate_a_burst(
    rolled_back: asyncpg.Connection,
) -> None:
    burst = await _burst(rolled_back)
    ids = [job.id for job in burst[:STAMPED]]

    for name, nodes in (await _plans(rolled_back, ids)).items():
        # Never through a partial index of pending jobs, which these statistics show as
        # nearly empty and which holds the whole burst...
        indexes = {n["Index Name"] for n in nodes if "Index Name" in n}
        assert indexes <= {"jobs_pkey"}, (name, indexes)
        # ...and no join that compares every row of one side with every row of the
        # other: each join looks the job up by its id.
        assert not [n for n in nodes if "Join Filter" in n], (name, nodes)
        inner = [n for n in nodes if n.get("Parent Relationship") == "Inner"]
        assert inner and all(
            n["Node Type"] == "Index Scan" and n["Index Cond"].startswith("(id = ") for n in inner
        ), (name, inner)


async def test_a_stamp_marks_the_pending_unstamped_jobs_and_touches_nothing_else(
    rolled_back: asyncpg.Connection,
) -> None:
    burst = await _burst(rolled_back)
    stamped_before, running, others = burst[0], burst[1], burst[STAMPED:]
    earlier = datetime(2026, 1, 1, tzinfo=UTC)
    await rolled_back.execute(
        "UPDATE jobs SET published_at = $2 WHERE id = $1", stamped_before.id, earlier
    )
    await rolled_back.execute(
        "UPDATE jobs SET status = $2 WHERE id = $1", running.id, JobState.RUNNING.value
    )
    ids = [job.id for job in burst[:STAMPED]]

    await rolled_back.fetch(jobs_db._MARK_PUBLISHED.sql, ids)

    stamps = {
        r["id"]: r["published_at"]
        for r in await rolled_back.fetch(
            "SELECT id, published_at FROM jobs WHERE id = ANY($1::uuid[])",
            [job.id for job in burst],
        )
    }
    assert stamps[stamped_before.id] == earlier, "a stamped job keeps its stamp"
    assert stamps[running.id] is None, "a job no longer pending is left as it is"
    fresh = [stamps[job.id] for job in burst[2:STAMPED]]
    assert all(stamp is not None for stamp in fresh), "every other confirmed job is stamped"
    assert all(stamps[job.id] is None for job in others), "jobs not confirmed stay unstamped"
