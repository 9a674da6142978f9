"""Every database statement is bounded: the server cancels one that runs too long
(statement_timeout) or waits too long for a lock (lock_timeout), and the client gives
up on a server that does not answer at all (command timeout). Each failure is one a
caller may retry (`is_transient`), and the engine works again afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.config import Settings
from conveyor.db.engine import Timeouts, create_engine, fetch, is_transient
from tests.faults import FaultProxy
from tests.stack import Backing

pytestmark = pytest.mark.integration

SHORT = Timeouts(statement_s=0.3, lock_s=0.3, command_s=1.0)


@pytest.fixture
async def engine(backing: Backing) -> AsyncIterator[AsyncEngine]:
    e = create_engine(backing.database_url, pool_size=1, timeouts=SHORT)
    yield e
    await e.dispose()


async def _still_works(engine: AsyncEngine) -> None:
    assert (await fetch(engine, "SELECT 1 AS one", []))[0]["one"] == 1


async def test_a_statement_running_past_the_statement_timeout_is_cancelled(
    engine: AsyncEngine,
) -> None:
    with pytest.raises(asyncpg.QueryCanceledError) as caught:
        await fetch(engine, "SELECT pg_sleep(5)", [])
    assert is_transient(caught.value)
    await _still_works(engine)


async def test_a_statement_waiting_past_the_lock_timeout_is_cancelled_and_writes_nothing(
    backing: Backing,
) -> None:
    engine = create_engine(
        backing.database_url, pool_size=1, timeouts=Timeouts(statement_s=10, lock_s=0.3)
    )
    tenant = f"locked-{uuid.uuid4().hex[:8]}"
    holder = await asyncpg.connect(backing.database_url)
    try:
        await holder.execute("INSERT INTO tenants (tenant) VALUES ($1)", tenant)
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM tenants WHERE tenant = $1 FOR UPDATE", tenant)
            with pytest.raises(asyncpg.LockNotAvailableError) as caught:
                await fetch(
                    engine, "UPDATE tenants SET max_running = 1 WHERE tenant = $1", [tenant]
                )
            assert is_transient(caught.value)
        limit = await holder.fetchval("SELECT max_running FROM tenants WHERE tenant = $1", tenant)
        assert limit is None, "the cancelled UPDATE wrote nothing"
    finally:
        await holder.execute("DELETE FROM tenants WHERE tenant = $1", tenant)
        await holder.close()
    try:
        await _still_works(engine)
    finally:
        await engine.dispose()


async def test_a_server_that_stops_answering_fails_the_statement_after_the_command_timeout(
    backing: Backing,
) -> None:
    url = make_url(backing.database_url)
    with FaultProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        engine = create_engine(proxy.url(backing.database_url), pool_size=1, timeouts=SHORT)
        try:
            await _still_works(engine)
            proxy.stall()
            with pytest.raises(Exception) as caught:
                await fetch(engine, "SELECT 1 AS one", [])
            assert is_transient(caught.value)
            proxy.restore()
            await _still_works(engine)
        finally:
            proxy.restore()
            await engine.dispose()


async def test_engines_take_their_timeouts_from_the_settings(
    backing: Backing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_DB_STATEMENT_TIMEOUT_S", "12")
    monkeypatch.setenv("CONVEYOR_DB_LOCK_TIMEOUT_S", "3")
    monkeypatch.setattr("conveyor.core.config.get_settings", lambda: Settings())
    engine = create_engine(backing.database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            statement = (await conn.execute(sa.text("SHOW statement_timeout"))).scalar_one()
            lock = (await conn.execute(sa.text("SHOW lock_timeout"))).scalar_one()
        assert (statement, lock) == ("12s", "3s")
    finally:
        await engine.dispose()


def test_the_default_timeouts_bound_every_statement() -> None:
    settings = Settings()
    assert settings.db_statement_timeout_s > 0 and settings.db_lock_timeout_s > 0
    assert settings.db_command_timeout_s > settings.db_statement_timeout_s, (
        "the server cancels a slow statement before the client drops its connection"
    )
