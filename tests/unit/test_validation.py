"""Turning a SubmitJobRequest into a row: defaults, scheduling and the request fingerprint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.contract.validation import request_hash, validate_submit
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument
from conveyor.v1 import jobs_pb2

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


def _with(**fields: object) -> jobs_pb2.SubmitJobRequest:
    """A valid request with some fields set (maps merged, repeated fields replaced)."""
    req = _req()
    for name, value in fields.items():
        if name == "messages":
            del req.messages[:]
            req.messages.extend(value)  # type: ignore[arg-type]
        elif name in ("labels", "metadata"):
            getattr(req, name).update(value)
        elif name == "stop_sequences":
            req.stop_sequences.extend(value)  # type: ignore[arg-type]
        elif name in ("run_at", "delay", "timeout"):
            assert isinstance(value, tuple)
            getattr(req, name).seconds, getattr(req, name).nanos = value
        else:
            setattr(req, name, value)
    return req


REFUSED: list[tuple[str, str, dict[str, object]]] = [
    ("NUL in the system prompt", "system", {"system": "be\x00brief"}),
    (
        "NUL in a message",
        "messages[0].content",
        {"messages": [jobs_pb2.Message(role="user", content="hi\x00")]},
    ),
    ("NUL in a label value", "labels['team']", {"labels": {"team": "a\x00"}}),
    ("NUL in a label key", "labels['t\\x00']", {"labels": {"t\x00": "a"}}),
    ("NUL in metadata", "metadata['user_id']", {"metadata": {"user_id": "u\x00"}}),
    ("NUL in the idempotency key", "idempotency_key", {"idempotency_key": "k\x00"}),
    ("NUL in the webhook URL", "webhook_url", {"webhook_url": "https://example.com/\x00"}),
    ("NUL in a stop sequence", "stop_sequences[0]", {"stop_sequences": ["END\x00"]}),
    ("NUL in the model", "model", {"model": "claude\x00"}),
    ("a model name with a trailing newline", "model", {"model": "claude-sonnet-4-5\n"}),
    ("run_at before the year 1", "run_at", {"run_at": (-62_135_596_801, 0)}),
    ("run_at after the year 9999", "run_at", {"run_at": (253_402_300_800, 0)}),
    ("run_at with nanos of a second or more", "run_at", {"run_at": (1_700_000_000, 10**9)}),
    ("run_at with negative nanos", "run_at", {"run_at": (1_700_000_000, -1)}),
    ("a delay of 2^62 seconds", "delay", {"delay": (2**62, 0)}),
    ("a timeout of 2^62 seconds", "timeout", {"timeout": (2**62, 0)}),
    ("a delay of mixed signs", "delay", {"delay": (5, -5)}),
    ("a timeout of mixed signs", "timeout", {"timeout": (-5, 5)}),
    ("a delay with nanos of a second", "delay", {"delay": (0, 10**9)}),
    ("a timeout with nanos beyond a second", "timeout", {"timeout": (1, 10**9 + 5)}),
    ("temperature NaN", "temperature", {"temperature": float("nan")}),
]


@pytest.mark.parametrize(
    ("field", "fields"), [(f, v) for _, f, v in REFUSED], ids=[c for c, _, _ in REFUSED]
)
def test_a_refused_value_names_its_field(field: str, fields: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_submit(_with(**fields), Settings(), "t", now=NOW)
    assert err.value.field == field


def test_the_edges_of_the_well_known_types_are_accepted() -> None:
    job = validate_submit(_with(run_at=(-62_135_596_800, 999_999_999)), Settings(), "t", now=NOW)
    assert job.run_at is not None and job.run_at.year == 1
    job = validate_submit(_with(timeout=(3599, 999_999_999)), Settings(), "t", now=NOW)
    assert job.timeout_ms == 3_599_999
    job = validate_submit(_with(delay=(0, 0)), Settings(), "t", now=NOW)
    assert job.run_at is None
