"""The async SQLAlchemy engine (asyncpg driver), which database errors are worth a retry
and the one retry loop for them (`retry_transient`), database creation and migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from alembic import command
from alembic.config import Config
from asyncpg.exceptions._base import DataError as _ClientDataError
from opentelemetry.trace import SpanKind
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError as SADataError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from conveyor.core.telemetry import exporting, tracer

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
T = TypeVar("T")
W = TypeVar("W")

log = logging.getLogger(__name__)


def asyncpg_url(url: str) -> str:
    """The SQLAlchemy URL for `url`, with the asyncpg driver whatever was given."""
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


_DRIVER_DISCONNECTS = (
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)

DATABASE_ERRORS = (
    DBAPIError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
"""What a statement raises when the database fails it, through SQLAlchemy or not."""


def is_data_error(exc: BaseException) -> bool:
    """Whether a database error is about a value the statement carried (SQLSTATE class 22:
    a NUL or untranslatable character, a number or time out of range, ...), or one
    the driver could not encode: the statement would fail again, and a statement
    without that value would not. SQLAlchemy's wrapper is looked through."""
    seen: BaseException | None = exc
    for _ in range(4):  # the error, SQLAlchemy's `orig`, its adapter's cause
        if seen is None:
            return False
        if isinstance(seen, (asyncpg.exceptions.DataError, _ClientDataError, SADataError)):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


async def write_by_halves(
    batch: Sequence[W],
    write: Callable[[Sequence[W]], Awaitable[None]],
    fail: Callable[[Sequence[W], BaseException], None],
    name: str,
) -> None:
    """`write` a group of items that share one statement (it answers them), so that one
    item's bad value fails that item alone: the statement then wrote nothing
    (`is_data_error`), so the group is split in halves and each half written again,
    until the item holding the value fails by itself. Any other error is `fail`ed to
    every item of the group, and raised again unless it is an Exception (cancelled)."""
    try:
        await write(batch)
    except BaseException as exc:
        if len(batch) > 1 and is_data_error(exc):
            log.info(
                "a grouped write refused a value; splitting it",
                extra={"writes": name, "items": len(batch)},
            )
            half = len(batch) // 2
            try:
                await write_by_halves(batch[:half], write, fail, name)
                await write_by_halves(batch[half:], write, fail, name)
            finally:  # cancelled meanwhile: no item is left without an answer
                fail(batch, asyncio.CancelledError())
            return
        fail(batch, exc)
        if not isinstance(exc, Exception):
            raise


_SERVER_TIMEOUTS = (
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout (or a cancel request)
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
)


def is_timeout(exc: BaseException) -> bool:
    """Whether a statement ran out of time: the server cancelled it (statement or lock
    timeout) or the client stopped waiting (command timeout). Nothing was written by
    a cancelled statement; it may succeed when tried again. SQLAlchemy's wrapper is
    looked through."""
    seen: BaseException | None = exc
    for _ in range(4):  # the error, SQLAlchemy's `orig`, its adapter's cause
        if seen is None:
            return False
        if isinstance(seen, (TimeoutError, *_SERVER_TIMEOUTS)):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


