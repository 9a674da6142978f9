"""Tenants, their API keys and their limits, as stored in Postgres.

Used by the services (key lookup, the tenant registry, limits) and by the
operator commands `conveyor keys ...` and `conveyor tenants ...`, which work on
the database directly.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.core.lifecycle import JobState
from conveyor.db.schema import api_keys, jobs, tenants, webhook_secrets

Row = Mapping[str, Any]


@dataclass(frozen=True)
class KeyOwner:
    """What a valid API key resolves to."""

    key_id: uuid.UUID
    tenant: str
    name: str
    role: str


STAMP_EVERY = "1 minute"
"""A key's last_used_at is stamped at most this often (a write per call would not do)."""


async def resolve_key(engine: AsyncEngine, key_hash: str) -> KeyOwner | None:
    """The owner of an unrevoked key with this hash, or None.

    An unknown key is a read only, so a flood of them writes nothing; a valid key's
    `last_used_at` is stamped when it is more than STAMP_EVERY old.
    """
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(
                    api_keys.c.id,
                    api_keys.c.tenant,
                    api_keys.c.name,
                    api_keys.c.role,
                    api_keys.c.last_used_at,
                    (
                        api_keys.c.last_used_at.is_(None)
                        | (
                            api_keys.c.last_used_at
                            < sa.func.now() - sa.text(f"interval '{STAMP_EVERY}'")
                        )
                    ).label("stale"),
                ).where(api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None))
            )
        ).first()
        if row is None:
            return None
        if row.stale:
            await conn.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == row.id)
                .values(last_used_at=sa.func.now())
            )
    return KeyOwner(key_id=row.id, tenant=row.tenant, name=row.name, role=row.role)


async def ensure_tenant(conn: AsyncConnection, tenant: str) -> None:
    """Register a tenant (idempotent)."""
    await conn.execute(
        insert(tenants).values(tenant=tenant).on_conflict_do_nothing(index_elements=["tenant"])
    )


async def tenant_names(conn: AsyncConnection) -> list[str]:
    """Every registered tenant."""
    return list(
        (await conn.execute(sa.select(tenants.c.tenant).order_by(tenants.c.tenant))).scalars()
    )


async def get_tenant(conn: AsyncConnection, tenant: str) -> Row | None:
    row = (
        (await conn.execute(sa.select(tenants).where(tenants.c.tenant == tenant)))
        .mappings()
        .first()
    )
    return dict(row) if row else None


async def list_tenants(conn: AsyncConnection) -> list[Row]:
    result = await conn.execute(sa.select(tenants).order_by(tenants.c.tenant))
    return [dict(r) for r in result.mappings()]


UNCHANGED: Any = object()
"""A limit argument that leaves the stored value as it is."""


async def set_tenant_limits(
    engine: AsyncEngine,
    tenant: str,
    *,
    submit_per_minute: int | None = UNCHANGED,
    max_running: int | None = UNCHANGED,
    daily_budget_micros: int | None = UNCHANGED,
    monthly_budget_micros: int | None = UNCHANGED,
) -> Row:
    """Set a tenant's limits (None removes one), registering the tenant if needed.

    Setting a budget recounts the ledger of the current UTC day and month
    (`tenant_spend`) from the jobs submitted in them: the cost of finished ones and
    the reservation of the others (services.gateway.budgets).

    Setting a concurrency limit recounts the tenant's running jobs under the
    tenant row's lock: a transition that commits meanwhile waits for the lock
    (its trigger updates that row) and then counts on top of the recount.
    """
    # A transaction of its own: the engine otherwise runs in autocommit.
    async with engine.execution_options(isolation_level="READ COMMITTED").begin() as conn:
        await ensure_tenant(conn, tenant)
        await conn.execute(
            sa.select(tenants.c.tenant).where(tenants.c.tenant == tenant).with_for_update()
        )
        values: dict[str, Any] = {}
        if submit_per_minute is not UNCHANGED:
            values["submit_per_minute"] = submit_per_minute
        if max_running is not UNCHANGED:
            values["max_running"] = max_running
            running = (
                await conn.execute(
                    sa.select(sa.func.count()).where(
                        jobs.c.tenant == tenant, jobs.c.status == JobState.RUNNING.value
                    )
                )
            ).scalar_one()
            values["running"] = int(running)
        budgets = {"daily_budget_micros": daily_budget_micros}
        budgets["monthly_budget_micros"] = monthly_budget_micros
        budgets = {k: v for k, v in budgets.items() if v is not UNCHANGED}
        values.update(budgets)
        if values:
            await conn.execute(
                sa.update(tenants).where(tenants.c.tenant == tenant).values(**values)
            )
        if budgets:
            await conn.execute(sa.text(_RECOUNT_SPEND), {"t": tenant})
        row = (
            (await conn.execute(sa.select(tenants).where(tenants.c.tenant == tenant)))
            .mappings()
            .one()
        )
        return dict(row)


