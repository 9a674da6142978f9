"""What the unit tests of the client and the CLI serve them: gRPC handlers standing in
for the gateway (GetJob, SubmitJob) and the notifier (WatchJob), the job they answer
with and the run of events they stream; and `sync_fake` (a fixture through
`conftest.py`), a threaded server of them. `test_client.py` serves them from a
grpc.aio server too (`fake`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from conveyor.v1 import events_pb2, jobs_pb2

JOB_ID = "0b9f6a4e-8d4c-4d59-9a55-1f0f5b7e1a01"


def final_job(job_id: str = JOB_ID) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id=job_id,
        status=jobs_pb2.JOB_STATUS_SUCCEEDED,
        model="claude-sonnet-4-5",
        result_text="Hello",
        stop_reason="end_turn",
        attempts=1,
        max_attempts=3,
        usage=jobs_pb2.Usage(input_tokens=12, output_tokens=2),
        created_at=Timestamp(seconds=1_700_000_000),
    )


def events(job_id: str = JOB_ID) -> list[events_pb2.JobEvent]:
    """A run: snapshot (running), two deltas, the terminal transition."""
    return [
        events_pb2.JobEvent(
            job_id=job_id,
            sequence=2,
            snapshot=jobs_pb2.Job(id=job_id, status=jobs_pb2.JOB_STATUS_RUNNING),
        ),
        events_pb2.JobEvent(
            job_id=job_id, sequence=3, token_delta=events_pb2.TokenDelta(text="Hel", attempt=1)
        ),
        events_pb2.JobEvent(
            job_id=job_id, sequence=4, token_delta=events_pb2.TokenDelta(text="lo", attempt=1)
        ),
        events_pb2.JobEvent(
            job_id=job_id,
            sequence=5,
            status_changed=events_pb2.StatusChanged(
                status=jobs_pb2.JOB_STATUS_SUCCEEDED,
                previous=jobs_pb2.JOB_STATUS_RUNNING,
                attempt=1,
                job=final_job(job_id),
            ),
        ),
    ]


def invalid_argument_status() -> grpc.Status:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="id", description="is not a UUID")
        ]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="id: is not a UUID")
    status.details.add().Pack(bad)
    return rpc_status.to_status(status)


def _handlers(get: Any, submit: Any, watch: Any) -> list[grpc.GenericRpcHandler]:
    jobs = grpc.method_handlers_generic_handler(
        "conveyor.v1.JobService",
        {
            "GetJob": grpc.unary_unary_rpc_method_handler(
                get,
                request_deserializer=jobs_pb2.GetJobRequest.FromString,
                response_serializer=jobs_pb2.GetJobResponse.SerializeToString,
            ),
            "SubmitJob": grpc.unary_unary_rpc_method_handler(
                submit,
                request_deserializer=jobs_pb2.SubmitJobRequest.FromString,
                response_serializer=jobs_pb2.SubmitJobResponse.SerializeToString,
            ),
        },
    )
    job_events = grpc.method_handlers_generic_handler(
        "conveyor.v1.JobEvents",
        {
            "WatchJob": grpc.unary_stream_rpc_method_handler(
                watch,
                request_deserializer=events_pb2.WatchJobRequest.FromString,
                response_serializer=events_pb2.JobEvent.SerializeToString,
            )
        },
    )
    return [jobs, job_events]


@pytest.fixture
def sync_fake() -> Iterator[str]:
    """A threaded gRPC server, for commands that run their own event loop (asyncio.run)."""

    def get_job(request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> Any:
        if request.id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "job missing not found")
        if request.id == "bad":
            context.abort_with_status(invalid_argument_status())
        return jobs_pb2.GetJobResponse(job=final_job(request.id))

    def submit_job(request: jobs_pb2.SubmitJobRequest, context: grpc.ServicerContext) -> Any:
        return jobs_pb2.SubmitJobResponse(
            job=jobs_pb2.Job(id=JOB_ID, status=jobs_pb2.JOB_STATUS_PENDING)
        )

    def watch_job(
        request: events_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[events_pb2.JobEvent]:
        yield from events(request.id)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(_handlers(get_job, submit_job, watch_job))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
