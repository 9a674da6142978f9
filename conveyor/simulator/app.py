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

Besides: `GET /healthz`, `GET /stats` (counters), `POST /control` (change the
configuration at run time) and `POST /v1/messages/count_tokens`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency, this is a fallback
    orjson = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = [
    "FAIL_KINDS",
    "HTTP_FAIL_KINDS",
    "SIMULATOR_KEY",
    "STREAM_FAIL_KINDS",
    "Generation",
    "InvalidRequest",
    "RunningSimulator",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "build_app",
    "estimate_input_tokens",
    "plan_generation",
    "run_simulator",
    "start_simulator",
    "validate_body",
]


# --------------------------------------------------------------------------- JSON


def _dumps_std(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _dumps_sorted_std(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()


if orjson is not None:
    _dumps: Callable[[Any], bytes] = orjson.dumps
    _loads: Callable[[bytes], Any] = orjson.loads
    _JSONDecodeError: type[ValueError] = orjson.JSONDecodeError

    def _dumps_sorted(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)

else:  # pragma: no cover
    _dumps = _dumps_std
    _loads = json.loads
    _JSONDecodeError = json.JSONDecodeError
    _dumps_sorted = _dumps_sorted_std


# ------------------------------------------------------------------ configuration

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
    }
)
"""Fields `POST /control` may change; host, port and the rest need a restart."""

_LIMIT_FIELDS: Final[dict[str, str]] = {
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when a field is out of range."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not (math.isfinite(self.limit_burst_s) and self.limit_burst_s > 0):
            raise ValueError(f"limit_burst_s must be a number > 0, got {self.limit_burst_s!r}")
        for name in ("latency_ms", "tokens_per_second", "retry_after_s", *_LIMIT_FIELDS.values()):
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


# -------------------------------------------------------------------- generation

_WORDS: Final[str] = (
    "the a an of to in for on with by from at as into over under about after "
    "before between through during without within along across behind beyond "
    "queue job worker token stream model prompt answer request message lane "
    "broker retry lease signal event batch cache shard packet vector kernel "
    "river stone cloud forest garden harbor lantern meadow mountain ocean "
    "orchard planet valley window winter summer autumn spring morning evening "
    "quick quiet bright gentle steady clever simple careful patient curious runs "
    "builds carries finds keeps moves opens reads sends turns writes waits"
)
_VOCABULARY: Final[tuple[str, ...]] = tuple(_WORDS.split())
"""Words the generated text is made of; each token is one of them and a space."""

_DELTA_PREFIX: Final[bytes] = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_DELTA_SUFFIX: Final[bytes] = b"}}\n\n"


def _delta_frame(text: str) -> bytes:
    return _DELTA_PREFIX + _dumps(text) + _DELTA_SUFFIX


_WORD_FRAMES: Final[dict[str, bytes]] = {w + " ": _delta_frame(w + " ") for w in _VOCABULARY}
"""The `content_block_delta` frame of every whole token, built once."""

_PING_FRAME: Final[bytes] = b'event: ping\ndata: {"type":"ping"}\n\n'
_BLOCK_START_FRAME: Final[bytes] = (
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
)
_BLOCK_STOP_FRAME: Final[bytes] = (
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
)
_MESSAGE_STOP_FRAME: Final[bytes] = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_ERROR_EVENT_FRAME: Final[bytes] = (
    b"event: error\n"
    b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)


def _frame(event: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Generation:
    """The planned answer to one request."""

    deltas: tuple[str, ...]
    """The text deltas, in order; their concatenation is the text."""
    output_tokens: int
    stop_reason: str
    stop_sequence: str | None

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def plan_generation(
    messages: Any, max_tokens: int, wanted_tokens: int, stop_sequences: list[str] | None
) -> Generation:
    """Deterministic text for `messages`: `wanted_tokens` words, cut by max_tokens or a stop sequence."""
    digest = hashlib.blake2b(_dumps_sorted(messages), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "big"))
    count = min(wanted_tokens, max_tokens)
    tokens = [w + " " for w in rng.choices(_VOCABULARY, k=count)]
    stop_reason = "max_tokens" if wanted_tokens > max_tokens else "end_turn"
    if stop_sequences:
        text = "".join(tokens)
        best: tuple[int, str] | None = None
        for seq in stop_sequences:
            if not seq:
                continue
            at = text.find(seq)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, seq)
        if best is not None:
            at, seq = best
            end = at + len(seq)
            deltas: list[str] = []
            offset = 0
            output_tokens = 0
            for tok in tokens:
                if offset >= end:
                    break
                output_tokens += 1
                if offset < at:
                    deltas.append(tok[: at - offset])
                offset += len(tok)
            return Generation(tuple(deltas), output_tokens, "stop_sequence", seq)
    return Generation(tuple(tokens), count, stop_reason, None)


