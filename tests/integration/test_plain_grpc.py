"""The first call a user tries works as written, with nothing but server reflection.

This does what grpcurl does: fetch the descriptors from the server, build the
messages from them, parse the README's JSON and call the method. No generated
stubs or proto files are used.
"""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import count_jobs
from tests.stack import Stack

pytestmark = pytest.mark.integration

README_SUBMIT = (
    '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hello"}]}'
)


def _call(
    target: str, method: str, body: str, api_key: str | None = None
) -> list[dict[str, object]]:
    """Like `grpcurl -plaintext -H 'authorization: Bearer KEY' -d BODY TARGET METHOD`:
    JSON in, JSON messages out."""
    service_name, method_name = method.rsplit("/", 1)
    with grpc.insecure_channel(target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method_desc = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        request_cls = message_factory.GetMessageClass(method_desc.input_type)
        response_cls = message_factory.GetMessageClass(method_desc.output_type)
        request = json_format.Parse(body, request_cls())
        path = f"/{service_name}/{method_name}"
        serialize, deserialize = request_cls.SerializeToString, response_cls.FromString
        metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
        if method_desc.server_streaming:
            call = channel.unary_stream(path, serialize, deserialize)
            responses = list(call(request, timeout=30, metadata=metadata))
        else:
            unary = channel.unary_unary(path, serialize, deserialize)
            responses = [unary(request, timeout=30, metadata=metadata)]
        return [json.loads(json_format.MessageToJson(r)) for r in responses]


def test_the_readme_calls_work_through_reflection_alone(stack: Stack, api_key: str) -> None:
    submit = "conveyor.v1.JobService/SubmitJob"
    (submitted,) = _call(stack.gateway, submit, README_SUBMIT, api_key)
    job = submitted["job"]
    assert isinstance(job, dict) and job["id"] and job["status"] == "JOB_STATUS_PENDING"

    watch = json.dumps({"id": job["id"]})
    events = _call(stack.notifier, "conveyor.v1.JobEvents/WatchJob", watch, api_key)
    assert "snapshot" in events[0]
    get = json.dumps({"id": job["id"]})
    (got,) = _call(stack.gateway, "conveyor.v1.JobService/GetJob", get, api_key)
    final = got["job"]
    assert isinstance(final, dict) and final["status"] == "JOB_STATUS_SUCCEEDED"
    assert final["resultText"]


async def test_without_a_key_the_call_is_refused_but_discovery_works(
    stack: Stack, db: AsyncEngine
) -> None:
    before = await count_jobs(db)
    with pytest.raises(grpc.RpcError) as err:  # reflection answered: the method was found
        _call(stack.gateway, "conveyor.v1.JobService/SubmitJob", README_SUBMIT)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in (err.value.details() or "")
    assert await count_jobs(db) == before, "nothing was written"
