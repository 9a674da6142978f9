"""The HTTP/JSON API: JobService and JobEvents over HTTP, with Server-Sent Events.

Why a transcoder of our own and not Connect RPC. Connect's JSON protocol is
`POST /conveyor.v1.JobService/GetJob` with the request in the body: no REST paths
(`GET /v1/jobs/{id}`), no query strings, nothing a browser's cache, `curl` or an
OpenAPI tool expects; and its server streams are enveloped binary frames that
EventSource and a plain `fetch` reader cannot read. The Python `connectrpc` server
is an ASGI/WSGI application, so it would also need a second web stack next to
grpc.aio. The rules in protos/ (`google.api.http`) already say what every path
is; reading them from the service descriptors at start (services/http/transcode.py)
takes a few hundred lines, serves REST paths and SSE, and leaves the gateway and
notifier untouched.

Why a service of its own (`python -m services.http`) calling the gateway and the
notifier over gRPC, on one multiplexed channel each: authentication, tenant rules,
quotas, input checks and limits stay in one place (the gRPC servers) and cannot
drift; the gateway keeps its event loop for submits (HTTP parsing and JSON cost
CPU that would otherwise come out of the gateway's core); and the HTTP service
scales apart from it. The extra hop is a loopback HTTP/2 call on an open channel;
`make bench` measures HTTP SubmitJob against gRPC (scenario http-submit).

Security: the `Authorization: Bearer <key>` header is passed to the gRPC call as
it is (no cookies, so no CSRF surface; a key is never taken from a URL), every
answer carries a Content-Security-Policy, nothing logs headers or query strings,
CORS is off unless CONVEYOR_HTTP_CORS_ORIGINS lists origins, and a body larger
than the gRPC servers' receive limit (in its JSON form) is refused before it is
read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
from aiohttp import web
from google.protobuf.message import Message

from conveyor.core.config import Settings
from conveyor.core.errors import ConveyorError, InvalidArgument
from conveyor.core.metrics import HTTP_REQUESTS, HTTP_STREAMS
from conveyor.server.runtime import max_request_bytes
from conveyor.v1 import events_pb2, jobs_pb2

from . import errors, site
from .transcode import (
    NOTIFIER_SERVICES,
    SERVICES,
    Route,
    request_from,
    routes,
    to_json,
)

log = logging.getLogger(__name__)

OPENAPI_FILE = Path(__file__).with_name("openapi.json")
UNARY_TIMEOUT_S = 60.0
"""Deadline of one unary call to the gateway."""
FIRST_EVENT_WAIT_S = 1.0
"""A stream's first message (or its refusal) is awaited this long before the SSE
answer starts, so that an unknown job or a wrong key gets a plain JSON error with
its HTTP status; a stream with nothing to say yet starts with a comment instead."""
STREAM_QUEUE = 16
"""Messages read from a gRPC stream ahead of the HTTP reader. With the small
per-stream gRPC window below and a socket send buffer of SSE_SEND_BUFFER, a slow
reader holds back the notifier, whose bounded inbox then cuts it off, as on gRPC."""
SSE_SEND_BUFFER = 16 * 1024
NOTIFIER_WINDOW = 16 * 1024
JSON_BODY_FACTOR = 2
"""The body limit is this many times the gRPC receive limit: JSON escapes text."""
RETRY_MS = 2000
"""The reconnection delay an EventSource is told to use."""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID, traceparent, tracestate"
PASSED_HEADERS = ("authorization", "traceparent", "tracestate")
"""Request headers forwarded to the gRPC call as metadata."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def channel(target: str, settings: Settings, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to one of our gRPC servers (TLS when they serve it)."""
    options = [
        ("grpc.primary_user_agent", "conveyor-http"),
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", max_request_bytes(settings)),
        *options,
    ]
    if not settings.tls:
        return grpc.aio.insecure_channel(target, options=options)
    roots = os.environ.get("CONVEYOR_TLS_ROOT_CERTS") or settings.tls_cert_file
    cert = os.environ.get("CONVEYOR_TLS_CLIENT_CERT_FILE")
    key = os.environ.get("CONVEYOR_TLS_CLIENT_KEY_FILE")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(roots).read_bytes() if roots else None,
        private_key=Path(key).read_bytes() if cert and key else None,
        certificate_chain=Path(cert).read_bytes() if cert and key else None,
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


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


