"""The batch lane: jobs of a lane configured as batch go through the Message Batches
API (the simulator's), gathered by the dispatcher's batcher, with the worker's rules
for outcomes, cancelling, and crash safety (a batch is recorded before it is created,
and a restarted dispatcher adopts it instead of creating a duplicate)."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.core import pricing
from conveyor.core.config import DEFAULT_TENANT
from conveyor.db.admin import create_api_key
from conveyor.db.engine import create_engine
from conveyor.v1 import jobs_pb2
from tests.conftest import eventually, finished, job_history
from tests.stack import Stack, backing_services

MODEL = "claude-sonnet-4-5"
LANE = "batch"
BATCH_ENV = {
    "CONVEYOR_LANES": '["interactive", "default", "bulk", "batch"]',
    "CONVEYOR_WORKER_LANES": '["interactive", "default", "bulk"]',
    "CONVEYOR_BATCH_LANES": '["batch"]',
    "CONVEYOR_BATCH_MAX_WAIT_S": "0.3",
    "CONVEYOR_BATCH_POLL_S": "0.2",
    "CONVEYOR_BATCH_POLL_MAX_S": "0.4",
    "SIM_BATCH_PROCESSING_S": "0.5",
}
SERVICES = ("simulator", "gateway", "notifier", "dispatcher", "worker")


@pytest.fixture(scope="module")
def batch_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own (own vhost and database) with a `batch` lane."""
    saved = dict(os.environ)
    try:
        with backing_services() as backing:
            s = Stack(backing, Path(tmp_path_factory.mktemp("batches")), BATCH_ENV)
            try:
                for name in SERVICES:
                    s.start(name)
                yield s
            finally:
                s.stop_all()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
async def bdb(batch_stack: Stack) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(batch_stack.backing.database_url, pool_size=2, pre_ping=True)
    yield engine
    await engine.dispose()


@pytest.fixture
async def bclient(batch_stack: Stack, bdb: AsyncEngine) -> AsyncIterator[ConveyorClient]:
    key, _ = await create_api_key(bdb, DEFAULT_TENANT, f"batch-{uuid.uuid4().hex[:8]}", "member")
    async with ConveyorClient(batch_stack.gateway, batch_stack.notifier, api_key=key) as c:
        yield c


def sim(stack: Stack, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST `body` to) the simulator."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        stack.simulator_url + path, data=data, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def batches_created(stack: Stack) -> int:
    return int(sim(stack, "/batches/stats")["created"])


async def one(db: AsyncEngine, sql: str, **params: Any) -> Any:
    async with db.connect() as conn:
        return (await conn.execute(sa.text(sql), params)).one()


async def batches_of(db: AsyncEngine, job_id: str) -> list[Any]:
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT b.*, bj.outcome FROM batch_jobs bj JOIN batches b ON b.id = bj.batch_id"
                " WHERE bj.job_id = :id ORDER BY b.recorded_at"
            ),
            {"id": uuid.UUID(job_id)},
        )
        return list(rows)


async def settled_batches(db: AsyncEngine, job_id: str) -> list[Any]:
    """The job's batches once each is ended (results are written, then the batch ends)."""

    async def ended() -> bool:
        return all(b.status == "ended" for b in await batches_of(db, job_id))

    await eventually(ended)
    return await batches_of(db, job_id)


async def submit(client: ConveyorClient, n: int, **kw: Any) -> list[jobs_pb2.Job]:
    return [
        await client.submit(MODEL, f"batch {i} {uuid.uuid4()}", max_tokens=16, lane=LANE, **kw)
        for i in range(n)
    ]


async def test_batch_lane_jobs_run_in_one_batch_at_the_batch_service_tier_and_price(
    batch_stack: Stack, bclient: ConveyorClient, bdb: AsyncEngine
) -> None:
    before = batches_created(batch_stack)
    jobs = await submit(bclient, 4, webhook_url="http://127.0.0.1:9/hook")
    done = [await finished(bclient, j.id) for j in jobs]
    assert [d.status for d in done] == [jobs_pb2.JOB_STATUS_SUCCEEDED] * 4
    assert all(d.attempts == 1 and d.result_text for d in done)
    assert batches_created(batch_stack) == before + 1, "the four jobs went as one batch"
    batch_ids = {b.id for j in jobs for b in await batches_of(bdb, j.id)}
    assert len(batch_ids) == 1
    batch = (await settled_batches(bdb, jobs[0].id))[0]
    assert batch.request_count == 4
    assert batch.provider_batch_id.startswith("msgbatch_")
    total = 0
    for j in jobs:
        row = await one(
            bdb,
            "SELECT result, lease_id, input_tokens FROM jobs WHERE id = :id",
            id=uuid.UUID(j.id),
        )
        usage = row.result["usage"]
        assert usage["service_tier"] == "batch"
        batch_price = pricing.cost_micros(MODEL, usage, batch=True)
        full_price = pricing.cost_micros(MODEL, usage)
        assert batch_price is not None and full_price is not None
        assert abs(batch_price * 2 - full_price) <= 2, "half price, allowing for rounding"
        total += batch_price
        job = next(d for d in done if d.id == j.id)
        assert job.priced and job.cost_micros == batch_price, "the job costs the batch price"
        # Its history shows the batch it ran in; webhooks were written by the triggers.
        detail = await one(
            bdb,
            "SELECT detail FROM job_events WHERE job_id = :id AND status = 'running'",
            id=uuid.UUID(j.id),
        )
        assert detail.detail["batch_id"] == str(batch.id)
        assert detail.detail["provider_batch_id"] == batch.provider_batch_id
        worker = await one(
            bdb, "SELECT worker FROM job_attempts WHERE job_id = :id", id=uuid.UUID(j.id)
        )
        assert worker.worker == f"batch:{batch.provider_batch_id}", "no worker ran it"
        hooks = await one(
            bdb,
            "SELECT count(*) AS n FROM webhook_deliveries WHERE job_id = :id"
            " AND event = 'succeeded'",
            id=uuid.UUID(j.id),
        )
        assert hooks.n == 1
    assert batch.cost_micros == total
    assert await job_history(bdb, jobs[0].id) == ["pending", "running", "succeeded"]


