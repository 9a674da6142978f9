"""Fast JSON for the simulator (orjson when present, the standard library otherwise)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency, this is a fallback
    orjson = None  # type: ignore[assignment]

__all__ = ["JSONDecodeError", "dumps", "dumps_sorted", "loads"]


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


dumps = _dumps
loads = _loads
dumps_sorted = _dumps_sorted
JSONDecodeError = _JSONDecodeError
