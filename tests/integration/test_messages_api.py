"""Whole Messages API requests through the real stack: the body reaches the provider as
submitted, the whole answer comes back, malformed bodies are refused naming their path.

The simulator keeps each body it received under the job's `x-sim-record` label
(`GET /received/<key>`), so a test compares the body the provider saw with the one
submitted.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from typing import Any

import aiohttp
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient, InvalidArgument, content_blocks, message_of
from conveyor.v1 import events_pb2, jobs_pb2
from tests import bodies
from tests.conftest import count_jobs, finished
from tests.integration.test_plain_grpc import _call
from tests.stack import Stack

pytestmark = pytest.mark.integration

WEATHER = bodies.WEATHER_TOOL
TOOL_BODY = bodies.body(
    "What is the weather in Paris?",
    tools=[WEATHER],
    tool_choice={"type": "tool", "name": WEATHER["name"]},
)
THINKING_BODY = bodies.body(
    "Think, then answer.", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024}
)


async def received(stack: Stack, key: str) -> dict[str, Any]:
    """The body the simulator received with `x-sim-record: key`."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.simulator_url}/received/{key}") as resp,
    ):
        assert resp.status == 200, f"the simulator received no body under {key!r}"
        out: dict[str, Any] = orjson.loads(await resp.read())
        return out


def submit_body(
    body: dict[str, Any], labels: dict[str, str] | None = None
) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(request_json=orjson.dumps(body), labels=labels or {})


# ------------------------------------------------------------------- nothing lost on the way


async def _round_trip(
    client: ConveyorClient, stack: Stack, name: str, body: dict[str, Any]
) -> tuple[str, jobs_pb2.Job, dict[str, Any]]:
    key = uuid.uuid4().hex
    response = await client.submit_request(submit_body(body, {"x-sim-record": key}))
    final = await finished(client, response.job.id, within_s=60)
    return name, final, await received(stack, key)


async def test_every_request_shape_reaches_the_provider_as_submitted(
    client: ConveyorClient, stack: Stack
) -> None:
    assert len(bodies.VALID) >= 30
    results = await asyncio.gather(
        *(_round_trip(client, stack, name, copy.deepcopy(b)) for name, b in bodies.VALID)
    )
    for (name, final, seen), (_, body) in zip(results, bodies.VALID, strict=True):
        assert seen == {**body, "stream": True}, f"{name}: the provider got another body"
        assert final.status == jobs_pb2.JOB_STATUS_SUCCEEDED, (name, final.error)
        got = await client.get(final.id)
        assert orjson.loads(got.request_json) == body, f"{name}: the stored body differs"
        assert got.response_id.startswith("msg_") and got.response_model == body["model"]
        assert content_blocks(got), f"{name}: no content blocks kept"


