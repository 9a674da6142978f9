"""Operator commands, on the database directly (CONVEYOR_DATABASE_URL), not through the
gateway; they need the server install (`pip install 'conveyor[server]'`):

    conveyor keys create --tenant acme --name ci [--role member|admin]   # prints the key, once
    conveyor keys create --role operator --name ops   # tenant `operators`; every tenant's stats
    conveyor keys list [--tenant acme] [--all] [--json]
    conveyor keys revoke 3f2a9c1e
    conveyor tenants list [--json]
    conveyor tenants set acme --submit-per-minute 600 --max-running 50 --retention-days 30
    conveyor webhooks secret rotate --tenant acme [--overlap-s 86400]   # prints it, once
    conveyor webhooks secret list [--tenant acme] [--json]

A key (or a webhook signing secret) is printed on stdout alone, so
`KEY=$(conveyor keys create ...)` works. These commands exit 1 when the operation
fails (a name taken, no such key, no secrets key set), 2 on a usage error.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, TypeVar

import click

from conveyor.cli import output
from conveyor.cli.base import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _Converting, fail
from conveyor.cli.jobs import json_option

ROLES = ("member", "admin", "operator")
"""The roles of conveyor.server.auth.ROLES (named here so `--help` needs no server modules)."""
UNCHANGED: Any = object()
T = TypeVar("T")


def server_modules() -> None:
    """Exit 2 with a hint when the server's dependencies are not installed."""
    try:
        import pydantic_settings  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as exc:
        raise click.UsageError(
            f"this command works on the database and needs the server install"
            f" (pip install 'conveyor[server]'): {exc.name} is missing"
        ) from None


def _tenant(text: str) -> str:
    server_modules()
    from conveyor.server.auth import check_tenant_name

    return check_tenant_name(text)


