"""Provider rate limits shared by every worker: requests, input tokens and output
tokens per minute, per model.

Each (model, dimension) is a Postgres token bucket (`model:<model>:requests`,
`...:input_tokens`, `...:output_tokens`; see conveyor.db.buckets). Before a call, a
worker takes what the call needs from its local pool, which it refills from the
buckets in batches, so with plentiful budget there is no database round trip per
call; when budget is short the call waits for the refill instead of going out
and coming back 429.

What a call needs, as the provider counts it: one request; its input tokens,
estimated before the call (characters / 4); and `max_tokens` output tokens,
reserved at the start and settled at the end. The usage the provider reports
settles both estimates (the difference goes back to, or is taken from, the pool).

Limits come from CONVEYOR_RATE_LIMITS and from the provider's
`anthropic-ratelimit-<dimension>-limit` headers; the lower wins. A learnt limit
is written to the bucket, so every worker uses it, and a low `-remaining` lowers
the bucket's level. Models are keyed by `conveyor.core.metrics.ModelNames`: a model
neither known nor allowed shares the `other` buckets (and state), so invented
names cannot grow the limiter's memory or the bucket table. A model whose limits
nobody knows yet is probed: one call at a time per worker until the first
answer's headers arrive. A 429 that still
happens blocks the model's buckets for its retry-after, in every worker, and
empties the exhausted ones. Unless the provider's answers say otherwise: a 429
that comes within PLENTY_RECENT_S of an answer showing budget to spare (at least
LOW_WATER of every limit left) pauses nothing, and such an answer arriving during
a pause lifts it. So a 429 that no shortage explains (an overloaded provider)
costs only its own retry, while a real shortage, where the answers around the 429
show little left, keeps every worker waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contract import request_body
from conveyor.core.config import Settings
from conveyor.core.metrics import PROVIDER_THROTTLED, RATE_LIMIT_WAIT, ModelNames
from conveyor.core.telemetry import tracer
from conveyor.db.buckets import BucketStore, Definition, LocalBudget
from conveyor.db.engine import retry_transient

log = logging.getLogger(__name__)
T = TypeVar("T")

DIMENSIONS = ("requests", "input_tokens", "output_tokens")
CONFIG_KEYS = {
    "requests": "requests_per_minute",
    "input_tokens": "input_tokens_per_minute",
    "output_tokens": "output_tokens_per_minute",
}
"""The keys of a model's entry in CONVEYOR_RATE_LIMITS."""
HEADER_NAMES = {
    "requests": "requests",
    "input_tokens": "input-tokens",
    "output_tokens": "output-tokens",
}
DB_RETRY_S = 0.5
"""The pause between reads of the buckets while Postgres is unreachable."""
LOW_WATER = 0.1
"""A `-remaining` below this share of the limit lowers the bucket to it."""
CLAMP_EVERY_S = 1.0
PLENTY_RECENT_S = 1.0
"""A 429 this soon after an answer showing budget to spare pauses nothing."""


def bucket_name(model: str, dimension: str) -> str:
    return f"model:{model}:{dimension}"


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """Input tokens of a Messages API body, estimated before the call: text at characters
    / 4, images by their pixels, PDFs by their pages, tools by their JSON (the formula:
    conveyor.contract.request_body.estimate)."""
    return request_body.estimate_input_tokens(dict(body))


def parse_limits(headers: Mapping[str, str] | None) -> dict[str, tuple[float, float | None]]:
    """(limit, remaining) per dimension from `anthropic-ratelimit-*` headers."""
    out: dict[str, tuple[float, float | None]] = {}
    if not headers:
        return out
    lowered = {k.lower(): v for k, v in headers.items()}
    for dimension, name in HEADER_NAMES.items():
        limit = _number(lowered.get(f"anthropic-ratelimit-{name}-limit"))
        if limit is None or limit <= 0:
            continue
        out[dimension] = (limit, _number(lowered.get(f"anthropic-ratelimit-{name}-remaining")))
    return out


def exhausted(headers: Mapping[str, str] | None) -> list[str]:
    """Dimensions a 429's headers report as used up (remaining 0)."""
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    return [
        dimension
        for dimension, name in HEADER_NAMES.items()
        if _number(lowered.get(f"anthropic-ratelimit-{name}-remaining")) == 0
    ]


def _plenty_left(limits: Mapping[str, tuple[float, float | None]]) -> bool:
    """Whether an answer's headers show at least LOW_WATER of every limit left."""
    return bool(limits) and all(
        remaining is not None and remaining >= LOW_WATER * limit
        for limit, remaining in limits.values()
    )


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


@dataclass
class Permit:
    """Budget taken for one call; settle it with the call's usage."""

    model: str
    input_tokens: int
    output_tokens: int
    needs: dict[str, float] = field(default_factory=dict)
    probe: bool = False
    settled: bool = False


