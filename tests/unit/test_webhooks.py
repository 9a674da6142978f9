"""Webhook signatures, bodies, retry delays and the address rules, without a network."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest

from conveyor.webhooks import (
    address_refusal,
    parse_networks,
    retry_delay_s,
    signature,
    signed_headers,
    verify_signature,
    webhook_body,
)

SECRET = "whsec-unit"
NOW = 1_800_000_000.0


def test_a_signed_body_verifies_with_the_same_secret_only() -> None:
    body = b'{"id": "d1", "type": "job.succeeded"}'
    headers = signed_headers(SECRET, body, "d1", "job.succeeded", now=NOW)
    ts, sig = headers["Conveyor-Timestamp"], headers["Conveyor-Signature"]

    assert verify_signature(SECRET, body, ts, sig, now=NOW)
    assert not verify_signature("other", body, ts, sig, now=NOW)
    assert not verify_signature(SECRET, body + b" ", ts, sig, now=NOW)
    assert not verify_signature(SECRET, body, str(int(NOW) + 1), sig, now=NOW)
    assert headers["Conveyor-Delivery"] == "d1" and headers["Conveyor-Event"] == "job.succeeded"


def test_the_signature_is_an_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b"{}"
    expected = hmac.new(SECRET.encode(), b"1800000000.{}", hashlib.sha256).hexdigest()
    assert signature(SECRET, 1_800_000_000, body) == f"v1={expected}"


def test_an_old_or_future_signature_is_refused_as_a_replay() -> None:
    body = b"{}"
    sig = signature(SECRET, int(NOW), body)
    assert verify_signature(SECRET, body, str(int(NOW)), sig, now=NOW + 299)
    assert not verify_signature(SECRET, body, str(int(NOW)), sig, now=NOW + 301)
    assert not verify_signature(SECRET, body, str(int(NOW)), sig, now=NOW - 301)
    assert not verify_signature(SECRET, body, "not a number", sig, now=NOW)


def test_one_matching_signature_among_several_is_enough() -> None:
    body = b"{}"
    good = signature(SECRET, int(NOW), body)
    stale = signature("previous secret", int(NOW), body)
    assert verify_signature(SECRET, body, str(int(NOW)), f"{stale}, {good}", now=NOW)
    assert not verify_signature(SECRET, body, str(int(NOW)), stale, now=NOW)
    assert not verify_signature(SECRET, body, str(int(NOW)), "", now=NOW)


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
            delay = retry_delay_s(attempt, 1.0, 60.0)
            assert ceiling / 2 <= delay <= ceiling
    assert retry_delay_s(1, 1.0, 60.0, retry_after_s=30.0) >= 30.0
    assert retry_delay_s(1, 1.0, 60.0, retry_after_s=3600.0) <= 60.0
