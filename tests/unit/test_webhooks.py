"""Webhook signatures (Standard Webhooks), stored secrets, bodies, retry delays, the
address rules and what the per-host cap counts, without a network."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks import Webhook, WebhookVerificationError

from conveyor.core.lifecycle import backoff_s
from conveyor.server.webhooks import (
    SecretBox,
    address_refusal,
    new_secret,
    parse_networks,
    secret_bytes,
    secret_text,
    signature,
    signed_headers,
    verify_signature,
    webhook_body,
)
from services.notifier.webhook_hosts import HostKeys, address_key

SECRET = secret_text(b"unit-test-secret-of-32-bytes!!!!")
OTHER = secret_text(b"another tenant's secret 32 bytes")
NOW = 1_800_000_000.0
BODY = b'{"id": "d1", "type": "job.succeeded"}'


def test_a_signed_body_verifies_with_the_same_secret_only() -> None:
    headers = signed_headers([SECRET], BODY, "d1", "job.succeeded", now=NOW)

    assert verify_signature(SECRET, BODY, headers, now=NOW)
    assert not verify_signature(OTHER, BODY, headers, now=NOW)
    assert not verify_signature(SECRET, BODY + b" ", headers, now=NOW)
    assert not verify_signature(SECRET, BODY, {**headers, "webhook-id": "d2"}, now=NOW)
    assert not verify_signature(
        SECRET, BODY, {**headers, "webhook-timestamp": str(int(NOW) + 1)}, now=NOW
    )
    assert headers["webhook-id"] == "d1" and headers["Conveyor-Event"] == "job.succeeded"
    assert headers["Content-Type"] == "application/json"


def test_the_standard_webhooks_library_verifies_a_signed_body() -> None:
    headers = signed_headers([SECRET], BODY, "d1", "job.succeeded")  # signed now

    assert Webhook(SECRET).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER).verify(BODY, headers)


def test_the_signature_is_a_base64_hmac_sha256_of_id_dot_timestamp_dot_body() -> None:
    mac = hmac.new(secret_bytes(SECRET), b"d1.1800000000." + BODY, hashlib.sha256).digest()
    assert signature(SECRET, "d1", 1_800_000_000, BODY) == "v1," + base64.b64encode(mac).decode()
    headers = signed_headers([SECRET], BODY, "d1", "job.succeeded", now=NOW)
    assert headers["webhook-timestamp"] == "1800000000"
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()


def test_an_old_or_future_signature_is_refused_as_a_replay() -> None:
    headers = signed_headers([SECRET], BODY, "d1", "job.succeeded", now=NOW)
    assert verify_signature(SECRET, BODY, headers, now=NOW + 299)
    assert not verify_signature(SECRET, BODY, headers, now=NOW + 301)
    assert not verify_signature(SECRET, BODY, headers, now=NOW - 301)
    assert not verify_signature(SECRET, BODY, {**headers, "webhook-timestamp": "x"}, now=NOW)
    assert not verify_signature(SECRET, BODY, {**headers, "webhook-timestamp": "9" * 40}, now=NOW)


def test_during_a_rotation_both_secrets_sign_and_either_verifies() -> None:
    headers = signed_headers([SECRET, OTHER], BODY, "d1", "job.succeeded")
    parts = headers["webhook-signature"].split(" ")

    assert len(parts) == 2 and all(p.startswith("v1,") for p in parts)
    for secret in (SECRET, OTHER):
        assert verify_signature(secret, BODY, headers)
        Webhook(secret).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret_text(new_secret())).verify(BODY, headers)


def test_nothing_is_signed_without_a_secret() -> None:
    with pytest.raises(ValueError, match="never sent unsigned"):
        signed_headers([], BODY, "d1", "job.succeeded")
    headers = signed_headers([SECRET], BODY, "d1", "job.succeeded", now=NOW)
    assert not verify_signature(SECRET, BODY, {**headers, "webhook-signature": ""}, now=NOW)


def test_secrets_are_random_whsec_base64_that_standard_webhooks_accepts() -> None:
    one, two = new_secret(), new_secret()
    assert one != two and len(one) == 32
    text = secret_text(one)
    assert text.startswith("whsec_") and secret_bytes(text) == one
    assert Webhook(text).sign("d1", datetime.fromtimestamp(NOW, UTC), BODY) == signature(
        one, "d1", int(NOW), BODY
    )
    for bad in ("plain", "whsec_", "whsec_not base64!"):
        with pytest.raises(ValueError, match="webhook secret"):
            secret_bytes(bad)


KEY = "unit-test-webhook-secrets-key-0123456789"


def test_a_stored_secret_opens_only_with_its_key_tenant_and_id() -> None:
    box = SecretBox(KEY)
    secret = new_secret()
    sealed = box.seal("acme", "id-1", secret)

    assert secret not in sealed, "stored encrypted"
    assert box.open("acme", "id-1", sealed) == secret
    for tenant, secret_id, key in (("other", "id-1", KEY), ("acme", "id-2", KEY)):
        with pytest.raises(ValueError, match="does not open"):
            SecretBox(key).open(tenant, secret_id, sealed)
    with pytest.raises(ValueError, match="does not open"):
        SecretBox(KEY + "x").open("acme", "id-1", sealed)
    with pytest.raises(ValueError, match="at least 32"):
        SecretBox("short")


def test_the_body_describes_the_change_and_the_job_without_its_request() -> None:
    snapshot = {
        "id": "7c1d0c4e-0000-4000-8000-000000000001",
        "tenant": "acme",
        "status": "succeeded",
        "model": "claude-sonnet-4-5",
        "lane": "default",
        "priority": 0,
        "labels": {"team": "a"},
        "attempts": 1,
        "max_attempts": 3,
        "result_text": "hello",
        "stop_reason": "end_turn",
        "input_tokens": 5,
        "output_tokens": 2,
        "seq": 4,
        "created_at": "2026-11-23T10:00:00.5+00:00",
        "finished_at": "2026-11-23T11:00:00+01:00",
        "request": {"messages": [{"role": "user", "content": "secret prompt"}]},
    }
    created = datetime(2026, 11, 23, 10, 0, 1, tzinfo=UTC)
    body = json.loads(webhook_body("d1", "succeeded", 4, "running", snapshot, created))

    assert body["id"] == "d1" and body["type"] == "job.succeeded" and body["sequence"] == 4
    assert body["previous_status"] == "running"
    assert body["created_at"] == "2026-11-23T10:00:01Z"
    job = body["job"]
    assert job["status"] == "succeeded" and job["result_text"] == "hello"
    assert job["usage"] == {
        "input_tokens": 5,
        "output_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    assert job["created_at"] == "2026-11-23T10:00:00.500000Z"
    assert job["finished_at"] == "2026-11-23T10:00:00Z"
    assert job["started_at"] is None and job["error"] is None
    assert "request" not in job and "secret prompt" not in json.dumps(body)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.9", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not a public"),
        ("fd00::1", "private"),
    ],
)
def test_addresses_that_are_not_public_are_refused(address: str, kind: str) -> None:
    why = address_refusal(address)
    assert why is not None and kind in why


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(address) is None


def test_configuration_can_allow_private_addresses_wholesale_or_by_network() -> None:
    assert address_refusal("10.1.2.3", allow_private=True) is None
    allowed = parse_networks(["127.0.0.0/8", "10.1.0.0/16"])
    assert address_refusal("127.0.0.1", allowed=allowed) is None
    assert address_refusal("10.1.2.3", allowed=allowed) is None
    assert address_refusal("10.2.0.1", allowed=allowed) is not None
    assert address_refusal("169.254.169.254", allowed=allowed) is not None
    with pytest.raises(ValueError, match="not a network"):
        parse_networks(["ten"])


def test_retry_delays_grow_with_jitter_up_to_the_cap_and_honour_retry_after() -> None:
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0)):
        for _ in range(50):
            delay = backoff_s(attempt, 1.0, 60.0)
            assert ceiling / 2 <= delay <= ceiling
    assert backoff_s(1, 1.0, 60.0, retry_after_s=30.0) >= 30.0
    assert backoff_s(1, 1.0, 60.0, retry_after_s=3600.0) <= 60.0


class FakeResolver(AbstractResolver):
    """Names to addresses, as DNS would answer (wildcard subdomains of one machine)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        if host not in self.table:
            raise OSError(f"{host} does not resolve")
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.table[host]
        ]

    async def close(self) -> None:
        pass


async def test_the_per_host_cap_counts_names_of_one_address_as_one_host() -> None:
    hosts = HostKeys()
    resolver = FakeResolver(
        {
            "a.evil.example": ["203.0.113.7"],
            "b.evil.example": ["203.0.113.7"],
            "c.other.example": ["::ffff:203.0.113.7"],
            "shop.example": ["198.51.100.1", "198.51.100.2"],
        }
    )
    hosts.resolver = resolver
    keys: dict[str, Any] = {h: await hosts.key(h) for h in resolver.table}

    assert keys["a.evil.example"] == keys["b.evil.example"] == keys["c.other.example"]
    assert keys["a.evil.example"] == await hosts.key("203.0.113.7")
    assert keys["shop.example"] == "198.51.100.1"
    assert await hosts.key("nowhere.example") == "nowhere.example"
    lookups = resolver.lookups
    await hosts.key("a.evil.example")
    assert resolver.lookups == lookups, "kept for a while, as aiohttp's DNS cache does"


def test_an_address_counts_as_its_canonical_form() -> None:
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert address_key("fe80::1%eth0") == "fe80::1"
    assert address_key("2001:DB8::1") == "2001:db8::1"
