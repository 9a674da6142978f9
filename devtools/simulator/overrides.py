"""Per-request behaviour from the `x-sim-*` headers (see `devtools.simulator.app`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from devtools.simulator.requests import InvalidRequest
from devtools.simulator.settings import FAIL_KINDS, SimulatorConfig

__all__ = ["Overrides", "parse_overrides"]


@dataclass(slots=True)
class Overrides:
    """Per-request behaviour from the `x-sim-*` headers."""

    fail: str | None
    latency_s: float
    tokens: int
    seconds_per_token: float
    timestamps: bool
    emit_log: str | None = None


def parse_overrides(
    headers: Mapping[str, str],
    config: SimulatorConfig,
    draw_failure: Callable[[SimulatorConfig], str | None],
) -> Overrides:
    """The request's overrides; a random failure drawn when none is forced (InvalidRequest
    for a malformed header)."""
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
        fail = draw_failure(config)
    tps = config.tokens_per_second if tps is None else tps
    return Overrides(
        fail=fail,
        latency_s=(config.latency_ms if latency_ms is None else latency_ms) / 1000.0,
        tokens=config.output_tokens if tokens is None else int(tokens),
        seconds_per_token=1.0 / tps if tps > 0 else 0.0,
        timestamps=headers.get("x-sim-timestamps", "").strip().lower() in ("1", "true"),
        emit_log=(headers.get("x-sim-emit-log") or "").strip()[:128] or None,
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