def sse(data: bytes, event_id: str | None = None, event: str | None = None) -> bytes:
    """One Server-Sent Events message (`data` is one line of JSON)."""
    head = b""
    if event_id is not None:
        head += b"id: " + event_id.encode() + b"\n"
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


# --------------------------------------------------------------------------- resume points


class Positions:
    """Where a stream is, per job: the SSE event ids, and Last-Event-ID read back.

    WatchJob: the id is the job's sequence number (of the event; a snapshot's when no
    resume point was given), so Last-Event-ID is `after_sequence`.

    WatchJobs: the id is a cursor, `<job>:<sequence>` entries joined by commas, one
    per job seen so far (with `labels`, per unfinished job), where `<job>` is the
    job's index in `ids` or, with `labels`, its id. Last-Event-ID is turned back into
    `after_sequences`, so a reconnect gets each job's events after the last one
    received, exactly once, as a gRPC resume does.
    """

    def __init__(self, ids: list[str], resume: dict[str, int], forget_finished: bool) -> None:
        self.index = {job: i for i, job in enumerate(ids)}
        self.at: dict[str, int] = dict(resume)
        self.forget_finished = forget_finished

    def see(self, event: events_pb2.JobEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "snapshot":
            self.at.setdefault(event.job_id, event.sequence)
        elif kind in ("status_changed", "token_delta"):
            self.at[event.job_id] = event.sequence
            if (
                self.forget_finished
                and kind == "status_changed"
                and event.status_changed.status in FINISHED
            ):
                self.at.pop(event.job_id, None)

    def single(self, job_id: str) -> str:
        return str(self.at.get(job_id, 0))

    def cursor(self) -> str:
        return ",".join(
            f"{self.index.get(job, job)}:{seq}" for job, seq in self.at.items() if seq > 0
        )

    @staticmethod
    def parse(text: str, ids: list[str]) -> dict[str, int]:
        """A WatchJobs cursor as after_sequences; InvalidArgument if it is not one."""
        out: dict[str, int] = {}
        for part in filter(None, text.split(",")):
            job, sep, seq = part.strip().rpartition(":")
            if not sep or not seq.isdigit() or len(seq) > 18:
                raise InvalidArgument("Last-Event-ID", "is not a cursor this stream sent")
            if job.isdigit():
                if int(job) >= len(ids):
                    raise InvalidArgument("Last-Event-ID", "names a job index beyond `ids`")
                job = ids[int(job)]
            out[job] = int(seq)
        return out


FINISHED = {
    jobs_pb2.JOB_STATUS_SUCCEEDED,
    jobs_pb2.JOB_STATUS_FAILED,
    jobs_pb2.JOB_STATUS_CANCELLED,
    jobs_pb2.JOB_STATUS_DEAD,
}


def _canonical(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        return job_id


# --------------------------------------------------------------------------- handlers


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

    async def _request(self, route: Route, request: web.Request) -> Message:
        body: Any = None
        if route.body:
            raw = await request.read()
            if raw.strip():
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise InvalidArgument("body", "is not valid JSON (UTF-8)") from None
        return request_from(route, body, request.match_info, request.query.items())

    async def _unary(
        self, route: Route, call: grpc.aio.UnaryUnaryMultiCallable, request: web.Request
    ) -> web.StreamResponse:
        try:
            metadata = metadata_of(request)
            message = await self._request(route, request)
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
            job = _canonical(message.id)
            resume = {job: message.after_sequence} if message.after_sequence else {}
            return Positions([job], resume, forget_finished=False)
        assert isinstance(message, events_pb2.WatchJobsRequest)
        ids = list(dict.fromkeys(_canonical(i) for i in message.ids))
        if last is not None and last.strip():
            for job, seq in Positions.parse(last, ids).items():
                message.after_sequences[job] = seq
        resume = {_canonical(k): v for k, v in message.after_sequences.items()}
        return Positions(ids, resume, forget_finished=not ids)

    async def _stream(
        self, route: Route, call: grpc.aio.UnaryStreamMultiCallable, request: web.Request
    ) -> web.StreamResponse:
        try:
            metadata = metadata_of(request)
            message = await self._request(route, request)
            positions = self._resume(route, message, request)
        except ConveyorError as exc:
            return errors.response(errors.from_conveyor_error(exc))
        single = isinstance(message, events_pb2.WatchJobRequest)
        job_id = _canonical(message.id) if isinstance(message, events_pb2.WatchJobRequest) else ""
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
            writer = _Writer(response, self.settings.http_sse_write_timeout_s)
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
        except (ConnectionError, _Stalled):
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


class _Stalled(Exception):
    """The SSE reader took nothing for the write timeout."""


class _Writer:
    def __init__(self, response: web.StreamResponse, timeout_s: float) -> None:
        self.response = response
        self.timeout_s = timeout_s

    async def send(self, data: bytes) -> None:
        try:
            await asyncio.wait_for(self.response.write(data), self.timeout_s)
        except TimeoutError:
            log.info("an SSE reader stopped reading; disconnected")
            raise _Stalled() from None


# --------------------------------------------------------------------------- application


def _cors_allowed(settings: Settings, origin: str | None) -> bool:
    if not origin or not settings.http_cors_origins:
        return False
    return "*" in settings.http_cors_origins or origin in settings.http_cors_origins


def build_app(
    settings: Settings, gateway: grpc.aio.Channel, notifier: grpc.aio.Channel
) -> web.Application:
    """The aiohttp application: the contract's routes, /healthz, /openapi.json and the
    dashboard (services/http/site.py)."""
    api = Api(settings, gateway, notifier)
    openapi = OPENAPI_FILE.read_bytes() if OPENAPI_FILE.exists() else b"{}"

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        """CORS preflight, HTTP-level errors in the error shape, metrics."""
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        if request.method == "OPTIONS" and _cors_allowed(settings, request.headers.get("Origin")):
            answer: web.StreamResponse = web.Response(status=204)
        else:
            try:
                answer = await handler(request)
            except web.HTTPException as exc:
                answer = _http_error(exc)
            except Exception:
                log.exception("HTTP handler failed", extra={"route": name})
                answer = errors.response(
                    errors.error_body(grpc.StatusCode.INTERNAL, "internal error")
                )
        HTTP_REQUESTS.labels(name, str(answer.status)).inc()
        return answer

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)
        if site.is_dashboard(request.path):  # the dashboard loads its own script and style
            response.headers["Content-Security-Policy"] = site.DASHBOARD_CSP
        origin = request.headers.get("Origin")
        if _cors_allowed(settings, origin):
            assert origin is not None
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = (
                    "GET, POST, PUT, PATCH, DELETE, OPTIONS"
                )
                response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
                response.headers["Access-Control-Max-Age"] = "600"

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "SERVING"})

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    app = web.Application(
        middlewares=[edge],
        client_max_size=JSON_BODY_FACTOR * max_request_bytes(settings),
    )
    app.on_response_prepare.append(headers)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/openapi.json", openapi_json, allow_head=False)
    site.add_routes(app, settings)
    for route in routes():
        app.router.add_route(route.verb, route.aiohttp_path, api.handler(route))
    return app


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no such path, wrong method, body too large), in our shape."""
    status = exc.status
    code = {
        404: grpc.StatusCode.NOT_FOUND,
        405: grpc.StatusCode.UNIMPLEMENTED,
        413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    }.get(status, grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL)
    message = {
        404: "no such path",
        405: f"method {exc.reason and exc.reason.lower()}: see /openapi.json",
        413: "the request body is larger than the limit",
    }.get(status, exc.reason)
    extra = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return errors.response(errors.error_body(code, message, http_status=status), extra)


class _RequestTextFilter(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending bytes (a header line,
    which may be `Authorization: Bearer <key>`): keep the fact, drop the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            kind = type(record.exc_info[1]).__name__ if record.exc_info else "error"
            record.msg = "refused an HTTP request that could not be parsed or handled: %s"
            record.args = (kind,)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the HTTP API until `stop` is set."""
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.internal"):
        logging.getLogger(name).addFilter(_RequestTextFilter())
    gateway = channel(settings.http_gateway_target or settings.gateway_target, settings, [])
    notifier = channel(
        settings.http_notifier_target or settings.notifier_target,
        settings,
        [("grpc.http2.lookahead_bytes", NOTIFIER_WINDOW), ("grpc.http2.bdp_probe", 0)],
    )
    runner = web.AppRunner(
        build_app(settings, gateway, notifier),
        access_log=None,  # access lines would carry query strings; metrics count calls
        handle_signals=False,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    listener = web.TCPSite(runner, settings.http_host, settings.http_port)
    await listener.start()
    log.info("http ready", extra={"address": f"{settings.http_host}:{settings.http_port}"})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await gateway.close()
        await notifier.close()
