"""What a model call costs: a price table per model and the cost of one usage.

Prices are in USD per million tokens, which is the same number as micro-dollars
per token, so a cost in micro-dollars is tokens times price, summed exactly (in
`Decimal`) and rounded once, half up, per job.

Each model has an input and an output price, cache write prices for the 5-minute
and the 1-hour TTL, a cache read price, a batch factor (the Message Batches API
charges half of every token price; it stacks with the cache multipliers) and a
price per 1,000 server-side web searches (not discounted in batches).

A model is found by its exact name, then by shell-style pattern (`claude-opus-4-5*`;
the longest pattern first). `CONVEYOR_PRICES` (JSON) overrides or adds entries,
and its entries are looked up before the defaults. A model found nowhere is
*unpriced*: its cost is None (NULL), never zero.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from typing import Any, ClassVar, Protocol, TypeVar

MILLION = 1_000_000

_WILDCARDS = frozenset("*?[")

# Multipliers of the input price, as Anthropic publishes them.
CACHE_WRITE_5M_FACTOR = Decimal("1.25")
CACHE_WRITE_1H_FACTOR = Decimal(2)
CACHE_READ_FACTOR = Decimal("0.1")
BATCH_FACTOR = Decimal("0.5")
WEB_SEARCH_PER_1K = Decimal(10)


@dataclass(frozen=True)
class ModelPrice:
    """Prices of one model, in USD per million tokens (= micro-dollars per token)."""

    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal
    batch_factor: Decimal = BATCH_FACTOR
    """What a batch pays of every token price (0.5: half)."""
    web_search_per_1k: Decimal = WEB_SEARCH_PER_1K
    """USD per 1,000 web searches (server tool use)."""

    @classmethod
    def of(cls, input_usd: str | float, output_usd: str | float, **rest: Any) -> ModelPrice:
        """Prices from input and output per million tokens; the cache prices default to
        Anthropic's multipliers of the input price (5 m write 1.25x, 1 h write 2x,
        read 0.1x). `rest` may name any other field (`cache_read=...`)."""
        inp = Decimal(str(input_usd))
        fields: dict[str, Decimal] = {
            "cache_write_5m": inp * CACHE_WRITE_5M_FACTOR,
            "cache_write_1h": inp * CACHE_WRITE_1H_FACTOR,
            "cache_read": inp * CACHE_READ_FACTOR,
        }
        for name, value in rest.items():
            if name not in _PRICE_FIELDS:
                raise ValueError(f"unknown price field {name!r}")
            fields[name] = Decimal(str(value))
        price = cls(input=inp, output=Decimal(str(output_usd)), **fields)
        for name in _PRICE_FIELDS:
            if getattr(price, name) < 0:
                raise ValueError(f"price field {name!r} is negative")
        return price

    def tokens_micros(self, tokens: int, per_token: Decimal, *, batch: bool) -> Decimal:
        """Micro-dollars for `tokens` at `per_token` (unrounded)."""
        return tokens * per_token * (self.batch_factor if batch else 1)


_PRICE_FIELDS = (
    "input",
    "output",
    "cache_write_5m",
    "cache_write_1h",
    "cache_read",
    "batch_factor",
    "web_search_per_1k",
)

_OPUS_4 = ModelPrice.of(15, 75)
_OPUS_45 = ModelPrice.of(5, 25)
_SONNET = ModelPrice.of(3, 15)
_HAIKU_45 = ModelPrice.of(1, 5)
_HAIKU_35 = ModelPrice.of("0.80", 4)
_HAIKU_3 = ModelPrice.of("0.25", "1.25", cache_write_5m="0.30", cache_write_1h="0.50")

DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    # Claude 4.x, as published (USD per million tokens).
    "claude-opus-4-[5-9]*": _OPUS_45,
    "claude-opus-4-1*": _OPUS_4,
    "claude-opus-4-0": _OPUS_4,
    "claude-opus-4-2025*": _OPUS_4,
    "claude-sonnet-4-*": _SONNET,
    "claude-haiku-4-*": _HAIKU_45,
    # Claude 3.x.
    "claude-3-7-sonnet*": _SONNET,
    "claude-3-5-sonnet*": _SONNET,
    "claude-3-5-haiku*": _HAIKU_35,
    "claude-3-opus*": _OPUS_4,
    "claude-3-sonnet*": _SONNET,
    "claude-3-haiku*": _HAIKU_3,
    # The bundled simulator's models, priced like a sonnet so tests and the
    # benchmark have figures.
    "claude-sim-*": _SONNET,
}
"""Default prices by exact name or shell-style pattern."""


class PriceTable:
    """Prices by model: exact names first, then patterns (longest first); the
    operator's entries before the defaults."""

    def __init__(
        self,
        overrides: Mapping[str, ModelPrice] | None = None,
        defaults: Mapping[str, ModelPrice] = DEFAULT_PRICES,
    ) -> None:
        self._exact: list[dict[str, ModelPrice]] = []
        self._patterns: list[tuple[str, ModelPrice]] = []
        for table in (overrides or {}, defaults):
            self._exact.append({k: v for k, v in table.items() if not _WILDCARDS & set(k)})
            patterns = [(k, v) for k, v in table.items() if _WILDCARDS & set(k)]
            self._patterns.extend(sorted(patterns, key=lambda kv: -len(kv[0])))
        self._cache: dict[str, ModelPrice | None] = {}

    @classmethod
    def from_json(cls, raw: Mapping[str, Mapping[str, Any]]) -> PriceTable:
        """A table from CONVEYOR_PRICES: `{"model-or-pattern": {"input": 3,
        "output": 15, ...}}`; input and output are required, the other fields
        default to the published multipliers."""
        overrides: dict[str, ModelPrice] = {}
        for name, fields in raw.items():
            if "input" not in fields or "output" not in fields:
                raise ValueError(f"prices of {name!r} need `input` and `output`")
            rest = {k: v for k, v in fields.items() if k not in ("input", "output")}
            overrides[name] = ModelPrice.of(fields["input"], fields["output"], **rest)
        return cls(overrides)

    def price_of(self, model: str) -> ModelPrice | None:
        """The prices of `model`, or None when it is unpriced."""
        if model in self._cache:
            return self._cache[model]
        found: ModelPrice | None = None
        for exact in self._exact:
            if model in exact:
                found = exact[model]
                break
        else:
            for pattern, price in self._patterns:
                if fnmatch.fnmatchcase(model, pattern):
                    found = price
                    break
        if len(self._cache) < 10_000:  # bounded: model names come from tenants
            self._cache[model] = found
        return found