_RECOUNT_SPEND = """
WITH period AS (
  SELECT (now() AT TIME ZONE 'UTC')::date AS day,
         date_trunc('month', now() AT TIME ZONE 'UTC')::date AS month
), spent AS (
  SELECT coalesce(sum(coalesce(j.budget_micros, j.cost_micros, 0))
                  FILTER (WHERE (j.created_at AT TIME ZONE 'UTC')::date = period.day), 0) AS day,
         coalesce(sum(coalesce(j.budget_micros, j.cost_micros, 0)), 0) AS month
    FROM period LEFT JOIN jobs j
      ON j.tenant = :t AND j.created_at >= period.month AT TIME ZONE 'UTC'
)
INSERT INTO tenant_spend (tenant, day, day_micros, month, month_micros)
SELECT :t, period.day, spent.day, period.month, spent.month FROM period, spent
ON CONFLICT (tenant) DO UPDATE
   SET day = EXCLUDED.day, day_micros = EXCLUDED.day_micros,
       month = EXCLUDED.month, month_micros = EXCLUDED.month_micros
"""
"""A tenant's spend in the current UTC day and month, from its jobs: what the ledger
counts for a budgeted job, else the job's cost."""


async def create_key(
    conn: AsyncConnection, *, tenant: str, name: str, role: str, key_hash: str, prefix: str
) -> Row:
    """Store a new key (its hash only) and register its tenant."""
    await ensure_tenant(conn, tenant)
    row = (
        (
            await conn.execute(
                sa.insert(api_keys)
                .values(
                    id=uuid.uuid4(),
                    tenant=tenant,
                    name=name,
                    role=role,
                    key_hash=key_hash,
                    prefix=prefix,
                )
                .returning(*api_keys.c)
            )
        )
        .mappings()
        .one()
    )
    return dict(row)


async def list_keys(
    conn: AsyncConnection, tenant: str | None = None, *, include_revoked: bool = False
) -> list[Row]:
    """Keys (never their hashes), oldest first."""
    columns = [c for c in api_keys.c if c.name != "key_hash"]
    stmt = sa.select(*columns).order_by(api_keys.c.created_at, api_keys.c.id)
    if tenant is not None:
        stmt = stmt.where(api_keys.c.tenant == tenant)
    if not include_revoked:
        stmt = stmt.where(api_keys.c.revoked_at.is_(None))
    return [dict(r) for r in (await conn.execute(stmt)).mappings()]


async def find_keys(conn: AsyncConnection, key_id: str) -> list[Row]:
    """Keys whose id is `key_id` or starts with it (the 8-character short id)."""
    text = key_id.strip().lower()
    stmt = sa.select(api_keys.c.id, api_keys.c.tenant, api_keys.c.name, api_keys.c.revoked_at)
    stmt = stmt.where(sa.cast(api_keys.c.id, sa.Text).startswith(text, autoescape=True))
    return [dict(r) for r in (await conn.execute(stmt)).mappings()]


