"""Group commit must not let one tenant's bad value fail another's submit, and its
queue is bounded.

Concurrent submits share INSERT statements (services.gateway.group_insert). A value
Postgres refuses fails a whole statement, so a bad row must fail only the submit
that carried it: the others of its group are inserted and accepted. Validation
refuses every such value known (a NUL), so the per-row path is driven here through
the GroupInsert and the servicer directly, with a row that skips validation.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient, InvalidArgument, ResourceExhausted
from conveyor.contract.validation import validate_submit
from conveyor.core.config import Settings
from conveyor.core.lifecycle import Job
from conveyor.db import jobs as db_jobs
from conveyor.db.engine import create_engine, is_data_error
from conveyor.v1 import jobs_pb2
from services.gateway.group_insert import GroupInsert
from services.gateway.servicer import JobServiceServicer
from tests.conftest import TenantClient, count_jobs
from tests.stack import Backing, Stack

pytestmark = pytest.mark.integration


def _request(prompt: str = "Hello", **fields: Any) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        model="claude-sonnet-4-5",
        max_tokens=8,
        messages=[jobs_pb2.Message(role="user", content=prompt)],
        **fields,
    )


def _job(tenant: str, prompt: str = "Hello") -> db_jobs.NewJob:
    """A job row as validation makes it; `prompt` goes in unchecked (to carry a NUL)."""
    job = validate_submit(_request(), Settings(), tenant)
    job.request["messages"][0]["content"] = prompt
    return job


async def _stored(db: AsyncEngine, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    async with db.connect() as conn:
        rows = await conn.execute(sa.text("SELECT id FROM jobs WHERE id = ANY(:ids)"), {"ids": ids})
        return {r.id for r in rows}


@pytest.fixture
async def engine(stack: Stack, backing: Backing) -> AsyncIterator[AsyncEngine]:
    """An engine of the test's own on the stack's database (the stack has migrated it)."""
    engine = create_engine(backing.database_url, pool_size=4)
    yield engine
    await engine.dispose()


async def test_one_bad_row_fails_only_its_own_submit_in_a_shared_insert(
    engine: AsyncEngine, db: AsyncEngine
) -> None:
    statements: list[int] = []
    inserts = GroupInsert(engine, interval_s=0.3)
    real_insert = db_jobs.insert_jobs

    async def counting(*args: Any) -> list[Job]:
        statements.append(len(args[1]))
        return await real_insert(*args)

    good = [[_job(f"iso-{i % 10}")] for i in range(50)]
    bad = [_job("iso-bad", prompt="a NUL \x00 in the prompt")]
    submits = good[:25] + [bad] + good[25:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db_jobs, "insert_jobs", counting)
        results = await asyncio.gather(
            *(inserts.insert(jobs, "tests") for jobs in submits), return_exceptions=True
        )
        await inserts.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and is_data_error(errors[0])
    assert results.index(errors[0]) == 25, "the bad submit, and only it, failed"
    assert max(statements) > 1, "submits were grouped (else the test proves nothing)"
    good_ids = [jobs[0].id for jobs in good]
    assert await _stored(db, good_ids) == set(good_ids)
    assert await _stored(db, [bad[0].id]) == set()


class _Queue:
    async def enqueue(self, jobs: list[Job]) -> None:
        return None


class _Events:
    async def publish_statuses(self, jobs: list[Job], previous: str | None) -> None:
        return None


async def test_the_servicer_answers_a_refused_row_invalid_argument_and_the_rest_accepted(
    engine: AsyncEngine, db: AsyncEngine
) -> None:
    settings = Settings(gateway_group_interval_ms=300)
    servicer = JobServiceServicer(
        settings,
        engine,
        cast(Any, _Queue()),
        cast(Any, _Events()),
        cast(Any, None),
        cast(Any, None),
    )
    good = [_job(f"svc-{i % 10}") for i in range(50)]
    bad = _job("svc-bad", prompt="\x00")
    calls = [servicer._store_and_enqueue([j], j.tenant, False) for j in good[:10]]
    calls.append(servicer._store_and_enqueue([bad], bad.tenant, False))
    calls += [servicer._store_and_enqueue([j], j.tenant, False) for j in good[10:]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    await servicer.close()
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], InvalidArgument)
    assert refused[0].field == "request"
    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert len(accepted) == 50
    assert all(r[0].job.status == jobs_pb2.JOB_STATUS_PENDING for r in accepted)
    assert await _stored(db, [j.id for j in good]) == {j.id for j in good}
    assert await _stored(db, [bad.id]) == set()


async def test_a_nul_among_50_concurrent_submits_of_other_tenants_fails_only_itself(
    client: ConveyorClient, tenant_client: TenantClient, db: AsyncEngine
) -> None:
    before = await count_jobs(db)
    async with (
        tenant_client("iso-a") as a,
        tenant_client("iso-b") as b,
        tenant_client("iso-c") as c,
        tenant_client("iso-d") as d,
        tenant_client("iso-e") as e,
    ):
        others = [a, b, c, d, e]
        good = [others[i % 5].submit_request(_request(f"hi {i}")) for i in range(50)]
        bad = client.submit_request(_request("bad \x00", labels={"run": "nul"}))
        results = await asyncio.gather(*good[:20], bad, *good[20:], return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], InvalidArgument), refused
    assert [f for f, _ in refused[0].field_violations] == ["messages[0].content"]
    accepted = [r for r in results if isinstance(r, jobs_pb2.SubmitJobResponse)]
    assert len(accepted) == 50
    assert await count_jobs(db) == before + 50, "the refused submit wrote nothing"


# --------------------------------------------------------------------------- bounded queue


@pytest.fixture(scope="module")
def small_queue(stack: Stack) -> Iterator[Stack]:
    """The stack's gateway restarted with a queue of 2 jobs and a slow pace (one INSERT a
    second), so that concurrent submits overfill it (restored afterwards)."""
    stack.stop("gateway")
    stack.start(
        "gateway", CONVEYOR_GATEWAY_MAX_WAITING_JOBS="2", CONVEYOR_GATEWAY_GROUP_INTERVAL_MS="1000"
    )
    try:
        yield stack
    finally:
        stack.stop("gateway")
        stack.start("gateway")


async def test_a_full_group_commit_queue_answers_resource_exhausted_and_writes_nothing(
    small_queue: Stack, api_key: str, db: AsyncEngine
) -> None:
    before = await count_jobs(db)
    async with ConveyorClient(small_queue.gateway, small_queue.notifier, api_key=api_key) as c:
        results = await asyncio.gather(
            *(c.submit_request(_request(f"q {i}")) for i in range(20)), return_exceptions=True
        )
    accepted = [r for r in results if isinstance(r, jobs_pb2.SubmitJobResponse)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(accepted) + len(refused) == 20, [r for r in results if isinstance(r, Exception)]
    assert refused and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert refused[0].retry_after is not None
    assert accepted, "the queue takes submits while it has room"
    assert await count_jobs(db) == before + len(accepted), "refused submits wrote nothing"
