"""The rate limits the simulator enforces, as the provider does: token buckets per model."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from devtools.simulator.settings import LIMIT_FIELDS, SimulatorConfig

__all__ = ["RateLimits"]


@dataclass
class _Bucket:
    limit_per_min: float
    capacity: float
    level: float
    updated: float

    @property
    def refill_per_s(self) -> float:
        return self.limit_per_min / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.refill_per_s)
        self.updated = now


class RateLimits:
    """The rate limits the simulator enforces: a token bucket per limited dimension and
    model, as the provider keeps them per model."""

    def __init__(self) -> None:
        self.limits: dict[str, tuple[float, float]] = {}
        """Per header name: (limit per minute, capacity)."""
        self.models: dict[str, dict[str, _Bucket]] = {}

    @property
    def enforcing(self) -> bool:
        return bool(self.limits)

    def configure(self, config: SimulatorConfig) -> None:
        """Follow the config; a bucket keeps its level (within its new capacity)."""
        self.limits = {}
        for name, field_name in LIMIT_FIELDS.items():
            limit = float(getattr(config, field_name))
            if limit > 0:
                self.limits[name] = (limit, max(1.0, limit * config.limit_burst_s / 60.0))
        now = time.monotonic()
        for buckets in self.models.values():
            for name in list(buckets):
                if name not in self.limits:
                    del buckets[name]
            for name, (limit, capacity) in self.limits.items():
                bucket = buckets.get(name)
                if bucket is None:
                    buckets[name] = _Bucket(limit, capacity, capacity, now)
                else:
                    bucket.refill(now)
                    bucket.limit_per_min, bucket.capacity = limit, capacity
                    bucket.level = min(bucket.level, capacity)

    def _buckets(self, model: str) -> dict[str, _Bucket]:
        buckets = self.models.get(model)
        if buckets is None:
            now = time.monotonic()
            buckets = self.models[model] = {
                name: _Bucket(limit, capacity, capacity, now)
                for name, (limit, capacity) in self.limits.items()
            }
        return buckets

    def admit(self, model: str, needs: Mapping[str, float]) -> float:
        """Take `needs` (by header name) if every bucket has it; else the seconds to wait.

        A need above a bucket's capacity passes when the bucket is full (it goes into
        debt), as with the real API.
        """
        buckets = self._buckets(model)
        now = time.monotonic()
        wait = 0.0
        for name, bucket in buckets.items():
            bucket.refill(now)
            need = min(needs.get(name, 0.0), bucket.capacity)
            if bucket.level < need:
                wait = max(wait, (need - bucket.level) / bucket.refill_per_s)
        if wait > 0:
            return wait
        for name, bucket in buckets.items():
            bucket.level -= needs.get(name, 0.0)
        return 0.0

    def give_back(self, model: str, name: str, amount: float) -> None:
        bucket = self.models.get(model, {}).get(name)
        if bucket is not None and amount > 0:
            bucket.refill(time.monotonic())
            bucket.level = min(bucket.capacity, bucket.level + amount)

    def headers(self, model: str) -> dict[str, str]:
        """The `anthropic-ratelimit-*` headers of the model's enforced buckets."""
        now = time.monotonic()
        wall = datetime.now(UTC)
        out: dict[str, str] = {}
        for name, bucket in self._buckets(model).items():
            bucket.refill(now)
            full_in = max(0.0, (bucket.capacity - bucket.level) / bucket.refill_per_s)
            reset = (wall + timedelta(seconds=full_in)).strftime("%Y-%m-%dT%H:%M:%SZ")
            out[f"anthropic-ratelimit-{name}-limit"] = f"{bucket.limit_per_min:.0f}"
            out[f"anthropic-ratelimit-{name}-remaining"] = f"{max(0, math.floor(bucket.level))}"
            out[f"anthropic-ratelimit-{name}-reset"] = reset
        return out
