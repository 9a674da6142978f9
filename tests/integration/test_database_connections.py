"""The connection pool under a server that closes its connections (a Postgres restart,
an administrator's pg_terminate_backend): a statement finding its connection dead
runs once more on a fresh one, whenever in the closing it started."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.db.engine import create_engine, driver_connection, fetch, once_more_on_disconnect
from tests.conftest import logged_errors
from tests.stack import Backing

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(backing: Backing) -> AsyncIterator[AsyncEngine]:
    """A one-connection pool without pre-ping, as the services run theirs."""
    e = create_engine(backing.database_url, pool_size=1)
    yield e
    await e.dispose()


def _terminate_and_wait(url: str, pid: int) -> None:
    """Have the server close backend `pid`, and return once it has, blocking the calling
    event loop meanwhile: the closing (the server's error, then the end of the socket)
    then waits, unread, for that loop's next turns."""

    async def terminate() -> None:
        admin = await asyncpg.connect(url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)
        finally:
            await admin.close()

    thread = threading.Thread(target=asyncio.run, args=(terminate(),))
    thread.start()
    thread.join()
    time.sleep(0.05)  # the backend has exited; let its last bytes reach our socket


async def _pid_by_driver(engine: AsyncEngine) -> int:
    rows = await fetch(engine, "SELECT pg_backend_pid() AS pid", [])
    return int(rows[0]["pid"])


async def _pid_by_sqlalchemy(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


@pytest.mark.parametrize("turns", range(5))
@pytest.mark.parametrize("pid", [_pid_by_driver, _pid_by_sqlalchemy], ids=["driver", "sqlalchemy"])
async def test_a_statement_on_a_connection_the_server_closed_runs_on_a_fresh_one(
    engine: AsyncEngine,
    backing: Backing,
    turns: int,
    pid: Callable[[AsyncEngine], Awaitable[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with driver_connection(engine) as conn:
        closed_pid = await conn.fetchval("SELECT pg_backend_pid()")
    _terminate_and_wait(backing.database_url, closed_pid)
    # Depending on how many turns the loop takes first, the statement finds the
    # connection with the server's error half-read, fully read, or closed.
    for _ in range(turns):
        await asyncio.sleep(0)

    fresh_pid = await once_more_on_disconnect(lambda: pid(engine))

    assert fresh_pid != closed_pid
    assert await pid(engine) == fresh_pid, "the pool goes on with the fresh connection"
    assert logged_errors(caplog) == [], "the dead connection was closed and dropped quietly"


async def test_connections_opened_under_load_are_kept_and_bounded(
    engine: AsyncEngine, backing: Backing, caplog: pytest.LogCaptureFixture
) -> None:
    # A pool of size 1 opens up to two connections under load and keeps both: closing one
    # on its return would have a busy process fork a Postgres backend per burst.
    rows = await asyncio.gather(
        *(fetch(engine, "SELECT pg_backend_pid() AS pid, pg_sleep(0.2)", []) for _ in range(3))
    )
    pids = {r[0]["pid"] for r in rows}
    assert len(pids) == 2, "the third statement waited for one of the two connections"

    admin = await asyncpg.connect(backing.database_url)
    try:
        open_backends = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
        )
    finally:
        await admin.close()
    assert open_backends == 2, "both connections were kept for the next statements"
    assert logged_errors(caplog) == []
