"""SyncConveyorClient on the real stack: every method of ConveyorClient, blocking; the
streams as plain iterators; the same errors, with nothing written for refused input.

The tests are `async def` only to read the database; each calls the blocking client
as a script does (it runs its own loop in its own thread, so a running loop in the
caller's thread, as in a notebook, is no obstacle)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    job_status_name,
)
from conveyor.client.sync import SyncConveyorClient
from conveyor.db.admin import create_api_key
from conveyor.v1 import jobs_pb2
from tests.stack import Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
FAST = {"x-sim-latency-ms": "0", "x-sim-tokens": "3", "x-sim-tokens-per-second": "0"}


def _request(prompt: str = "Say hi.", **fields: Any) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        model=MODEL,
        max_tokens=16,
        messages=[jobs_pb2.Message(role="user", content=prompt)],
        labels=fields.pop("labels", FAST),
        **fields,
    )


@pytest.fixture
async def tenant(db: AsyncEngine) -> str:
    return f"sync-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def key(db: AsyncEngine, tenant: str) -> str:
    made, _ = await create_api_key(db, tenant, "sync-client", "member")
    return made


@pytest.fixture
def conveyor(stack: Stack, key: str) -> Iterator[SyncConveyorClient]:
    with SyncConveyorClient(stack.gateway, stack.notifier, api_key=key) as client:
        yield client


async def _jobs_of(db: AsyncEngine, tenant: str) -> int:
    async with db.connect() as conn:
        query = sa.text("SELECT count(*) FROM jobs WHERE tenant = :t")
        return int((await conn.execute(query, {"t": tenant})).scalar_one())


async def test_submit_watch_and_wait_block_until_the_job_is_done(
    conveyor: SyncConveyorClient,
) -> None:
    job = conveyor.submit(MODEL, "Say hi.", max_tokens=16, labels=FAST)
    assert job.status == jobs_pb2.JOB_STATUS_PENDING

    events = list(conveyor.watch(job.id))
    final = conveyor.wait(job.id, timeout=60)

    assert events[0].WhichOneof("payload") == "snapshot"
    assert events[-1].status_changed.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    text = "".join(e.token_delta.text for e in events if e.HasField("token_delta"))
    assert final.status == jobs_pb2.JOB_STATUS_SUCCEEDED and final.result_text == text
    assert conveyor.get(job.id).result_text == text
    history = [job_status_name(h.status) for h in conveyor.history(job.id)]
    assert history[0] == "pending" and history[-1] == "succeeded"


async def test_create_submit_request_and_submit_many_submit_as_the_async_client_does(
    conveyor: SyncConveyorClient,
) -> None:
    made = conveyor.create(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "Hi"}], labels=FAST
    )
    first = conveyor.submit_request(_request(idempotency_key=f"k-{made.id}"))
    again = conveyor.submit_request(_request(idempotency_key=f"k-{made.id}"))
    many = conveyor.submit_many([_request(f"n{i}") for i in range(3)])

    assert conveyor.get(made.id).request_json, "the whole body travelled"
    assert again.idempotent_replay and again.job.id == first.job.id
    prompts = [json.loads(conveyor.get(j.id).request_json)["messages"][0]["content"] for j in many]
    assert prompts == ["n0", "n1", "n2"], "in request order"
    for job in [made, first.job, *many]:
        assert conveyor.wait(job.id, timeout=60).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_list_pages_and_iter_jobs_iterates_every_page(conveyor: SyncConveyorClient) -> None:
    batch = {"batch": uuid.uuid4().hex, **FAST}
    ids = [j.id for j in conveyor.submit_many([_request(labels=batch) for _ in range(5)])]

    page, token = conveyor.list(labels=batch, page_size=2)
    every = [job.id for job in conveyor.iter_jobs(labels=batch, page_size=2)]

    assert len(page) == 2 and token
    assert sorted(every) == sorted(ids)


async def test_watch_jobs_iterates_many_jobs_until_all_are_done(
    conveyor: SyncConveyorClient,
) -> None:
    ids = [j.id for j in conveyor.submit_many([_request(f"m{i}") for i in range(3)])]

    done = {
        e.job_id
        for e in conveyor.watch_jobs(ids)
        if e.WhichOneof("payload") == "status_changed"
        and e.status_changed.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    }

    assert done == set(ids)


async def test_leaving_a_watch_early_closes_it_and_the_client_goes_on(
    conveyor: SyncConveyorClient,
) -> None:
    slow = {"x-sim-tokens": "200", "x-sim-tokens-per-second": "50"}
    job = conveyor.submit(MODEL, "Count slowly.", max_tokens=256, labels=slow)

    for _event in conveyor.watch(job.id):
        break  # the stream is closed on the client's loop

    assert conveyor.cancel(job.id).id == job.id
    assert conveyor.wait(job.id, timeout=60).status == jobs_pb2.JOB_STATUS_CANCELLED


async def test_refused_calls_raise_the_async_clients_errors_and_write_nothing(
    conveyor: SyncConveyorClient, db: AsyncEngine, tenant: str
) -> None:
    before = await _jobs_of(db, tenant)

    with pytest.raises(InvalidArgument) as bad:
        conveyor.submit(MODEL, "Hi", max_tokens=16, lane="no-such-lane")
    with pytest.raises(NotFound):
        conveyor.get(str(uuid.uuid4()))
    with pytest.raises(InvalidArgument):
        conveyor.get("not-a-uuid")

    assert [f for f, _ in bad.value.field_violations] == ["lane"]
    assert await _jobs_of(db, tenant) == before, "nothing written"


async def test_cancel_retry_priority_and_delete_change_the_job(
    conveyor: SyncConveyorClient,
) -> None:
    later = conveyor.submit(MODEL, "Later.", max_tokens=16, delay=timedelta(hours=1))
    failing = conveyor.submit(MODEL, "Fail.", max_tokens=16, labels={"x-sim-fail": "400"})

    assert conveyor.set_priority(later.id, 7).priority == 7
    assert conveyor.cancel(later.id).status == jobs_pb2.JOB_STATUS_CANCELLED
    with pytest.raises(FailedPrecondition):
        conveyor.cancel(later.id)
    assert conveyor.wait(failing.id, timeout=60).status == jobs_pb2.JOB_STATUS_FAILED
    assert conveyor.retry(failing.id).status == jobs_pb2.JOB_STATUS_PENDING
    conveyor.delete(later.id)

    with pytest.raises(NotFound):
        conveyor.get(later.id)


async def test_stats_count_the_tenants_jobs(conveyor: SyncConveyorClient, tenant: str) -> None:
    job = conveyor.submit(MODEL, "Hi", max_tokens=16, labels=FAST)
    conveyor.wait(job.id, timeout=60)

    stats = conveyor.stats()

    assert stats.tenant == tenant
    assert stats.counts["succeeded"] >= 1
    with pytest.raises(PermissionDenied):
        conveyor.stats(all_tenants=True)


async def test_schedules_are_created_listed_paused_resumed_and_deleted(
    conveyor: SyncConveyorClient,
) -> None:
    made = conveyor.create_schedule(
        _request(), interval=timedelta(hours=6), name="nightly", paused=True
    )

    listed, _ = conveyor.list_schedules()
    assert [s.id for s in listed] == [made.id] and listed[0].paused
    assert not conveyor.resume_schedule(made.id).paused
    assert conveyor.pause_schedule(made.id).paused
    assert conveyor.get_schedule(made.id).name == "nightly"
    conveyor.delete_schedule(made.id)
    with pytest.raises(NotFound):
        conveyor.get_schedule(made.id)


async def test_bulk_actions_count_then_act_on_the_filtered_jobs(
    conveyor: SyncConveyorClient,
) -> None:
    batch = {"bulk": uuid.uuid4().hex}
    later = [_request(labels=batch) for _ in range(3)]
    for request in later:
        request.delay.FromTimedelta(timedelta(hours=1))
    ids = [j.id for j in conveyor.submit_many(later)]
    flt = SyncConveyorClient.job_filter(labels=batch)

    counted = conveyor.cancel_jobs(flt, dry_run=True)
    done = conveyor.cancel_jobs(flt, reason="sync test")
    retried = conveyor.retry_jobs(flt, dry_run=True)
    redriven = conveyor.redrive_dead(dry_run=True)

    assert counted.matched == 3 and counted.changed == 0
    assert done.changed == 3 and done.action_id
    assert {conveyor.get(i).status for i in ids} == {jobs_pb2.JOB_STATUS_CANCELLED}
    assert retried.matched == 0 and redriven.dry_run


async def test_a_lane_is_paused_listed_and_resumed_for_the_tenant(
    conveyor: SyncConveyorClient, tenant: str
) -> None:
    pause = conveyor.pause_lane("bulk", reason="provider down")

    assert (pause.lane, pause.tenant) == ("bulk", tenant)
    assert [(p.lane, p.reason) for p in conveyor.lane_pauses()] == [("bulk", "provider down")]
    assert conveyor.resume_lane("bulk") is True
    assert conveyor.lane_pauses() == []


async def test_workers_are_listed_for_an_operator_and_refused_to_a_member(
    stack: Stack, db: AsyncEngine, conveyor: SyncConveyorClient
) -> None:
    key, _ = await create_api_key(db, "operators", f"op-{uuid.uuid4().hex[:8]}", "operator")
    with SyncConveyorClient(stack.gateway, stack.notifier, api_key=key) as operator:
        workers = operator.workers()
        with pytest.raises(NotFound):
            operator.drain_worker(str(uuid.uuid4()))

    assert workers and all(w.lanes for w in workers)
    with pytest.raises(PermissionDenied):
        conveyor.workers()
    with pytest.raises(PermissionDenied):
        conveyor.drain_worker(workers[0].id)
    assert not operator_sees_draining(stack, key, workers[0].id)


def operator_sees_draining(stack: Stack, key: str, worker_id: str) -> bool:
    """Whether the worker is draining (the member's refused drain must not have started it)."""
    with SyncConveyorClient(stack.gateway, stack.notifier, api_key=key) as operator:
        return any(w.draining for w in operator.workers() if w.id == worker_id)
