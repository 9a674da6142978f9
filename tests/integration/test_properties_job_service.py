"""Property: no JobService request, however hostile, gets INTERNAL or UNKNOWN, and a
refused request writes nothing.

Hypothesis builds requests from the proto messages, with hostile field values (huge,
negative, NUL, any unicode, bad ids, extreme timestamps and durations), and sends
them to the stack's live services. Each request runs as a tenant of this module's
own; before and after it, the test counts that tenant's jobs and the history rows of
its "anchor" jobs (scheduled a day ahead, so no worker touches them, and the targets
of most id-taking requests): a refused request must leave both as they were.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.v1 import jobs_pb2, jobs_pb2_grpc
from tests.integration.hostile_requests import (
    INT32,
    MAPS,
    RUN,
    TEXT,
    TIMESTAMPS,
    Target,
    _check,
    _unary,
    _valid_submit,
    job_ids,
    submit_requests,
)

pytestmark = pytest.mark.integration


def _is_anchor(target: Target, job_id: str) -> bool:
    try:
        return str(uuid.UUID(job_id)) in target.anchors
    except ValueError:
        return False


def _page_tokens() -> st.SearchStrategy[str]:
    import base64

    def token(created: str) -> str:
        return base64.urlsafe_b64encode(f"{created}|{uuid.uuid4()}".encode()).decode()

    return st.one_of(
        TEXT,
        st.sampled_from(
            [
                "0001-01-01T00:00:00+14:00",
                "9999-12-31T23:59:59-14:00",
                "2026-01-01T00:00:00",
                "2026-01-01T00:00:00+00:00",
                "-infinity",
            ]
        ).map(token),
        st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    )


@settings(RUN, max_examples=450)
@given(data=st.data())
def test_submit_job_never_answers_internal_or_unknown(target: Target, data: st.DataObject) -> None:
    req = data.draw(submit_requests())
    stub = jobs_pb2_grpc.JobServiceStub(target.gateway)
    before = target.written()
    code = _check(target, lambda: _unary(stub.SubmitJob, req, target.member), req)
    if code == grpc.StatusCode.OK:
        assert target.written()[0] in (before[0], before[0] + 1)  # new, or a replay


@settings(RUN, max_examples=150)
@given(data=st.data())
def test_submit_jobs_never_answers_internal_or_unknown(target: Target, data: st.DataObject) -> None:
    jobs = data.draw(
        st.one_of(
            st.lists(submit_requests(), max_size=4),
            st.sampled_from([0, 501]).map(lambda n: [_valid_submit() for _ in range(n)]),
        )
    )
    req = jobs_pb2.SubmitJobsRequest(jobs=jobs)
    stub = jobs_pb2_grpc.JobServiceStub(target.gateway)
    _check(target, lambda: _unary(stub.SubmitJobs, req, target.member), f"{len(jobs)} jobs")


@settings(RUN, max_examples=300)
@given(data=st.data())
def test_reads_never_answer_internal_or_unknown(target: Target, data: st.DataObject) -> None:
    stub = jobs_pb2_grpc.JobServiceStub(target.gateway)
    job_id = data.draw(job_ids(target))
    method = data.draw(st.sampled_from(["GetJob", "RetryJob", "GetJobHistory"]))
    request: Message = {
        "GetJob": jobs_pb2.GetJobRequest,
        "RetryJob": jobs_pb2.RetryJobRequest,
        "GetJobHistory": jobs_pb2.GetJobHistoryRequest,
    }[method](id=job_id)
    key = data.draw(st.sampled_from([target.member, target.admin]))
    _check(target, lambda: _unary(getattr(stub, method), request, key), request)


@settings(RUN, max_examples=300)
@given(data=st.data())
def test_list_jobs_never_answers_internal_or_unknown(target: Target, data: st.DataObject) -> None:
    req = jobs_pb2.ListJobsRequest(
        statuses=cast(Any, data.draw(st.lists(st.integers(-3, 10), max_size=3))),
        lane=data.draw(st.one_of(st.just(""), TEXT, st.just("bulk"))),
        labels=data.draw(st.one_of(st.just({}), MAPS)),
        page_size=data.draw(INT32),
        page_token=data.draw(st.one_of(st.just(""), _page_tokens())),
        view=cast(Any, data.draw(st.one_of(st.sampled_from([0, 1, 2]), INT32))),
    )
    if data.draw(st.booleans()):
        req.created_after.CopyFrom(data.draw(TIMESTAMPS))
    if data.draw(st.booleans()):
        req.created_before.CopyFrom(data.draw(TIMESTAMPS))
    stub = jobs_pb2_grpc.JobServiceStub(target.gateway)
    _check(target, lambda: _unary(stub.ListJobs, req, target.member), req)


@settings(RUN, max_examples=200)
@given(data=st.data())
def test_cancel_job_never_answers_internal_or_unknown(target: Target, data: st.DataObject) -> None:
    # Cancel requests for the anchors carry a bad reason (a good one would cancel them).
    job_id = data.draw(job_ids(target))
    reason = data.draw(st.one_of(st.just("\x00"), st.just("r" * 1025), TEXT))
    if _is_anchor(target, job_id) and "\x00" not in reason and len(reason) <= 1024:
        reason += "\x00"
    req = jobs_pb2.CancelJobRequest(id=job_id, reason=reason)
    stub = jobs_pb2_grpc.JobServiceStub(target.gateway)
    _check(target, lambda: _unary(stub.CancelJob, req, target.member), req)


@settings(RUN, max_examples=100)
@given(data=st.data())
def test_get_stats_never_answers_internal_or_unknown(target: Target, data: st.DataObject) -> None:
    req = jobs_pb2.GetStatsRequest(
        tenant=data.draw(st.one_of(st.just(""), st.just(target.tenant), TEXT)),
        all_tenants=data.draw(st.booleans()),
    )
    key = data.draw(st.sampled_from([target.member, target.admin]))
    stub = jobs_pb2_grpc.JobServiceStub(target.gateway)
    _check(target, lambda: _unary(stub.GetStats, req, key), req)
