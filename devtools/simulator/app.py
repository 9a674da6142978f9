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
`state` (the `Simulator`: configuration, counters, the control endpoints), `messages`
(the `/v1/messages` handlers), `requests` (checks), `content` (the answer's blocks),
`schema_values` (values of a JSON schema), `tokens` (input tokens), `caching` (the
prompt cache), `sse` (stream frames), `overrides` (`x-sim-*` headers), `settings`,
`ratelimits` and `batches` (the Message Batches API). This module builds the
application and serves it.

Besides: `GET /healthz`, `GET /stats` (counters), `POST /control` (change the
configuration at run time) and `POST /v1/messages/count_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from devtools.simulator.batches import BatchStore
from devtools.simulator.batches import add_routes as add_batch_routes
from devtools.simulator.content import Generation, plan_generation
from devtools.simulator.messages import Messages
from devtools.simulator.ratelimits import RateLimits
from devtools.simulator.requests import InvalidRequest, validate_body
from devtools.simulator.settings import (
    FAIL_KINDS,
    HTTP_FAIL_KINDS,
    STREAM_FAIL_KINDS,
    SimulatorConfig,
    SimulatorStats,
)
from devtools.simulator.state import Simulator
from devtools.simulator.tokens import count_input_tokens, estimate_input_tokens

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


# ------------------------------------------------------------------- application

SIMULATOR_KEY: Final = web.AppKey("simulator", Simulator)
"""`app[SIMULATOR_KEY]` is the app's `Simulator` (config, stats)."""


def build_app(config: SimulatorConfig | None = None) -> web.Application:
    """The aiohttp application; `app[SIMULATOR_KEY]` holds its state."""
    sim = Simulator(config if config is not None else SimulatorConfig())
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[SIMULATOR_KEY] = sim
    messages = Messages(sim)
    app.router.add_post("/v1/messages", messages.handle_messages)
    app.router.add_post("/v1/messages/count_tokens", messages.handle_count_tokens)
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
