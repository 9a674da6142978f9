"""Token buckets shared by every process through Postgres, spent locally in batches.

A bucket (a `rate_buckets` row) refills at `limit_per_min / 60` per second up to
`capacity`. A process takes from it with one conditional UPDATE that refills
the row from the time elapsed and grants what is needed, plus up to a batch
more while the bucket is over half full, or nothing; the grant goes to the
process's local pool, which pays for the next calls without a round trip. So
with plentiful budget a process meets the database once per batch, not once
per call; when budget is short, every taker gets just its need, in turn, and
waits for the refill.

A request larger than the capacity is granted when the bucket is full, leaving
it in debt (a negative level) that the refill pays off: it waits its turn
instead of never passing. A `blocked_until` in the future grants nothing (a
provider's 429 with retry-after blocks every process). What a process holds but
no longer needs (after an idle second, or refunds after a call) goes back to
the bucket.

The UPDATE computes from the row itself, so concurrent takers serialize on the
row and each sees the other's result (READ COMMITTED re-evaluates the SET
expressions on the latest row version).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

_NOW = "greatest(b.updated_at, clock_timestamp())"
_AVAIL = (
    "least(b.capacity, b.level + coalesce(b.limit_per_min, 0) / 60.0"
    " * greatest(0, extract(epoch FROM clock_timestamp() - b.updated_at)::float8))"
)
# The batch beyond `need` comes only from the upper half of the bucket: when budget
# is plentiful a taker gets a batch, when it is scarce every taker gets just its need.
_GRANT = f"""
  CASE WHEN b.limit_per_min IS NULL THEN w.want
       WHEN b.blocked_until > clock_timestamp() THEN 0
       WHEN {_AVAIL} >= least(w.need, b.capacity)
         THEN w.need + greatest(0, least(w.want - w.need, {_AVAIL} - w.need - b.capacity / 2))
       ELSE 0 END"""
_RETURNING = """
RETURNING b.bucket, b.limit_per_min, b.capacity, b.level, b.last_grant,
          greatest(0, extract(epoch FROM b.blocked_until - clock_timestamp()))::float8 AS blocked_s
"""

_TAKE = sa.text(
    f"""
UPDATE rate_buckets b
   SET last_grant = {_GRANT},
       level = CASE WHEN b.limit_per_min IS NULL THEN b.level ELSE {_AVAIL} - {_GRANT} END,
       updated_at = {_NOW}
  FROM unnest(CAST(:names AS text[]), CAST(:needs AS float8[]), CAST(:wants AS float8[]))
       AS w(bucket, need, want)
 WHERE b.bucket = w.bucket
{_RETURNING}
"""
)

_GIVE_BACK = sa.text(
    f"""
UPDATE rate_buckets b
   SET level = least(b.capacity, {_AVAIL} + w.amount), updated_at = {_NOW}
  FROM unnest(CAST(:names AS text[]), CAST(:amounts AS float8[])) AS w(bucket, amount)
 WHERE b.bucket = w.bucket AND b.limit_per_min IS NOT NULL
"""
)

_DEFINE = sa.text(
    f"""
INSERT INTO rate_buckets AS b (bucket, limit_per_min, capacity, level, updated_at, source,
                               learned_at)
VALUES (:name, :limit, :capacity, least(:capacity, coalesce(:remaining, :capacity)),
        clock_timestamp(), :source,
        CASE WHEN :source = 'learned' THEN clock_timestamp() END)
ON CONFLICT (bucket) DO UPDATE
   SET level = CASE WHEN b.limit_per_min IS NULL THEN EXCLUDED.level
                    ELSE least(EXCLUDED.capacity, {_AVAIL},
                               coalesce(:remaining, 'Infinity'::float8)) END,
       limit_per_min = EXCLUDED.limit_per_min, capacity = EXCLUDED.capacity,
       updated_at = {_NOW}, source = EXCLUDED.source,
       learned_at = coalesce(EXCLUDED.learned_at, b.learned_at)
"""
).bindparams(
    sa.bindparam("limit", type_=sa.Float()),
    sa.bindparam("capacity", type_=sa.Float()),
    sa.bindparam("remaining", type_=sa.Float()),
    sa.bindparam("source", type_=sa.Text()),
)

_CLAMP = sa.text(
    f"""
UPDATE rate_buckets b SET level = least({_AVAIL}, :level), updated_at = {_NOW}
 WHERE b.bucket = :name AND b.limit_per_min IS NOT NULL
"""
).bindparams(sa.bindparam("level", type_=sa.Float()))

_BLOCK = sa.text(
    f"""
