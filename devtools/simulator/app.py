"""The aiohttp application of the simulator: a stand-in for the Anthropic Messages API.

It answers `POST /v1/messages` the way the real API does, as one JSON message or as
a server-sent-event stream, with deterministic text (seeded from the request's
messages), configurable latency and speed, and failures injected at random rates or
forced per request by `x-sim-*` headers:

- `x-sim-fail`: `429`, `529`, `500`, `400`, `401` (an error response with the real
  JSON shape), `drop` (the connection is closed half way through the answer) or
  `error-event` (an SSE `error` event, overloaded, half way through the stream);
- `x-sim-latency-ms`: time to the first token;
- `x-sim-tokens`: number of tokens to generate (still capped by `max_tokens`);
- `x-sim-tokens-per-second`: pace of the tokens (0 is as fast as possible);
- `x-sim-timestamps: 1`: an SSE comment `: t=<time.time_ns()>` before each delta;
- `x-sim-record: <key>`: keep the request body's bytes as received, for
  `GET /received/<key>` (tests compare it with what was submitted; the last
  RECORDED_BODIES keys and RECORDED_BYTES bytes are kept, the oldest forgotten);
- `x-sim-emit-log: <key>`: note the time (`time.time_ns()`) each delta is written,
  served by `GET /emissions/<key>` (the benchmark compares it with when a watcher
  received the token; the last 10,000 keys are kept);
- `x-sim-fail-attempts: 1,2`: apply `x-sim-fail` only when the request's
  `x-sim-attempt` header (the worker sends its attempt number) is in the list, so
  a job can fail its first attempts and then succeed.

With `limit_*` set, it also enforces rate limits the way the provider does: token
buckets of requests, input tokens and output tokens per minute, per model (output
tokens are reserved at max_tokens and the unused part given back at the end), a
request over a limit answered 429 `rate_limit_error` with `retry-after`, and every
answer carrying the `anthropic-ratelimit-<requests|input-tokens|output-tokens>-
<limit|remaining|reset>` headers of its model's buckets.

Beyond text it behaves like the API for tools (tool_use blocks whose input fits the
tool's schema, per `tool_choice`), structured output (`output_config.format`),
extended thinking, prompt caching, images and documents, and refuses what the API
refuses with a 400 `invalid_request_error`. The parts live in their own modules:
`requests` (checks), `content` (the answer's blocks), `schema_values` (values of a
JSON schema), `tokens` (input tokens), `caching` (the prompt cache), `sse` (stream
frames), `overrides` (`x-sim-*` headers), `settings` and `ratelimits`.

Besides: `GET /healthz`, `GET /stats` (counters), `POST /control` (change the
configuration at run time) and `POST /v1/messages/count_tokens`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web

from devtools.simulator.batches import BatchStore
from devtools.simulator.batches import add_routes as add_batch_routes
from devtools.simulator.caching import PromptCache
from devtools.simulator.content import Answer, Generation, plan_answer, plan_generation
from devtools.simulator.jsonio import JSONDecodeError, dumps, loads
from devtools.simulator.overrides import Overrides, parse_overrides
from devtools.simulator.ratelimits import RateLimits
from devtools.simulator.requests import InvalidRequest, validate_body, validate_count_tokens
from devtools.simulator.responses import default_ratelimit_headers, error_response
from devtools.simulator.settings import (
    FAIL_KINDS,
    HTTP_FAIL_KINDS,
    MAX_EMISSION_LOGS,
    STREAM_FAIL_KINDS,
    SimulatorConfig,
    SimulatorStats,
)
from devtools.simulator.sse import ERROR_EVENT_FRAME, StreamFrames, stream_frames
from devtools.simulator.tokens import count_input_tokens, estimate_input_tokens, segments

log = logging.getLogger(__name__)

__all__ = [
    "FAIL_KINDS",
    "HTTP_FAIL_KINDS",
    "SIMULATOR_KEY",
    "STREAM_FAIL_KINDS",
    "Generation",
    "InvalidRequest",
    "RateLimits",
    "RunningSimulator",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "build_app",
    "count_input_tokens",
    "estimate_input_tokens",
    "plan_generation",
    "run_simulator",
    "start_simulator",
    "validate_body",
]


# ----------------------------------------------------------------- the simulator


RECORDED_BODIES = 512
"""`x-sim-record` keys remembered."""
RECORDED_BYTES = 64 * 1024 * 1024
"""Bytes of recorded bodies remembered."""


class Simulator:
    """The state of one simulator: its (mutable) configuration, RNG and counters."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = dataclasses.replace(config)
        self.stats = SimulatorStats()
        self._rng = random.Random(config.seed)
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(5).hex()
        self._ratelimit_second = -1
        self._ratelimit_headers: dict[str, str] = {}
        self.limits = RateLimits()
        self.limits.configure(self._config)
        self.emissions: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        """Per `x-sim-emit-log` key: when each delta was written (ns since the epoch)."""
        self.cache = PromptCache()
        """The prompt cache (see `devtools.simulator.caching`)."""
        self.received: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        """Per `x-sim-record` key: the last request body received with it."""

    def record(self, key: str, raw: bytes) -> None:
        """Keep a received body under `key`, within RECORDED_BODIES and RECORDED_BYTES."""
        self.received.pop(key, None)
        self.received[key] = raw
        total = sum(len(b) for b in self.received.values())
        while len(self.received) > RECORDED_BODIES or total > RECORDED_BYTES:
            _, gone = self.received.popitem(last=False)
            total -= len(gone)

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def update_config(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """Apply `changes` to the configuration (ValueError if invalid); a new seed reseeds."""
        new = self._config.updated(changes)
        self._config = new
        self.limits.configure(new)
        if "seed" in changes:
            self._rng = random.Random(new.seed)
        return new

    def reset_stats(self) -> None:
        active = self.stats.active_streams
        self.stats = SimulatorStats(active_streams=active)

    # -- helpers

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):014x}"

    def _success_headers(self, request_id: str, model: str | None = None) -> dict[str, str]:
        now = int(time.time())
        if now != self._ratelimit_second:
            reset = (datetime.fromtimestamp(now, UTC) + timedelta(seconds=60)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            self._ratelimit_second = now
            self._ratelimit_headers = default_ratelimit_headers(reset)
        headers = dict(self._ratelimit_headers)
        if self.limits.enforcing and model is not None:
            headers.update(self.limits.headers(model))
        headers["request-id"] = request_id
        return headers

    def error_response(
        self, kind: str, request_id: str, message: str | None = None
    ) -> web.Response:
        """An error answer with the real JSON shape (`kind` is a key of `ERRORS`)."""
        return error_response(kind, request_id, self._config.retry_after_s, message)

    def rate_limited_response(self, request_id: str, model: str, wait_s: float) -> web.Response:
        """429 for a request over an enforced limit, with the buckets' headers and a
        whole-second retry-after, as the real API sends."""
        response = self.error_response("429", request_id)
        response.headers.update(self.limits.headers(model))
        response.headers["retry-after"] = str(max(1, math.ceil(wait_s)))
        return response

    def _draw_failure(self, config: SimulatorConfig) -> str | None:
        r = self._rng.random()
        for kind, rate in (
            ("429", config.rate_429),
            ("529", config.rate_529),
            ("500", config.rate_500),
            ("drop", config.rate_drop),
            ("error-event", config.rate_error_event),
        ):
            if r < rate:
                return kind
            r -= rate
        return None

    # -- handlers

    async def handle_messages(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/messages`."""
        stats = self.stats
        stats.requests += 1
        config = self._config
        request_id = "req_sim_" + self._next_id()
        try:
            overrides = parse_overrides(request.headers, config, self._draw_failure)
            raw = await request.read()
            record = (request.headers.get("x-sim-record") or "").strip()[:128]
            if record:
                self.record(record, raw)
            try:
                body = loads(raw)
            except JSONDecodeError as exc:
                raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
            validate_body(body)
        except InvalidRequest as exc:
            stats.invalid_requests += 1
            return self.error_response("400", request_id, str(exc))

        model: str = body["model"]
        max_tokens: int = body["max_tokens"]
        # Only a request with a cache breakpoint needs its prefix hashed.
        units = segments(body) if b"cache_control" in raw else []
        input_tokens = count_input_tokens(body)
        if self.limits.enforcing:
            wait = self.limits.admit(
                model, {"requests": 1, "input-tokens": input_tokens, "output-tokens": max_tokens}
            )
            if wait > 0:
                stats.rate_limited += 1
                return self.rate_limited_response(request_id, model, wait)

        fail = overrides.fail
        if fail is not None and fail in HTTP_FAIL_KINDS:
            stats.count_failure(fail)
            return self.error_response(fail, request_id)

        answer = plan_answer(body, overrides.tokens)
        cached = self.cache.apply(model, units)
        usage = {
            "input_tokens": max(0, input_tokens - cached.read - cached.written),
            "output_tokens": answer.output_tokens,
            "cache_creation_input_tokens": cached.written,
            "cache_read_input_tokens": cached.read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": cached.write_5m,
                "ephemeral_1h_input_tokens": cached.write_1h,
            },
            "service_tier": "standard",
        }
        message = {
            "id": "msg_sim_" + self._next_id(),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [block.final for block in answer.blocks],
            "stop_reason": answer.stop_reason,
            "stop_sequence": answer.stop_sequence,
            "usage": usage,
        }
        try:
            if body.get("stream"):
                start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
                start["usage"] = {**usage, "output_tokens": 1}
                frames = stream_frames(answer, start)
                return await self._stream(request, request_id, model, frames, overrides)
            return await self._whole(request, request_id, message, answer, overrides)
        finally:
            # Output tokens were reserved at max_tokens; what was not generated goes back.
            self.limits.give_back(model, "output-tokens", max_tokens - answer.output_tokens)

    async def _whole(
        self,
        request: web.Request,
        request_id: str,
        message: dict[str, Any],
        answer: Answer,
        overrides: Overrides,
    ) -> web.StreamResponse:
        stats = self.stats
        pace = overrides.seconds_per_token * max(0, answer.delta_count - 1)
        delay = overrides.latency_s + pace
        if delay > 0:
            await asyncio.sleep(delay)
        if overrides.fail == "drop":
            stats.count_failure("drop")
            _close_transport(request)
            # aiohttp's write of this response fails quietly on the closed transport.
            return web.Response(status=200)
        if overrides.fail == "error-event":
            # A whole (non-streamed) answer has no events: overloaded comes as a 529.
            stats.count_failure("error-event")
            return self.error_response("529", request_id)
        stats.messages += 1
        stats.completed += 1
        stats.tokens_emitted += answer.output_tokens
        return web.Response(
            body=dumps(message),
            content_type="application/json",
            headers=self._success_headers(request_id, message["model"]),
        )

    async def _stream(
        self,
        request: web.Request,
        request_id: str,
        model: str,
        frames: StreamFrames,
        overrides: Overrides,
    ) -> web.StreamResponse:
        stats = self.stats
        headers = self._success_headers(request_id, model)
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        await resp.prepare(request)
        stats.streams += 1
        stats.active_streams += 1
        units = frames.units
        fail_at = len(units) // 2 if overrides.fail in STREAM_FAIL_KINDS else -1
        stamp = overrides.timestamps
        step = overrides.seconds_per_token
        emitted: list[int] | None = None
        if overrides.emit_log is not None:
            emitted = self.emissions.setdefault(overrides.emit_log, [])
            while len(self.emissions) > MAX_EMISSION_LOGS:
                self.emissions.popitem(last=False)
        loop = asyncio.get_running_loop()
        try:
            await resp.write(frames.head)
            if overrides.latency_s > 0:
                await asyncio.sleep(overrides.latency_s)
            if step > 0 or stamp or fail_at >= 0 or emitted is not None:
                started = loop.time()
                for i, unit in enumerate(units):
                    if i == fail_at:
                        break
                    if step > 0 and i > 0:
                        wait = started + i * step - loop.time()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    if stamp:
                        unit = b": t=%d\n" % time.time_ns() + unit
                    if emitted is not None:
                        emitted.append(time.time_ns())
                    await resp.write(unit)
                    stats.tokens_emitted += 1
            else:
                # As fast as possible: one write for all the deltas.
                await resp.write(b"".join(units))
                stats.tokens_emitted += len(units)
            if fail_at >= 0:
                assert overrides.fail is not None
                stats.count_failure(overrides.fail)
                if overrides.fail == "drop":
                    _close_transport(request)
                    return resp
                await resp.write(ERROR_EVENT_FRAME)
                await resp.write_eof()
                return resp
            await resp.write(frames.tail)
            await resp.write_eof()
            stats.completed += 1
        except ConnectionError:
            # The client went away; aiohttp's own write_eof will fail quietly too.
            stats.client_disconnects += 1
        finally:
            stats.active_streams -= 1
        return resp

    async def handle_count_tokens(self, request: web.Request) -> web.Response:
        """`POST /v1/messages/count_tokens`: input tokens as `/v1/messages` counts them."""
        request_id = "req_sim_" + self._next_id()
        try:
            try:
                body = loads(await request.read())
            except JSONDecodeError as exc:
                raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
            validate_count_tokens(body)
        except InvalidRequest as exc:
            return self.error_response("400", request_id, str(exc))
        return web.Response(
            body=dumps({"input_tokens": count_input_tokens(body)}),
            content_type="application/json",
            headers={"request-id": request_id},
        )

    async def handle_healthz(self, request: web.Request) -> web.Response:
        """`GET /healthz`."""
        return web.Response(text="ok")

    async def handle_emissions(self, request: web.Request) -> web.Response:
        """`GET /emissions/{key}`: when each delta of the `x-sim-emit-log: key` streams
        was written, `{"times_ns": [...]}` (404 for an unknown key)."""
        key = request.match_info["key"]
        times = self.emissions.get(key)
        if times is None:
            return self.error_response("404", "req_sim_" + self._next_id(), f"no log {key!r}")
        return web.Response(body=dumps({"times_ns": times}), content_type="application/json")

    async def handle_received(self, request: web.Request) -> web.Response:
        """`GET /received/{key}`: the body of the last request sent with `x-sim-record:
        key`, as received (404 for an unknown key)."""
        key = request.match_info["key"]
        raw = self.received.get(key)
        if raw is None:
            return self.error_response("404", "req_sim_" + self._next_id(), f"no body {key!r}")
        return web.Response(body=raw, content_type="application/json")

    async def handle_stats(self, request: web.Request) -> web.Response:
        """`GET /stats`: the counters as JSON."""
        return web.Response(body=dumps(self.stats.to_dict()), content_type="application/json")

    async def handle_control(self, request: web.Request) -> web.Response:
        """`POST /control`: change the configuration; `{"reset_stats": true}` zeroes the counters."""
        request_id = "req_sim_" + self._next_id()
        try:
            changes = loads(await request.read() or b"{}")
        except JSONDecodeError as exc:
            return self.error_response("400", request_id, f"request body is not valid JSON: {exc}")
        if not isinstance(changes, dict):
            return self.error_response("400", request_id, "request body must be a JSON object")
        reset = changes.pop("reset_stats", False)
        try:
            config = self.update_config(changes)
        except (ValueError, TypeError) as exc:
            return self.error_response("400", request_id, str(exc))
        if reset:
            self.reset_stats()
        log.info("simulator configuration changed: %s", changes)
        return web.Response(body=dumps(config.to_dict()), content_type="application/json")

    async def handle_not_found(self, request: web.Request) -> web.Response:
        return self.error_response(
            "404", "req_sim_" + self._next_id(), f"Not found: {request.path}"
        )


def _close_transport(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


# ------------------------------------------------------------------- application

SIMULATOR_KEY: Final = web.AppKey("simulator", Simulator)
"""`app[SIMULATOR_KEY]` is the app's `Simulator` (config, stats)."""


def build_app(config: SimulatorConfig | None = None) -> web.Application:
    """The aiohttp application; `app[SIMULATOR_KEY]` holds its state."""
    sim = Simulator(config if config is not None else SimulatorConfig())
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[SIMULATOR_KEY] = sim
    app.router.add_post("/v1/messages", sim.handle_messages)
    app.router.add_post("/v1/messages/count_tokens", sim.handle_count_tokens)
    app.router.add_get("/healthz", sim.handle_healthz)
    app.router.add_get("/stats", sim.handle_stats)
    app.router.add_get("/emissions/{key}", sim.handle_emissions)
    app.router.add_get("/received/{key}", sim.handle_received)
    app.router.add_post("/control", sim.handle_control)
    add_batch_routes(app, BatchStore(lambda: sim.config))
    app.router.add_route("*", "/{tail:.*}", sim.handle_not_found)
    return app


@dataclass
class RunningSimulator:
    """A simulator listening on a socket (see `start_simulator`)."""

    app: web.Application
    host: str
    port: int

    @property
    def base_url(self) -> str:
        """The URL to give the anthropic client as `base_url`."""
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def simulator(self) -> Simulator:
        return self.app[SIMULATOR_KEY]

    @property
    def config(self) -> SimulatorConfig:
        """The live configuration."""
        return self.simulator.config

    @property
    def stats(self) -> SimulatorStats:
        """The live counters."""
        return self.simulator.stats

    def update(self, **changes: Any) -> SimulatorConfig:
        """Change the configuration at run time, like `POST /control`."""
        return self.simulator.update_config(changes)


@contextlib.asynccontextmanager
async def start_simulator(
    config: SimulatorConfig | None = None, *, shutdown_timeout: float = 1.0
) -> AsyncIterator[RunningSimulator]:
    """Serve the simulator in the running loop for the duration of the `async with`.

    Without a config it listens on a free port of 127.0.0.1 (port 0); with one, on
    `config.host`/`config.port`. Streams still open at exit get `shutdown_timeout`
    seconds to finish before they are cancelled.
    """
    cfg = config if config is not None else SimulatorConfig(port=0)
    app = build_app(cfg)
    runner_kwargs: dict[str, Any] = {} if cfg.access_log else {"access_log": None}
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, **runner_kwargs)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port, backlog=cfg.backlog)
        await site.start()
        port = cfg.port
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                port = int(address[1])
                break
        yield RunningSimulator(app=app, host=cfg.host, port=port)
    finally:
        await runner.cleanup()


async def run_simulator(
    config: SimulatorConfig | None = None, *, stop: asyncio.Event | None = None
) -> None:
    """Serve until `stop` is set (or the task is cancelled)."""
    cfg = config if config is not None else SimulatorConfig()
    stop_event = stop if stop is not None else asyncio.Event()
    async with start_simulator(cfg, shutdown_timeout=5.0) as sim:
        log.info("simulator listening on %s", sim.base_url)
        await stop_event.wait()
