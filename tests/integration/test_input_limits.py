"""Input limits come from the settings: a gateway configured with small ones answers
each request beyond them INVALID_ARGUMENT naming the field, and writes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient, InvalidArgument
from conveyor.v1 import jobs_pb2
from tests.conftest import count_jobs
from tests.stack import Stack

pytestmark = pytest.mark.integration

LIMITS = {
    "CONVEYOR_MAX_PROMPT_CHARS": "200",
    "CONVEYOR_MAX_MESSAGES": "3",
    "CONVEYOR_MAX_OUTPUT_TOKENS": "1000",
    "CONVEYOR_MAX_METADATA_CHARS": "16",
    "CONVEYOR_MAX_LABELS": "2",
    "CONVEYOR_MAX_LABEL_CHARS": "16",
    "CONVEYOR_MAX_WEBHOOK_URL_CHARS": "40",
    "CONVEYOR_ALLOWED_MODELS": '["claude-*"]',
}


def _msg(role: str, content: str) -> jobs_pb2.Message:
    return jobs_pb2.Message(role=role, content=content)


def _request(**fields: object) -> jobs_pb2.SubmitJobRequest:
    req = jobs_pb2.SubmitJobRequest(
        model="claude-sonnet-4-5", max_tokens=16, messages=[_msg("user", "Hello")]
    )
    for name, value in fields.items():
        if name == "messages":
            del req.messages[:]
            req.messages.extend(value)  # type: ignore[arg-type]
        elif name in ("labels", "metadata"):
            getattr(req, name).update(value)
        elif name == "stop_sequences":
            req.stop_sequences.extend(value)  # type: ignore[arg-type]
        else:
            setattr(req, name, value)
    return req


BAD_REQUESTS: list[tuple[str, str, dict[str, object]]] = [
    ("model not in the allowed list", "model", {"model": "gpt-4o"}),
    ("max_tokens over the provider's range", "max_tokens", {"max_tokens": 1001}),
    ("max_tokens zero", "max_tokens", {"max_tokens": 0}),
    ("temperature below 0", "temperature", {"temperature": -0.1}),
    ("temperature above 1", "temperature", {"temperature": 1.01}),
    ("prompt too long", "messages", {"messages": [_msg("user", "x" * 201)]}),
    ("system prompt too long", "system", {"system": "s" * 201}),
    (
        "system and messages together too long",
        "messages",
        {"system": "s" * 150, "messages": [_msg("user", "x" * 51)]},
    ),
    (
        "too many messages",
        "messages",
        {
            "messages": [
                _msg("user", "a"),
                _msg("assistant", "b"),
                _msg("user", "c"),
                _msg("assistant", "d"),
            ]
        },
    ),
    ("metadata key the Messages API refuses", "metadata['team']", {"metadata": {"team": "x"}}),
    ("metadata value too long", "metadata['user_id']", {"metadata": {"user_id": "u" * 17}}),
    ("too many labels", "labels", {"labels": {"a": "1", "b": "2", "c": "3"}}),
    ("label value too long", "labels['a']", {"labels": {"a": "v" * 17}}),
    ("label key too long", f"labels[{'k' * 17!r}]", {"labels": {"k" * 17: "v"}}),
    (
        "webhook URL too long",
        "webhook_url",
        {"webhook_url": "https://example.invalid/" + "h" * 17},
    ),
    ("stop sequence too long", "stop_sequences[0]", {"stop_sequences": ["s" * 257]}),
]


@pytest.fixture(scope="module")
async def limited(stack: Stack, api_key: str) -> AsyncIterator[ConveyorClient]:
    """A client of a gateway restarted with small limits (restored afterwards)."""
    stack.stop("gateway")
    stack.start("gateway", **LIMITS)
    try:
        async with ConveyorClient(stack.gateway, stack.notifier, api_key=api_key) as c:
            yield c
    finally:
        stack.stop("gateway")
        stack.start("gateway")


@pytest.mark.parametrize(
    ("field", "fields"),
    [(field, fields) for _, field, fields in BAD_REQUESTS],
    ids=[case for case, _, _ in BAD_REQUESTS],
)
async def test_a_request_beyond_a_limit_names_the_field_and_writes_nothing(
    limited: ConveyorClient, db: AsyncEngine, field: str, fields: dict[str, object]
) -> None:
    before = await count_jobs(db)
    with pytest.raises(InvalidArgument) as err:
        await limited.submit_request(_request(**fields))
    assert [f for f, _ in err.value.field_violations] == [field]
    assert err.value.details.startswith(field)
    assert await count_jobs(db) == before


async def test_a_request_at_every_limit_is_accepted(
    limited: ConveyorClient, db: AsyncEngine
) -> None:
    before = await count_jobs(db)
    response = await limited.submit_request(
        _request(
            model="claude-haiku-4-5",
            max_tokens=1000,
            temperature=1.0,
            system="s" * 100,
            messages=[_msg("user", "a" * 50), _msg("assistant", "b" * 25), _msg("user", "c" * 25)],
            metadata={"user_id": "u" * 16},
            labels={"a": "v" * 16, "k" * 16: "v"},
            webhook_url="https://example.invalid/" + "h" * 16,
        )
    )
    assert response.job.status == jobs_pb2.JOB_STATUS_PENDING
    assert await count_jobs(db) == before + 1
    done = await limited.wait(response.job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_a_bad_job_in_a_batch_is_named_by_its_index_and_nothing_is_written(
    limited: ConveyorClient, db: AsyncEngine
) -> None:
    before = await count_jobs(db)
    with pytest.raises(InvalidArgument) as err:
        await limited.submit_many([_request(), _request(model="gpt-4o")])
    assert [f for f, _ in err.value.field_violations] == ["jobs[1].model"]
    assert await count_jobs(db) == before