UPDATE rate_buckets b
   SET blocked_until = greatest(coalesce(b.blocked_until, clock_timestamp()),
                                clock_timestamp() + make_interval(secs => :seconds)),
       level = CASE WHEN b.bucket = ANY(CAST(:drain AS text[])) THEN least({_AVAIL}, 0)
                    ELSE {_AVAIL} END,
       updated_at = {_NOW}
 WHERE b.bucket = ANY(CAST(:names AS text[])) AND b.limit_per_min IS NOT NULL
"""
).bindparams(sa.bindparam("seconds", type_=sa.Float()))

_UNBLOCK = sa.text(
    "UPDATE rate_buckets SET blocked_until = NULL"
    " WHERE bucket = ANY(CAST(:names AS text[])) AND blocked_until IS NOT NULL"
)

_READ = sa.text(
    """
SELECT b.bucket, b.limit_per_min, b.capacity, b.level, 0.0::float8 AS last_grant,
       greatest(0, extract(epoch FROM b.blocked_until - clock_timestamp()))::float8 AS blocked_s,
       b.source
  FROM rate_buckets b WHERE b.bucket = ANY(CAST(:names AS text[]))
"""
)


@dataclass(frozen=True)
class BucketState:
    """A bucket as a statement left it."""

    name: str
    limit_per_min: float | None
    """None: unlimited."""
    capacity: float
    level: float
    granted: float
    blocked_s: float
    """Seconds the bucket still grants nothing (a provider's retry-after)."""
    source: str | None = None

    @property
    def refill_per_s(self) -> float:
        return (self.limit_per_min or 0.0) / 60.0


def _state(row: sa.Row[object]) -> BucketState:
    m = row._mapping
    return BucketState(
        name=m["bucket"],
        limit_per_min=m["limit_per_min"],
        capacity=float(m["capacity"]),
        level=float(m["level"]),
        granted=float(m["last_grant"]),
        blocked_s=float(m["blocked_s"] or 0.0),
        source=m.get("source"),
    )


class BucketStore:
    """The `rate_buckets` rows: one statement per operation."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def take(self, wants: Sequence[tuple[str, float, float]]) -> dict[str, BucketState]:
        """For each (bucket, need, want): grant `need` to `want`, or nothing.

        Buckets without a row are absent from the result.
        """
        if not wants:
            return {}
        async with self.engine.connect() as conn:
            result = await conn.execute(
                _TAKE,
                {
                    "names": [w[0] for w in wants],
                    "needs": [float(w[1]) for w in wants],
                    "wants": [float(w[2]) for w in wants],
                },
            )
            return {s.name: s for s in map(_state, result)}

    async def give_back(self, amounts: Mapping[str, float]) -> None:
        """Return unused grants (negative amounts move a local debt to the bucket)."""
        if not amounts:
            return
        async with self.engine.connect() as conn:
            await conn.execute(
                _GIVE_BACK,
                {"names": list(amounts), "amounts": [float(a) for a in amounts.values()]},
            )

    async def define(
        self,
        name: str,
        limit_per_min: float | None,
        capacity: float,
        *,
        source: str,
        remaining: float | None = None,
    ) -> None:
        """Create or change a bucket. Its level never rises above what it was (nor
        `remaining`, what the provider says is left); a new bucket starts full."""
        async with self.engine.connect() as conn:
            await conn.execute(
                _DEFINE,
                {
                    "name": name,
                    "limit": limit_per_min,
                    "capacity": capacity,
                    "remaining": remaining,
                    "source": source,
                },
            )

    async def clamp(self, name: str, level: float) -> None:
        """Lower a bucket's level to `level` if it is above (the provider has less left)."""
        async with self.engine.connect() as conn:
            await conn.execute(_CLAMP, {"name": name, "level": level})

    async def block(self, names: Sequence[str], seconds: float, drain: Sequence[str]) -> None:
        """Grant nothing from `names` for `seconds`; empty the `drain` buckets."""
        async with self.engine.connect() as conn:
            await conn.execute(
                _BLOCK, {"names": list(names), "seconds": seconds, "drain": list(drain)}
            )

    async def unblock(self, names: Sequence[str]) -> None:
        """Lift a block early (the provider has said there is budget after all)."""
        async with self.engine.connect() as conn:
            await conn.execute(_UNBLOCK, {"names": list(names)})

    async def read(self, names: Sequence[str]) -> dict[str, BucketState]:
        async with self.engine.connect() as conn:
            result = await conn.execute(_READ, {"names": list(names)})
            return {s.name: s for s in map(_state, result)}


@dataclass
class Definition:
    """A bucket as this process wants it to exist."""

    limit_per_min: float | None
    capacity: float
    source: str


MIN_WAIT_S = 0.005
MAX_WAIT_S = 2.0
IDLE_RETURN_S = 1.0
"""What a process holds of a bucket it has not spent from for this long goes back."""


class LocalBudget:
    """This process's share of shared buckets: taken in batches, spent locally.

    `batch_s`: a take asks for what is needed plus this many seconds of the
    bucket's refill, so a busy process meets the database about 1/batch_s times a
    second per bucket, whatever its call rate.
    """

    def __init__(self, store: BucketStore, batch_s: float = 0.25) -> None:
        self.store = store
        self.batch_s = batch_s
        self.pool: dict[str, float] = {}
        self.definitions: dict[str, Definition] = {}
        self.states: dict[str, BucketState] = {}
        self._used_at: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def define(
        self,
        name: str,
        limit_per_min: float | None,
        capacity: float,
        *,
        source: str,
        remaining: float | None = None,
    ) -> None:
        """Create or change a bucket (see BucketStore.define) and remember its definition."""
        self.definitions[name] = Definition(limit_per_min, capacity, source)
        await self.store.define(name, limit_per_min, capacity, source=source, remaining=remaining)

    def limited(self, name: str) -> bool:
        definition = self.definitions.get(name)
        return definition is not None and definition.limit_per_min is not None

    def lock(self, key: str) -> asyncio.Lock:
        """A lock for callers that fill the same buckets, so that one goes to the database
        at a time and the others find its batch in the pool."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def has(self, needs: Mapping[str, float]) -> bool:
        """Whether the local pool covers `needs` (unlimited buckets always do)."""
        return all(
            self.pool.get(n, 0.0) >= amount for n, amount in needs.items() if self.limited(n)
        )

    def spend(self, needs: Mapping[str, float]) -> None:
        now = time.monotonic()
        for name, amount in needs.items():
            if self.limited(name):
                self.pool[name] = self.pool.get(name, 0.0) - amount
                self._used_at[name] = now

    def refund(self, name: str, amount: float) -> None:
        """Put back (or, negative, take more of) what a call turned out to use."""
        if self.limited(name) and amount:
            self.pool[name] = self.pool.get(name, 0.0) + amount
            self._used_at[name] = time.monotonic()

    def drop(self, names: Sequence[str]) -> None:
        """Forget what the pool holds of these buckets (a provider said it is not there)."""
        for name in names:
            if self.pool.get(name, 0.0) > 0:
                self.pool[name] = 0.0

    async def fill(self, needs: Mapping[str, float]) -> float:
        """Take what the pool lacks for `needs` from the buckets.

        Returns 0 when the pool now covers `needs`, else how long to wait before
        trying again (the refill time of the scarcest bucket, or its block).
        """
        wants: list[tuple[str, float, float]] = []
        for name, amount in needs.items():
            if not self.limited(name):
                continue
            lacking = amount - self.pool.get(name, 0.0)
            if lacking <= 0:
                continue
            refill = (self.definitions[name].limit_per_min or 0.0) / 60.0
            wants.append((name, lacking, max(lacking, refill * self.batch_s)))
        if not wants:
            return 0.0
        states = await self.store.take(wants)
        missing = [w[0] for w in wants if w[0] not in states]
        if missing:  # rows gone (e.g. a reset database): create them from our definitions
            for name in missing:
                d = self.definitions[name]
                await self.store.define(name, d.limit_per_min, d.capacity, source=d.source)
            states.update(await self.store.take([w for w in wants if w[0] in missing]))
        wait = 0.0
        for name, lacking, _ in wants:
            state = states.get(name)
            if state is None:
                wait = max(wait, MAX_WAIT_S)
                continue
            self.states[name] = state
            self.pool[name] = self.pool.get(name, 0.0) + state.granted
            self._used_at[name] = time.monotonic()
            if state.granted > 0 or state.limit_per_min is None:
                continue
            if state.blocked_s > 0:
                wait = max(wait, state.blocked_s)
                continue
            short = min(lacking, state.capacity) - state.level
            wait = max(wait, short / state.refill_per_s if state.refill_per_s > 0 else MAX_WAIT_S)
        if wait <= 0:
            return 0.0
        return min(max(wait, MIN_WAIT_S), MAX_WAIT_S)

    async def return_idle(self, idle_s: float = IDLE_RETURN_S) -> None:
        """Give back what the pool holds of buckets unused for `idle_s` (and hand over debts)."""
        now = time.monotonic()
        amounts = {
            name: amount
            for name, amount in self.pool.items()
            if amount and now - self._used_at.get(name, 0.0) >= idle_s
        }
        if not amounts:
            return
        for name in amounts:
            self.pool[name] = 0.0
        try:
            await self.store.give_back(amounts)
        except Exception as exc:  # lost budget refills by itself; nothing to repair
            log.warning("returning unused budget failed", extra={"error": repr(exc)})

    async def return_all(self) -> None:
        await self.return_idle(idle_s=-math.inf)