async def test_the_short_form_and_the_body_form_send_sampling_parameters_alike(
    client: ConveyorClient, stack: Stack
) -> None:
    short, whole = uuid.uuid4().hex, uuid.uuid4().hex
    typed = jobs_pb2.SubmitJobRequest(
        model=bodies.MODEL,
        max_tokens=64,
        messages=[jobs_pb2.Message(role="user", content="Hi")],
        temperature=0.25,
        labels={"x-sim-record": short},
    )
    body = bodies.body("Hi", max_tokens=64, temperature=0.25)
    jobs = [
        (await client.submit_request(typed)).job,
        (await client.submit_request(submit_body(body, {"x-sim-record": whole}))).job,
    ]
    for job in jobs:
        assert (await finished(client, job.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert await received(stack, short) == await received(stack, whole) == {**body, "stream": True}


# ------------------------------------------------------------------- the whole answer


async def test_a_tool_call_comes_back_whole(client: ConveyorClient) -> None:
    job = await client.create(**copy.deepcopy(TOOL_BODY), priority=3, labels={"team": "tools"})
    final = await finished(client, job.id)

    assert final.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert final.stop_reason == "tool_use"
    (call,) = [b for b in content_blocks(final) if b["type"] == "tool_use"]
    assert call["name"] == "get_weather" and call["id"].startswith("toolu_")
    assert isinstance(call["input"], dict) and isinstance(call["input"].get("city"), str)
    message = message_of(final)  # the SDK's own Message, as messages.create returns it
    assert message.stop_reason == "tool_use"
    assert message.content[-1].type == "tool_use"
    assert final.usage.input_tokens > 0 and orjson.loads(final.usage.usage_json)["input_tokens"]


async def test_thinking_comes_back_with_its_signature(client: ConveyorClient) -> None:
    job = await client.create(**copy.deepcopy(THINKING_BODY))
    final = await finished(client, job.id)

    blocks = content_blocks(final)
    assert blocks[0]["type"] == "thinking" and blocks[0]["thinking"] and blocks[0]["signature"]
    assert blocks[-1]["type"] == "text"
    assert final.result_text == "".join(b["text"] for b in blocks if b["type"] == "text")


async def test_a_cache_write_reports_its_usage_by_lifetime(client: ConveyorClient) -> None:
    system = [
        bodies.text("Long instructions. " * 400, cache_control={"type": "ephemeral", "ttl": "1h"})
    ]
    body = bodies.body(f"Hi {uuid.uuid4()}", system=system)
    first = await finished(client, (await client.create(**copy.deepcopy(body))).id)
    again = await finished(client, (await client.create(**copy.deepcopy(body))).id)

    assert first.usage.cache_creation_input_tokens > 0
    assert first.usage.cache_creation.ephemeral_1h_input_tokens == (
        first.usage.cache_creation_input_tokens
    )
    assert again.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens


async def test_a_basic_listing_leaves_the_bulky_fields_out(client: ConveyorClient) -> None:
    label = {"listing": uuid.uuid4().hex}
    job = await client.create(**copy.deepcopy(TOOL_BODY), labels=label)
    await finished(client, job.id)

    (basic,), _ = await client.list(labels=label)
    (full,), _ = await client.list(labels=label, full=True)
    assert basic.result_text == full.result_text and basic.stop_reason == "tool_use"
    assert not basic.content_json and not basic.request_json
    assert content_blocks(full) and orjson.loads(full.request_json) == TOOL_BODY


def test_a_tool_call_through_plain_grpc_reflection(stack: Stack, api_key: str) -> None:
    """What grpcurl does: the body as a JSON string in `requestJson` (bytes are base64 in
    proto JSON), the answer's content blocks base64 JSON in `contentJson`."""
    import base64

    submit = json.dumps({"requestJson": base64.b64encode(orjson.dumps(TOOL_BODY)).decode()})
    (submitted,) = _call(stack.gateway, "conveyor.v1.JobService/SubmitJob", submit, api_key)
    job_id = submitted["job"]["id"]  # type: ignore[index]
    events = _call(
        stack.notifier, "conveyor.v1.JobEvents/WatchJob", json.dumps({"id": job_id}), api_key
    )
    assert "statusChanged" in events[-1]
    (got,) = _call(
        stack.gateway, "conveyor.v1.JobService/GetJob", json.dumps({"id": job_id}), api_key
    )
    job: Any = got["job"]
    assert job["status"] == "JOB_STATUS_SUCCEEDED" and job["stopReason"] == "tool_use"
    blocks = json.loads(base64.b64decode(job["contentJson"]))
    (call,) = [b for b in blocks if b["type"] == "tool_use"]
    assert call["name"] == "get_weather" and "city" in call["input"]


# ------------------------------------------------------------------- refusals


def _json_able(body: object) -> bool:
    """Whether the body survives JSON (no NaN, no non-string keys, no 65-bit integers)."""
    try:
        return bool(orjson.loads(orjson.dumps(body)) == body)
    except TypeError:
        return False


# Those that the gateway's default settings refuse and that JSON can carry at all (NaN
# cannot be written in JSON: a raw NaN is refused as not JSON, below).
_GATEWAY_DEFAULTS = [b for b in bodies.INVALID if not b.settings and _json_able(b.body)]


async def test_malformed_bodies_are_refused_naming_their_path_and_nothing_is_written(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    assert len(_GATEWAY_DEFAULTS) >= 20
    before = await count_jobs(db)
    for bad in _GATEWAY_DEFAULTS:
        with pytest.raises(InvalidArgument) as refused:
            await client.submit_request(submit_body(bad.body))
        fields = [f for f, _ in refused.value.field_violations]
        assert fields == [bad.path], f"{bad.name}: {refused.value.details}"
    # in a batch, the path names the job
    bad = _GATEWAY_DEFAULTS[0]
    with pytest.raises(InvalidArgument) as refused:
        await client.submit_many([submit_body(bodies.body("fine")), submit_body(bad.body)])
    assert [f for f, _ in refused.value.field_violations] == [f"jobs[1].{bad.path}"]
    assert await count_jobs(db) == before, "nothing was written"


@pytest.mark.parametrize(
    ("request_json", "field"),
    [
        (b"{not json", "request_json"),
        (b'{"model": "m", "max_tokens": 5, "messages": [], "temperature": NaN}', "request_json"),
        (b'"a string"', "request"),
        (orjson.dumps({**bodies.body("Hi"), "model": "bad model!"}), "request.model"),
    ],
    ids=["not json", "NaN", "not an object", "bad model name"],
)
async def test_a_body_that_is_not_a_request_is_refused(
    client: ConveyorClient, db: AsyncEngine, request_json: bytes, field: str
) -> None:
    before = await count_jobs(db)
    with pytest.raises(InvalidArgument) as refused:
        await client.submit_request(jobs_pb2.SubmitJobRequest(request_json=request_json))
    assert [f for f, _ in refused.value.field_violations] == [field]
    assert await count_jobs(db) == before, "nothing was written"


@pytest.mark.parametrize(
    ("short_form", "field"),
    [
        ({"model": bodies.MODEL}, "model"),
        ({"max_tokens": 10}, "max_tokens"),
        ({"messages": [jobs_pb2.Message(role="user", content="Hi")]}, "messages"),
        ({"temperature": 0.5}, "temperature"),
        ({"system": "terse"}, "system"),
    ],
)
async def test_setting_both_forms_is_refused(
    client: ConveyorClient, db: AsyncEngine, short_form: dict[str, Any], field: str
) -> None:
    before = await count_jobs(db)
    request = jobs_pb2.SubmitJobRequest(request_json=orjson.dumps(bodies.body("Hi")), **short_form)
    with pytest.raises(InvalidArgument) as refused:
        await client.submit_request(request)
    assert [f for f, _ in refused.value.field_violations] == [field]
    assert await count_jobs(db) == before, "nothing was written"


async def test_the_client_refuses_stream(client: ConveyorClient) -> None:
    with pytest.raises(TypeError, match="stream"):
        await client.create(**bodies.body("Hi"), stream=True)


# ------------------------------------------------------------------- streaming


SLOW = {"x-sim-tokens": "80", "x-sim-tokens-per-second": "40", "x-sim-latency-ms": "50"}


def _deltas(events: list[events_pb2.JobEvent]) -> list[events_pb2.TokenDelta]:
    return [e.token_delta for e in events if e.WhichOneof("payload") == "token_delta"]


def rebuild(deltas: list[events_pb2.TokenDelta]) -> list[dict[str, Any]]:
    """Content blocks rebuilt from a watch's deltas, as a watcher would."""
    blocks: dict[int, dict[str, Any]] = {}
    partial: dict[int, str] = {}
    for d in deltas:
        if d.block_json:
            blocks[d.index] = orjson.loads(d.block_json)
        block = blocks[d.index]
        if d.kind == events_pb2.DELTA_KIND_TEXT:
            block["text"] += d.text
        elif d.kind == events_pb2.DELTA_KIND_THINKING:
            block["thinking"] += d.text
        elif d.kind == events_pb2.DELTA_KIND_SIGNATURE:
            block["signature"] = block.get("signature", "") + d.text
        elif d.kind == events_pb2.DELTA_KIND_INPUT_JSON:
            partial[d.index] = partial.get(d.index, "") + d.text
    for index, joined in partial.items():
        blocks[index]["input"] = json.loads(joined)
    return [blocks[i] for i in sorted(blocks)]


async def test_a_watcher_sees_every_delta_kind_with_its_block_index(
    client: ConveyorClient,
) -> None:
    body = bodies.body(
        "Weather in Paris?",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        tools=[WEATHER],
    )
    job = await client.create(**copy.deepcopy(body), labels=SLOW)
    events = [e async for e in client.watch(job.id)]
    final = await client.get(job.id)

    deltas = _deltas(events)
    kinds = {d.kind for d in deltas}
    assert events_pb2.DELTA_KIND_THINKING in kinds and events_pb2.DELTA_KIND_SIGNATURE in kinds
    if final.stop_reason == "tool_use":
        assert events_pb2.DELTA_KIND_INPUT_JSON in kinds
    assert {d.index for d in deltas} == set(range(len(content_blocks(final))))
    assert rebuild(deltas) == content_blocks(final)


async def test_a_watch_started_mid_run_gets_the_blocks_so_far(client: ConveyorClient) -> None:
    job = await client.create(**copy.deepcopy(THINKING_BODY), labels=SLOW)
    seen: list[events_pb2.JobEvent] = []
    async for event in client.watch(job.id):
        seen.append(event)
        if len(_deltas(seen)) >= 3:  # well into the thinking block
            break
    late = [e async for e in client.watch(job.id)]  # a new watch, mid-run
    final = await client.get(job.id)

    assert _deltas(late)[0].block_json, "the late watch starts with the first block"
    assert rebuild(_deltas(late)) == content_blocks(final)
