"""Conversions between stored job rows and the contract's messages."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.errors import InvalidArgument
from conveyor.states import JobState
from conveyor.v1 import jobs_pb2


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


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


def job_to_proto(row: Mapping[str, Any]) -> jobs_pb2.Job:
    """The contract's Job for a row of the jobs table."""
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
    if row["input_tokens"] is not None or row["output_tokens"] is not None:
        job.usage.CopyFrom(
            jobs_pb2.Usage(
                input_tokens=row["input_tokens"] or 0,
                output_tokens=row["output_tokens"] or 0,
                cache_creation_input_tokens=row["cache_creation_input_tokens"] or 0,
                cache_read_input_tokens=row["cache_read_input_tokens"] or 0,
            )
        )
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