@lru_cache(maxsize=1)
def default_table() -> PriceTable:
    """The process's table: the defaults and CONVEYOR_PRICES."""
    from conveyor.core.config import get_settings

    return PriceTable.from_json(get_settings().prices)


def price_of(model: str) -> ModelPrice | None:
    """The prices of `model` in the process's table; None: unpriced."""
    return default_table().price_of(model)


def _int(value: Any) -> int:
    """A usage count (None, missing or malformed: 0)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_micros(price: ModelPrice, usage: Mapping[str, Any], *, batch: bool = False) -> int:
    """Micro-dollars of one usage at `price` (rounded half up, once).

    Cache writes are split by TTL with `usage.cache_creation.ephemeral_5m/1h_input_tokens`;
    write tokens the split does not cover (a usage without the breakdown) are priced
    at the 5-minute rate, the API's default TTL.
    """
    written = _int(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    w5 = w1 = 0
    if isinstance(split, Mapping):
        w5 = _int(split.get("ephemeral_5m_input_tokens"))
        w1 = _int(split.get("ephemeral_1h_input_tokens"))
    w5 += max(0, written - w5 - w1)
    total = (
        price.tokens_micros(_int(usage.get("input_tokens")), price.input, batch=batch)
        + price.tokens_micros(_int(usage.get("output_tokens")), price.output, batch=batch)
        + price.tokens_micros(w5, price.cache_write_5m, batch=batch)
        + price.tokens_micros(w1, price.cache_write_1h, batch=batch)
        + price.tokens_micros(
            _int(usage.get("cache_read_input_tokens")), price.cache_read, batch=batch
        )
    )
    tools = usage.get("server_tool_use")
    if isinstance(tools, Mapping):
        searches = _int(tools.get("web_search_requests"))
        total += searches * price.web_search_per_1k * MILLION / 1000
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def cost_micros(
    model: str, usage: Mapping[str, Any], *, batch: bool = False, table: PriceTable | None = None
) -> int | None:
    """Micro-dollars that `usage` of `model` cost (`batch`: at the Message Batches
    price); None when the model is unpriced."""
    price = (table or default_table()).price_of(model)
    return None if price is None else usage_micros(price, usage, batch=batch)


class _Priced(Protocol):
    """An attempt's outcome (conveyor.db.jobs.Outcome): a dataclass with these fields."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def result(self) -> Mapping[str, Any] | None: ...
    @property
    def usage(self) -> Mapping[str, int] | None: ...
    @property
    def cost_micros(self) -> int | None: ...


P = TypeVar("P", bound=_Priced)


def with_cost(outcome: P, model: str, *, batch: bool = False) -> P:
    """The outcome with its attempt's cost, from the whole usage the provider reported
    (`result.usage`, where the cache writes' TTL split is), else its `usage`: 0 without
    usage, None for an unpriced model. For the worker and the batch lane."""
    full = (outcome.result or {}).get("usage")
    usage = full if isinstance(full, Mapping) else (outcome.usage or {})
    return dataclasses.replace(outcome, cost_micros=cost_micros(model, usage, batch=batch))


def worst_case_micros(
    model: str,
    input_tokens: int,
    max_tokens: int,
    *,
    batch: bool = False,
    table: PriceTable | None = None,
) -> int | None:
    """What a request may cost at most, for budgets: its estimated input tokens at
    the input price plus `max_tokens` of output; None when unpriced."""
    price = (table or default_table()).price_of(model)
    if price is None:
        return None
    usage = {"input_tokens": input_tokens, "output_tokens": max_tokens}
    return usage_micros(price, usage, batch=batch)


def cache_saved_micros(model: str, cache_read_tokens: int, *, batch: bool = False) -> int | None:
    """Dollars (micro) the prompt cache saved: what `cache_read_tokens` would have
    cost as input, minus what they cost as cache reads; None when unpriced."""
    price = price_of(model)
    if price is None:
        return None
    saved = price.tokens_micros(cache_read_tokens, price.input - price.cache_read, batch=batch)
    return int(saved.quantize(Decimal(1), rounding=ROUND_HALF_UP))
