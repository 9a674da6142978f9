"""The Message Batches endpoints of the simulator.

- `POST /v1/messages/batches`: create (`{"requests": [{"custom_id", "params"}]}`);
- `GET /v1/messages/batches/{id}`: retrieve;
- `GET /v1/messages/batches`: list, newest first, paged by `limit`, `after_id`, `before_id`;
- `POST /v1/messages/batches/{id}/cancel`: cancel (requests not yet answered end `canceled`);
- `GET /v1/messages/batches/{id}/results`: the results as JSON lines, once ended.

A batch ends `batch_processing_s` seconds (SimulatorConfig, changeable by `POST /control`)
after it was created, or after `x-sim-batch-processing-ms` of its create request. Each
request is then answered with the message `POST /v1/messages` would give (the same
content generation), its usage with `service_tier: "batch"`. A request whose params
are invalid ends `errored` (invalid_request_error), as the API does.

Injection: the create request's `x-sim-batch-results` header, a JSON object
`{custom_id: kind}`, forces single results: `errored-400`, `errored-429`,
`errored-500`, `errored-529` (that error type), `expired` or `canceled`. A batch
whose processing time exceeds `batch_expire_s` ends at that point with every request
`expired`, as a real batch does after 24 hours.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from devtools.simulator.content import plan_answer
from devtools.simulator.jsonio import JSONDecodeError, dumps, loads
from devtools.simulator.requests import InvalidRequest, validate_body
from devtools.simulator.responses import ERRORS, error_response
from devtools.simulator.settings import SimulatorConfig
from devtools.simulator.tokens import count_input_tokens

MAX_REQUESTS = 100_000
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
RESULT_KINDS = ("errored-400", "errored-429", "errored-500", "errored-529", "expired", "canceled")


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class SimBatch:
    """One batch: its requests, when it ends, and (once ended) its results."""

    id: str
    created_at: float
    ends_at: float
    expires_at: float
    requests: list[dict[str, Any]]
    forced: dict[str, str]
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


class BatchStore:
    """The simulator's batches (in memory) and their handlers."""

    def __init__(self, config: Any) -> None:
        self._config_of = config
        """A callable returning the live SimulatorConfig."""
        self.batches: dict[str, SimBatch] = {}
        self.order: list[str] = []
        """Batch ids, oldest first."""
        self.created = 0
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    @property
    def config(self) -> SimulatorConfig:
        config: SimulatorConfig = self._config_of()
        return config

    def _next_id(self, kind: str) -> str:
        return f"{kind}_sim_{self._prefix}{next(self._ids):012x}"

    # -- state

    def _settle(self, batch: SimBatch, now: float) -> None:
        """End the batch if its time has come: write every request's result."""
        if batch.ended_at is not None:
            return
        if batch.cancel_initiated_at is not None:
            self._end(batch, batch.cancel_initiated_at, "canceled")
        elif now >= batch.expires_at and batch.ends_at > batch.expires_at:
            self._end(batch, batch.expires_at, "expired")
        elif now >= batch.ends_at:
            self._end(batch, batch.ends_at, None)

    def _end(self, batch: SimBatch, at: float, everyone: str | None) -> None:
        batch.ended_at = at
        for item in batch.requests:
            custom_id = item["custom_id"]
            kind = everyone or batch.forced.get(custom_id)
            batch.results.append({"custom_id": custom_id, "result": self._result(item, kind)})

    def _result(self, item: dict[str, Any], kind: str | None) -> dict[str, Any]:
        if kind in ("expired", "canceled"):
            return {"type": kind}
        if kind is not None and kind.startswith("errored-"):
            _, error_type, text = ERRORS[kind.removeprefix("errored-")]
            return _errored(error_type, text)
        params = item.get("params")
        try:
            if not isinstance(params, dict):
                raise InvalidRequest("params: must be an object")
            body = {k: v for k, v in params.items() if k != "stream"}
            validate_body(body)
        except InvalidRequest as exc:
            return _errored("invalid_request_error", str(exc))
        answer = plan_answer(body, self.config.output_tokens)
        message: dict[str, Any] = {
            "id": self._next_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [block.final for block in answer.blocks],
            "stop_reason": answer.stop_reason,
            "stop_sequence": answer.stop_sequence,
            "usage": {
                "input_tokens": count_input_tokens(body),
                "output_tokens": answer.output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "service_tier": "batch",
            },
        }
        return {"type": "succeeded", "message": message}

    def _json(self, batch: SimBatch, base_url: str) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if batch.ended_at is None:
            counts["processing"] = len(batch.requests)
            status = "in_progress" if batch.cancel_initiated_at is None else "canceling"
        else:
            for r in batch.results:
                counts[r["result"]["type"]] += 1
            status = "ended"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": _rfc3339(batch.created_at),
            "expires_at": _rfc3339(batch.expires_at),
            "ended_at": _rfc3339(batch.ended_at),
            "cancel_initiated_at": _rfc3339(batch.cancel_initiated_at),
            "archived_at": None,
            "results_url": (
                f"{base_url}/v1/messages/batches/{batch.id}/results"
                if batch.ended_at is not None
                else None
            ),
        }

    def _find(self, request: web.Request) -> SimBatch | None:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is not None:
            self._settle(batch, time.time())
        return batch

    # -- handlers

    async def create(self, request: web.Request) -> web.Response:
        """`POST /v1/messages/batches`."""
        request_id = self._next_id("req")
        try:
            body = loads(await request.read())
        except JSONDecodeError as exc:
            return self._error("400", request_id, f"request body is not valid JSON: {exc}")
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return self._error("400", request_id, "requests: must be a non-empty list")
        if len(requests) > MAX_REQUESTS:
            return self._error("400", request_id, f"requests: at most {MAX_REQUESTS}")
        seen: set[str] = set()
        for i, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
                return self._error("400", request_id, f"requests.{i}.custom_id: invalid")
            if custom_id in seen:
                return self._error("400", request_id, f"requests.{i}.custom_id: repeated")
            seen.add(custom_id)
        try:
            forced = _forced(request.headers.get("x-sim-batch-results"))
            processing_s = _processing_s(
                request.headers.get("x-sim-batch-processing-ms"), self.config
            )
        except ValueError as exc:
            return self._error("400", request_id, str(exc))
        now = time.time()
        batch = SimBatch(
            id=self._next_id("msgbatch"),
            created_at=now,
            ends_at=now + processing_s,
            expires_at=now + self.config.batch_expire_s,
            requests=requests,
            forced=forced,
        )
        self.batches[batch.id] = batch
        self.order.append(batch.id)
        self.created += 1
        return self._ok(self._json(batch, _base_url(request)))

    async def retrieve(self, request: web.Request) -> web.Response:
        """`GET /v1/messages/batches/{id}`."""
        batch = self._find(request)
        if batch is None:
            return self._not_found(request)
        return self._ok(self._json(batch, _base_url(request)))

    async def list(self, request: web.Request) -> web.Response:
        """`GET /v1/messages/batches`: newest first; `after_id` pages on, `before_id` back."""
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return self._error("400", self._next_id("req"), "limit: must be an integer")
        if not 1 <= limit <= 1000:
            return self._error("400", self._next_id("req"), "limit: must be in 1..1000")
        ids = list(reversed(self.order))
        after, before = request.query.get("after_id"), request.query.get("before_id")
        if after in self.batches:
            ids = ids[ids.index(after) + 1 :]
            page = ids[:limit]
        elif before in self.batches:
            ids = ids[: ids.index(before)]
            page = ids[-limit:]
        else:
            page = ids[:limit]
        now = time.time()
        for batch_id in page:
            self._settle(self.batches[batch_id], now)
        base = _base_url(request)
        data = [self._json(self.batches[i], base) for i in page]
        return self._ok(
            {
                "data": data,
                "has_more": len(ids) > len(page),
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        """`POST /v1/messages/batches/{id}/cancel`."""
        batch = self._find(request)
        if batch is None:
            return self._not_found(request)
        if batch.ended_at is None and batch.cancel_initiated_at is None:
            batch.cancel_initiated_at = time.time()
        return self._ok(self._json(batch, _base_url(request)))

    async def results(self, request: web.Request) -> web.Response:
        """`GET /v1/messages/batches/{id}/results`: JSON lines, once the batch ended."""
        batch = self._find(request)
        if batch is None:
            return self._not_found(request)
        if batch.ended_at is None:
            return self._error(
                "400", self._next_id("req"), f"batch {batch.id} has not ended processing"
            )
        lines = b"".join(dumps(r) + b"\n" for r in batch.results)
        return web.Response(body=lines, content_type="application/binary")

    async def stats(self, request: web.Request) -> web.Response:
        """`GET /batches/stats`: batches created since start (tests count duplicates)."""
        return self._ok({"created": self.created})

    # -- helpers

    def _ok(self, payload: dict[str, Any]) -> web.Response:
        return web.Response(body=dumps(payload), content_type="application/json")

    def _error(self, kind: str, request_id: str, message: str) -> web.Response:
        return error_response(kind, request_id, self.config.retry_after_s, message)

    def _not_found(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        return self._error("404", self._next_id("req"), f"batch {batch_id} not found")


def _errored(error_type: str, message: str) -> dict[str, Any]:
    return {
        "type": "errored",
        "error": {"type": "error", "error": {"type": error_type, "message": message}},
    }


def _forced(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = loads(raw.encode())
    except JSONDecodeError:
        raise ValueError("x-sim-batch-results: must be a JSON object") from None
    if not isinstance(value, dict) or any(v not in RESULT_KINDS for v in value.values()):
        raise ValueError(f"x-sim-batch-results: values must be one of {', '.join(RESULT_KINDS)}")
    return {str(k): str(v) for k, v in value.items()}


def _processing_s(raw: str | None, config: SimulatorConfig) -> float:
    if raw is None or not raw.strip():
        return config.batch_processing_s
    try:
        ms = float(raw)
    except ValueError:
        raise ValueError("x-sim-batch-processing-ms: must be a number") from None
    if not ms >= 0:
        raise ValueError("x-sim-batch-processing-ms: must be >= 0")
    return ms / 1000


def _base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def add_routes(app: web.Application, store: BatchStore) -> None:
    """Register the batch endpoints (before the simulator's catch-all route)."""
    app.router.add_post("/v1/messages/batches", store.create)
    app.router.add_get("/v1/messages/batches", store.list)
    app.router.add_get("/v1/messages/batches/{batch_id}", store.retrieve)
    app.router.add_post("/v1/messages/batches/{batch_id}/cancel", store.cancel)
    app.router.add_get("/v1/messages/batches/{batch_id}/results", store.results)
    app.router.add_get("/batches/stats", store.stats)
