"""Prompt caching, the way the API reports it.

A request's units (tools, then system, then message blocks; see
`tokens.segments`) form a prefix; a unit with `cache_control` is a breakpoint. For
each request:

- read: the longest cached prefix ending at a breakpoint or at one of the 20 units
  before it (the API's lookback) is read; its tokens are `cache_read_input_tokens`,
  and reading it restarts its TTL;
- write: every breakpoint after that is written; the tokens between one written
  point and the next are `cache_creation_input_tokens`, split by the breakpoint's TTL
  into `ephemeral_5m_input_tokens` and `ephemeral_1h_input_tokens`;
- a prefix shorter than the model's minimum cacheable length is neither written nor
  read (silently, as the API does): `min_cacheable_tokens(model)`, 1024 tokens, or
  2048 for a model whose name contains "haiku" (the API's figures for its Sonnet,
  Opus and older Haiku models).

Entries are kept per model, for their TTL, at most `max_entries` of them (the least
recently used go first), so memory stays bounded whatever the traffic.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from devtools.simulator.tokens import Segment, tokens_of

__all__ = ["LOOKBACK_BLOCKS", "TTL_SECONDS", "CacheUsage", "PromptCache", "min_cacheable_tokens"]

TTL_SECONDS: Final[dict[str, float]] = {"5m": 300.0, "1h": 3600.0}
LOOKBACK_BLOCKS: Final = 20
"""Units before a breakpoint where the API also looks for a cached prefix."""


def min_cacheable_tokens(model: str) -> int:
    """The shortest prefix the API caches for `model`."""
    return 2048 if "haiku" in model.lower() else 1024


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """What one request read from and wrote to the cache, in tokens."""

    read: int = 0
    write_5m: int = 0
    write_1h: int = 0

    @property
    def written(self) -> int:
        return self.write_5m + self.write_1h


@dataclass(slots=True)
class _Entry:
    expires: float
    ttl_s: float


class PromptCache:
    """The simulator's prompt cache: prefix hashes with their expiry, LRU-bounded."""

    def __init__(
        self, max_entries: int = 50_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def apply(self, model: str, units: Sequence[Segment]) -> CacheUsage:
        """Read and write the cache for one request's units; the tokens of each."""
        breakpoints = [i for i, u in enumerate(units) if u.ttl is not None]
        if not breakpoints:
            return CacheUsage()
        now = self._clock()
        hashes: list[bytes] = []
        totals: list[int] = []
        h = hashlib.blake2b(model.encode(), digest_size=16).digest()
        chars = tokens = 0
        for unit in units:
            h = hashlib.blake2b(h + unit.key, digest_size=16).digest()
            chars, tokens = chars + unit.chars, tokens + unit.tokens
            hashes.append(h)
            totals.append(tokens_of(chars, tokens))

        read_at = -1
        candidates = sorted(
            {p for b in breakpoints for p in range(max(0, b - LOOKBACK_BLOCKS), b + 1)},
            reverse=True,
        )
        for p in candidates:
            entry = self._entries.get(hashes[p])
            if entry is None:
                continue
            if entry.expires <= now:
                del self._entries[hashes[p]]
                continue
            entry.expires = now + entry.ttl_s
            self._entries.move_to_end(hashes[p])
            read_at = p
            break
        read = totals[read_at] if read_at >= 0 else 0

        minimum = min_cacheable_tokens(model)
        written = {"5m": 0, "1h": 0}
        done = read
        for b in breakpoints:
            if b <= read_at or totals[b] < minimum:
                continue
            ttl = units[b].ttl or "5m"
            self._store(hashes[b], TTL_SECONDS.get(ttl, 300.0), now)
            written[ttl if ttl in written else "5m"] += totals[b] - done
            done = totals[b]
        return CacheUsage(read=read, write_5m=written["5m"], write_1h=written["1h"])

    def _store(self, key: bytes, ttl_s: float, now: float) -> None:
        self._entries[key] = _Entry(now + ttl_s, ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
