"""The simulator's configuration (`SimulatorConfig`) and counters (`SimulatorStats`)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "FAIL_KINDS",
    "HTTP_FAIL_KINDS",
    "LIMIT_FIELDS",
    "MAX_EMISSION_LOGS",
    "STREAM_FAIL_KINDS",
    "SimulatorConfig",
    "SimulatorStats",
]

MAX_EMISSION_LOGS: Final = 10_000
"""`x-sim-emit-log` keys remembered (the oldest are forgotten)."""

HTTP_FAIL_KINDS: Final[tuple[str, ...]] = ("429", "529", "500", "400", "401")
"""Failures answered with an HTTP error status instead of a message."""

STREAM_FAIL_KINDS: Final[tuple[str, ...]] = ("drop", "error-event")
"""Failures that happen half way through the answer."""

FAIL_KINDS: Final[tuple[str, ...]] = HTTP_FAIL_KINDS + STREAM_FAIL_KINDS
"""Every value `x-sim-fail` accepts."""

_MUTABLE_FIELDS: Final[frozenset[str]] = frozenset(
    {
        "latency_ms",
        "tokens_per_second",
        "output_tokens",
        "rate_429",
        "rate_529",
        "rate_500",
        "rate_drop",
        "rate_error_event",
        "retry_after_s",
        "seed",
        "limit_requests_per_minute",
        "limit_input_tokens_per_minute",
        "limit_output_tokens_per_minute",
        "limit_burst_s",
        "batch_processing_s",
        "batch_expire_s",
    }
)
"""Fields `POST /control` may change; host, port and the rest need a restart."""

LIMIT_FIELDS: Final[dict[str, str]] = {
    "requests": "limit_requests_per_minute",
    "input-tokens": "limit_input_tokens_per_minute",
    "output-tokens": "limit_output_tokens_per_minute",
}
"""The enforced limits, by the name their headers use."""


@dataclass
class SimulatorConfig:
    """How the simulator behaves. Every field is also a `SIM_<FIELD>` variable and a flag."""

    host: str = "127.0.0.1"
    port: int = 8765
    """0 picks a free port (see `RunningSimulator.port`)."""
    latency_ms: float = 0.0
    """Time to the first token."""
    tokens_per_second: float = 0.0
    """Pace of the tokens after the first; 0 sends them as fast as possible."""
    output_tokens: int = 24
    """Tokens generated per answer (each is one word and a space), capped by max_tokens."""
    rate_429: float = 0.0
    """Probability (0..1) that a request is answered 429 rate_limit_error."""
    rate_529: float = 0.0
    """Probability that a request is answered 529 overloaded_error."""
    rate_500: float = 0.0
    """Probability that a request is answered 500 api_error."""
    rate_drop: float = 0.0
    """Probability that the connection is closed half way through the answer."""
    rate_error_event: float = 0.0
    """Probability that a stream ends half way with an SSE `error` event (overloaded)."""
    retry_after_s: float = 1.0
    """Value of the `retry-after` header of 429 and 529 answers."""
    seed: int | None = None
    """Seed of the failure-injection RNG; None seeds from the OS."""
    limit_requests_per_minute: float = 0.0
    """Enforced requests per minute (0: no limit)."""
    limit_input_tokens_per_minute: float = 0.0
    """Enforced input tokens per minute (0: no limit)."""
    limit_output_tokens_per_minute: float = 0.0
    """Enforced output tokens per minute, max_tokens reserved at the start (0: no limit)."""
    limit_burst_s: float = 60.0
    """Capacity of each enforced bucket, in seconds of its rate (60: a whole minute)."""
    access_log: bool = False
    """Log every request (aiohttp's access log); off for speed."""
    backlog: int = 4096
    """Listen backlog, big enough for a thousand clients connecting at once."""
    batch_processing_s: float = 1.0
    """How long a message batch takes to end (`x-sim-batch-processing-ms` overrides it)."""
    batch_expire_s: float = 86_400.0
    """A batch still processing after this long ends with every request `expired`."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when a field is out of range."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not (math.isfinite(self.limit_burst_s) and self.limit_burst_s > 0):
            raise ValueError(f"limit_burst_s must be a number > 0, got {self.limit_burst_s!r}")
        for name in (
            "latency_ms",
            "tokens_per_second",
            "retry_after_s",
            "batch_processing_s",
            "batch_expire_s",
            *LIMIT_FIELDS.values(),
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.output_tokens < 0:
            raise ValueError(f"output_tokens must be >= 0, got {self.output_tokens}")
        if self.backlog < 1:
            raise ValueError(f"backlog must be >= 1, got {self.backlog}")
        for name in ("rate_429", "rate_529", "rate_500", "rate_drop", "rate_error_event"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a probability in 0..1, got {value!r}")
        if self.total_failure_rate > 1.0 + 1e-9:
            raise ValueError(
                f"the failure rates add up to {self.total_failure_rate:g}, more than 1"
            )

    @property
    def total_failure_rate(self) -> float:
        """The probability that a request gets some injected failure."""
        return (
            self.rate_429 + self.rate_529 + self.rate_500 + self.rate_drop + self.rate_error_event
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SimulatorConfig:
        """A config from the `SIM_*` variables (`SIM_PORT`, `SIM_RATE_429`, ...)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"SIM_{f.name.upper()}")
            if raw is None or raw.strip() == "":
                continue
            try:
                values[f.name] = _parse_field(f.name, raw.strip())
            except ValueError as exc:
                raise ValueError(f"SIM_{f.name.upper()}={raw!r}: {exc}") from None
        return cls(**values)

    def updated(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """A copy with `changes` (from `POST /control`) applied; ValueError if invalid."""
        unknown = set(changes) - _MUTABLE_FIELDS
        if unknown:
            raise ValueError(
                f"cannot change {', '.join(sorted(unknown))} at run time; "
                f"changeable: {', '.join(sorted(_MUTABLE_FIELDS))}"
            )
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            checked[name] = _coerce_field(name, value)
        return dataclasses.replace(self, **checked)


_INT_FIELDS: Final[frozenset[str]] = frozenset({"port", "output_tokens", "backlog"})
_BOOL_FIELDS: Final[frozenset[str]] = frozenset({"access_log"})


def _parse_field(name: str, raw: str) -> Any:
    """Parse one field from its text form (environment variable)."""
    if name == "host":
        return raw
    if name in _BOOL_FIELDS:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected a boolean (1/0, true/false)")
    if name == "seed":
        return None if raw.lower() in ("none", "null") else int(raw)
    if name in _INT_FIELDS:
        return int(raw)
    return float(raw)


def _coerce_field(name: str, value: Any) -> Any:
    """Check the type of one field from JSON (`POST /control`)."""
    if name == "seed":
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ValueError("seed must be an integer or null")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if name in _INT_FIELDS:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


# ---------------------------------------------------------------------- counters


@dataclass
class SimulatorStats:
    """Counters served by `GET /stats`."""

    requests: int = 0
    """`POST /v1/messages` requests, whatever their outcome."""
    streams: int = 0
    """Requests with `"stream": true` that were answered with an event stream."""
    messages: int = 0
    """Requests answered with a whole message (not streamed)."""
    completed: int = 0
    """Answers (streamed or not) sent to the end without failure."""
    invalid_requests: int = 0
    """Requests rejected because their body was invalid (not injected failures)."""
    client_disconnects: int = 0
    """Streams the client closed before the end."""
    active_streams: int = 0
    rate_limited: int = 0
    """Requests answered 429 because an enforced limit was exceeded (not injected)."""
    tokens_emitted: int = 0
    """Output tokens sent: text deltas of streams plus output tokens of whole messages."""
    failures_injected_by_kind: dict[str, int] = field(default_factory=dict)

    def count_failure(self, kind: str) -> None:
        self.failures_injected_by_kind[kind] = self.failures_injected_by_kind.get(kind, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["failures_injected_by_kind"] = dict(self.failures_injected_by_kind)
        return out
