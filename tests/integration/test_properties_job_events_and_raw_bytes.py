"""Property: no JobEvents watch, however hostile, and no random bytes sent as the body of
any RPC of either service get INTERNAL or UNKNOWN, and a refused request writes
nothing.

Hypothesis builds requests from the proto messages, with hostile field values (huge,
negative, NUL, any unicode, bad ids, extreme timestamps and durations), and sends
them to the stack's live services. Each request runs as a tenant of this module's
own; before and after it, the test counts that tenant's jobs and the history rows of
its "anchor" jobs (scheduled a day ahead, so no worker touches them, and the targets
of most id-taking requests): a refused request must leave both as they were.

Streams are read for a moment only (a short deadline: DEADLINE_EXCEEDED is a fine
answer for a watch of a job that keeps running).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.v1 import events_pb2, events_pb2_grpc, jobs_pb2
from tests.integration.hostile_requests import (
    DURATIONS,
    INT64,
    MAPS,
    RUN,
    TEXT,
    Target,
    _check,
    _stream,
    _unary,
    job_ids,
)

pytestmark = pytest.mark.integration


@settings(RUN, max_examples=120)
@given(data=st.data())
def test_watch_job_never_answers_internal_or_unknown(target: Target, data: st.DataObject) -> None:
    req = events_pb2.WatchJobRequest(id=data.draw(job_ids(target)), after_sequence=data.draw(INT64))
    if data.draw(st.booleans()):
        req.progress_interval.CopyFrom(data.draw(DURATIONS))
    stub = events_pb2_grpc.JobEventsStub(target.notifier)
    _check(target, lambda: _stream(stub.WatchJob, req, target.member), req)


@settings(RUN, max_examples=120)
@given(data=st.data())
def test_watch_jobs_never_answers_internal_or_unknown(target: Target, data: st.DataObject) -> None:
    req = events_pb2.WatchJobsRequest(
        ids=data.draw(st.lists(job_ids(target), max_size=3)),
        labels=data.draw(st.one_of(st.just({}), MAPS)),
        after_sequences=data.draw(
            st.dictionaries(st.one_of(st.sampled_from(target.anchors), TEXT), INT64, max_size=3)
        ),
        token_deltas=data.draw(st.booleans()),
    )
    if data.draw(st.booleans()):
        req.progress_interval.CopyFrom(data.draw(DURATIONS))
    stub = events_pb2_grpc.JobEventsStub(target.notifier)
    _check(target, lambda: _stream(stub.WatchJobs, req, target.member), req)


def _methods() -> list[tuple[str, str, bool]]:
    out = []
    for service, where in (
        (jobs_pb2.DESCRIPTOR.services_by_name["JobService"], "gateway"),
        (events_pb2.DESCRIPTOR.services_by_name["JobEvents"], "notifier"),
    ):
        for m in service.methods:
            out.append((where, f"/{service.full_name}/{m.name}", m.server_streaming))
    return out


METHODS = _methods()


@settings(RUN, max_examples=450)
@given(
    method=st.sampled_from(METHODS),
    body=st.one_of(
        st.binary(max_size=64), st.binary(min_size=1, max_size=4).map(lambda b: b * 300)
    ),
)
def test_random_bytes_as_a_request_body_never_answer_internal_or_unknown(
    target: Target, method: tuple[str, str, bool], body: bytes
) -> None:
    where, path, streaming = method
    channel = target.gateway if where == "gateway" else target.notifier
    if streaming:
        call = channel.unary_stream(path)
        _check(target, lambda: _stream(call, body, target.member), (path, body))
    else:
        unary = channel.unary_unary(path)
        _check(target, lambda: _unary(unary, body, target.member), (path, body))
