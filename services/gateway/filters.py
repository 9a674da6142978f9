"""What the gateway's listings share: the checks of a job filter (ListJobs and the bulk
actions CancelJobs, RetryJobs: statuses, lane, labels and the created range of a
request, as the fields of conveyor.db.jobs.ListFilter), and the page tokens of a
keyset-paginated listing (ListJobs, ListSchedules)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from conveyor.contract.convert import to_datetime
from conveyor.contract.validation import check_strings
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument
from conveyor.core.lifecycle import JobState
from conveyor.v1 import jobs_pb2, operations_pb2


def filter_fields(
    request: jobs_pb2.ListJobsRequest | operations_pb2.JobFilter,
    settings: Settings,
    prefix: str = "",
    allowed: Sequence[JobState] = (),
    verb: str = "",
) -> dict[str, Any]:
    """The filter fields a request gives, checked (InvalidArgument naming the field,
    after `prefix`). With `allowed`, a status outside it is refused (a job in it
    cannot be `verb`)."""
    statuses: list[str] = []
    for i, s in enumerate(request.statuses):
        field = f"{prefix}statuses[{i}]"
        if s not in range(1, 8):
            raise InvalidArgument(field, "is not a job status")
        state = JobState.from_proto(s)
        if allowed and state not in allowed:
            raise InvalidArgument(
                field,
                f"a {state.value} job cannot be {verb} (only {', '.join(a.value for a in allowed)})",
            )
        statuses.append(state.value)
    if request.lane and request.lane not in settings.lanes:
        raise InvalidArgument(f"{prefix}lane", f"must be one of {', '.join(settings.lanes)}")
    labels = dict(request.labels)
    check_strings(labels, f"{prefix}labels")
    after, before = f"{prefix}created_after", f"{prefix}created_before"
    return {
        "statuses": statuses,
        "lane": request.lane,
        "created_after": to_datetime(request.created_after, after)
        if request.HasField("created_after")
        else None,
        "created_before": to_datetime(request.created_before, before)
        if request.HasField("created_before")
        else None,
        "labels": labels,
    }


def encode_page_token(created_at: datetime | None, item_id: uuid.UUID) -> str:
    """The token of the page after the item (created_at, id) of a listing, newest first."""
    assert created_at is not None
    raw = f"{created_at.isoformat()}|{item_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_page_token(token: str, listing: str) -> tuple[datetime, uuid.UUID]:
    """(created_at, id) of a token `encode_page_token` wrote, or InvalidArgument naming
    the `listing` call. Anything else is refused here, before the query: an extreme or
    zoneless time would fail it (the driver's conversion to UTC overflows)."""
    try:
        created, item_id = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        after = datetime.fromisoformat(created)
        if after.tzinfo is None:
            raise ValueError("no time zone")
        return after.astimezone(UTC), uuid.UUID(item_id)
    except (ValueError, OverflowError):  # binascii.Error and UnicodeError are ValueErrors
        raise InvalidArgument("page_token", f"is not a token from {listing}") from None
