"""Turning a SubmitJobRequest into a row: defaults, scheduling and the request fingerprint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.config import Settings
from conveyor.errors import InvalidArgument
from conveyor.v1 import jobs_pb2
from conveyor.validation import request_hash, validate_submit

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _req(**kw: object) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        model="claude-sonnet-4-5",
        max_tokens=64,
        messages=[jobs_pb2.Message(role="user", content="Hello")],
        **kw,  # type: ignore[arg-type]
    )


def test_the_plain_request_gets_the_defaults() -> None:
    job = validate_submit(_req(), Settings(), "default", now=NOW)
    assert job.lane == "default" and job.priority == 0
    assert job.max_attempts == 3 and job.timeout_ms == 600_000
    assert job.run_at is None
    assert job.request == {"max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}


def test_provider_fields_are_carried_into_the_request_body() -> None:
    req = _req(
        system="Be brief", temperature=0.2, stop_sequences=["END"], metadata={"user_id": "u1"}
    )
    body = validate_submit(req, Settings(), "default", now=NOW).request
    assert body["system"] == "Be brief" and body["temperature"] == pytest.approx(0.2)
    assert body["stop_sequences"] == ["END"] and body["metadata"] == {"user_id": "u1"}


def test_a_delay_schedules_the_job() -> None:
    req = _req()
    req.delay.FromTimedelta(timedelta(seconds=30))
    assert validate_submit(req, Settings(), "t", now=NOW).run_at == NOW + timedelta(seconds=30)


def test_run_at_and_delay_together_are_refused() -> None:
    req = _req()
    req.delay.FromSeconds(1)
    req.run_at.FromDatetime(NOW)
    with pytest.raises(InvalidArgument) as err:
        validate_submit(req, Settings(), "t", now=NOW)
    assert err.value.field == "run_at"


def test_batch_fields_carry_the_index() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_submit(_req(priority=12), Settings(), "t", prefix="jobs[4].", now=NOW)
    assert err.value.field == "jobs[4].priority"


def test_the_fingerprint_tells_requests_apart_and_ignores_nothing() -> None:
    assert request_hash(_req()) == request_hash(_req())
    assert request_hash(_req()) != request_hash(_req(priority=1))