async def revoke_key(conn: AsyncConnection, key_id: uuid.UUID) -> Row | None:
    """Revoke a key (idempotent); None if there is no such key."""
    row = (
        (
            await conn.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == key_id)
                .values(revoked_at=sa.func.coalesce(api_keys.c.revoked_at, sa.func.now()))
                .returning(api_keys.c.id, api_keys.c.tenant, api_keys.c.name, api_keys.c.revoked_at)
            )
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


async def revoke_named(conn: AsyncConnection, tenant: str, name: str) -> Sequence[uuid.UUID]:
    """Revoke the live key of a tenant with this name, if any; the ids revoked."""
    result = await conn.execute(
        sa.update(api_keys)
        .where(
            api_keys.c.tenant == tenant, api_keys.c.name == name, api_keys.c.revoked_at.is_(None)
        )
        .values(revoked_at=sa.func.now())
        .returning(api_keys.c.id)
    )
    return list(result.scalars())


async def rotate_webhook_secret(
    engine: AsyncEngine,
    tenant: str,
    seal: Callable[[uuid.UUID], bytes],
    overlap_s: float,
) -> tuple[Row, int]:
    """Make `seal(id)` (the new secret, sealed for its id) the tenant's current webhook
    secret; the previous one keeps signing for `overlap_s` more seconds (0: stops now).
    Secrets already expired are deleted. Returns the new row (without the secret) and
    how many older secrets still sign."""
    async with engine.execution_options(isolation_level="READ COMMITTED").begin() as conn:
        await ensure_tenant(conn, tenant)
        # Serialises rotations of one tenant (the unique index allows one current secret).
        await conn.execute(
            sa.select(tenants.c.tenant).where(tenants.c.tenant == tenant).with_for_update()
        )
        ws = webhook_secrets
        # Every older secret signs until the end of the overlap at most (0: none does).
        until = sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, float(overlap_s))
        await conn.execute(
            sa.update(ws)
            .where(
                ws.c.tenant == tenant, sa.or_(ws.c.expires_at.is_(None), ws.c.expires_at > until)
            )
            .values(expires_at=until)
        )
        await conn.execute(
            sa.delete(ws).where(ws.c.tenant == tenant, ws.c.expires_at <= sa.func.now())
        )
        secret_id = uuid.uuid4()
        row = (
            (
                await conn.execute(
                    sa.insert(ws)
                    .values(id=secret_id, tenant=tenant, sealed=seal(secret_id))
                    .returning(ws.c.id, ws.c.tenant, ws.c.created_at, ws.c.expires_at)
                )
            )
            .mappings()
            .one()
        )
        older = (
            await conn.execute(
                sa.select(sa.func.count()).where(ws.c.tenant == tenant, ws.c.id != secret_id)
            )
        ).scalar_one()
        return dict(row), int(older)


async def list_webhook_secrets(conn: AsyncConnection, tenant: str | None = None) -> list[Row]:
    """Webhook secrets still signing (never the secrets themselves), by tenant, newest first."""
    ws = webhook_secrets
    stmt = (
        sa.select(ws.c.id, ws.c.tenant, ws.c.created_at, ws.c.expires_at)
        .where(sa.or_(ws.c.expires_at.is_(None), ws.c.expires_at > sa.func.now()))
        .order_by(ws.c.tenant, ws.c.created_at.desc())
    )
    if tenant is not None:
        stmt = stmt.where(ws.c.tenant == tenant)
    return [dict(r) for r in (await conn.execute(stmt)).mappings()]


async def signing_secrets(conn: AsyncConnection, tenant: str) -> list[Row]:
    """The sealed secrets that sign a tenant's webhooks now (id, sealed), newest first:
    the current one and those of a rotation whose overlap has not ended."""
    ws = webhook_secrets
    stmt = (
        sa.select(ws.c.id, ws.c.sealed)
        .where(
            ws.c.tenant == tenant,
            sa.or_(ws.c.expires_at.is_(None), ws.c.expires_at > sa.func.now()),
        )
        .order_by(ws.c.created_at.desc())
    )
    return [dict(r) for r in (await conn.execute(stmt)).mappings()]
