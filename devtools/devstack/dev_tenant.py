"""The development tenant's API key and webhook signing secret, kept in the run folder."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from conveyor.core.config import DEFAULT_TENANT, Settings

from .processes import RunDir

DEV_KEY_FILE = "dev-api-key"
"""The development tenant's API key, in the run folder."""
DEV_KEY_NAME = "dev"
DEV_WEBHOOK_SECRET_FILE = "dev-webhook-secret"
"""The development tenant's webhook signing secret (whsec_...), in the run folder."""
DEV_WEBHOOK_KEY_FILE = "dev-webhook-secrets-key"
"""The key that encrypts stored webhook secrets, unless CONVEYOR_WEBHOOK_SECRETS_KEY is set."""


def _write_private(path: Path, secret: str) -> None:
    """Replace `path` with a file only its owner can read (mode 0600, never wider)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


def dev_webhook_secrets_key(run: RunDir) -> str:
    """CONVEYOR_WEBHOOK_SECRETS_KEY, or unless the environment sets it, the key kept in
    `run/dev-webhook-secrets-key` (made once, mode 0600), exported to the services
    started here."""
    key = os.environ.get("CONVEYOR_WEBHOOK_SECRETS_KEY", "")
    if key:
        return key
    path = run.path / DEV_WEBHOOK_KEY_FILE
    key = path.read_text().strip() if path.exists() else ""
    if not key:
        key = secrets.token_urlsafe(32)
        _write_private(path, key)
    os.environ["CONVEYOR_WEBHOOK_SECRETS_KEY"] = key  # inherited by the services started here
    return key


async def ensure_dev_webhook_secret(settings: Settings, run: RunDir) -> str:
    """Sign the development tenant's webhooks on `make up`: its current secret is the
    one in `run/dev-webhook-secret` if that still holds, else a new one is made (the
    previous one stops signing at once) and written there. Returns what was done."""
    from conveyor.db import tenants as tenants_db
    from conveyor.db.engine import create_engine
    from conveyor.server.webhooks import SecretBox, new_secret, secret_bytes, secret_text

    box = SecretBox(dev_webhook_secrets_key(run))
    path = run.path / DEV_WEBHOOK_SECRET_FILE
    kept = path.read_text().strip() if path.exists() else ""
    engine = create_engine(settings.database_url.get_secret_value(), pool_size=1, pre_ping=True)
    try:
        async with engine.connect() as conn:
            signing = await tenants_db.signing_secrets(conn, DEFAULT_TENANT)
        if kept and signing:
            try:
                current = box.open(DEFAULT_TENANT, str(signing[0]["id"]), signing[0]["sealed"])
                if current == secret_bytes(kept):
                    return (
                        f"webhook signing secret of tenant {DEFAULT_TENANT}: {run.relative(path)}"
                    )
            except ValueError:
                pass  # another key, or the file was edited: make a new one
        secret = new_secret()
        await tenants_db.rotate_webhook_secret(
            engine,
            DEFAULT_TENANT,
            lambda secret_id: box.seal(DEFAULT_TENANT, str(secret_id), secret),
            0.0,
        )
    finally:
        await engine.dispose()
    _write_private(path, secret_text(secret))
    return f"created a webhook signing secret for tenant {DEFAULT_TENANT}: {run.relative(path)}"


async def ensure_dev_key(settings: Settings, run: RunDir) -> tuple[str, str]:
    """The development tenant's API key: the one in the run folder if it still works,
    else a new one (replacing the old key of that name). Returns (key, what was done)."""
    from conveyor.db import tenants as tenants_db
    from conveyor.db.admin import create_api_key
    from conveyor.db.engine import create_engine
    from conveyor.server.auth import hash_key

    path = run.path / DEV_KEY_FILE
    engine = create_engine(settings.database_url.get_secret_value(), pool_size=1, pre_ping=True)
    try:
        if path.exists():
            key = path.read_text().strip()
            owner = await tenants_db.resolve_key(engine, hash_key(key)) if key else None
            # An operator key (every tenant's stats on this machine); an older admin key
            # is replaced, as admin keys no longer read other tenants' stats.
            if owner is not None and owner.tenant == DEFAULT_TENANT and owner.role == "operator":
                return key, f"development API key: {run.relative(path)}"
        async with engine.connect() as conn:
            await tenants_db.revoke_named(conn, DEFAULT_TENANT, DEV_KEY_NAME)
        key, _ = await create_api_key(engine, DEFAULT_TENANT, DEV_KEY_NAME, "operator")
    finally:
        await engine.dispose()
    _write_private(path, key)
    return key, f"created a development API key for tenant {DEFAULT_TENANT}: {run.relative(path)}"
