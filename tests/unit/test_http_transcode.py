"""The HTTP mapping read from the contract (services/http/transcode.py) and the SSE
resume cursor, without a stack."""

from __future__ import annotations

import uuid

import pytest

from conveyor.core.errors import InvalidArgument
from conveyor.v1 import events_pb2, jobs_pb2
from services.http.app import Positions
from services.http.transcode import Route, from_json, request_from, routes, to_json


def route(name: str) -> Route:
    return next(r for r in routes() if r.name == name)


def test_every_rpc_of_job_service_and_job_events_is_routed_from_its_http_rule() -> None:
    found = {(r.verb, r.template): r.name for r in routes()}
    assert found[("POST", "/v1/jobs")] == "SubmitJob"
    assert found[("GET", "/v1/jobs/{id}")] == "GetJob"
    assert found[("POST", "/v1/jobs/{id}:cancel")] == "CancelJob"
    assert found[("GET", "/v1/jobs/{id}/events")] == "WatchJob"
    assert found[("GET", "/v1/events")] == "WatchJobs"
    served = {r.name for r in routes()}
    for service in (
        jobs_pb2.DESCRIPTOR.services_by_name["JobService"],
        events_pb2.DESCRIPTOR.services_by_name["JobEvents"],
    ):
        assert {m.name for m in service.methods} <= served


def test_query_strings_fill_lists_maps_enums_and_timestamps() -> None:
    query = [
        ("status", "pending"),
        ("statuses", "JOB_STATUS_DEAD,failed"),
        ("labels[team]", "search"),
        ("page_size", "5"),
        ("created_after", "2026-01-01T00:00:00Z"),
    ]
    message = request_from(route("ListJobs"), None, {}, query)
    assert isinstance(message, jobs_pb2.ListJobsRequest)
    assert list(message.statuses) == [
        jobs_pb2.JOB_STATUS_PENDING,
        jobs_pb2.JOB_STATUS_DEAD,
        jobs_pb2.JOB_STATUS_FAILED,
    ]
    assert dict(message.labels) == {"team": "search"} and message.page_size == 5
    assert message.created_after.seconds > 0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ([("statuss", "pending")], "statuss"),
        ([("page_size", "ten")], "page_size"),
        ([("status", "asleep")], "statuses"),
        ([("nope[x]", "y")], "nope[x]"),
    ],
)
def test_a_bad_query_parameter_is_invalid_argument_naming_it(
    query: list[tuple[str, str]], field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        request_from(route("ListJobs"), None, {}, query)
    assert refused.value.field == field


def test_path_variables_win_over_the_body() -> None:
    message = request_from(route("CancelJob"), {"id": "other", "reason": "r"}, {"id": "abc"}, [])
    assert isinstance(message, jobs_pb2.CancelJobRequest)
    assert (message.id, message.reason) == ("abc", "r")


def test_json_bytes_fields_travel_as_json_values_both_ways() -> None:
    body = {"requestJson": {"model": "m", "max_tokens": 1024, "messages": []}}
    message = jobs_pb2.SubmitJobRequest()
    from_json(body, message)
    assert message.request_json == b'{"model":"m","max_tokens":1024,"messages":[]}'
    job = jobs_pb2.Job(id="x", content_json=b'[{"type":"text","text":"hi"}]')
    out = to_json(jobs_pb2.GetJobResponse(job=job))
    assert out["job"]["contentJson"] == [{"type": "text", "text": "hi"}]
    assert "requestJson" not in out["job"], "an empty JSON field is left out"


def test_a_body_that_is_not_the_message_is_invalid_argument() -> None:
    for body, field in [([1], "body"), ({"maxTokens": "x"}, "maxTokens"), ({"zz": 1}, "zz")]:
        with pytest.raises(InvalidArgument) as refused:
            from_json(body, jobs_pb2.SubmitJobRequest())
        assert refused.value.field == field


def _event(job: str, seq: int, kind: str) -> events_pb2.JobEvent:
    event = events_pb2.JobEvent(job_id=job, sequence=seq)
    if kind == "snapshot":
        event.snapshot.id = job
    elif kind == "delta":
        event.token_delta.text = "t"
    else:
        event.status_changed.status = jobs_pb2.JOB_STATUS_SUCCEEDED
    return event


def test_the_watch_jobs_cursor_reads_back_as_the_resume_points_it_stands_for() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    positions = Positions([a, b], {}, forget_finished=False)
    for event in [_event(a, 3, "snapshot"), _event(b, 1, "snapshot"), _event(a, 5, "delta")]:
        positions.see(event)
    assert positions.cursor() == "0:5,1:1"
    assert Positions.parse(positions.cursor(), [a, b]) == {a: 5, b: 1}


def test_with_labels_the_cursor_names_jobs_and_forgets_finished_ones() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    positions = Positions([], {}, forget_finished=True)
    for event in [_event(a, 2, "snapshot"), _event(b, 4, "snapshot"), _event(a, 3, "status")]:
        positions.see(event)
    assert positions.cursor() == f"{b}:4"


def test_a_resume_point_is_kept_over_the_snapshot_sequence() -> None:
    a = str(uuid.uuid4())
    positions = Positions([a], {a: 2}, forget_finished=False)
    positions.see(_event(a, 9, "snapshot"))  # the events 3..9 are still to come
    assert positions.single(a) == "2"


@pytest.mark.parametrize("text", ["x", "0:", "5:1", "0:-1", "0:1:2x"])
def test_a_cursor_this_stream_did_not_send_is_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Positions.parse(text, [str(uuid.uuid4())])


def test_a_path_variable_that_is_not_text_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as refused:
        request_from(route("GetJob"), None, {"id": "\udcff"}, [])
    assert refused.value.field == "id"
