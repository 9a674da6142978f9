"""The counters the `jobs_tally_*` triggers keep (migration 0010): `job_counts`, which
GetStats reads, and `tenants.running`, which a claim checks against `max_running`.

Each statement that inserts, updates or deletes jobs moves them, however many jobs
and tenants it covers: one INSERT of many jobs, one UPDATE moving jobs of several
tenants from several statuses, one DELETE. The counts must equal what the jobs table
says after every statement; token totals count each job once per finish.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.db.job_stats import stats
from conveyor.db.tenants import set_tenant_limits

pytestmark = pytest.mark.integration


def _tenant(name: str) -> str:
    return f"counts-{name}-{uuid.uuid4().hex[:8]}"


async def _execute(db: AsyncEngine, sql: str, **params: Any) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.text(sql), params)


async def _insert(db: AsyncEngine, tenant: str, lane: str, status: str, n: int) -> None:
    """`n` jobs of `tenant` in `lane` and `status`, in one INSERT."""
    await _execute(
        db,
        """
INSERT INTO jobs (id, tenant, status, lane, model, request, request_hash, max_attempts,
                  timeout_ms, published_at, created_at, updated_at)
SELECT gen_random_uuid(), :tenant, :status, :lane, 'claude-sonnet-4-5', '{}', 'h', 3, 60000,
       now(), now(), now()
  FROM generate_series(1, :n)
""",
        tenant=tenant,
        lane=lane,
        status=status,
        n=n,
    )


async def _counted(db: AsyncEngine, tenants: list[str]) -> dict[tuple[str, str, str], int]:
    """What job_counts says: jobs per (tenant, lane, status), zero counts left out."""
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT tenant, lane, status, sum(jobs) AS n FROM job_counts"
                " WHERE tenant = ANY(:t) GROUP BY 1, 2, 3 HAVING sum(jobs) <> 0"
            ),
            {"t": tenants},
        )
        return {(r.tenant, r.lane, r.status): int(r.n) for r in rows}


async def _actual(db: AsyncEngine, tenants: list[str]) -> dict[tuple[str, str, str], int]:
    """What the jobs table says."""
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT tenant, lane, status, count(*) AS n FROM jobs"
                " WHERE tenant = ANY(:t) GROUP BY 1, 2, 3"
            ),
            {"t": tenants},
        )
        return {(r.tenant, r.lane, r.status): int(r.n) for r in rows}


async def _running(db: AsyncEngine, tenant: str) -> tuple[int, int]:
    """The tenant's kept running count and its running jobs."""
    async with db.connect() as conn:
        kept = (
            await conn.execute(
                sa.text("SELECT running FROM tenants WHERE tenant = :t"), {"t": tenant}
            )
        ).scalar_one()
        actual = (
            await conn.execute(
                sa.text("SELECT count(*) FROM jobs WHERE tenant = :t AND status = 'running'"),
                {"t": tenant},
            )
        ).scalar_one()
        return int(kept), int(actual)


async def test_one_statement_moving_jobs_of_several_tenants_and_statuses_is_counted_exactly(
    db: AsyncEngine,
) -> None:
    a, b = _tenant("a"), _tenant("b")
    for tenant in (a, b):
        await _insert(db, tenant, "default", "pending", 6)
        await _insert(db, tenant, "batch", "scheduled", 4)
    assert await _counted(db, [a, b]) == await _actual(db, [a, b])

    # One UPDATE: pending -> running and scheduled -> pending, in both tenants and lanes.
    await _execute(
        db,
        """
UPDATE jobs SET status = CASE status WHEN 'pending' THEN 'running' ELSE 'pending' END
 WHERE tenant IN (:a, :b)
   AND id IN ((SELECT id FROM jobs WHERE tenant IN (:a, :b) AND status = 'pending' LIMIT 7)
              UNION ALL
              (SELECT id FROM jobs WHERE tenant IN (:a, :b) AND status = 'scheduled' LIMIT 5))
""",
        a=a,
        b=b,
    )
    # Another: every running job finishes, some succeeded, some failed.
    await _execute(
        db,
        """
UPDATE jobs SET status = CASE WHEN tenant = :a THEN 'succeeded' ELSE 'failed' END,
                finished_at = now()
 WHERE tenant IN (:a, :b) AND status = 'running'
""",
        a=a,
        b=b,
    )
    counted = await _counted(db, [a, b])
    assert counted == await _actual(db, [a, b])
    assert sum(counted.values()) == 20


