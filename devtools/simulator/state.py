"""The state of one simulator (its mutable configuration, random draws, counters,
rate-limit buckets, prompt cache, recorded bodies and emission logs), the helpers its
handlers share (ids, headers, error answers), and its control endpoints: `/healthz`,
`/stats`, `/control`, `/emissions/{key}`, `/received/{key}`."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from devtools.simulator.caching import PromptCache
from devtools.simulator.jsonio import JSONDecodeError, dumps, loads
from devtools.simulator.ratelimits import RateLimits
from devtools.simulator.responses import default_ratelimit_headers, error_response
from devtools.simulator.settings import (
    SimulatorConfig,
    SimulatorStats,
)

log = logging.getLogger(__name__)

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

    # -- helpers of the handlers

    def next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):014x}"

    def success_headers(self, request_id: str, model: str | None = None) -> dict[str, str]:
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

    def draw_failure(self, config: SimulatorConfig) -> str | None:
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

    # -- the control endpoints

    async def handle_healthz(self, request: web.Request) -> web.Response:
        """`GET /healthz`."""
        return web.Response(text="ok")

    async def handle_emissions(self, request: web.Request) -> web.Response:
        """`GET /emissions/{key}`: when each delta of the `x-sim-emit-log: key` streams
        was written, `{"times_ns": [...]}` (404 for an unknown key)."""
        key = request.match_info["key"]
        times = self.emissions.get(key)
        if times is None:
            return self.error_response("404", "req_sim_" + self.next_id(), f"no log {key!r}")
        return web.Response(body=dumps({"times_ns": times}), content_type="application/json")

    async def handle_received(self, request: web.Request) -> web.Response:
        """`GET /received/{key}`: the body of the last request sent with `x-sim-record:
        key`, as received (404 for an unknown key)."""
        key = request.match_info["key"]
        raw = self.received.get(key)
        if raw is None:
            return self.error_response("404", "req_sim_" + self.next_id(), f"no body {key!r}")
        return web.Response(body=raw, content_type="application/json")

    async def handle_stats(self, request: web.Request) -> web.Response:
        """`GET /stats`: the counters as JSON."""
        return web.Response(body=dumps(self.stats.to_dict()), content_type="application/json")

    async def handle_control(self, request: web.Request) -> web.Response:
        """`POST /control`: change the configuration; `{"reset_stats": true}` zeroes the counters."""
        request_id = "req_sim_" + self.next_id()
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
        return self.error_response("404", "req_sim_" + self.next_id(), f"Not found: {request.path}")
