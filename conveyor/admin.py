"""Operator commands of the `conveyor` CLI, working on the database directly
(CONVEYOR_DATABASE_URL), not through the gateway:

    conveyor keys create --tenant acme --name ci [--admin]   # prints the key, once
    conveyor keys list [--tenant acme] [--all]
    conveyor keys revoke 3f2a9c1e
    conveyor tenants list
    conveyor tenants set acme --submit-per-minute 600 --max-running 50   # "none" removes one

A key is printed on stdout (alone, so `KEY=$(conveyor keys create ...)` works) and
never stored: only its SHA-256 is. A revoked key stops working within
CONVEYOR_AUTH_CACHE_S (10 s by default).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.auth import PREFIX_CHARS, check_tenant_name, generate_key, hash_key
from conveyor.config import get_settings
from conveyor.db import tenants as db
from conveyor.db.engine import create_engine

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], Awaitable[int]]


def _engine() -> AsyncEngine:
    return create_engine(get_settings().database_url.get_secret_value(), pool_size=1, pre_ping=True)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    everything = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(row[i]) for row in everything) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in everything
    )


def tenant_arg(text: str) -> str:
    try:
        return check_tenant_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def limit_arg(text: str) -> int | None:
    """A non-negative integer, or "none" (no limit of its own)."""
    if text.strip().lower() in ("none", "null", "-"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


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


async def cmd_keys_create(args: argparse.Namespace) -> int:
    engine = _engine()
    try:
        key, row = await create_api_key(
            engine, args.tenant, args.name, "admin" if args.admin else "member"
        )
    except IntegrityError:
        print(
            f"error: tenant {args.tenant} already has a key named {args.name!r}"
            " (revoke it first, or pick another name)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        await engine.dispose()
    print(key)
    print(
        f"created key {str(row['id'])[:8]} ({row['role']}) for tenant {row['tenant']}:"
        " it is shown once; store it now",
        file=sys.stderr,
    )
    return EXIT_OK


async def cmd_keys_list(args: argparse.Namespace) -> int:
    engine = _engine()
    try:
        async with engine.connect() as conn:
            rows = await db.list_keys(conn, args.tenant, include_revoked=args.all)
    finally:
        await engine.dispose()
    header = ["ID", "TENANT", "NAME", "ROLE", "KEY", "CREATED", "LAST USED"]
    if args.all:
        header.append("REVOKED")
    table = []
    for r in rows:
        line = [
            str(r["id"])[:8],
            r["tenant"],
            r["name"],
            r["role"],
            r["prefix"] + "…",
            _when(r["created_at"]),
            _when(r["last_used_at"]),
        ]
        if args.all:
            line.append(_when(r["revoked_at"]))
        table.append(line)
    print(_table(header, table))
    return EXIT_OK


async def cmd_keys_revoke(args: argparse.Namespace) -> int:
    engine = _engine()
    try:
        async with engine.connect() as conn:
            found = await db.find_keys(conn, args.id)
            if not found:
                print(f"error: no key with id {args.id}", file=sys.stderr)
                return EXIT_FAILED
            if len(found) > 1:
                print(
                    f"error: {args.id} names {len(found)} keys; give more of the id",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            key_id: uuid.UUID = found[0]["id"]
            row = await db.revoke_key(conn, key_id)
    finally:
        await engine.dispose()
    assert row is not None
    print(f"revoked key {str(row['id'])[:8]} ({row['name']}) of tenant {row['tenant']}")
    return EXIT_OK


async def cmd_tenants_list(args: argparse.Namespace) -> int:
    engine = _engine()
    try:
        async with engine.connect() as conn:
            rows = await db.list_tenants(conn)
    finally:
        await engine.dispose()
    default = get_settings().tenant_submit_per_minute
    table = []
    for r in rows:
        quota = r["submit_per_minute"]
        quota_text = str(quota) if quota is not None else f"{default or 'unlimited'} (default)"
        limit = r["max_running"]
        table.append(
            [
                r["tenant"],
                quota_text,
                str(limit) if limit is not None else "unlimited",
                str(r["running"]) if limit is not None else "-",
                _when(r["created_at"]),
            ]
        )
    print(_table(["TENANT", "SUBMIT/MIN", "MAX RUNNING", "RUNNING", "CREATED"], table))
    return EXIT_OK


async def cmd_tenants_set(args: argparse.Namespace) -> int:
    changes: dict[str, int | None] = {}
    if args.submit_per_minute is not db.UNCHANGED:
        changes["submit_per_minute"] = args.submit_per_minute
    if args.max_running is not db.UNCHANGED:
        changes["max_running"] = args.max_running
    if not changes:
        print("error: give --submit-per-minute and/or --max-running", file=sys.stderr)
        return EXIT_USAGE
    engine = _engine()
    try:
        row = await db.set_tenant_limits(engine, args.tenant, **changes)
    finally:
        await engine.dispose()
    print(
        f"tenant {row['tenant']}: submit_per_minute={row['submit_per_minute']}"
        f" max_running={row['max_running']}"
    )
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """Add `keys` and `tenants` to the `conveyor` command's subparsers."""
    keys = sub.add_parser(
        "keys",
        help="create, list and revoke API keys (on the database)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    p = keys_sub.add_parser("create", help="create a key; print it (once)")
    p.add_argument("--tenant", required=True, type=tenant_arg)
    p.add_argument("--name", required=True, help="what the key is for, e.g. ci or billing-batch")
    p.add_argument("--admin", action="store_true", help="may also read every tenant's stats")
    p.set_defaults(handler=cmd_keys_create)
    p = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    p.add_argument("--tenant", type=tenant_arg, default=None)
    p.add_argument("--all", action="store_true", help="include revoked keys")
    p.set_defaults(handler=cmd_keys_list)
    p = keys_sub.add_parser(
        "revoke", help="revoke a key by its id (the 8-character short id will do)"
    )
    p.add_argument("id")
    p.set_defaults(handler=cmd_keys_revoke)

    tenants = sub.add_parser("tenants", help="list tenants, set their quotas and limits")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", metavar="COMMAND", required=True)
    p = tenants_sub.add_parser("list", help="tenants with their submit quota and concurrency limit")
    p.set_defaults(handler=cmd_tenants_list)
    p = tenants_sub.add_parser("set", help="set a tenant's submit quota and/or concurrency limit")
    p.add_argument("tenant", type=tenant_arg)
    p.add_argument(
        "--submit-per-minute",
        type=limit_arg,
        default=db.UNCHANGED,
        metavar="N|none",
        help="jobs per minute (none: the default, CONVEYOR_TENANT_SUBMIT_PER_MINUTE)",
    )
    p.add_argument(
        "--max-running",
        type=limit_arg,
        default=db.UNCHANGED,
        metavar="N|none",
        help="jobs running at once over all workers (none: unlimited)",
    )
    p.set_defaults(handler=cmd_tenants_set)
