"""Conversions between stored jobs (conveyor.core.lifecycle.Job) and the contract's
messages, and the checks of the contract's values that go with them."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.core.errors import InvalidArgument
from conveyor.core.lifecycle import Job
from conveyor.v1 import jobs_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_timestamp(target: Timestamp, value: datetime) -> None:
    """`target.FromDatetime(value)` (a naive value is UTC) by subtraction: protobuf's
    goes through a time tuple and `calendar.timegm`, several times slower."""
    delta = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1_000


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    set_timestamp(ts, value)
    return ts


# The ranges google.protobuf's well-known types define (timestamp.proto, duration.proto):
# a Timestamp lies within the years 1..9999 with nanos 0..999,999,999; a Duration is at
# most 10,000 years either way, with nanos of the seconds' sign and below 1e9.
_MIN_TIMESTAMP_S = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_TIMESTAMP_S = 253_402_300_799  # 9999-12-31T23:59:59Z
_MAX_DURATION_S = 315_576_000_000
_NANOS = 1_000_000_000


def to_datetime(value: Timestamp, field: str) -> datetime:
    """A request's Timestamp as an aware UTC datetime, or InvalidArgument naming the field."""
    if not _MIN_TIMESTAMP_S <= value.seconds <= _MAX_TIMESTAMP_S:
        raise InvalidArgument(field, "must lie within the years 1 to 9999")
    if not 0 <= value.nanos < _NANOS:
        raise InvalidArgument(field, "nanos must be 0..999,999,999")
    return value.ToDatetime(tzinfo=UTC)


def to_timedelta(value: Duration, field: str) -> timedelta:
    """A request's Duration as a timedelta, or InvalidArgument naming the field."""
    if not -_MAX_DURATION_S <= value.seconds <= _MAX_DURATION_S:
        raise InvalidArgument(field, f"must be within {_MAX_DURATION_S} seconds either way")
    if not -_NANOS < value.nanos < _NANOS:
        raise InvalidArgument(field, "nanos must be within -999,999,999..999,999,999")
    if (value.seconds < 0 < value.nanos) or (value.nanos < 0 < value.seconds):
        raise InvalidArgument(field, "seconds and nanos must have the same sign")
    return value.ToTimedelta()


MAX_QUOTED_KEY = 64
"""The longest map key quoted whole in a field name (e.g. `labels['team']`): the name
travels in the status's trailers, which gRPC bounds (a few KiB)."""


def key_field(field: str, key: str) -> str:
    """The field name of a map entry, `field['key']`, with a long key cut short."""
    if len(key) <= MAX_QUOTED_KEY:
        return f"{field}[{key!r}]"
    return f"{field}[{key[:MAX_QUOTED_KEY]!r}...]"


def check_text(value: str, field: str) -> None:
    """Refuse a NUL character, which no text column of Postgres can store (nor a JSON
    value in jsonb), so it would fail the statement it travels in."""
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain a NUL character")


def parse_job_id(value: str, field: str = "id") -> uuid.UUID:
    """A job id from a request, or InvalidArgument naming the field."""
    if not value:
        raise InvalidArgument(field, "is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(field, "is not a job id (a UUID)") from None


def job_error(error: Mapping[str, Any] | None) -> jobs_pb2.JobError | None:
    if not error:
        return None
    return jobs_pb2.JobError(
        code=str(error.get("code", "")),
        message=str(error.get("message", "")),
        retryable=bool(error.get("retryable", False)),
        http_status=int(error.get("http_status") or 0),
    )


def _usage(job: Job, full: bool) -> jobs_pb2.Usage:
    """The token columns, plus what the provider's whole usage object says."""
    usage = jobs_pb2.Usage(
        input_tokens=job.input_tokens or 0,
        output_tokens=job.output_tokens or 0,
        cache_creation_input_tokens=job.cache_creation_input_tokens or 0,
        cache_read_input_tokens=job.cache_read_input_tokens or 0,
    )
    reported = (job.result or {}).get("usage")
    if not isinstance(reported, dict):
        return usage
    cache = reported.get("cache_creation")
    if isinstance(cache, dict):
        usage.cache_creation.ephemeral_5m_input_tokens = cache.get("ephemeral_5m_input_tokens") or 0
        usage.cache_creation.ephemeral_1h_input_tokens = cache.get("ephemeral_1h_input_tokens") or 0
    server = reported.get("server_tool_use")
    if isinstance(server, dict):
        usage.server_tool_use.web_search_requests = server.get("web_search_requests") or 0
        usage.server_tool_use.web_fetch_requests = server.get("web_fetch_requests") or 0
    usage.service_tier = reported.get("service_tier") or ""
    if full:
        usage.usage_json = orjson.dumps(reported)
    return usage


def request_body(job: Job) -> dict[str, Any]:
    """The whole Messages API body of a job (the row keeps `model` in its own column)."""
    return {"model": job.model, **(job.request or {})}


def _webhook_events(job: Job) -> jobs_pb2.WebhookEvents.ValueType:
    if not job.webhook_url:
        return jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED
    return (
        jobs_pb2.WEBHOOK_EVENTS_ALL if job.webhook_all_events else jobs_pb2.WEBHOOK_EVENTS_TERMINAL
    )


def job_to_proto(job: Job, *, content: bool = True, request: bool = False) -> jobs_pb2.Job:
    """The contract's Job for a stored job.

    `content`: with the final message's content blocks (and the whole usage object);
    `request`: with the request body. GetJob sets both (the FULL view), ListJobs's
    BASIC view neither, watch events `content` only.
    """
    out = jobs_pb2.Job(
        id=str(job.id),
        tenant=job.tenant,
        status=job.status.to_proto(),
        model=job.model,
        lane=job.lane,
        priority=job.priority,
        labels=job.labels or {},
        idempotency_key=job.idempotency_key or "",
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        result_text=job.result_text or "",
        stop_reason=job.stop_reason or "",
        dead_reason=job.dead_reason or "",
        webhook_url=job.webhook_url or "",
        webhook_events=_webhook_events(job),
        trace_id=job.trace_id or "",
        sequence=job.seq,
    )
    if job.cost_micros is not None:  # NULL: unfinished or unpriced
        out.cost_micros, out.priced = job.cost_micros, True
    result = job.result
    if job.input_tokens is not None or job.output_tokens is not None:
        out.usage.CopyFrom(_usage(job, content))
    if isinstance(result, dict):
        out.stop_sequence = result.get("stop_sequence") or ""
        out.response_id = result.get("id") or ""
        out.response_model = result.get("model") or ""
        if content and result.get("content") is not None:
            out.content_json = orjson.dumps(result["content"])
    if request and job.request is not None:
        out.request_json = orjson.dumps(request_body(job))
    err = job_error(job.error)
    if err is not None:
        out.error.CopyFrom(err)
    for name in Job.TIMESTAMPS:
        value = getattr(job, name)
        if value is not None:
            set_timestamp(getattr(out, name), value)
    return out
