"""Conversions between stored job rows and the contract's messages."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.core.errors import InvalidArgument
from conveyor.core.lifecycle import JobState
from conveyor.v1 import jobs_pb2


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
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


def _usage(row: Mapping[str, Any], result: Mapping[str, Any] | None, full: bool) -> jobs_pb2.Usage:
    """The token columns, plus what the provider's whole usage object says."""
    usage = jobs_pb2.Usage(
        input_tokens=row["input_tokens"] or 0,
        output_tokens=row["output_tokens"] or 0,
        cache_creation_input_tokens=row["cache_creation_input_tokens"] or 0,
        cache_read_input_tokens=row["cache_read_input_tokens"] or 0,
    )
    reported = (result or {}).get("usage")
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


def request_body(row: Mapping[str, Any]) -> dict[str, Any]:
    """The whole Messages API body of a job (the row keeps `model` in its own column)."""
    return {"model": row["model"], **(row["request"] or {})}


def job_to_proto(
    row: Mapping[str, Any], *, content: bool = True, request: bool = False
) -> jobs_pb2.Job:
    """The contract's Job for a row of the jobs table.

    `content`: with the final message's content blocks (and the whole usage object);
    `request`: with the request body. GetJob sets both (the FULL view), ListJobs's
    BASIC view neither, watch events `content` only.
    """
    job = jobs_pb2.Job(
        id=str(row["id"]),
        tenant=row["tenant"],
        status=JobState(row["status"]).to_proto(),
        model=row["model"],
        lane=row["lane"],
        priority=row["priority"],
        labels=row["labels"] or {},
        idempotency_key=row["idempotency_key"] or "",
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        result_text=row["result_text"] or "",
        stop_reason=row["stop_reason"] or "",
        dead_reason=row["dead_reason"] or "",
        webhook_url=row["webhook_url"] or "",
        webhook_events=(
            (
                jobs_pb2.WEBHOOK_EVENTS_ALL
                if row.get("webhook_all_events")
                else jobs_pb2.WEBHOOK_EVENTS_TERMINAL
            )
            if row["webhook_url"]
            else jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED
        ),
        trace_id=row["trace_id"] or "",
        sequence=row["seq"],
    )
    if (cost := row.get("cost_micros")) is not None:  # NULL: unfinished or unpriced
        job.cost_micros, job.priced = cost, True
    result = row.get("result")
    if row["input_tokens"] is not None or row["output_tokens"] is not None:
        job.usage.CopyFrom(_usage(row, result, content))
    if isinstance(result, dict):
        job.stop_sequence = result.get("stop_sequence") or ""
        job.response_id = result.get("id") or ""
        job.response_model = result.get("model") or ""
        if content and result.get("content") is not None:
            job.content_json = orjson.dumps(result["content"])
    if request and row.get("request") is not None:
        job.request_json = orjson.dumps(request_body(row))
    err = job_error(row["error"])
    if err is not None:
        job.error.CopyFrom(err)
    for name in (
        "created_at",
        "updated_at",
        "run_at",
        "started_at",
        "finished_at",
        "cancel_requested_at",
    ):
        value = row[name]
        if value is not None:
            getattr(job, name).CopyFrom(timestamp(value))
    return job
