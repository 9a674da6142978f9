"""The price table and what a usage costs (conveyor.core.pricing)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from conveyor.core.pricing import (
    DEFAULT_PRICES,
    ModelPrice,
    PriceTable,
    cost_micros,
    price_of,
    usage_micros,
    worst_case_micros,
)

SONNET = ModelPrice.of(3, 15)


@pytest.mark.parametrize(
    ("usage", "micros"),
    [
        ({"input_tokens": 1000}, 3000),
        ({"output_tokens": 1000}, 15000),
        # Cache writes by TTL: 5 m at 1.25x input, 1 h at 2x input.
        (
            {
                "cache_creation_input_tokens": 1000,
                "cache_creation": {"ephemeral_5m_input_tokens": 1000},
            },
            3750,
        ),
        (
            {
                "cache_creation_input_tokens": 1000,
                "cache_creation": {"ephemeral_1h_input_tokens": 1000},
            },
            6000,
        ),
        (
            {
                "cache_creation_input_tokens": 300,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 100,
                    "ephemeral_1h_input_tokens": 200,
                },
            },
            375 + 1200,
        ),
        # Without the TTL breakdown, writes are priced at the 5-minute rate (the default).
        ({"cache_creation_input_tokens": 1000}, 3750),
        ({"cache_read_input_tokens": 1000}, 300),
        # Web searches: $10 per 1,000.
        ({"server_tool_use": {"web_search_requests": 3}}, 30000),
        # Missing, null or malformed counts are 0.
        ({"input_tokens": None, "output_tokens": "7", "cache_creation": None}, 0),
        ({}, 0),
    ],
)
def test_cost_of_each_usage_field(usage: dict[str, Any], micros: int) -> None:
    assert usage_micros(SONNET, usage) == micros


def test_fractions_of_a_micro_dollar_are_summed_then_rounded_once() -> None:
    # 1 cache read token = 0.3 µ$ and 1 input token of haiku 3 = 0.25 µ$: summed, not
    # rounded per field.
    assert usage_micros(SONNET, {"cache_read_input_tokens": 5}) == 2  # 1.5 -> 2
    haiku3 = price_of("claude-3-haiku-20240307")
    assert haiku3 is not None
    assert usage_micros(haiku3, {"input_tokens": 3, "output_tokens": 1}) == 2  # 0.75+1.25


def test_batch_price_is_half_of_every_token_price_but_not_of_searches() -> None:
    usage = {
        "input_tokens": 1000,
        "output_tokens": 1000,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 1000,
        "server_tool_use": {"web_search_requests": 1},
    }
    full = usage_micros(SONNET, usage)
    batch = usage_micros(SONNET, usage, batch=True)
    assert full == 3000 + 15000 + 300 + 3750 + 10000
    assert batch == (3000 + 15000 + 300 + 3750) // 2 + 10000


@pytest.mark.parametrize(
    ("model", "input_usd", "output_usd"),
    [
        ("claude-opus-4-5", 5, 25),
        ("claude-opus-4-5-20251101", 5, 25),
        ("claude-opus-4-6", 5, 25),
        ("claude-opus-4-1", 15, 75),
        ("claude-opus-4-1-20250805", 15, 75),
        ("claude-opus-4-0", 15, 75),
        ("claude-opus-4-20250514", 15, 75),
        ("claude-sonnet-4-5", 3, 15),
        ("claude-sonnet-4-20250514", 3, 15),
        ("claude-haiku-4-5", 1, 5),
        ("claude-3-7-sonnet-latest", 3, 15),
        ("claude-3-5-haiku-20241022", Decimal("0.8"), 4),
        ("claude-3-opus-20240229", 15, 75),
        ("claude-3-haiku-20240307", Decimal("0.25"), Decimal("1.25")),
        ("claude-sim-1", 3, 15),
    ],
)
def test_default_prices_of_current_models(
    model: str, input_usd: Decimal | int, output_usd: Decimal | int
) -> None:
    price = PriceTable().price_of(model)
    assert price is not None
    assert (price.input, price.output) == (input_usd, output_usd)
    assert price.cache_read == price.input * Decimal("0.1")


def test_a_model_missing_from_the_table_is_unpriced_not_free() -> None:
    assert PriceTable().price_of("claude-invented-123") is None
    assert cost_micros("claude-invented-123", {"input_tokens": 10}, table=PriceTable()) is None
    assert worst_case_micros("claude-invented-123", 10, 10, table=PriceTable()) is None


def test_settings_override_and_add_prices_before_the_defaults() -> None:
    table = PriceTable.from_json(
        {
            "claude-sonnet-4-5": {"input": 2, "output": 10, "cache_read": 0.5},
            "house-model-*": {"input": 1, "output": 2, "batch_factor": 1},
        }
    )
    sonnet = table.price_of("claude-sonnet-4-5")
    assert sonnet is not None and (sonnet.input, sonnet.cache_read) == (Decimal(2), Decimal("0.5"))
    assert table.price_of("claude-sonnet-4-6") == DEFAULT_PRICES["claude-sonnet-4-*"]
    assert cost_micros("house-model-7", {"input_tokens": 10}, batch=True, table=table) == 10


def test_a_price_override_needs_input_and_output() -> None:
    with pytest.raises(ValueError, match="input"):
        PriceTable.from_json({"m": {"output": 1}})
    with pytest.raises(ValueError, match="unknown price field"):
        PriceTable.from_json({"m": {"input": 1, "output": 1, "cache": 1}})


def test_worst_case_is_estimated_input_plus_max_tokens_of_output() -> None:
    assert worst_case_micros("claude-sonnet-4-5", 100, 1000, table=PriceTable()) == 300 + 15000
