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
notifier untouched. The modules: `transcode` (the routes and the JSON mapping read
from the contract), `api` (the handlers), `sse` (event format and resume points),
`errors` (the error shape), `site` (the dashboard), `openapi` (the OpenAPI document);
this one builds the application and serves it.

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
import logging
import os
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from conveyor.core.config import Settings
from conveyor.core.metrics import HTTP_REQUESTS
from conveyor.server.runtime import freeze_startup_heap, max_request_bytes

from . import errors, site
from .api import Api, Handler
from .sse import Positions
from .transcode import routes

log = logging.getLogger(__name__)

__all__ = ["OPENAPI_FILE", "Positions", "build_app", "channel", "serve"]

OPENAPI_FILE = Path(__file__).with_name("openapi.json")
NOTIFIER_WINDOW = 16 * 1024
"""The notifier channel's per-stream HTTP/2 window: a slow SSE reader holds back the
notifier (see sse.STREAM_QUEUE)."""
JSON_BODY_FACTOR = 2
"""The body limit is this many times the gRPC receive limit: JSON escapes text."""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID, traceparent, tracestate"


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
    freeze_startup_heap()
    log.info("http ready", extra={"address": f"{settings.http_host}:{settings.http_port}"})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await gateway.close()
