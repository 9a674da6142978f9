"""`POST /v1/messages` (a whole JSON message or an SSE stream, with the failures,
latency and pace the configuration and the `x-sim-*` headers ask for) and
`POST /v1/messages/count_tokens`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from devtools.simulator.content import Answer, plan_answer
from devtools.simulator.jsonio import JSONDecodeError, dumps, loads
from devtools.simulator.overrides import Overrides, parse_overrides
from devtools.simulator.requests import InvalidRequest, validate_body, validate_count_tokens
from devtools.simulator.settings import (
    HTTP_FAIL_KINDS,
    MAX_EMISSION_LOGS,
    STREAM_FAIL_KINDS,
)
from devtools.simulator.sse import ERROR_EVENT_FRAME, StreamFrames, stream_frames
from devtools.simulator.state import Simulator
from devtools.simulator.tokens import count_input_tokens, segments


class Messages:
    """The Messages API handlers of one simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def handle_messages(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/messages`."""
        stats = self.sim.stats
        stats.requests += 1
        config = self.sim.config
        request_id = "req_sim_" + self.sim.next_id()
        try:
            overrides = parse_overrides(request.headers, config, self.sim.draw_failure)
            raw = await request.read()
            record = (request.headers.get("x-sim-record") or "").strip()[:128]
            if record:
                self.sim.record(record, raw)
            try:
                body = loads(raw)
            except JSONDecodeError as exc:
                raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
            validate_body(body)
        except InvalidRequest as exc:
            stats.invalid_requests += 1
            return self.sim.error_response("400", request_id, str(exc))

        model: str = body["model"]
        max_tokens: int = body["max_tokens"]
        # Only a request with a cache breakpoint needs its prefix hashed.
        units = segments(body) if b"cache_control" in raw else []
        input_tokens = count_input_tokens(body)
        if self.sim.limits.enforcing:
            wait = self.sim.limits.admit(
                model, {"requests": 1, "input-tokens": input_tokens, "output-tokens": max_tokens}
            )
            if wait > 0:
                stats.rate_limited += 1
                return self.sim.rate_limited_response(request_id, model, wait)

        fail = overrides.fail
        if fail is not None and fail in HTTP_FAIL_KINDS:
            stats.count_failure(fail)
            return self.sim.error_response(fail, request_id)

        answer = plan_answer(body, overrides.tokens)
        cached = self.sim.cache.apply(model, units)
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
            "id": "msg_sim_" + self.sim.next_id(),
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
            self.sim.limits.give_back(model, "output-tokens", max_tokens - answer.output_tokens)

    async def _whole(
        self,
        request: web.Request,
        request_id: str,
        message: dict[str, Any],
        answer: Answer,
        overrides: Overrides,
    ) -> web.StreamResponse:
        stats = self.sim.stats
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
            return self.sim.error_response("529", request_id)
        stats.messages += 1
        stats.completed += 1
        stats.tokens_emitted += answer.output_tokens
        return web.Response(
            body=dumps(message),
            content_type="application/json",
            headers=self.sim.success_headers(request_id, message["model"]),
        )

    async def _stream(
        self,
        request: web.Request,
        request_id: str,
        model: str,
        frames: StreamFrames,
        overrides: Overrides,
    ) -> web.StreamResponse:
        stats = self.sim.stats
        headers = self.sim.success_headers(request_id, model)
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
            emitted = self.sim.emissions.setdefault(overrides.emit_log, [])
            while len(self.sim.emissions) > MAX_EMISSION_LOGS:
                self.sim.emissions.popitem(last=False)
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
        request_id = "req_sim_" + self.sim.next_id()
        try:
            try:
                body = loads(await request.read())
            except JSONDecodeError as exc:
                raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
            validate_count_tokens(body)
        except InvalidRequest as exc:
            return self.sim.error_response("400", request_id, str(exc))
        return web.Response(
            body=dumps({"input_tokens": count_input_tokens(body)}),
            content_type="application/json",
            headers={"request-id": request_id},
        )


def _close_transport(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()
