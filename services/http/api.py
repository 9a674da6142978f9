"""The handlers of the contract's routes: a unary call to the gateway answered as JSON,
a stream from the notifier relayed as Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import orjson
from aiohttp import web
from google.protobuf.message import Message

from conveyor.core.config import Settings
from conveyor.core.errors import ConveyorError, InvalidArgument
from conveyor.core.metrics import HTTP_STREAMS
from conveyor.v1 import events_pb2

from . import errors
from .sse import (
    FIRST_EVENT_WAIT_S,
    RETRY_MS,
    SSE_SEND_BUFFER,
    STREAM_QUEUE,
    Positions,
    Stalled,
    Writer,
    canonical,
    sse,
)
from .transcode import (
    NOTIFIER_SERVICES,
    SERVICES,
    Route,
    request_from,
    to_json,
)

log = logging.getLogger(__name__)

UNARY_TIMEOUT_S = 60.0
"""Deadline of one unary call to the gateway."""

PASSED_HEADERS = ("authorization", "traceparent", "tracestate")
"""Request headers forwarded to the gRPC call as metadata."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metadata_of(request: web.Request) -> tuple[tuple[str, str], ...]:
    """The headers passed on as gRPC metadata; a value gRPC cannot carry is refused."""
    out = []
    for name in PASSED_HEADERS:
        value = request.headers.get(name)
        if value is None:
            continue
        if not value.isascii() or not value.isprintable():
            if name == "authorization":
                raise _Unauthenticated()
            continue
        out.append((name, value))
    return tuple(out)


class _Unauthenticated(ConveyorError):
    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self) -> None:
        super().__init__("the Authorization header must be `Bearer <api key>`")


class Api:
    """The handlers of every route, on one channel to the gateway and one to the notifier."""

    def __init__(
        self, settings: Settings, gateway: grpc.aio.Channel, notifier: grpc.aio.Channel
    ) -> None:
        self.settings = settings
        self.channels = {
            service.full_name: notifier if service.full_name in NOTIFIER_SERVICES else gateway
            for service in SERVICES
        }

    def handler(self, route: Route) -> Handler:
        chan = self.channels[route.service]
        if route.streaming:
            stream_call = chan.unary_stream(
                route.grpc_path,
                request_serializer=route.request_class.SerializeToString,
                response_deserializer=route.response_class.FromString,
            )
            return lambda request: self._stream(route, stream_call, request)
        unary_call = chan.unary_unary(
            route.grpc_path,
            request_serializer=route.request_class.SerializeToString,
            response_deserializer=route.response_class.FromString,
        )
        return lambda request: self._unary(route, unary_call, request)

    async def _request(
        self, route: Route, request: web.Request
    ) -> tuple[tuple[tuple[str, str], ...], Message]:
        """The gRPC call's metadata and request message; ConveyorError if either is bad."""
        metadata = metadata_of(request)
        body: Any = None
        if route.body:
            raw = await request.read()
            if raw.strip():
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise InvalidArgument("body", "is not valid JSON (UTF-8)") from None
        return metadata, request_from(route, body, request.match_info, request.query.items())

    async def _unary(
        self, route: Route, call: grpc.aio.UnaryUnaryMultiCallable, request: web.Request
    ) -> web.StreamResponse:
        try:
            metadata, message = await self._request(route, request)
        except ConveyorError as exc:
            return errors.response(errors.from_conveyor_error(exc))
        try:
            reply = await call(message, metadata=metadata, timeout=UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return errors.response(errors.from_rpc_error(exc))
        return web.Response(body=orjson.dumps(to_json(reply)), content_type="application/json")

    # -- Server-Sent Events

    def _resume(self, route: Route, message: Message, request: web.Request) -> Positions:
        """Apply Last-Event-ID to the request; the stream's position keeper."""
        last = request.headers.get("Last-Event-ID")
        if isinstance(message, events_pb2.WatchJobRequest):
            if last is not None and last.strip():
                if not last.strip().isdigit() or len(last.strip()) > 18:
                    raise InvalidArgument("Last-Event-ID", "must be a sequence number")
                message.after_sequence = int(last.strip())
            job = canonical(message.id)
            resume = {job: message.after_sequence} if message.after_sequence else {}
            return Positions([job], resume, forget_finished=False)
        assert isinstance(message, events_pb2.WatchJobsRequest)
        ids = list(dict.fromkeys(canonical(i) for i in message.ids))
        if last is not None and last.strip():
            for job, seq in Positions.parse(last, ids).items():
                message.after_sequences[job] = seq
        resume = {canonical(k): v for k, v in message.after_sequences.items()}
        return Positions(ids, resume, forget_finished=not ids)

    async def _stream(
        self, route: Route, call: grpc.aio.UnaryStreamMultiCallable, request: web.Request
    ) -> web.StreamResponse:
        try:
            metadata, message = await self._request(route, request)
            positions = self._resume(route, message, request)
        except ConveyorError as exc:
            return errors.response(errors.from_conveyor_error(exc))
        single = isinstance(message, events_pb2.WatchJobRequest)
        job_id = canonical(message.id) if isinstance(message, events_pb2.WatchJobRequest) else ""
        grpc_call = call(message, metadata=metadata)
        queue: asyncio.Queue[Message | grpc.aio.AioRpcError | None] = asyncio.Queue(STREAM_QUEUE)

        async def pump() -> None:
            try:
                async for item in grpc_call:
                    await queue.put(item)
                await queue.put(None)
            except grpc.aio.AioRpcError as exc:
                await queue.put(exc)

        pumping = asyncio.create_task(pump())
        HTTP_STREAMS.inc()
        response = web.StreamResponse(status=499)  # replaced once the stream starts
        try:
            first: Message | grpc.aio.AioRpcError | None | bool = False
            with contextlib.suppress(TimeoutError):
                first = await asyncio.wait_for(queue.get(), FIRST_EVENT_WAIT_S)
            if isinstance(first, grpc.aio.AioRpcError):
                return errors.response(errors.from_rpc_error(first))
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SSE_SEND_BUFFER)
            writer = Writer(response, self.settings.http_sse_write_timeout_s)
            await writer.send(f"retry: {RETRY_MS}\n\n".encode())
            item = first
            heartbeat = self.settings.http_sse_heartbeat_s
            while True:
                if item is False:
                    try:
                        item = await asyncio.wait_for(queue.get(), heartbeat)
                    except TimeoutError:
                        await writer.send(b": keep-alive\n\n")
                        item = False
                        continue
                if item is None:
                    await writer.send(sse(b"{}", event="end"))
                    break
                if isinstance(item, grpc.aio.AioRpcError):
                    await writer.send(sse(orjson.dumps(errors.from_rpc_error(item)), event="error"))
                    break
                assert isinstance(item, events_pb2.JobEvent)
                positions.see(item)
                event_id = positions.single(job_id) if single else positions.cursor()
                await writer.send(sse(orjson.dumps(to_json(item)), event_id))
                item = False
            return response
        except (ConnectionError, Stalled):
            # The reader left or stopped reading: the stream is over.
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            HTTP_STREAMS.dec()
            grpc_call.cancel()
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
