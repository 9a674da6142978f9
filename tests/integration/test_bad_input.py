"""Bad requests get INVALID_ARGUMENT naming the field, and nothing is written."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient, FailedPrecondition, InvalidArgument
from conveyor.v1 import jobs_pb2
from tests.conftest import count_jobs

pytestmark = pytest.mark.integration


def _request(**overrides: object) -> jobs_pb2.SubmitJobRequest:
    req = jobs_pb2.SubmitJobRequest(
        model="claude-sonnet-4-5",
        max_tokens=16,
        messages=[jobs_pb2.Message(role="user", content="Hello")],
    )
    for name, value in overrides.items():
        if name == "messages":
            del req.messages[:]
            req.messages.extend(value)  # type: ignore[arg-type]
        elif name in ("labels", "metadata"):
            getattr(req, name).update(value)
        elif name == "stop_sequences":
            req.stop_sequences.extend(value)  # type: ignore[arg-type]
        elif name == "delay_s":
            req.delay.FromSeconds(int(value))  # type: ignore[call-overload]
        else:
            setattr(req, name, value)
    return req


BAD_REQUESTS = [
    ("model", {"model": ""}),
    ("model", {"model": "no spaces allowed"}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": 1_000_000}),
    ("messages", {"messages": []}),
    ("messages[0].role", {"messages": [jobs_pb2.Message(role="robot", content="x")]}),
    ("messages[0].role", {"messages": [jobs_pb2.Message(role="assistant", content="x")]}),
    (
        "messages[1].content",
        {
            "messages": [
                jobs_pb2.Message(role="user", content="a"),
                jobs_pb2.Message(role="assistant", content=""),
            ]
        },
    ),
    ("temperature", {"temperature": 1.5}),
    ("priority", {"priority": 10}),
    ("priority", {"priority": -1}),
    ("lane", {"lane": "express"}),
    ("max_attempts", {"max_attempts": 99}),
    ("idempotency_key", {"idempotency_key": "k" * 300}),
    ("webhook_url", {"webhook_url": "ftp://example.com/hook"}),
    ("delay", {"delay_s": -5}),
    ("labels", {"labels": {f"k{i}": "v" for i in range(40)}}),
    ("stop_sequences[0]", {"stop_sequences": ["   "]}),
]


@pytest.mark.parametrize(
    ("field", "overrides"), BAD_REQUESTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_REQUESTS)]
)
async def test_a_bad_field_is_named_and_nothing_is_written(
    client: ConveyorClient, db: AsyncEngine, field: str, overrides: dict[str, object]
) -> None:
    before = await count_jobs(db)
    with pytest.raises(InvalidArgument) as err:
        await client.submit_request(_request(**overrides))
    assert [f for f, _ in err.value.field_violations] == [field]
    assert field in err.value.details
    assert await count_jobs(db) == before


async def test_one_bad_job_rejects_the_whole_batch(client: ConveyorClient, db: AsyncEngine) -> None:
    before = await count_jobs(db)
    with pytest.raises(InvalidArgument) as err:
        await client.submit_many([_request(), _request(), _request(max_tokens=0)])
    assert [f for f, _ in err.value.field_violations] == ["jobs[2].max_tokens"]
    assert await count_jobs(db) == before


async def test_a_malformed_job_id_is_invalid(client: ConveyorClient) -> None:
    with pytest.raises(InvalidArgument) as err:
        await client.get("not-a-uuid")
    assert [f for f, _ in err.value.field_violations] == ["id"]


async def test_a_finished_job_cannot_be_cancelled(client: ConveyorClient) -> None:
    job = await client.wait((await client.submit("claude-sonnet-4-5", "x", max_tokens=8)).id, 30)
    with pytest.raises(FailedPrecondition):
        await client.cancel(job.id)
    assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_only_failed_or_dead_jobs_can_be_retried(client: ConveyorClient) -> None:
    job = await client.wait((await client.submit("claude-sonnet-4-5", "x", max_tokens=8)).id, 30)
    with pytest.raises(FailedPrecondition):
        await client.retry(job.id)
    after = await client.get(job.id)
    assert after.status == jobs_pb2.JOB_STATUS_SUCCEEDED and after.attempts == 1
