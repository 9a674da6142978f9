"""Building requests and reading answers: messages from a prompt, a Messages API body as
JSON, a submit request's timing fields, and a finished job as the SDK's Message."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from conveyor.v1 import jobs_pb2

if TYPE_CHECKING:
    import anthropic

MessagesArg: TypeAlias = str | Sequence[Mapping[str, str]] | Sequence[jobs_pb2.Message]


def build_messages(messages: MessagesArg) -> list[jobs_pb2.Message]:
    """Messages from a prompt string (one user turn), dicts with role/content, or Messages."""
    if isinstance(messages, str):
        return [jobs_pb2.Message(role="user", content=messages)]
    out: list[jobs_pb2.Message] = []
    for item in messages:
        if isinstance(item, jobs_pb2.Message):
            out.append(item)
        else:
            out.append(jobs_pb2.Message(role=item.get("role", "user"), content=item["content"]))
    return out


def _jsonable(value: Any) -> Any:
    """What json cannot write itself: the SDK's Iterable params (tuples, generators),
    other mappings, and pydantic models (e.g. an SDK block passed back in a new turn)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def json_bytes(body: Any) -> bytes:
    """Compact UTF-8 JSON (the stdlib's: the client installs without orjson)."""
    return json.dumps(
        body, default=_jsonable, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode()


def aware(value: datetime) -> datetime:
    """`value` with a time zone; a naive datetime is read as local time."""
    return value if value.tzinfo is not None else value.astimezone()


def set_timing(
    request: jobs_pb2.SubmitJobRequest,
    run_at: datetime | None,
    delay: timedelta | None,
    timeout: timedelta | None,
) -> jobs_pb2.SubmitJobRequest:
    """Fill a submit request's optional `run_at`, `delay` and `timeout` (None leaves one unset)."""
    if run_at is not None:
        request.run_at.FromDatetime(aware(run_at))
    if delay is not None:
        request.delay.FromTimedelta(delay)
    if timeout is not None:
        request.timeout.FromTimedelta(timeout)
    return request


def content_blocks(job: jobs_pb2.Job) -> list[dict[str, Any]]:
    """The final message's content blocks of a finished job ([] when it has none)."""
    return cast(list[dict[str, Any]], json.loads(job.content_json)) if job.content_json else []


def message_of(job: jobs_pb2.Job) -> anthropic.types.Message:
    """A succeeded job's answer as the SDK's Message, as `messages.create` returns it."""
    import anthropic  # here: importing the SDK takes a while, and few callers need it

    usage = (
        json.loads(job.usage.usage_json)
        if job.usage.usage_json
        else {
            "input_tokens": job.usage.input_tokens,
            "output_tokens": job.usage.output_tokens,
        }
    )
    return anthropic.types.Message.model_validate(
        {
            "id": job.response_id,
            "type": "message",
            "role": "assistant",
            "model": job.response_model or job.model,
            "content": content_blocks(job),
            "stop_reason": job.stop_reason or None,
            "stop_sequence": job.stop_sequence or None,
            "usage": usage,
        }
    )
