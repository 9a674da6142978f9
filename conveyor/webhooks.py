"""Webhooks: the signed JSON body Conveyor POSTs, how a receiver verifies it, and the
address rules that keep webhooks away from internal networks.

Each POST carries

    Content-Type: application/json
    Conveyor-Delivery: <delivery id>        (the same on every retry: deduplicate on it)
    Conveyor-Event: job.<status>            (job.succeeded, job.failed, job.running, ...)
    Conveyor-Timestamp: <unix seconds>      (when this attempt was signed)
    Conveyor-Signature: v1=<hex>            (HMAC-SHA256 of "<timestamp>." + body)

and a body

    {"id": "<delivery id>", "type": "job.succeeded", "sequence": 42,
     "previous_status": "running", "created_at": "2026-11-23T10:00:00.123456Z",
     "job": {"id": ..., "status": "succeeded", "result_text": ..., "usage": {...}, ...}}

`job` is the job as it was at that change. A receiver checks a delivery with
`verify_signature(secret, body, headers["Conveyor-Timestamp"],
headers["Conveyor-Signature"])`, or the few lines of standard library shown in
the README (this module needs nothing else either).

The signature header may list several `v1=` values separated by commas (e.g.
during a secret rotation); a delivery is genuine when one of them matches.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

SIGNATURE_HEADER = "Conveyor-Signature"
TIMESTAMP_HEADER = "Conveyor-Timestamp"
DELIVERY_HEADER = "Conveyor-Delivery"
EVENT_HEADER = "Conveyor-Event"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300.0
"""A signature older (or newer) than this is refused by `verify_signature` (replays)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------- signing


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def signature(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The `Conveyor-Signature` value: `v1=` and the hex HMAC-SHA256 of "<timestamp>." + body."""
    mac = hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def signed_headers(
    secret: str | bytes, body: bytes, delivery_id: str, event: str, now: float | None = None
) -> dict[str, str]:
    """The headers of one POST of `body`."""
    timestamp = int(time.time() if now is None else now)
    return {
        "Content-Type": "application/json",
        DELIVERY_HEADER: delivery_id,
        EVENT_HEADER: event,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


def verify_signature(
    secret: str | bytes,
    body: bytes,
    timestamp: str,
    signature_header: str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether a POST is genuine: one `v1=` signature matches the raw `body` as received,
    and the timestamp is within `tolerance_s` of now (so an old POST cannot be replayed)."""
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance_s:
        return False
    expected = signature(secret, sent, body)
    given = [part.strip() for part in (signature_header or "").split(",")]
    return any(hmac.compare_digest(expected, part) for part in given if part)


# --------------------------------------------------------------------------- body


_TIMESTAMPS = (
    "created_at",
    "updated_at",
    "run_at",
    "started_at",
    "finished_at",
    "cancel_requested_at",
)


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
        "error": dict(error) if error else None,
        "dead_reason": job.get("dead_reason"),
        "trace_id": job.get("trace_id"),
        "sequence": job.get("seq"),
        "webhook_events": "all" if job.get("webhook_all_events") else "terminal",
    }
    for name in _TIMESTAMPS:
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


# --------------------------------------------------------------------------- retries


def retry_delay_s(
    attempt: int, base_s: float, cap_s: float, retry_after_s: float | None = None
) -> float:
    """Wait before the attempt after `attempt` (1-based): exponential with jitter (half to
    all of base·2^(attempt-1), at most the cap), never shorter than a receiver's Retry-After
    (itself capped)."""
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay


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