def is_conflict(exc: BaseException) -> bool:
    """Whether Postgres rolled a statement back for a conflict with another transaction
    (SQLSTATE class 40: a deadlock, a serialization failure): it wrote nothing and may
    succeed when tried again. Statements that change many rows at once (the worker's
    grouped claims and outcomes) can meet in opposite orders on shared rows. SQLAlchemy's
    wrapper is looked through."""
    seen: BaseException | None = exc
    for _ in range(4):  # the error, SQLAlchemy's `orig`, its adapter's cause
        if seen is None:
            return False
        if isinstance(seen, asyncpg.exceptions.TransactionRollbackError):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is worth trying again later: a lost connection, a
    statement that ran out of time or one rolled back for a conflict."""
    return is_disconnect(exc) or is_timeout(exc) or is_conflict(exc)


async def retry_transient(
    op: Callable[[], Awaitable[T]],
    *,
    message: str = "database unavailable; retrying",
    first_s: float = 0.1,
    max_s: float = 5.0,
    stopping: Callable[[], bool] | None = None,
) -> T:
    """Run `op`, trying again while the database is unreachable or its statements time
    out (`is_transient`); any other error is raised.

    Each failure is logged as `message`; the pause between tries doubles from `first_s`
    up to `max_s`. Once `stopping()` is true a failure raises ConnectionError instead:
    a process going away does not wait for the database to come back.
    """
    delay = first_s
    while True:
        try:
            return await op()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning(message, extra={"error": repr(exc)})
        if stopping is not None and stopping():
            raise ConnectionError("database unavailable while stopping")
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_s)


def is_disconnect(exc: BaseException) -> bool:
    """Whether a database error means the connection (or the server) went away, so
    that the connection is unusable and the statement worth running on another."""
    if is_data_error(exc):  # a refused value (its message may say "closed")
        return False
    # InternalClientError: a server closing a connection sends its error first and
    # closes the socket after; a statement started between the two finds the
    # connection's protocol still busy with that error ("another operation is in
    # progress"), a connection that can never be used again.
    if isinstance(exc, (OSError, asyncpg.InternalClientError, *_DRIVER_DISCONNECTS)):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return "closed" in str(exc).lower()
    return isinstance(exc, DBAPIError) and bool(
        exc.connection_invalidated or "connect" in str(exc).lower()
    )


@contextlib.asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """One of the pool's connections, as the asyncpg connection itself.

    A connection found dead is dropped with the rest of the pool (they all went to
    the same server), as SQLAlchemy does when it sees a disconnect itself.

    Returning and invalidating run in a greenlet, as AsyncConnection.close does:
    either may close the connection (one beyond the pool's size is closed when
    returned), which SQLAlchemy's asyncpg adapter can only await from there.
    """
    try:
        raw = await engine.raw_connection()
    except engine.dialect.loaded_dbapi.Error as exc:  # SQLAlchemy's wrapper of asyncpg's error
        raise ConnectionError(f"cannot connect to Postgres: {exc}") from exc
    try:
        yield raw.driver_connection
    except BaseException as exc:
        if is_disconnect(exc):
            await greenlet_spawn(raw.invalidate, exc)
            await engine.dispose(close=False)
        raise
    finally:
        await greenlet_spawn(raw.close)


async def fetch(engine: AsyncEngine, sql: str, args: Sequence[Any]) -> list[Mapping[str, Any]]:
    """Run one statement with positional parameters ($1 …); its rows.

    For the statements on every job's path (insert, claim, finish): SQLAlchemy's
    Connection around a statement costs noticeably more CPU than asyncpg's own
    work, more still in a process that had been idle. SQLAlchemy's
    instrumentation does not see these statements, so when spans are exported each
    gets a CLIENT span here, with the attributes that instrumentation gives its own
    (opentelemetry-instrumentation-asyncpg would pin older OpenTelemetry packages
    than the gRPC instrumentation needs).
    """
    with _statement_span(engine, sql):
        async with driver_connection(engine) as conn:
            return [dict(r) for r in await conn.fetch(sql, *args)]


def _statement_span(engine: AsyncEngine, sql: str) -> contextlib.AbstractContextManager[Any]:
    if not exporting():
        return contextlib.nullcontext()
    database = engine.url.database or ""
    return tracer().start_as_current_span(
        f"{sql.split(None, 1)[0].upper()} {database}",
        kind=SpanKind.CLIENT,
        attributes={
            "db.system.name": "postgresql",
            "db.namespace": database,
            "db.query.text": sql,
            "server.address": engine.url.host or "",
            "server.port": engine.url.port or 5432,
        },
    )


async def once_more_on_disconnect(op: Callable[[], Awaitable[T]]) -> T:
    """Run `op`; if its connection was dead, run it once more on a fresh one.

    Without pre-ping, the first use of a pool after a Postgres restart fails;
    SQLAlchemy (or `driver_connection`) then discards the pool's stale connections,
    so one retry suffices.
    """
    try:
        return await op()
    except Exception as exc:
        if not is_disconnect(exc):
            raise
        return await op()


@dataclass(frozen=True)
class Timeouts:
    """Limits on every statement of an engine (seconds; 0 for no limit on the server's)."""

    statement_s: float = 30.0
    """Server side (statement_timeout): a statement running longer is cancelled."""
    lock_s: float = 10.0
    """Server side (lock_timeout): a statement waiting longer for a lock is cancelled."""
    command_s: float = 60.0
    """Client side (asyncpg's connect timeout and command_timeout): a server that does
    not answer at all (hung, or a network that drops packets)."""

    @classmethod
    def from_settings(cls) -> Timeouts:
        from conveyor.core.config import get_settings

        s = get_settings()
        return cls(s.db_statement_timeout_s, s.db_lock_timeout_s, s.db_command_timeout_s)

    def connect_args(self) -> dict[str, Any]:
        return {
            "timeout": self.command_s,
            "command_timeout": self.command_s,
            "server_settings": {
                "statement_timeout": str(round(self.statement_s * 1000)),
                "lock_timeout": str(round(self.lock_s * 1000)),
            },
        }


def create_engine(
    url: str, pool_size: int = 10, pre_ping: bool = False, timeouts: Timeouts | None = None
) -> AsyncEngine:
    """An engine whose pool recovers from a Postgres restart, traced when exporting.

    It runs in autocommit: every write Conveyor makes is one statement (a transition
    and its history row travel in one CTE), atomic by itself, so BEGIN and COMMIT
    would only add round trips. Services leave `pre_ping` off (it costs a round trip
    per checkout) and retry a disconnect instead; tools that cannot retry turn it on.
    Every statement is bounded by `timeouts` (by default the CONVEYOR_DB_*_TIMEOUT_S
    settings): a hung database fails a call instead of holding it for ever. The pool
    opens up to twice `pool_size` connections, as many as it did with overflow, and
    keeps them all.
    """
    timeouts = timeouts or Timeouts.from_settings()
    engine = create_async_engine(
        asyncpg_url(url),
        # Every connection opened is kept: one lent beyond the pool's size (an overflow)
        # would be closed on its return, and a busy process would open and close
        # connections (a Postgres backend forked each) all the time.
        pool_size=2 * pool_size,
        max_overflow=0,
        # Without pre-ping a connection found dead raises a disconnect error; SQLAlchemy
        # then refreshes the pool and callers retry (see once_more_on_disconnect).
        pool_pre_ping=pre_ping,
        isolation_level="AUTOCOMMIT",
        pool_recycle=1800,
        connect_args=timeouts.connect_args(),
    )
    if exporting():
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        SQLAlchemyInstrumentor().instrument(
            engine=engine.sync_engine, enable_commenter=False, skip_dep_check=True
        )
    return engine


async def ensure_database(url: str) -> bool:
    """Create the database named in `url` if it does not exist; True if created."""
    parsed = make_url(url)
    name = parsed.database
    if not name:
        raise ValueError("database URL names no database")
    admin = await asyncpg.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password,
        database="postgres",
    )
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        await admin.execute(f'CREATE DATABASE "{name}"')
        return True
    finally:
        await admin.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", asyncpg_url(url).replace("%", "%%"))
    return cfg


async def migrate(url: str, revision: str = "head") -> None:
    """Create the database if needed and apply the Alembic migrations up to `revision`."""
    await ensure_database(url)
    # Alembic's async env runs its own event loop, so it gets a thread of its own.
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)