async def test_a_transient_batch_error_is_retried_through_the_lane_and_a_permanent_one_fails(
    bclient: ConveyorClient, bdb: AsyncEngine
) -> None:
    transient = (
        await submit(
            bclient,
            1,
            labels={"x-sim-batch-result": "errored-529", "x-sim-fail-attempts": "1"},
        )
    )[0]
    permanent = (await submit(bclient, 1, labels={"x-sim-batch-result": "errored-400"}))[0]
    done = await finished(bclient, transient.id)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 2
    assert await job_history(bdb, transient.id) == [
        "pending",
        "running",
        "scheduled",
        "pending",
        "running",
        "succeeded",
    ]
    assert [b.outcome for b in await settled_batches(bdb, transient.id)] == ["errored", "succeeded"]
    failed = await finished(bclient, permanent.id)
    assert failed.status == jobs_pb2.JOB_STATUS_FAILED and failed.attempts == 1
    assert failed.error.code == "invalid_request_error" and not failed.error.retryable


async def test_an_expired_batch_request_is_retried_until_its_attempts_run_out(
    bclient: ConveyorClient, bdb: AsyncEngine
) -> None:
    once = (
        await submit(
            bclient, 1, labels={"x-sim-batch-result": "expired", "x-sim-fail-attempts": "1"}
        )
    )[0]
    always = (await submit(bclient, 1, labels={"x-sim-batch-result": "expired"}, max_attempts=2))[0]
    assert (await finished(bclient, once.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
    dead = await finished(bclient, always.id)
    assert dead.status == jobs_pb2.JOB_STATUS_DEAD and dead.attempts == 2
    assert dead.error.code == "batch_expired"
    assert [b.outcome for b in await settled_batches(bdb, always.id)] == ["expired", "expired"]


async def test_cancelling_every_job_of_a_batch_cancels_it_and_drops_the_results(
    batch_stack: Stack, bclient: ConveyorClient, bdb: AsyncEngine
) -> None:
    sim(batch_stack, "/control", {"batch_processing_s": 30})
    try:
        jobs = await submit(bclient, 2)

        async def running() -> bool:
            got = [await bclient.get(j.id) for j in jobs]
            return all(g.status == jobs_pb2.JOB_STATUS_RUNNING for g in got)

        await eventually(running)
        for j in jobs:
            await bclient.cancel(j.id, reason="not needed")
        for j in jobs:
            done = await finished(bclient, j.id)
            assert done.status == jobs_pb2.JOB_STATUS_CANCELLED
            assert not done.result_text, "no result"
        batch = (await settled_batches(bdb, jobs[0].id))[0]
        at_api = sim(batch_stack, f"/v1/messages/batches/{batch.provider_batch_id}")
        assert at_api["processing_status"] == "ended"
        assert at_api["request_counts"]["canceled"] == 2
        for j in jobs:
            assert (await job_history(bdb, j.id))[-1] == "cancelled"
            assert (await job_history(bdb, j.id)).count("cancelled") == 1
    finally:
        sim(batch_stack, "/control", {"batch_processing_s": 0.5})


@pytest.mark.parametrize("pause", ["recorded", "api", "created"])
async def test_a_batcher_killed_mid_batch_loses_no_job_finishes_none_twice_nor_duplicates_it(
    pause: str, batch_stack: Stack, bclient: ConveyorClient, bdb: AsyncEngine
) -> None:
    """kill -9 the dispatcher after recording a batch (`recorded`), after the API created
    it but before that was noted (`api`), and after noting it (`created`)."""
    batch_stack.stop("dispatcher")
    batch_stack.start("dispatcher", CONVEYOR_BATCH_TEST_PAUSE=pause)
    before = batches_created(batch_stack)
    jobs = await submit(bclient, 3)
    expected = {"recorded": "recorded", "api": "recorded", "created": "created"}[pause]

    async def reached() -> bool:
        rows = await batches_of(bdb, jobs[0].id)
        stuck = bool(rows) and rows[0].status == expected
        return stuck and (pause != "api" or batches_created(batch_stack) == before + 1)

    await eventually(reached)
    batch_stack.kill("dispatcher")
    batch_stack.start("dispatcher")
    done = [await finished(bclient, j.id) for j in jobs]
    assert [d.status for d in done] == [jobs_pb2.JOB_STATUS_SUCCEEDED] * 3
    assert all(d.attempts == 1 for d in done)
    assert batches_created(batch_stack) == before + 1, "no duplicate batch at the API"
    for j in jobs:
        assert (await job_history(bdb, j.id)).count("succeeded") == 1
        assert len(await batches_of(bdb, j.id)) == 1