def _content_chars(content: Any) -> int:
    """Characters of text in a message's (or system prompt's) content."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for block in content:
            if isinstance(block, dict):
                text = block.get("text")
                if isinstance(text, str):
                    total += len(text)
                elif "content" in block:  # tool_result
                    total += _content_chars(block["content"])
                elif block.get("type") == "tool_use":
                    total += len(_dumps(block.get("input", {})))
                else:  # images, documents: a rough fixed cost
                    total += 1000
            elif isinstance(block, str):
                total += len(block)
        return total
    return 0


def estimate_input_tokens(system: Any, messages: list[Any]) -> int:
    """ceil(characters of system and message text / 4), at least 1."""
    chars = _content_chars(system)
    for msg in messages:
        if isinstance(msg, dict):
            chars += _content_chars(msg.get("content"))
    return max(1, math.ceil(chars / 4))


# -------------------------------------------------------------------- validation


class InvalidRequest(ValueError):
    """The request body is not a valid Messages API request (400 invalid_request_error)."""


_METADATA_KEYS: Final[frozenset[str]] = frozenset({"user_id"})
_ROLES: Final[frozenset[str]] = frozenset({"user", "assistant"})


def validate_body(body: Any) -> None:
    """Check a Messages API body about as strictly as the real API; raise InvalidRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise InvalidRequest(f"{name}: Field required")
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Input should be a valid string")
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidRequest("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 1")
    _validate_messages(body["messages"])
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise InvalidRequest("system: Input should be a valid string or a list of text blocks")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 1
    ):
        raise InvalidRequest("temperature: Input should be a number between 0 and 1")
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        raise InvalidRequest("stop_sequences: Input should be a valid list of strings")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata: Input should be a valid dictionary")
        for key in metadata:
            if key not in _METADATA_KEYS:
                raise InvalidRequest(f"metadata.{key}: Extra inputs are not permitted")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: Input should be a valid boolean")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Input should be a valid list")
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages.{i}: Input should be a valid dictionary")
        if msg.get("role") not in _ROLES:
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in msg:
            raise InvalidRequest(f"messages.{i}.content: Field required")
        content = msg["content"]
        if not isinstance(content, str | list):
            raise InvalidRequest(f"messages.{i}.content: Input should be a valid string or list")


# ----------------------------------------------------------------- the simulator

_ERRORS: Final[dict[str, tuple[int, str, str]]] = {
    "400": (400, "invalid_request_error", "Simulated invalid request (x-sim-fail: 400)"),
    "401": (401, "authentication_error", "invalid x-api-key"),
    "404": (404, "not_found_error", "Not found"),
    "429": (
        429,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization (simulated).",
    ),
    "500": (500, "api_error", "Internal server error"),
    "529": (529, "overloaded_error", "Overloaded"),
}
"""Status, error type and message of each error answer."""