async def test_tokens_are_counted_once_per_finish_and_kept_when_jobs_are_deleted(
    db: AsyncEngine,
) -> None:
    tenant = _tenant("tokens")
    await _insert(db, tenant, "default", "running", 5)
    await _execute(
        db,
        """
UPDATE jobs SET status = 'succeeded', finished_at = now(), input_tokens = 10,
                output_tokens = 4, cache_creation_input_tokens = 2, cache_read_input_tokens = 1
 WHERE tenant = :t
""",
        t=tenant,
    )
    # An UPDATE that leaves status alone (like a heartbeat or an outbox stamp) counts nothing.
    await _execute(db, "UPDATE jobs SET updated_at = now() WHERE tenant = :t", t=tenant)
    async with db.connect() as conn:
        before = await stats(conn, tenant)
    assert before.counts == {("default", "succeeded"): 5}
    assert before.tokens == {
        "input_tokens": 50,
        "output_tokens": 20,
        "cache_creation_input_tokens": 10,
        "cache_read_input_tokens": 5,
    }

    await _execute(db, "DELETE FROM jobs WHERE tenant = :t", t=tenant)
    async with db.connect() as conn:
        after = await stats(conn, tenant)
    assert after.counts == {}
    assert after.tokens == before.tokens


async def test_a_limited_tenants_running_count_follows_grouped_statements(
    db: AsyncEngine,
) -> None:
    limited, other, unlimited = _tenant("limited"), _tenant("other"), _tenant("unlimited")
    await set_tenant_limits(db, limited, max_running=100)
    await set_tenant_limits(db, other, max_running=100)
    await set_tenant_limits(db, unlimited, max_running=None)
    tenants = [limited, other, unlimited]
    for tenant in tenants:
        await _insert(db, tenant, "default", "pending", 8)
    # Inserted running: counted at once.
    await _insert(db, limited, "default", "running", 2)
    assert await _running(db, limited) == (2, 2)

    # One claim-like UPDATE of three tenants.
    await _execute(
        db,
        "UPDATE jobs SET status = 'running' WHERE id IN"
        " (SELECT id FROM jobs WHERE tenant = ANY(:t) AND status = 'pending' LIMIT 17)",
        t=tenants,
    )
    # One statement where some jobs leave running and others enter it.
    await _execute(
        db,
        """
UPDATE jobs SET status = CASE status WHEN 'running' THEN 'succeeded' ELSE 'running' END,
                finished_at = CASE status WHEN 'running' THEN now() END
 WHERE id IN ((SELECT id FROM jobs WHERE tenant = ANY(:t) AND status = 'running' LIMIT 5)
              UNION ALL
              (SELECT id FROM jobs WHERE tenant = ANY(:t) AND status = 'pending' LIMIT 3))
""",
        t=tenants,
    )
    for tenant in (limited, other):
        kept, actual = await _running(db, tenant)
        assert kept == actual
    # A tenant without a limit is not counted.
    assert (await _running(db, unlimited))[0] == 0

    await _execute(db, "DELETE FROM jobs WHERE tenant = ANY(:t) AND status = 'running'", t=tenants)
    assert await _running(db, limited) == (0, 0)
    assert await _running(db, other) == (0, 0)
    assert await _counted(db, tenants) == await _actual(db, tenants)