def _limit(text: str) -> int | None:
    """A non-negative integer, or "none" (no limit of its own)."""
    if text.strip().lower() in ("none", "null", "-"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a number or 'none', got {text!r}") from None
    if value < 0:
        raise ValueError(f"must not be negative: {text}")
    return value


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected seconds, got {text!r}") from None
    if not 0 <= value <= 366 * 86400:
        raise ValueError(f"must be 0 to 31622400 seconds: {text}")
    return value


def _dollars(text: str) -> float | None:
    """A non-negative amount of US dollars, or "none" (no budget)."""
    if text.strip().lower() in ("none", "null", "-"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected dollars or 'none', got {text!r}") from None
    if not 0 <= value < 1e12:
        raise ValueError(f"must be 0 or more dollars: {text}")
    return value


TENANT = _Converting("TENANT", _tenant)
LIMIT = _Converting("N|none", _limit)
DOLLARS = _Converting("USD|none", _dollars)
OVERLAP = _Converting("SECONDS", _overlap)


def on_database(work: Coroutine[Any, Any, T]) -> T:
    """Run an operator action with an engine of its own (disposed afterwards)."""
    return asyncio.run(work)


def _when(value: datetime | None) -> str:
    return output.when(value)


# --------------------------------------------------------------------------- keys


@click.group("keys")
def keys() -> None:
    """Create, list and revoke API keys (on the database)."""


@keys.command("create")
@click.option("--tenant", type=TENANT, default=None, help="the key's tenant (operators: optional)")
@click.option("--name", required=True, help="what the key is for, e.g. ci or billing-batch")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default="member",
    help="member (default) or admin: the tenant's own jobs and stats; operator: also every"
    " tenant's stats, the shared queues, workers",
)
@click.option("--admin", is_flag=True, help="the same as --role admin")
def keys_create(tenant: str | None, name: str, role: str, admin: bool) -> int:
    """Create a key; print it (once)."""
    server_modules()
    from sqlalchemy.exc import IntegrityError

    from conveyor.db import admin as ops
    from conveyor.server.auth import OPERATOR_TENANT

    if admin and role not in ("member", "admin"):
        raise click.UsageError("--admin is --role admin; give one role")
    role = "admin" if admin else role
    if tenant is None and role == "operator":
        tenant = OPERATOR_TENANT
    if tenant is None:
        raise click.UsageError("give --tenant (only operator keys have a default)")

    async def work() -> tuple[str, Any]:
        engine = ops.engine()
        try:
            return await ops.create_api_key(engine, tenant, name, role)
        finally:
            await engine.dispose()

    try:
        key, row = on_database(work())
    except IntegrityError:
        return fail(
            f"tenant {tenant} already has a key named {name!r} (revoke it first, or pick"
            " another name)",
            EXIT_FAILED,
        )
    print(key)
    print(
        f"created key {str(row['id'])[:8]} ({row['role']}) for tenant {row['tenant']}:"
        " it is shown once; store it now",
        file=sys.stderr,
    )
    return EXIT_OK


@keys.command("list")
@click.option("--tenant", type=TENANT, default=None)
@click.option("--all", "include_revoked", is_flag=True, help="include revoked keys")
@json_option
def keys_list(tenant: str | None, include_revoked: bool, as_json: bool) -> int:
    """List keys (never the keys themselves)."""
    server_modules()
    from conveyor.db import admin as ops

    async def work() -> list[Any]:
        engine = ops.engine()
        try:
            return await ops.list_keys(engine, tenant, include_revoked)
        finally:
            await engine.dispose()

    rows = on_database(work())
    if as_json:
        fields = ["id", "tenant", "name", "role", "prefix", "created_at", "last_used_at"]
        fields += ["revoked_at"] if include_revoked else []
        output.print_json([{k: r[k] for k in fields} for r in rows])
        return EXIT_OK
    headers = ["ID", "TENANT", "NAME", "ROLE", "KEY", "CREATED", "LAST USED"]
    t = output.table(*headers, *(["REVOKED"] if include_revoked else []))
    for r in rows:
        cells = [
            str(r["id"])[:8],
            r["tenant"],
            r["name"],
            r["role"],
            r["prefix"] + "…",
            _when(r["created_at"]),
            _when(r["last_used_at"]),
        ]
        t.add_row(*cells, *([_when(r["revoked_at"])] if include_revoked else []))
    output.show(t)
    return EXIT_OK


@keys.command("revoke")
@click.argument("id")
def keys_revoke(id: str) -> int:
    """Revoke a key by its id (the 8-character short id will do)."""
    server_modules()
    from conveyor.db import admin as ops

    async def work() -> Any:
        engine = ops.engine()
        try:
            return await ops.revoke_key(engine, id)
        finally:
            await engine.dispose()

    try:
        row = on_database(work())
    except ops.AdminError as exc:
        return fail(str(exc), EXIT_FAILED)
    print(f"revoked key {str(row['id'])[:8]} ({row['name']}) of tenant {row['tenant']}")
    return EXIT_OK


# --------------------------------------------------------------------------- tenants


@click.group("tenants")
def tenants() -> None:
    """List tenants; set their quotas, limits and retention (on the database)."""


@tenants.command("list")
@json_option
def tenants_list(as_json: bool) -> int:
    """Tenants with their submit quota, concurrency limit and retention."""
    server_modules()
    from conveyor.core.config import get_settings
    from conveyor.db import admin as ops

    async def work() -> list[Any]:
        engine = ops.engine()
        try:
            return await ops.list_tenants(engine)
        finally:
            await engine.dispose()

    rows = on_database(work())
    settings = get_settings()
    if as_json:
        output.print_json([dict(r) for r in rows])
        return EXIT_OK
    t = output.table(
        "TENANT",
        "SUBMIT/MIN",
        "MAX RUNNING",
        "RUNNING",
        "RETENTION",
        "CREATED",
        numeric=("RUNNING",),
    )
    default_quota = settings.tenant_submit_per_minute
    default_days = getattr(settings, "retention_days", None)
    for r in rows:
        quota, limit = r["submit_per_minute"], r["max_running"]
        days = r.get("retention_days")
        t.add_row(
            r["tenant"],
            str(quota) if quota is not None else f"{default_quota or 'unlimited'} (default)",
            str(limit) if limit is not None else "unlimited",
            str(r["running"]) if limit is not None else "-",
            _days(days) if days is not None else f"{_days(default_days)} (default)",
            _when(r["created_at"]),
        )
    output.show(t)
    return EXIT_OK


def _usd(micros: int | None) -> str:
    return "none" if micros is None else f"{micros / 1_000_000:g}"


def _days(days: int | None) -> str:
    if days is None:
        return "-"
    return "forever" if days == 0 else f"{days} days"


@tenants.command("set")
@click.argument("tenant", type=TENANT)
@click.option("--submit-per-minute", type=LIMIT, default=UNCHANGED, help="none: the default")
@click.option("--max-running", type=LIMIT, default=UNCHANGED, help="none: unlimited")
@click.option(
    "--retention-days",
    type=LIMIT,
    default=UNCHANGED,
    help="days finished jobs are kept, 0 for ever (none: the default, CONVEYOR_RETENTION_DAYS)",
)
@click.option(
    "--daily-budget-usd", type=DOLLARS, default=UNCHANGED, help="per UTC day (none: no budget)"
)
@click.option(
    "--monthly-budget-usd", type=DOLLARS, default=UNCHANGED, help="per UTC month (none: no budget)"
)
def tenants_set(
    tenant: str,
    submit_per_minute: Any,
    max_running: Any,
    retention_days: Any,
    daily_budget_usd: Any,
    monthly_budget_usd: Any,
) -> int:
    """Set a tenant's submit quota, concurrency limit, retention and/or budgets."""
    options = (submit_per_minute, max_running, retention_days, daily_budget_usd, monthly_budget_usd)
    if all(value is UNCHANGED for value in options):
        raise click.UsageError(
            "give --submit-per-minute, --max-running, --retention-days,"
            " --daily-budget-usd and/or --monthly-budget-usd"
        )
    server_modules()
    from conveyor.db import admin as ops

    def given(value: Any) -> Any:
        return ops.UNCHANGED if value is UNCHANGED else value

    async def work() -> Any:
        engine = ops.engine()
        try:
            return await ops.set_tenant(
                engine,
                tenant,
                given(submit_per_minute),
                given(max_running),
                given(retention_days),
                given(daily_budget_usd),
                given(monthly_budget_usd),
            )
        finally:
            await engine.dispose()

    try:
        row = on_database(work())
    except ops.AdminError as exc:  # a value the action refuses
        return fail(str(exc), EXIT_USAGE)
    print(
        f"tenant {row['tenant']}: submit_per_minute={row['submit_per_minute']}"
        f" max_running={row['max_running']} retention_days={row['retention_days']}"
        f" daily_budget_usd={_usd(row.get('daily_budget_micros'))}"
        f" monthly_budget_usd={_usd(row.get('monthly_budget_micros'))}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------- webhooks


@click.group("webhooks")
def webhooks() -> None:
    """Tenants' webhook signing secrets (on the database)."""


@webhooks.group("secret")
def secret() -> None:
    """Create, rotate and list signing secrets."""


@secret.command("rotate")
@click.option("--tenant", type=TENANT, required=True)
@click.option(
    "--overlap-s",
    type=OVERLAP,
    default=None,
    help="how long the previous secret keeps signing too (default:"
    " CONVEYOR_WEBHOOK_SECRET_OVERLAP_S; 0 after a leak)",
)
def secret_rotate(tenant: str, overlap_s: float | None) -> int:
    """Give a tenant a new signing secret (its first, or a rotation); print it (once)."""
    server_modules()
    from conveyor.db import admin as ops

    async def work() -> tuple[str, Any, int]:
        engine = ops.engine()
        try:
            return await ops.rotate_webhook_secret(engine, tenant, overlap_s)
        finally:
            await engine.dispose()

    try:
        text, row, older = on_database(work())
    except ValueError as exc:
        return fail(str(exc), EXIT_FAILED)
    print(text)
    note = (
        f"; {older} older secret(s) keep signing until they expire (webhooks secret list)"
        if older
        else ""
    )
    print(
        f"new webhook signing secret {str(row['id'])[:8]} for tenant {row['tenant']}:"
        f" it is shown once; give it to the tenant's receivers{note}",
        file=sys.stderr,
    )
    return EXIT_OK


@secret.command("list")
@click.option("--tenant", type=TENANT, default=None)
@json_option
def secret_list(tenant: str | None, as_json: bool) -> int:
    """Secrets that sign now (never the secrets)."""
    server_modules()
    from conveyor.db import admin as ops

    async def work() -> list[Any]:
        engine = ops.engine()
        try:
            return await ops.list_webhook_secrets(engine, tenant)
        finally:
            await engine.dispose()

    rows = on_database(work())
    if as_json:
        output.print_json(
            [{k: r[k] for k in ("id", "tenant", "created_at", "expires_at")} for r in rows]
        )
        return EXIT_OK
    t = output.table("ID", "TENANT", "CREATED", "SIGNS UNTIL")
    for r in rows:
        until = _when(r["expires_at"]) if r["expires_at"] is not None else "current"
        t.add_row(str(r["id"])[:8], r["tenant"], _when(r["created_at"]), until)
    output.show(t)
    return EXIT_OK
