"""Webhooks: the signed JSON body Conveyor POSTs, how a receiver verifies it, the
tenants' signing secrets, and the address rules that keep webhooks away from
internal networks.

Signing follows the Standard Webhooks specification (https://www.standardwebhooks.com),
so a receiver can verify with any of its published libraries. Each POST carries

    Content-Type: application/json
    webhook-id: <delivery id>               (the same on every retry: deduplicate on it)
    webhook-timestamp: <unix seconds>       (when this attempt was signed)
    webhook-signature: v1,<base64>          (HMAC-SHA256 of "<id>.<timestamp>.<body>")
    Conveyor-Event: job.<status>            (job.succeeded, job.failed, job.running, ...)

and a body

    {"id": "<delivery id>", "type": "job.succeeded", "sequence": 42,
     "previous_status": "running", "created_at": "2026-11-23T10:00:00.123456Z",
     "job": {"id": ..., "status": "succeeded", "result_text": ..., "usage": {...}, ...}}

`job` is the job as it was at that change. Each tenant has its own secret
(`whsec_<base64>`, made by `conveyor webhooks secret rotate`); during a rotation
the signature header holds one space-separated `v1,<sig>` per secret still
signing, and a delivery is genuine when one of them matches. A receiver checks a
delivery with `standardwebhooks.Webhook(secret).verify(body, headers)`, or with
`verify_signature(secret, body, headers)` here.

The secrets are stored encrypted (AES-256-GCM, bound to their tenant and id) under
a key of the deployment, CONVEYOR_WEBHOOK_SECRETS_KEY (`SecretBox`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from standardwebhooks import Webhook

from conveyor.core.lifecycle import Job

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
EVENT_HEADER = "Conveyor-Event"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
"""Random bytes of a signing secret (Standard Webhooks asks for 24 to 64)."""
MIN_SECRETS_KEY_CHARS = 32
"""CONVEYOR_WEBHOOK_SECRETS_KEY must be at least this long (e.g. `openssl rand -base64 32`)."""
DEFAULT_TOLERANCE_S = 300.0
"""A signature older (or newer) than this is refused by `verify_signature` (replays)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------- secrets


def new_secret() -> bytes:
    """A new random signing secret (its raw bytes)."""
    return secrets.token_bytes(SECRET_BYTES)


def secret_text(secret: bytes) -> str:
    """The `whsec_<base64>` form a receiver is given (and its libraries accept)."""
    return SECRET_PREFIX + base64.b64encode(secret).decode()


def secret_bytes(secret: str | bytes) -> bytes:
    """The raw bytes of a secret given as `whsec_<base64>` (or as raw bytes)."""
    if isinstance(secret, bytes):
        return secret
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        raw = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError:
        raise ValueError("a webhook secret is whsec_ and base64") from None
    if not raw:
        raise ValueError("a webhook secret may not be empty")
    return raw


class SecretBox:
    """Encrypts tenants' signing secrets for storage, under the deployment's key.

    AES-256-GCM with a key derived from CONVEYOR_WEBHOOK_SECRETS_KEY; the tenant and
    the secret's id are authenticated with it, so a stored secret cannot be moved to
    another tenant's row. Stored form: 12-byte nonce + ciphertext + tag.
    """

    def __init__(self, key: str) -> None:
        if len(key) < MIN_SECRETS_KEY_CHARS:
            raise ValueError(
                f"CONVEYOR_WEBHOOK_SECRETS_KEY must be at least {MIN_SECRETS_KEY_CHARS}"
                " characters (e.g. openssl rand -base64 32)"
            )
        derived = hashlib.sha256(b"conveyor webhook secrets v1\x00" + key.encode()).digest()
        self._aead = AESGCM(derived)

    @staticmethod
    def _context(tenant: str, secret_id: str) -> bytes:
        return f"{tenant}\x00{secret_id}".encode()

    def seal(self, tenant: str, secret_id: str, secret: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, secret, self._context(tenant, secret_id))

    def open(self, tenant: str, secret_id: str, sealed: bytes) -> bytes:
        """The secret; ValueError if it was sealed under another key, tenant or id."""
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], self._context(tenant, secret_id))
        except InvalidTag:
            raise ValueError(
                "a stored webhook secret does not open with CONVEYOR_WEBHOOK_SECRETS_KEY"
            ) from None


# --------------------------------------------------------------------------- signing


