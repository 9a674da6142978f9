"""How the job SQL is written and run: text statements with `:name` parameters, sent to
the driver with positional ones (the one query style of conveyor/db/jobs.py,
transitions.py and job_stats.py), and the pieces those statements share."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.lifecycle import Job
from conveyor.db.engine import fetch

Row = Mapping[str, Any]


def utcnow() -> datetime:
    return datetime.now(UTC)


_PARAM_CASTS: dict[str, str] = {
    "id": "uuid",
    "lease": "uuid",
    "now": "timestamptz",
    "run_at": "timestamptz",
    "tenant": "text",
    "status": "text",
    "dead_reason": "text",
    "previous": "text",
    "actor": "text",
    "cost": "int8",
}
"""Types of the parameters Postgres cannot infer where they stand (in CASE, IS NULL)."""

_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


@dataclass(frozen=True)
class Statement:
    """A statement written with `:name` parameters and sent to the driver with
    positional ones, as it is (conveyor.db.engine.fetch): SQLAlchemy's compilation
    and per-parameter processing of a text() statement cost about as much client
    CPU as Postgres spends running it, on the path of every job (claim, finish)."""

    sql: str
    names: tuple[str, ...]

    async def fetch(
        self, on: AsyncEngine | AsyncConnection, params: Mapping[str, Any]
    ) -> list[Row]:
        """The rows, run on a pooled connection of an engine or on a connection the
        caller holds."""
        args = [params[n] for n in self.names]
        if isinstance(on, AsyncEngine):
            return await fetch(on, self.sql, args)
        raw = await on.get_raw_connection()
        return [dict(r) for r in await raw.driver_connection.fetch(self.sql, *args)]  # type: ignore[union-attr]

    async def jobs(self, on: AsyncEngine | AsyncConnection, params: Mapping[str, Any]) -> list[Job]:
        return [Job.from_row(r) for r in await self.fetch(on, params)]

    async def job(self, on: AsyncEngine | AsyncConnection, params: Mapping[str, Any]) -> Job | None:
        """The first row as a job, if any."""
        rows = await self.fetch(on, params)
        return Job.from_row(rows[0]) if rows else None


def sql(statement: str) -> Statement:
    """`statement` with its `:name` parameters numbered ($1, $2 …, a name reused keeps
    its number) and cast where _PARAM_CASTS says."""
    names: list[str] = []

    def positional(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        cast = _PARAM_CASTS.get(name)
        return f"${names.index(name) + 1}" + (f"::{cast}" if cast else "")

    return Statement(_PARAMETER.sub(positional, statement), tuple(names))


def as_json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else orjson.dumps(dict(value)).decode()


def states(values: Sequence[Any]) -> list[str]:
    """States as the text array a statement binds (`status = ANY(:from_states)`)."""
    return [str(v) for v in values]
