"""The whole answer: built from the raw stream events, cut into delta events, stored and
shown; the body form of `conveyor submit`."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from conveyor.bus.events import delta_runs, shape_of
from conveyor.cli import build_parser, build_submit_request, format_blocks, job_dict
from conveyor.client import _jsonable, content_blocks, message_of
from conveyor.contract.convert import job_to_proto
from conveyor.core.lifecycle import Job, JobState
from conveyor.db.jobs import as_stored
from conveyor.llm.provider import MessageBuilder, create_arguments
from conveyor.v1 import events_pb2 as ev
from tests import bodies

Piece = tuple[int, int, str, bytes, bytes]


def sse(kind: str, **data: Any) -> bytes:
    return orjson.dumps({"type": kind, **data})


def run_stream(events: list[tuple[str, bytes]]) -> tuple[MessageBuilder, list[Piece]]:
    pieces: list[Piece] = []
    built = MessageBuilder(lambda *piece: pieces.append(piece))
    handlers = {
        "message_start": built.start,
        "content_block_start": built.block_start,
        "content_block_delta": built.delta,
        "content_block_stop": built.block_stop,
        "message_delta": built.message_delta,
    }
    for kind, data in events:
        handlers[kind](data)
    return built, pieces


USAGE = {
    "input_tokens": 50,
    "output_tokens": 1,
    "cache_creation_input_tokens": 20,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 20},
    "service_tier": "standard",
}
CITATION = {"type": "char_location", "cited_text": "Paris", "document_index": 0}
STREAM = [
    ("message_start", sse("message_start", message={"id": "msg_1", "model": "m", "usage": USAGE})),
    (
        "content_block_start",
        sse("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
    ),
    ("content_block_delta", sse("d", index=0, delta={"type": "thinking_delta", "thinking": "Hm"})),
    ("content_block_delta", sse("d", index=0, delta={"type": "thinking_delta", "thinking": "m."})),
    ("content_block_delta", sse("d", index=0, delta={"type": "signature_delta", "signature": "s"})),
    ("content_block_stop", sse("content_block_stop", index=0)),
    (
        "content_block_start",
        sse(
            "content_block_start", index=1, content_block={"type": "redacted_thinking", "data": "x"}
        ),
    ),
    ("content_block_stop", sse("content_block_stop", index=1)),
    (
        "content_block_start",
        sse("content_block_start", index=2, content_block={"type": "text", "text": ""}),
    ),
    ("content_block_delta", sse("d", index=2, delta={"type": "text_delta", "text": "It is "})),
    (
        "content_block_delta",
        sse("d", index=2, delta={"type": "citations_delta", "citation": CITATION}),
    ),
    ("content_block_delta", sse("d", index=2, delta={"type": "text_delta", "text": "Paris."})),
    ("content_block_stop", sse("content_block_stop", index=2)),
    (
        "content_block_start",
        sse(
            "content_block_start",
            index=3,
            content_block={"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
        ),
    ),
    (
        "content_block_delta",
        sse("d", index=3, delta={"type": "input_json_delta", "partial_json": ""}),
    ),
    (
        "content_block_delta",
        sse("d", index=3, delta={"type": "input_json_delta", "partial_json": '{"n": 1'}),
    ),
    (
        "content_block_delta",
        sse("d", index=3, delta={"type": "input_json_delta", "partial_json": "2}"}),
    ),
    ("content_block_stop", sse("content_block_stop", index=3)),
    (
        "message_delta",
        sse(
            "message_delta",
            delta={"stop_reason": "tool_use", "stop_sequence": None},
            usage={"output_tokens": 30, "server_tool_use": {"web_search_requests": 1}},
        ),
    ),
]


def test_the_final_message_is_built_from_every_kind_of_stream_event() -> None:
    built, _ = run_stream(STREAM)
    done = built.completion()

    assert done.text == "It is Paris."
    assert done.stop_reason == "tool_use"
    assert done.usage == {
        "input_tokens": 50,
        "output_tokens": 30,
        "cache_creation_input_tokens": 20,
        "cache_read_input_tokens": 0,
    }
    assert done.result is not None
    assert done.result["id"] == "msg_1" and done.result["stop_sequence"] is None
    assert done.result["usage"]["server_tool_use"] == {"web_search_requests": 1}
    assert done.result["content"] == [
        {"type": "thinking", "thinking": "Hmm.", "signature": "s"},
        {"type": "redacted_thinking", "data": "x"},
        {"type": "text", "text": "It is Paris.", "citations": [CITATION]},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"n": 12}},
    ]


def test_each_piece_is_handed_on_with_its_kind_index_and_first_block() -> None:
    _, pieces = run_stream(STREAM)

    kinds = [(kind, index) for kind, index, *_ in pieces]
    assert kinds == [
        (ev.DELTA_KIND_THINKING, 0),
        (ev.DELTA_KIND_THINKING, 0),
        (ev.DELTA_KIND_SIGNATURE, 0),
        (ev.DELTA_KIND_BLOCK, 1),
        (ev.DELTA_KIND_TEXT, 2),
        (ev.DELTA_KIND_CITATION, 2),
        (ev.DELTA_KIND_TEXT, 2),
        (ev.DELTA_KIND_INPUT_JSON, 3),
        (ev.DELTA_KIND_INPUT_JSON, 3),
        (ev.DELTA_KIND_INPUT_JSON, 3),
    ]
    firsts = [orjson.loads(block)["type"] for _, _, _, block, _ in pieces if block]
    assert firsts == ["thinking", "redacted_thinking", "text", "tool_use"]
    assert orjson.loads(pieces[5][4]) == CITATION


def test_pieces_of_one_block_and_kind_travel_together_citations_and_blocks_alone() -> None:
    shapes = [
        shape_of(ev.DELTA_KIND_THINKING, 0, b'{"type":"thinking"}'),
        shape_of(ev.DELTA_KIND_THINKING, 0),
        shape_of(ev.DELTA_KIND_SIGNATURE, 0),
        shape_of(ev.DELTA_KIND_BLOCK, 1, b"{}"),
        shape_of(ev.DELTA_KIND_TEXT, 2, b"{}"),
        shape_of(ev.DELTA_KIND_CITATION, 2, b"", b"{}"),
        shape_of(ev.DELTA_KIND_CITATION, 2, b"", b"{}"),
        shape_of(ev.DELTA_KIND_TEXT, 2),
        shape_of(ev.DELTA_KIND_TEXT, 2),
    ]
    assert delta_runs(shapes, 0, len(shapes)) == [
        (0, 2),
        (2, 3),
        (3, 4),
        (4, 5),
        (5, 6),
        (6, 7),
        (7, 9),
    ]
    assert delta_runs(shapes, 1, 2) == [(1, 2)]


def test_the_sdk_gets_every_key_of_the_body_named_ones_as_arguments() -> None:
    body = bodies.body("Hi", temperature=0.3, top_k=5, tools=[bodies.WEATHER_TOOL])
    del body["model"]
    named, extra = create_arguments(body)
    assert extra == {"temperature": 0.3, "top_k": 5}
    assert {**named, **extra} == body
    assert create_arguments({"max_tokens": 1, "messages": []})[1] is None


# ------------------------------------------------------------------- stored and shown


def _row(**values: Any) -> Job:
    from conveyor.db.jobs import NewJob

    job = NewJob(
        tenant="t",
        model="claude-x",
        request={"max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]},
        lane="default",
        priority=0,
        max_attempts=3,
        timeout_ms=1000,
        request_hash="h",
        id=uuid.uuid4(),
    )
    if "status" in values:
        values["status"] = JobState(values["status"])
    return dataclasses.replace(as_stored(job, datetime.now(UTC)), **values)


RESULT = {
    "id": "msg_9",
    "model": "claude-x-2",
    "content": [{"type": "tool_use", "id": "toolu_9", "name": "f", "input": {"big": 2**60}}],
    "stop_sequence": None,
    "usage": USAGE,
}


def test_a_job_shows_the_whole_final_message_and_its_request() -> None:
    row = _row(
        status="succeeded",
        result=RESULT,
        stop_reason="tool_use",
        input_tokens=50,
        output_tokens=30,
        cache_creation_input_tokens=20,
        cache_read_input_tokens=0,
    )
    job = job_to_proto(row, request=True)

    assert content_blocks(job)[0]["input"] == {"big": 2**60}  # an integer, not a float
    assert job.response_id == "msg_9" and job.response_model == "claude-x-2"
    assert job.usage.cache_creation.ephemeral_1h_input_tokens == 20
    assert job.usage.service_tier == "standard"
    assert orjson.loads(job.request_json)["model"] == "claude-x"
    message = message_of(job)
    assert message.stop_reason == "tool_use" and message.usage.input_tokens == 50

    basic = job_to_proto(row, content=False)
    assert not basic.content_json and not basic.request_json and not basic.usage.usage_json
    assert basic.response_id == "msg_9"


def test_conveyor_get_prints_the_blocks_readably(capsys: pytest.CaptureFixture[str]) -> None:
    row = _row(status="succeeded", result=RESULT, stop_reason="tool_use", input_tokens=1)
    job = job_to_proto(row, request=True)

    out = job_dict(job)
    assert out["content"] == RESULT["content"] and out["request"]["max_tokens"] == 10
    json.dumps(out)  # all JSON, no base64
    text = format_blocks(job)
    assert "[0] tool_use f (toolu_9)" in text
    assert json.dumps({"big": 2**60}, indent=2) in text


# ------------------------------------------------------------------- conveyor submit


def _submit_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["submit", *argv])


def test_the_short_form_stays_without_body_flags() -> None:
    request = build_submit_request(_submit_args("Hello", "--temperature", "0.5"))
    assert not request.request_json and request.messages[0].content == "Hello"


def test_body_flags_send_the_whole_body(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(base64.b64decode(bodies.PNG_B64))
    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(base64.b64decode(bodies.PDF_B64))
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([bodies.WEATHER_TOOL]))
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    args = _submit_args(
        "Describe",
        "--image",
        str(image),
        "--pdf",
        str(pdf),
        "--tools",
        str(tools),
        "--json-schema",
        str(schema),
        "--thinking",
        "1024",
        "--max-tokens",
        "4096",
        "--temperature",
        "1",
        "--priority",
        "4",
    )
    request = build_submit_request(args)

    assert not request.model and not request.messages and request.priority == 4
    body = json.loads(request.request_json)
    image_block, pdf_block, text_block = body["messages"][0]["content"]
    assert image_block["source"]["media_type"] == "image/png"
    assert image_block["source"]["data"] == bodies.PNG_B64
    assert pdf_block["type"] == "document"
    assert text_block == {"type": "text", "text": "Describe"}
    assert body["tools"] == [bodies.WEATHER_TOOL]
    assert body["output_config"] == {
        "format": {"type": "json_schema", "schema": {"type": "object"}}
    }
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["temperature"] == 1.0 and body["max_tokens"] == 4096


def test_a_request_file_is_sent_as_it_is(tmp_path: Path) -> None:
    given = bodies.body("Hi", tools=[bodies.WEATHER_TOOL], metadata={"user_id": "u"})
    path = tmp_path / "body.json"
    path.write_text(json.dumps(given))
    request = build_submit_request(_submit_args("--request-file", str(path)))
    assert json.loads(request.request_json) == given


def test_the_client_sends_sdk_iterables_and_models_as_json() -> None:
    from anthropic.types import TextBlock

    blocks = (b for b in [{"type": "text", "text": "a"}])
    assert orjson.loads(orjson.dumps({"c": blocks}, default=_jsonable)) == {
        "c": [{"type": "text", "text": "a"}]
    }
    block = TextBlock(type="text", text="b")
    assert orjson.loads(orjson.dumps([block], default=_jsonable)) == [{"type": "text", "text": "b"}]


def test_a_webhook_body_carries_the_whole_final_message() -> None:
    from conveyor.server.webhooks import job_json

    row = _row(status="succeeded", result=RESULT, stop_reason="tool_use", input_tokens=1)
    out = job_json(dataclasses.asdict(row))
    assert out["result"] == RESULT and out["stop_reason"] == "tool_use"
    assert job_json(dataclasses.asdict(_row()))["result"] is None


def test_a_workers_answer_for_a_late_watcher_holds_every_kind_and_block() -> None:
    """The text so far that a notifier asks a worker for (conveyor.bus.catchup) is made of
    the deltas as published: kinds, block indexes and first blocks included."""
    from conveyor.bus.catchup import TextSoFar
    from services.worker.inflight import InFlight
    from services.worker.runner import JobRunner

    job_id = uuid.uuid4()
    entry = InFlight(job_id=job_id, lease=uuid.uuid4(), attempt=1, base_seq=10)
    pieces = [
        (ev.DELTA_KIND_THINKING, 0, "Hm", b'{"type":"thinking","thinking":""}'),
        (ev.DELTA_KIND_THINKING, 0, "m.", b""),
        (ev.DELTA_KIND_SIGNATURE, 0, "sig", b""),
        (ev.DELTA_KIND_TEXT, 1, "Hi", b'{"type":"text","text":""}'),
    ]
    for kind, index, text, block in pieces:
        entry.text.append(text)
        entry.shape.append(shape_of(kind, index, block))
    entry.flushed = [end for _, end in delta_runs(entry.shape, 0, 4)]
    runner = JobRunner.__new__(JobRunner)
    runner.inflight = {job_id: entry}
    runner.ended = OrderedDict()

    found = runner.text_so_far(job_id, 1)
    assert found is not None
    base, deltas = found
    answer = TextSoFar(str(job_id), 1, base, orjson.loads(orjson.dumps(deltas)))
    got = [
        (
            e.sequence,
            e.token_delta.kind,
            e.token_delta.index,
            e.token_delta.text,
            bool(e.token_delta.block_json),
        )
        for e in answer.events("t", 10)
    ]
    assert got == [
        (12, ev.DELTA_KIND_THINKING, 0, "Hmm.", True),
        (13, ev.DELTA_KIND_SIGNATURE, 0, "sig", False),
        (14, ev.DELTA_KIND_TEXT, 1, "Hi", True),
    ]
    assert runner.text_so_far(job_id, 2) is None