def signature(secret: str | bytes, delivery_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature: HMAC-SHA256 of "<id>.<timestamp>.<body>"."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    return Webhook(secret_bytes(secret)).sign(delivery_id, when, body)


def signed_headers(
    signing: Sequence[str | bytes],
    body: bytes,
    delivery_id: str,
    event: str,
    now: float | None = None,
) -> dict[str, str]:
    """The headers of one POST of `body`, signed with every secret in `signing` (newest
    first; more than one during a rotation). At least one secret: never unsigned."""
    if not signing:
        raise ValueError("no signing secret: a webhook is never sent unsigned")
    timestamp = int(time.time() if now is None else now)
    return {
        "Content-Type": "application/json",
        ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: " ".join(signature(s, delivery_id, timestamp, body) for s in signing),
        EVENT_HEADER: event,
    }


def verify_signature(
    secret: str | bytes,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether a POST is genuine: one `v1,` signature in its `webhook-signature` header
    matches the raw `body` as received, with its `webhook-id` and `webhook-timestamp`,
    and the timestamp is within `tolerance_s` of now (so an old POST cannot be replayed).
    The same check as `standardwebhooks.Webhook(secret).verify(body, headers)`."""
    lower = {k.lower(): v for k, v in headers.items()}
    delivery_id = lower.get(ID_HEADER, "")
    given = lower.get(SIGNATURE_HEADER, "").split()
    try:
        sent = int(lower.get(TIMESTAMP_HEADER, ""))
        key = secret_bytes(secret)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if not delivery_id or abs(current - sent) > tolerance_s:
        return False
    expected = signature(key, delivery_id, sent, body).encode()
    return any(hmac.compare_digest(expected, part.encode()) for part in given)


# --------------------------------------------------------------------------- body


def rfc3339(value: datetime | str | None) -> str | None:
    """A UTC timestamp as `2026-11-23T10:00:00.123456Z` (None stays None)."""
    if value is None:
        return None
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def job_json(job: Mapping[str, Any]) -> dict[str, Any]:
    """The public JSON of a job from its stored row (or the row's JSON snapshot)."""
    usage = None
    if job.get("input_tokens") is not None or job.get("output_tokens") is not None:
        usage = {
            "input_tokens": job.get("input_tokens") or 0,
            "output_tokens": job.get("output_tokens") or 0,
            "cache_creation_input_tokens": job.get("cache_creation_input_tokens") or 0,
            "cache_read_input_tokens": job.get("cache_read_input_tokens") or 0,
        }
    error = job.get("error") or None
    out: dict[str, Any] = {
        "id": str(job["id"]),
        "tenant": job.get("tenant"),
        "status": job.get("status"),
        "model": job.get("model"),
        "lane": job.get("lane"),
        "priority": job.get("priority"),
        "labels": job.get("labels") or {},
        "idempotency_key": job.get("idempotency_key"),
        "attempts": job.get("attempts"),
        "max_attempts": job.get("max_attempts"),
        "result_text": job.get("result_text"),
        "stop_reason": job.get("stop_reason"),
        "usage": usage,
        # Micro-dollars the job's attempts cost; null: not finished, or unpriced model.
        "cost_micros": job.get("cost_micros"),
        # The whole final message: content blocks, stop_sequence, response id and model,
        # and the whole usage object as the provider reported it (cache creation by TTL,
        # server tool use, service tier).
        "result": result if isinstance(result := job.get("result"), dict) else None,
        "error": dict(error) if error else None,
        "dead_reason": job.get("dead_reason"),
        "trace_id": job.get("trace_id"),
        "sequence": job.get("seq"),
        "webhook_events": "all" if job.get("webhook_all_events") else "terminal",
    }
    for name in Job.TIMESTAMPS:
        out[name] = rfc3339(job.get(name))
    return out


def event_type(status: str) -> str:
    """`job.<status>`: the `type` of a body and its Conveyor-Event header."""
    return f"job.{status}"


def webhook_body(
    delivery_id: str,
    status: str,
    sequence: int,
    previous: str | None,
    job: Mapping[str, Any],
    created_at: datetime,
) -> bytes:
    """The JSON body reporting one status change of a job."""
    return orjson.dumps(
        {
            "id": delivery_id,
            "type": event_type(status),
            "sequence": sequence,
            "previous_status": previous,
            "created_at": rfc3339(created_at),
            "job": job_json(job),
        }
    )


# --------------------------------------------------------------------------- addresses


class WebhookRefused(Exception):
    """The URL may not be called: it resolves to an address that is not public, or it is
    not a valid http(s) URL. Permanent: the delivery is not retried."""


def parse_networks(values: Iterable[str]) -> list[IPNetwork]:
    """Networks from CIDR strings (ValueError names a bad one)."""
    out: list[IPNetwork] = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"not a network: {value!r} ({exc})") from None
    return out


def address_refusal(
    address: str, allow_private: bool = False, allowed: Sequence[IPNetwork] = ()
) -> str | None:
    """Why a webhook may not connect to `address`, or None if it may.

    Loopback, private, link-local (cloud metadata at 169.254.169.254 included),
    multicast, reserved, unspecified and other non-global addresses are refused
    unless `allow_private`, or unless `allowed` holds the address. IPv4 addresses
    mapped into IPv6 are judged as IPv4.
    """
    try:
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if allow_private or any(ip in net for net in allowed if ip.version == net.version):
        return None
    for kind, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flag:
            return f"{ip} is a {kind} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None
