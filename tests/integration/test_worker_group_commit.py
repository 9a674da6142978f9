"""The worker's claims and outcomes as group commits (services.worker.group_writes).

Concurrent claims share one statement, and so do concurrent outcomes; each job keeps
what its single statement guaranteed: its conditions and lease are checked per job,
a tenant's concurrency limit holds, its history rows are the same, and one job's bad
value fails that job alone. The jobs here are inserted directly and marked published,
so the stack's own worker never sees them; the stack is there for its migrated database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contract.validation import validate_submit
from conveyor.core.config import Settings
from conveyor.core.lifecycle import Job, JobState, Outcome
from conveyor.db import jobs as db_jobs
from conveyor.db import transitions
from conveyor.db.engine import create_engine, is_data_error
from conveyor.db.tenants import set_tenant_limits
from conveyor.v1 import jobs_pb2
from services.worker.group_writes import GroupWriter, JobWrites, StatusEvents
from tests.stack import Backing, Stack

pytestmark = pytest.mark.integration

WORKER = "tests:group-commit"


@pytest.fixture
async def engine(stack: Stack, backing: Backing) -> AsyncIterator[AsyncEngine]:
    """An engine of the test's own on the stack's database (the stack has migrated it)."""
    engine = create_engine(backing.database_url, pool_size=4)
    yield engine
    await engine.dispose()


_MADE: list[uuid.UUID] = []


@pytest.fixture(autouse=True)
async def _cancel_leftovers(db: AsyncEngine) -> AsyncIterator[None]:
    """Jobs a test leaves live (pending, running, a retry timer) are cancelled after it:
    else the stack's dispatcher would requeue or publish them, and the stack's worker
    call the simulator for them during later tests."""
    yield
    made = list(_MADE)
    _MADE.clear()
    async with db.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE jobs SET status = 'cancelled', lease_id = NULL, run_at = NULL,"
                " finished_at = now() WHERE id = ANY(:ids)"
                " AND status IN ('pending', 'running', 'scheduled')"
            ),
            {"ids": made},
        )


async def _pending(engine: AsyncEngine, tenant: str, n: int) -> list[uuid.UUID]:
    """`n` pending jobs of `tenant`, stored and marked published (no worker runs them)."""
    request = jobs_pb2.SubmitJobRequest(
        model="claude-sonnet-4-5",
        max_tokens=8,
        messages=[jobs_pb2.Message(role="user", content="Hello")],
    )
    new = [validate_submit(request, Settings(), tenant) for _ in range(n)]
    await db_jobs.insert_jobs(engine, new, [None] * n)
    ids = [j.id for j in new]
    _MADE.extend(ids)
    await db_jobs.mark_published(engine, ids)
    return ids


async def _claim_all(
    writes: JobWrites, ids: list[uuid.UUID], tenant: str
) -> list[tuple[Job | None, uuid.UUID]]:
    leases = [uuid.uuid4() for _ in ids]
    claimed = await asyncio.gather(
        *(writes.claim(job_id, lease, tenant) for job_id, lease in zip(ids, leases, strict=True))
    )
    return [(job, lease) for (job, _), lease in zip(claimed, leases, strict=True)]


async def _rows(db: AsyncEngine, sql: str, ids: list[uuid.UUID]) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        result = await conn.execute(sa.text(sql), {"ids": ids})
        return [dict(r._mapping) for r in result]


SUCCEEDED = Outcome(
    status=JobState.SUCCEEDED,
    result_text="Hi there",
    stop_reason="end_turn",
    usage={"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 2},
    result={"id": "msg_1", "content": []},
    cost_micros=41,
)
FAILED = Outcome(
    status=JobState.FAILED,
    error={"code": "invalid_request", "message": "bad", "retryable": False},
)
RETRY = Outcome(
    status=JobState.SCHEDULED,
    error={"code": "overloaded", "message": "529", "retryable": True},
    retry_in_s=30.0,
)


async def test_concurrent_claims_and_outcomes_share_statements_and_write_what_single_ones_do(
    engine: AsyncEngine, db: AsyncEngine
) -> None:
    tenant = f"group-{uuid.uuid4().hex[:6]}"
    ids = await _pending(engine, tenant, 31)
    writes = JobWrites(engine, WORKER)

    claimed = await _claim_all(writes, ids, tenant)
    assert all(job is not None and job.status is JobState.RUNNING for job, _ in claimed)
    assert writes.claims.statements < len(ids), "claims were grouped (else this proves nothing)"

    # Job 0 is written alone by the single statement, as the reference for its twins.
    outcomes = [SUCCEEDED, FAILED, RETRY]
    first, first_lease = claimed[0]
    assert first is not None
    alone = await transitions.finish(engine, first.id, first_lease, SUCCEEDED, seq_floor=first.seq)
    assert alone is not None
    done = await asyncio.gather(
        *(
            writes.finish(job.id, lease, outcomes[i % 3], seq_floor=job.seq + 5)
            for i, (job, lease) in enumerate(claimed)
            if i > 0 and job is not None
        )
    )
    assert writes.finishes.statements < len(ids) - 1, "outcomes were grouped"
    assert [d.status if d else None for d in done] == [
        outcomes[i % 3].status for i in range(1, len(ids))
    ]
    for d in done:
        assert d is not None and d.lease_id is None and d.seq == 2 + 5 + 1
    twin = next(d for d in done if d is not None and d.status is JobState.SUCCEEDED)
    columns = (
        "result_text, stop_reason, input_tokens, output_tokens, cache_read_input_tokens,"
        " cache_creation_input_tokens, result, cost_micros, error, dead_reason, attempts,"
        " finished_at IS NOT NULL AS finished, run_at IS NULL AS no_timer, published_at"
        " IS NOT NULL AS published, heartbeat_at IS NULL AS no_heartbeat"
    )
    rows = await _rows(
        db, f"SELECT id, {columns} FROM jobs WHERE id = ANY(:ids)", [alone.id, twin.id]
    )
    by_id = {r.pop("id"): r for r in rows}
    assert by_id[alone.id] == by_id[twin.id], "a grouped outcome writes what a single one does"
    retried = next(d for d in done if d is not None and d.status is JobState.SCHEDULED)
    assert (
        retried.run_at is not None and retried.published_at is None and retried.finished_at is None
    )

    history = await _rows(
        db,
        "SELECT job_id, seq, status, previous, attempt, detail, actor FROM job_events"
        " WHERE job_id = ANY(:ids) AND seq > 1 ORDER BY job_id, seq",
        ids,
    )
    for i, job_id in enumerate(ids):
        mine = [h for h in history if h["job_id"] == job_id]
        outcome = SUCCEEDED if i == 0 else outcomes[i % 3]
        assert [(h["status"], h["previous"], h["attempt"]) for h in mine] == [
            ("running", "pending", 1),
            (outcome.status.value, "running", 1),
        ]
        assert mine[1]["detail"] == outcome.error
    attempts = await _rows(
        db,
        "SELECT job_id, attempt, lease_id, worker, outcome, error, input_tokens,"
        " finished_at IS NOT NULL AS finished FROM job_attempts WHERE job_id = ANY(:ids)",
        ids,
    )
    leases = {job.id: lease for job, lease in claimed if job is not None}
    assert len(attempts) == len(ids)
    for a in attempts:
        i = ids.index(a["job_id"])
        outcome = SUCCEEDED if i == 0 else outcomes[i % 3]
        assert (a["attempt"], a["lease_id"], a["worker"], a["outcome"], a["finished"]) == (
            1,
            leases[a["job_id"]],
            WORKER,
            outcome.status.value,
            True,
        )
        assert a["error"] == outcome.error
        assert a["input_tokens"] == (outcome.usage or {}).get("input_tokens")


async def test_an_outcome_whose_lease_was_taken_over_is_refused_alone_in_its_group(
    engine: AsyncEngine, db: AsyncEngine
) -> None:
    tenant = f"lease-{uuid.uuid4().hex[:6]}"
    ids = await _pending(engine, tenant, 12)
    writes = JobWrites(engine, WORKER)
    claimed = await _claim_all(writes, ids, tenant)
    taken = ids[5]
    async with db.begin() as conn:  # stalled-job recovery and another worker's claim
        await conn.execute(
            sa.text("UPDATE jobs SET lease_id = :other WHERE id = :id"),
            {"other": uuid.uuid4(), "id": taken},
        )
    done = await asyncio.gather(
        *(writes.finish(job.id, lease, SUCCEEDED) for job, lease in claimed if job is not None)
    )
    assert writes.finishes.statements < len(ids)
    assert [d is None for d in done] == [job_id == taken for job_id in ids]
    status = await _rows(db, "SELECT id, status FROM jobs WHERE id = ANY(:ids)", ids)
    assert {r["id"]: r["status"] for r in status} == {
        job_id: "running" if job_id == taken else "succeeded" for job_id in ids
    }


async def test_a_limited_tenant_never_runs_more_than_its_limit_from_a_group(
    engine: AsyncEngine, db: AsyncEngine
) -> None:
    limited = f"limited-{uuid.uuid4().hex[:6]}"
    free = f"free-{uuid.uuid4().hex[:6]}"
    await set_tenant_limits(db, limited, max_running=2)
    limited_ids = await _pending(engine, limited, 6)
    free_ids = await _pending(engine, free, 6)
    writes = JobWrites(engine, WORKER)

    results = await asyncio.gather(
        *(writes.claim(i, uuid.uuid4(), limited) for i in limited_ids),
        *(writes.claim(i, uuid.uuid4(), free) for i in free_ids),
    )
    jobs = [job for job, _ in results]
    assert sum(job is not None for job in jobs[:6]) == 2, "the limit holds within a group"
    assert all(job is not None for job in jobs[6:]), "the other tenant's claims all went"
    assert writes.claims.statements < 12
    async with db.connect() as conn:
        count = (
            await conn.execute(
                sa.text("SELECT running FROM tenants WHERE tenant = :t"), {"t": limited}
            )
        ).scalar_one()
    assert count == 2


async def test_one_bad_value_fails_only_its_own_outcome_in_a_group(
    engine: AsyncEngine, db: AsyncEngine
) -> None:
    tenant = f"bad-{uuid.uuid4().hex[:6]}"
    ids = await _pending(engine, tenant, 16)
    writes = JobWrites(engine, WORKER)
    claimed = await _claim_all(writes, ids, tenant)
    bad = Outcome(status=JobState.SUCCEEDED, result_text="a NUL \x00 in the answer")
    results = await asyncio.gather(
        *(
            writes.finish(job.id, lease, bad if i == 7 else SUCCEEDED)
            for i, (job, lease) in enumerate(claimed)
            if job is not None
        ),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and is_data_error(errors[0]) and results.index(errors[0]) == 7
    assert writes.finishes.statements > 2, "the group was split to find the bad value"
    status = await _rows(db, "SELECT id, status FROM jobs WHERE id = ANY(:ids)", ids)
    assert {r["id"]: r["status"] for r in status} == {
        job_id: "running" if i == 7 else "succeeded" for i, job_id in enumerate(ids)
    }


async def test_two_deliveries_of_one_job_in_a_group_claim_it_once(
    engine: AsyncEngine, db: AsyncEngine
) -> None:
    tenant = f"twice-{uuid.uuid4().hex[:6]}"
    ids = await _pending(engine, tenant, 4)
    writes = JobWrites(engine, WORKER)
    claimed = await _claim_all(writes, [ids[0], *ids, ids[0]], tenant)
    assert writes.claims.statements < 6
    firsts = [job for job, _ in claimed if job is not None and job.id == ids[0]]
    assert len(firsts) == 1, "one delivery claimed it, the others found it running"
    winner = next(lease for job, lease in claimed if job is not None and job.id == ids[0])
    assert firsts[0].lease_id == winner
    attempts = await _rows(db, "SELECT job_id FROM job_attempts WHERE job_id = ANY(:ids)", ids)
    assert sorted(a["job_id"] for a in attempts) == sorted(ids)


async def test_a_lone_write_goes_at_once_and_later_ones_wait_for_it() -> None:
    gate = asyncio.Event()
    groups: list[list[int]] = []

    async def one(item: int) -> int:
        groups.append([item])
        await gate.wait()
        return item * 10

    async def many(items: list[int]) -> list[int]:
        groups.append(items)
        return [i * 10 for i in items]

    writer: GroupWriter[int, int] = GroupWriter(one, many, name="test")
    first = asyncio.create_task(writer.write(1))
    await asyncio.sleep(0.01)
    assert groups == [[1]], "a lone write started without waiting for company"
    later = [asyncio.create_task(writer.write(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert groups == [[1]], "the later writes wait for the running statement"
    gate.set()
    results = [r for r, _ in await asyncio.gather(first, *later)]
    assert results == [10, 20, 30, 40]
    assert groups == [[1], [2, 3, 4]]


class _Publisher:
    def __init__(self) -> None:
        self.singles: list[tuple[str, dict[str, Any] | None]] = []
        self.batches: list[list[tuple[Job, str | None, str]]] = []

    async def publish(self, event: Any, headers: dict[str, Any] | None = None) -> None:
        self.singles.append((event.job_id, headers))

    async def publish_changes(self, changes: list[tuple[Job, str | None, str]]) -> int:
        self.batches.append(changes)
        return len({(job.tenant, job.status) for job, _, _ in changes})


async def test_status_changes_of_one_loop_turn_go_out_together(
    engine: AsyncEngine,
) -> None:
    tenant = f"events-{uuid.uuid4().hex[:6]}"
    ids = await _pending(engine, tenant, 5)
    writes = JobWrites(engine, WORKER)
    jobs = [job for job, _ in await _claim_all(writes, ids, tenant) if job is not None]
    publisher = _Publisher()
    events = StatusEvents(publisher)  # type: ignore[arg-type]

    await asyncio.gather(*(events.publish(job, "pending") for job in jobs))
    assert publisher.singles == [] and len(publisher.batches) == 1
    assert [(j.id, p) for j, p, _ in publisher.batches[0]] == [(j.id, "pending") for j in jobs]

    await events.publish(jobs[0], "pending")
    assert [job_id for job_id, _ in publisher.singles] == [str(jobs[0].id)], "alone: one event"
