"""Operator actions on the database directly (CONVEYOR_DATABASE_URL), not through the
gateway: API keys, tenants' limits and retention, webhook signing secrets. The
`conveyor keys|tenants|webhooks` commands (conveyor.cli.admin) call these; tests and
the dev stack use `create_api_key` and `rotate_webhook_secret`.

A key is shown once and never stored: only its SHA-256 is. A webhook signing secret
is shown once too; it is stored encrypted under CONVEYOR_WEBHOOK_SECRETS_KEY, since
the notifier needs the secret itself to sign. A revoked key stops working within
CONVEYOR_AUTH_CACHE_S (10 s by default).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.config import get_settings
from conveyor.db import retention as retention_db
from conveyor.db import tenants as db
from conveyor.db.engine import create_engine
from conveyor.server.auth import PREFIX_CHARS, generate_key, hash_key
from conveyor.server.webhooks import SecretBox, new_secret, secret_text

UNCHANGED: Any = db.UNCHANGED
"""A limit not given: left as it is."""


class AdminError(Exception):
    """An operator action that cannot be done (the message says why)."""


def engine() -> AsyncEngine:
    """A one-connection engine on CONVEYOR_DATABASE_URL (dispose it when done)."""
    return create_engine(get_settings().database_url.get_secret_value(), pool_size=1, pre_ping=True)


async def create_api_key(engine: AsyncEngine, tenant: str, name: str, role: str) -> tuple[str, Any]:
    """Create a key; returns (the key, its row). The key exists nowhere else afterwards."""
    key = generate_key()
    async with engine.connect() as conn:
        row = await db.create_key(
            conn,
            tenant=tenant,
            name=name,
            role=role,
            key_hash=hash_key(key),
            prefix=key[:PREFIX_CHARS],
        )
    return key, row


async def rotate_webhook_secret(
    engine: AsyncEngine,
    tenant: str,
    overlap_s: float | None = None,
    secrets_key: str | None = None,
) -> tuple[str, Any, int]:
    """Give a tenant a new webhook signing secret (its first, or a rotation: the previous
    one signs for `overlap_s` more, by default CONVEYOR_WEBHOOK_SECRET_OVERLAP_S), sealed
    with `secrets_key` (by default CONVEYOR_WEBHOOK_SECRETS_KEY). Returns the secret
    (`whsec_...`, shown once), its row, and how many older ones still sign."""
    settings = get_settings()
    if secrets_key is None and settings.webhook_secrets_key is not None:
        secrets_key = settings.webhook_secrets_key.get_secret_value()
    if not secrets_key:
        raise ValueError(
            "CONVEYOR_WEBHOOK_SECRETS_KEY is not set: it encrypts the stored secrets"
            " (the notifiers need the same value)"
        )
    box = SecretBox(secrets_key)
    secret = new_secret()
    row, older = await db.rotate_webhook_secret(
        engine,
        tenant,
        lambda secret_id: box.seal(tenant, str(secret_id), secret),
        settings.webhook_secret_overlap_s if overlap_s is None else overlap_s,
    )
    return secret_text(secret), row, older


async def list_keys(engine: AsyncEngine, tenant: str | None, include_revoked: bool) -> list[Any]:
    async with engine.connect() as conn:
        return list(await db.list_keys(conn, tenant, include_revoked=include_revoked))


async def revoke_key(engine: AsyncEngine, key_id: str) -> Any:
    """Revoke the key whose id starts with `key_id`; AdminError if none or several do."""
    async with engine.connect() as conn:
        found = await db.find_keys(conn, key_id)
        if not found:
            raise AdminError(f"no key with id {key_id}")
        if len(found) > 1:
            raise AdminError(f"{key_id} names {len(found)} keys; give more of the id")
        full_id: uuid.UUID = found[0]["id"]
        row = await db.revoke_key(conn, full_id)
    assert row is not None
    return row


async def list_tenants(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list(await db.list_tenants(conn))


async def set_tenant(
    engine: AsyncEngine,
    tenant: str,
    submit_per_minute: int | None = UNCHANGED,
    max_running: int | None = UNCHANGED,
    retention_days: int | None = UNCHANGED,
    daily_budget_usd: float | None = UNCHANGED,
    monthly_budget_usd: float | None = UNCHANGED,
) -> Any:
    """Set a tenant's submit quota, concurrency limit, retention and/or budgets in US
    dollars per UTC day and month (None: the default, unlimited or no budget); the
    tenant's row afterwards."""
    changes: dict[str, int | None] = {}
    for name, usd in (("daily", daily_budget_usd), ("monthly", monthly_budget_usd)):
        if usd is not UNCHANGED:
            if usd is not None and not 0 <= usd < 1e12:
                raise AdminError(f"--{name}-budget-usd must be 0 or more")
            changes[f"{name}_budget_micros"] = None if usd is None else round(usd * 1_000_000)
    if submit_per_minute is not UNCHANGED:
        changes["submit_per_minute"] = submit_per_minute
    if max_running is not UNCHANGED:
        changes["max_running"] = max_running
    row = await db.set_tenant_limits(engine, tenant, **changes)
    if retention_days is not UNCHANGED:
        row = await retention_db.set_retention(engine, tenant, retention_days)
    return row


async def list_webhook_secrets(engine: AsyncEngine, tenant: str | None) -> list[Any]:
    async with engine.connect() as conn:
        return list(await db.list_webhook_secrets(conn, tenant))