@dataclass(slots=True)
class _Overrides:
    """Per-request behaviour from the `x-sim-*` headers."""

    fail: str | None
    latency_s: float
    tokens: int
    seconds_per_token: float
    timestamps: bool
    emit_log: str | None = None


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
        for name, field_name in _LIMIT_FIELDS.items():
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
            self._ratelimit_headers = {
                "anthropic-ratelimit-requests-limit": "100000",
                "anthropic-ratelimit-requests-remaining": "99999",
                "anthropic-ratelimit-requests-reset": reset,
                "anthropic-ratelimit-tokens-limit": "100000000",
                "anthropic-ratelimit-tokens-remaining": "99999000",
                "anthropic-ratelimit-tokens-reset": reset,
                "anthropic-ratelimit-input-tokens-limit": "80000000",
                "anthropic-ratelimit-input-tokens-remaining": "79999000",
                "anthropic-ratelimit-input-tokens-reset": reset,
                "anthropic-ratelimit-output-tokens-limit": "20000000",
                "anthropic-ratelimit-output-tokens-remaining": "19999000",
                "anthropic-ratelimit-output-tokens-reset": reset,
            }
        headers = dict(self._ratelimit_headers)
        if self.limits.enforcing and model is not None:
            headers.update(self.limits.headers(model))
        headers["request-id"] = request_id
        return headers

    def error_response(
        self, kind: str, request_id: str, message: str | None = None
    ) -> web.Response:
        """An error answer with the real JSON shape (`kind` is a key of `_ERRORS`)."""
        status, error_type, default_message = _ERRORS[kind]
        body = {
            "type": "error",
            "error": {"type": error_type, "message": message or default_message},
            "request_id": request_id,
        }
        headers = {"request-id": request_id, "x-should-retry": "true"}
        if status in (429, 529):
            headers["retry-after"] = f"{self._config.retry_after_s:g}"
        if status == 429:
            headers["anthropic-ratelimit-requests-remaining"] = "0"
        if status < 500 and status != 429:
            headers["x-should-retry"] = "false"
        return web.Response(
            status=status, body=_dumps(body), content_type="application/json", headers=headers
        )

    def rate_limited_response(self, request_id: str, model: str, wait_s: float) -> web.Response:
        """429 for a request over an enforced limit, with the buckets' headers and a
        whole-second retry-after, as the real API sends."""
        response = self.error_response("429", request_id)
        response.headers.update(self.limits.headers(model))
        response.headers["retry-after"] = str(max(1, math.ceil(wait_s)))
        return response

    def _overrides(self, request: web.Request, config: SimulatorConfig) -> _Overrides:
        headers = request.headers
        fail = headers.get("x-sim-fail")
        if fail is not None:
            fail = fail.strip().lower()
            if fail not in FAIL_KINDS:
                raise InvalidRequest(
                    f"x-sim-fail: expected one of {', '.join(FAIL_KINDS)}, got {fail!r}"
                )
            only_on = headers.get("x-sim-fail-attempts")
            if only_on is not None:
                attempts = {a.strip() for a in only_on.split(",")}
                if headers.get("x-sim-attempt", "").strip() not in attempts:
                    fail = None
        latency_ms = _header_number(headers.get("x-sim-latency-ms"), "x-sim-latency-ms")
        tokens = _header_number(headers.get("x-sim-tokens"), "x-sim-tokens")
        tps = _header_number(headers.get("x-sim-tokens-per-second"), "x-sim-tokens-per-second")
        if tokens is not None and not tokens.is_integer():
            raise InvalidRequest(f"x-sim-tokens: expected an integer, got {tokens!r}")
        if fail is None and config.total_failure_rate > 0:
            fail = self._draw_failure(config)
        tps = config.tokens_per_second if tps is None else tps
        return _Overrides(
            fail=fail,
            latency_s=(config.latency_ms if latency_ms is None else latency_ms) / 1000.0,
            tokens=config.output_tokens if tokens is None else int(tokens),
            seconds_per_token=1.0 / tps if tps > 0 else 0.0,
            timestamps=headers.get("x-sim-timestamps", "").strip().lower() in ("1", "true"),
            emit_log=(headers.get("x-sim-emit-log") or "").strip()[:128] or None,
        )

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
            overrides = self._overrides(request, config)
            raw = await request.read()
            try:
                body = _loads(raw)
            except _JSONDecodeError as exc:
                raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
            validate_body(body)
        except InvalidRequest as exc:
            stats.invalid_requests += 1
            return self.error_response("400", request_id, str(exc))

        messages: list[Any] = body["messages"]
        max_tokens: int = body["max_tokens"]
        input_tokens = estimate_input_tokens(body.get("system"), messages)
        if self.limits.enforcing:
            wait = self.limits.admit(
                body["model"],
                {"requests": 1, "input-tokens": input_tokens, "output-tokens": max_tokens},
            )
            if wait > 0:
                stats.rate_limited += 1
                return self.rate_limited_response(request_id, body["model"], wait)

        fail = overrides.fail
        if fail is not None and fail in HTTP_FAIL_KINDS:
            stats.count_failure(fail)
            return self.error_response(fail, request_id)

        gen = plan_generation(
            messages, max_tokens, max(0, overrides.tokens), body.get("stop_sequences")
        )
        message_id = "msg_sim_" + self._next_id()
        try:
            if body.get("stream"):
                return await self._stream(
                    request, request_id, message_id, body["model"], input_tokens, gen, overrides
                )
            return await self._whole(
                request, request_id, message_id, body["model"], input_tokens, gen, overrides
            )
        finally:
            # Output tokens were reserved at max_tokens; what was not generated goes back.
            self.limits.give_back(body["model"], "output-tokens", max_tokens - gen.output_tokens)

    async def _whole(
        self,
        request: web.Request,
        request_id: str,
        message_id: str,
        model: str,
        input_tokens: int,
        gen: Generation,
        overrides: _Overrides,
    ) -> web.StreamResponse:
        stats = self.stats
        delay = overrides.latency_s + overrides.seconds_per_token * max(0, len(gen.deltas) - 1)
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
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": gen.text}],
            "stop_reason": gen.stop_reason,
            "stop_sequence": gen.stop_sequence,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": gen.output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        stats.messages += 1
        stats.completed += 1
        stats.tokens_emitted += gen.output_tokens
        return web.Response(
            body=_dumps(message),
            content_type="application/json",
            headers=self._success_headers(request_id, model),
        )

    async def _stream(
        self,
        request: web.Request,
        request_id: str,
        message_id: str,
        model: str,
        input_tokens: int,
        gen: Generation,
        overrides: _Overrides,
    ) -> web.StreamResponse:
        stats = self.stats
        headers = self._success_headers(request_id, model)
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        await resp.prepare(request)
        stats.streams += 1
        stats.active_streams += 1
        message_start = _frame(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": input_tokens,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                },
            },
        )
        deltas = gen.deltas
        fail_at = len(deltas) // 2 if overrides.fail in STREAM_FAIL_KINDS else -1
        stamp = overrides.timestamps
        step = overrides.seconds_per_token
        emitted: list[int] | None = None
        if overrides.emit_log is not None:
            emitted = self.emissions.setdefault(overrides.emit_log, [])
            while len(self.emissions) > MAX_EMISSION_LOGS:
                self.emissions.popitem(last=False)
        loop = asyncio.get_running_loop()
        try:
            await resp.write(message_start + _BLOCK_START_FRAME + _PING_FRAME)
            if overrides.latency_s > 0:
                await asyncio.sleep(overrides.latency_s)
            if step > 0 or stamp or fail_at >= 0 or emitted is not None:
                started = loop.time()
                for i, delta in enumerate(deltas):
                    if i == fail_at:
                        break
                    if step > 0 and i > 0:
                        wait = started + i * step - loop.time()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    frame = _WORD_FRAMES.get(delta) or _delta_frame(delta)
                    if stamp:
                        frame = b": t=%d\n" % time.time_ns() + frame
                    if emitted is not None:
                        emitted.append(time.time_ns())
                    await resp.write(frame)
                    stats.tokens_emitted += 1
            else:
                # As fast as possible: one write for all the deltas.
                await resp.write(b"".join(_WORD_FRAMES.get(d) or _delta_frame(d) for d in deltas))
                stats.tokens_emitted += len(deltas)
            if fail_at >= 0:
                assert overrides.fail is not None
                stats.count_failure(overrides.fail)
                if overrides.fail == "drop":
                    _close_transport(request)
                    return resp
                await resp.write(_ERROR_EVENT_FRAME)
                await resp.write_eof()
                return resp
            message_delta = _frame(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": gen.stop_reason, "stop_sequence": gen.stop_sequence},
                    "usage": {"output_tokens": gen.output_tokens},
                },
            )
            await resp.write(_BLOCK_STOP_FRAME + message_delta + _MESSAGE_STOP_FRAME)
            await resp.write_eof()
            stats.completed += 1
        except ConnectionError:
            # The client went away; aiohttp's own write_eof will fail quietly too.
            stats.client_disconnects += 1
        finally:
            stats.active_streams -= 1
        return resp

    async def handle_count_tokens(self, request: web.Request) -> web.Response:
        """`POST /v1/messages/count_tokens`."""
        request_id = "req_sim_" + self._next_id()
        try:
            try:
                body = _loads(await request.read())
            except _JSONDecodeError as exc:
                raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise InvalidRequest("request body must be a JSON object")
            for name in ("model", "messages"):
                if name not in body:
                    raise InvalidRequest(f"{name}: Field required")
            _validate_messages(body["messages"])
        except InvalidRequest as exc:
            return self.error_response("400", request_id, str(exc))
        tokens = estimate_input_tokens(body.get("system"), body["messages"])
        return web.Response(
            body=_dumps({"input_tokens": tokens}),
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
        return web.Response(body=_dumps({"times_ns": times}), content_type="application/json")

    async def handle_stats(self, request: web.Request) -> web.Response:
        """`GET /stats`: the counters as JSON."""
        return web.Response(body=_dumps(self.stats.to_dict()), content_type="application/json")

    async def handle_control(self, request: web.Request) -> web.Response:
        """`POST /control`: change the configuration; `{"reset_stats": true}` zeroes the counters."""
        request_id = "req_sim_" + self._next_id()
        try:
            changes = _loads(await request.read() or b"{}")
        except _JSONDecodeError as exc:
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
        return web.Response(body=_dumps(config.to_dict()), content_type="application/json")

    async def handle_not_found(self, request: web.Request) -> web.Response:
        return self.error_response(
            "404", "req_sim_" + self._next_id(), f"Not found: {request.path}"
        )


def _header_number(raw: str | None, name: str) -> float | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name}: expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{name}: expected a number >= 0, got {raw!r}")
    return value


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
    app.router.add_post("/control", sim.handle_control)
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
