"""streaming: time from the simulator emitting a token to a WatchJob client receiving it.

The measurement lives in `bench/token_latency.py` (written separately). This
scenario runs it when that module exists and reports "skipped" otherwise. The
module is expected to offer

    async def run(ctx: bench.harness.Context) -> bench.harness.Result

or, failing that, to return a mapping of figures (name → number in ms), which is
shown as is. The worker is left running and the simulator at its defaults; the
module sets the latency and pace it needs through `ctx.sim_set`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from bench.harness import Context, Result

NAME = "streaming"
TITLE = "token delivery: simulator emits → WatchJob client receives"
MODULE = "bench.token_latency"
P50_TARGET_MS = 5.0


def _load() -> Any | None:
    try:
        return importlib.import_module(MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != MODULE:
            raise
        return None


def _from_mapping(figures: Mapping[str, Any]) -> Result:
    result = Result(NAME, TITLE)
    for key, value in figures.items():
        number = value if isinstance(value, int | float) else None
        if key.lower().replace("_ms", "") == "p50" and number is not None:
            result.add(
                "token delivery p50",
                value,
                "ms",
                target=f"< {P50_TARGET_MS:g} ms",
                met=number < P50_TARGET_MS,
            )
        else:
            result.add(key, value if number is not None else str(value))
    return result


async def run(ctx: Context) -> Result:
    module = _load()
    if module is None or not hasattr(module, "run"):
        result = Result(NAME, TITLE, status="skipped")
        result.notes.append(f"{MODULE.replace('.', '/')}.py is not there yet; nothing measured")
        return result
    await ctx.reset(worker=True)
    outcome = module.run(ctx)
    if inspect.isawaitable(outcome):
        outcome = await outcome
    if isinstance(outcome, Result):
        outcome.name = NAME
        return outcome
    if isinstance(outcome, Mapping):
        return _from_mapping(outcome)
    raise TypeError(f"{MODULE}.run returned {type(outcome).__name__}, not a Result or a mapping")