@dataclass
class _Model:
    limits: dict[str, float] = field(default_factory=dict)
    """Effective limits per minute of the dimensions that have one."""
    known: bool = False
    probe: asyncio.Lock = field(default_factory=asyncio.Lock)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    blocked_until: float = 0.0
    plenty_at: float = -math.inf
    """When an answer last showed budget to spare."""
    lifted: asyncio.Event = field(default_factory=asyncio.Event)
    """Set (and replaced) when a pause ends early."""
    clamped_at: dict[str, float] = field(default_factory=dict)


class ProviderLimiter:
    """Waits for provider budget before each call, across every worker process."""

    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        self.store = BucketStore(engine)
        self.budget = LocalBudget(self.store, settings.rate_limit_batch_s)
        self.configured = {
            model: {d: float(limits[k]) for d, k in CONFIG_KEYS.items() if limits.get(k)}
            for model, limits in settings.rate_limits.items()
        }
        self.learn = settings.rate_limit_learn
        self.burst_s = settings.rate_limit_burst_s
        self.models: dict[str, _Model] = {}
        self._loading: dict[str, asyncio.Future[_Model]] = {}
        self.names = ModelNames.from_settings(settings)

    def configured_for(self, model: str) -> dict[str, float]:
        return {**self.configured.get("*", {}), **self.configured.get(model, {})}

    def capacity(self, limit_per_min: float) -> float:
        return max(1.0, limit_per_min * self.burst_s / 60.0)

    async def _model(self, model: str) -> _Model:
        state = self.models.get(model)
        if state is not None:
            return state
        loading = self._loading.get(model)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[_Model] = asyncio.get_running_loop().create_future()
        self._loading[model] = future
        try:
            state = await self._load(model)
            self.models[model] = state
            future.set_result(state)
            return state
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters re-raise it
            raise
        finally:
            del self._loading[model]

    async def _load(self, model: str) -> _Model:
        """A model's limits: configured ones, lowered by those another worker learnt."""
        configured = self.configured_for(model)
        names = [bucket_name(model, d) for d in DIMENSIONS]
        rows = await self.store.read(names)
        state = _Model()
        learnt_any = False
        for dimension, name in zip(DIMENSIONS, names, strict=True):
            row = rows.get(name)
            learnt = row.limit_per_min if row is not None and row.source == "learned" else None
            learnt_any = learnt_any or learnt is not None
            candidates = [v for v in (configured.get(dimension), learnt) if v]
            if not candidates:
                continue
            limit = min(candidates)
            state.limits[dimension] = limit
            source = "learned" if learnt is not None else "config"
            if row is None or row.limit_per_min != limit or row.capacity != self.capacity(limit):
                await self.budget.define(name, limit, self.capacity(limit), source=source)
            else:
                self.budget.definitions[name] = Definition(limit, self.capacity(limit), source)
        state.known = learnt_any or bool(configured) or not self.learn
        return state

    async def acquire(self, model: str, body: Mapping[str, Any]) -> Permit:
        """Wait until the call fits the model's budget, and take it.

        While Postgres is unreachable it waits too (the job keeps its attempt).
        A model neither known nor allowed takes the `other` budget.
        """
        model = self.names(model)
        state = await self._retrying(lambda: self._model(model))
        permit = Permit(
            model=model,
            input_tokens=estimate_input_tokens(body),
            output_tokens=int(body.get("max_tokens") or 0),
        )
        if not state.known:
            await state.probe.acquire()
            if not state.known:
                # Another worker may have learnt the limits since: then no probe is needed.
                try:
                    fresh = await self._load(model)
                except BaseException:
                    state.probe.release()
                    raise
                if fresh.known and fresh.limits:
                    state.limits.update(fresh.limits)
                    state.known = True
            if state.known:
                state.probe.release()
            else:
                permit.probe = True  # held until the answer's headers are seen
                return permit
        amounts = {
            "requests": 1.0,
            "input_tokens": float(permit.input_tokens),
            "output_tokens": float(permit.output_tokens),
        }
        permit.needs = {bucket_name(model, d): amounts[d] for d in state.limits if amounts[d] > 0}
        if permit.needs:
            await self._take(state, permit)
        return permit

    async def _take(self, state: _Model, permit: Permit) -> None:
        budget, needs = self.budget, permit.needs
        if (
            not state.lock.locked()
            and state.blocked_until <= time.monotonic()
            and budget.has(needs)
        ):
            budget.spend(needs)
            return
        began = time.monotonic()
        span = None
        async with state.lock:
            while True:
                now = time.monotonic()
                if state.blocked_until > now:
                    wait = state.blocked_until - now
                elif budget.has(needs):
                    budget.spend(needs)
                    break
                else:
                    wait = await self._retrying(lambda: budget.fill(needs))
                    if wait <= 0:
                        continue
                if span is None:
                    span = tracer().start_span(
                        "rate limit wait", attributes={"gen_ai.request.model": permit.model}
                    )
                with contextlib.suppress(TimeoutError):  # a lifted pause wakes us early
                    await asyncio.wait_for(state.lifted.wait(), wait)
        if span is not None:
            span.end()
            RATE_LIMIT_WAIT.labels(permit.model).observe(time.monotonic() - began)

    @staticmethod
    async def _retrying(op: Callable[[], Awaitable[T]]) -> T:
        """Run a read or take of the buckets, waiting while Postgres is unreachable."""
        return await retry_transient(
            op, message="rate limits unavailable; waiting", first_s=DB_RETRY_S, max_s=DB_RETRY_S
        )

    async def observe(self, permit: Permit, headers: Mapping[str, str] | None) -> None:
        """Learn from an answer's rate-limit headers; ends a probe."""
        state = self.models.get(permit.model)
        if state is None:
            return
        limits = parse_limits(headers)
        try:
            if self.learn:
                await self._learn(permit.model, state, limits)
            if _plenty_left(limits):
                state.plenty_at = time.monotonic()
                if state.blocked_until > state.plenty_at:
                    await self._lift(permit.model, state)
        except Exception as exc:  # learning is best effort; the call goes on
            log.warning(
                "could not act on the answer's rate-limit headers", extra={"error": repr(exc)}
            )
        finally:
            if permit.probe:
                state.known = True
                permit.probe = False
                state.probe.release()

    async def _lift(self, model: str, state: _Model) -> None:
        """End this model's pause here and in every worker."""
        state.blocked_until = 0.0
        state.lifted.set()
        state.lifted = asyncio.Event()
        log.info("provider has budget left; model pause lifted", extra={"model": model})
        await self.store.unblock([bucket_name(model, d) for d in DIMENSIONS])

    async def _learn(
        self, model: str, state: _Model, limits: Mapping[str, tuple[float, float | None]]
    ) -> None:
        configured = self.configured_for(model)
        now = time.monotonic()
        for dimension, (limit, remaining) in limits.items():
            effective = min(limit, configured.get(dimension, math.inf))
            name = bucket_name(model, dimension)
            if state.limits.get(dimension) != effective:
                state.limits[dimension] = effective
                log.info(
                    "provider rate limit learnt",
                    extra={"model": model, "dimension": dimension, "per_minute": effective},
                )
                await self.budget.define(
                    name,
                    effective,
                    self.capacity(effective),
                    source="learned",
                    remaining=remaining,
                )
            elif (
                remaining is not None
                and remaining < LOW_WATER * limit
                and now - state.clamped_at.get(dimension, 0.0) >= CLAMP_EVERY_S
            ):
                state.clamped_at[dimension] = now
                await self.store.clamp(name, remaining)

    async def throttled(
        self, permit: Permit, retry_after_s: float | None, headers: Mapping[str, str] | None
    ) -> None:
        """The provider answered 429: stop every worker calling this model for a while."""
        PROVIDER_THROTTLED.labels(permit.model).inc()
        await self.observe(permit, headers)
        state = self.models.get(permit.model)
        if state is None:
            return
        if time.monotonic() - state.plenty_at < PLENTY_RECENT_S:
            log.info(
                "provider 429 while it reports budget to spare; not pausing",
                extra={"model": permit.model, "retry_after_s": retry_after_s},
            )
            return
        wait = retry_after_s if retry_after_s is not None else 1.0
        state.blocked_until = max(state.blocked_until, time.monotonic() + wait)
        names = [bucket_name(permit.model, d) for d in state.limits]
        drain = [bucket_name(permit.model, d) for d in exhausted(headers) if d in state.limits]
        if not drain and "requests" in state.limits:
            drain = [bucket_name(permit.model, "requests")]
        self.budget.drop(names)
        log.warning(
            "provider rate limit hit; model paused",
            extra={"model": permit.model, "retry_after_s": wait, "exhausted": drain},
        )
        if names:
            try:
                await self.store.block(names, wait, drain)
            except Exception as exc:  # this worker still pauses; the others learn by 429
                log.warning("could not pause the other workers", extra={"error": repr(exc)})

    def settle(self, permit: Permit, usage: Mapping[str, int] | None) -> None:
        """Settle the estimates with what the provider reported (None: the call failed)."""
        if permit.probe:
            state = self.models.get(permit.model)
            permit.probe = False
            if state is not None:
                state.probe.release()
        if permit.settled:
            return
        permit.settled = True
        model = permit.model
        used_in = used_out = 0
        if usage is not None:
            used_in = usage.get("input_tokens", 0) + usage.get("cache_creation_input_tokens", 0)
            used_out = usage.get("output_tokens", 0)
        input_name = bucket_name(model, "input_tokens")
        if usage is not None and input_name in permit.needs:
            self.budget.refund(input_name, permit.needs[input_name] - used_in)
        output_name = bucket_name(model, "output_tokens")
        if output_name in permit.needs:
            self.budget.refund(output_name, permit.needs[output_name] - used_out)

    async def run(self, stop: asyncio.Event) -> None:
        """Hand back, every second, the budget this worker holds but does not use."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            await self.budget.return_idle()
        await self.budget.return_all()
