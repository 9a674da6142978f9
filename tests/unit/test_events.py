"""The one event builder: a live status change and its stored replay are the same event."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from conveyor.bus.events import history_event, is_terminal, snapshot_event, status_event
from conveyor.core.lifecycle import Job, JobState

AT = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
ERROR = {"code": "overloaded", "message": "busy", "retryable": True, "http_status": 529}


def job(status: JobState, **fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": uuid.UUID("7c1d0c4e-0000-4000-8000-000000000001"),
        "tenant": "t",
        "status": status,
        "lane": "default",
        "model": "m",
        "attempts": 2,
        "max_attempts": 3,
        "seq": 7,
        "created_at": AT,
        "updated_at": AT,
        "error": ERROR,
    }
    values.update(fields)
    return Job(**values)


def stored(current: Job, previous: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job_events row written with the change that left the job as `current`."""
    return {
        "seq": current.seq,
        "status": current.status.value,
        "previous": previous,
        "attempt": current.attempts,
        "detail": detail,
        "created_at": current.updated_at,
    }


def test_a_live_change_and_its_stored_replay_are_the_same_event() -> None:
    for status, previous in (
        (JobState.RUNNING, "pending"),
        (JobState.SCHEDULED, "running"),
        (JobState.DEAD, "running"),
        (JobState.SUCCEEDED, "running"),
    ):
        current = job(status)
        assert status_event(current, previous) == history_event(stored(current, previous), current)


def test_a_change_carries_the_error_only_where_it_caused_it() -> None:
    running = status_event(job(JobState.RUNNING), "scheduled").status_changed
    assert not running.HasField("error"), "left from the attempt before: stale"
    retried = status_event(job(JobState.SCHEDULED), "running").status_changed
    assert retried.error.code == "overloaded" and not retried.HasField("job")


def test_the_change_that_ends_a_job_carries_all_of_it() -> None:
    done = job(JobState.SUCCEEDED, result_text="hi", error=None)
    event = status_event(done, "running")
    assert is_terminal(event) and event.status_changed.job.result_text == "hi"
    assert not event.status_changed.HasField("error")
    earlier = history_event({**stored(done, "running"), "seq": 5}, done)
    assert not earlier.status_changed.HasField("job"), "only the latest change carries the job"
    assert not is_terminal(status_event(job(JobState.RUNNING), "pending"))


def test_an_older_stored_change_carries_its_own_error() -> None:
    current = job(JobState.RUNNING, seq=9)
    entry = {**stored(current, "running"), "seq": 6, "status": "scheduled", "detail": ERROR}
    replayed = history_event(entry, current).status_changed
    assert replayed.error.http_status == 529 and replayed.status == JobState.SCHEDULED.to_proto()


def test_a_snapshot_is_the_job_at_its_sequence() -> None:
    event = snapshot_event(job(JobState.PENDING))
    assert event.sequence == 7 and event.snapshot.id == event.job_id
    assert event.time.ToDatetime(tzinfo=UTC) == AT
