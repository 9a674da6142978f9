"""Bounds a caller cannot talk a process out of: the gRPC receive size follows the input
limits, the key caches are bounded LRUs that a flood of wrong keys cannot grow or empty,
an anonymous tenant stays on loopback, the provider is chosen explicitly, and model
names become metric labels only when known or allowed."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contract.validation import validate_submit
from conveyor.core.config import ConfigError, Settings
from conveyor.core.errors import Unauthenticated
from conveyor.core.metrics import OTHER_MODEL, ModelNames, sdk_models
from conveyor.db import tenants as tenants_db
from conveyor.llm.provider import check_provider, simulator_headers
from conveyor.server.auth import Authenticator, generate_key, hash_key
from conveyor.server.runtime import (
    MIN_RECEIVE_BYTES,
    check_anonymous,
    is_loopback,
    max_request_bytes,
)
from conveyor.v1 import jobs_pb2
from services.worker.runner import JobRunner

WIDE = "\U0001f600"  # 4 bytes in UTF-8: the most a character of a limit can take


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings here are the defaults plus each test's values: a test stack of the
    same run leaves its ports and URLs in os.environ (devtools.sandbox)."""
    for name in list(os.environ):
        if name.startswith(("CONVEYOR_", "ANTHROPIC_")):
            monkeypatch.delenv(name)


def _settings(**values: object) -> Settings:
    return Settings.model_validate(values)


# --------------------------------------------------------------------------- receive size


def largest_request(settings: Settings) -> jobs_pb2.SubmitJobRequest:
    """A SubmitJobRequest at every input limit, in 4-byte characters."""
    per_message, rest = divmod(settings.max_prompt_chars, settings.max_messages)
    messages = [
        jobs_pb2.Message(
            role="user" if i % 2 == 0 else "assistant",
            content=WIDE * (per_message + (1 if i < rest else 0)),
        )
        for i in range(settings.max_messages)
    ]
    chars = settings.max_label_chars
    return jobs_pb2.SubmitJobRequest(
        model="c" * 128,
        messages=messages,
        max_tokens=settings.max_output_tokens,
        temperature=0.5,
        stop_sequences=[WIDE * 256] * 8,
        metadata={"user_id": WIDE * settings.max_metadata_chars},
        priority=settings.max_priority,
        lane="interactive",
        idempotency_key=WIDE * 255,
        max_attempts=20,
        webhook_url="https://" + WIDE * (settings.max_webhook_url_chars - len("https://")),
        webhook_events=jobs_pb2.WEBHOOK_EVENTS_ALL,
        labels={f"{i:04d}" + WIDE * (chars - 4): WIDE * chars for i in range(settings.max_labels)},
    )


@pytest.mark.parametrize(
    "limits",
    [
        # The short form's limits decide when the body form's (request_json) is smaller.
        {"max_request_bytes": 1024},  # the other defaults: about 4 MB
        {
            "max_prompt_chars": 3_000_000,
            "max_messages": 10,
            "max_labels": 64,
            "max_request_bytes": 1024,
        },
    ],
    ids=["defaults", "raised limits"],
)
def test_the_receive_size_holds_the_largest_request_the_limits_allow(
    limits: dict[str, int],
) -> None:
    settings = _settings(**limits)
    request = largest_request(settings)
    validate_submit(request, settings, "acme")  # it is valid: it must get through
    assert request.ByteSize() > MIN_RECEIVE_BYTES, "the limits, not the floor, decide"
    assert request.ByteSize() <= max_request_bytes(settings)
    # ... and the size is not far beyond it (the old fixed 16 MiB was four times too big).
    assert max_request_bytes(settings) < request.ByteSize() * 1.1


def test_the_receive_size_has_a_floor_for_small_limits() -> None:
    assert (
        max_request_bytes(_settings(max_prompt_chars=100, max_request_bytes=1024))
        == MIN_RECEIVE_BYTES
    )


def test_the_receive_size_holds_the_largest_request_body_the_limits_allow() -> None:
    settings = _settings(max_request_bytes=2_000_000, max_prompt_chars=100)
    body = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "'
    body += b"x" * (2_000_000 - len(body) - 6) + b'"}]}'
    request = largest_request(settings)
    del request.messages[:]
    for name in ("model", "max_tokens", "temperature", "stop_sequences", "metadata"):
        request.ClearField(name)
    request.request_json = body
    validate_submit(request, settings, "acme")  # it is valid: it must get through
    assert request.ByteSize() <= max_request_bytes(settings)
    assert max_request_bytes(settings) < request.ByteSize() * 1.1


# --------------------------------------------------------------------------- anonymous tenant


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_addresses_are_recognised(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "", "10.1.2.3", "192.168.0.1", "no-such.invalid"]
)
def test_every_other_address_counts_as_the_network(host: str) -> None:
    assert not is_loopback(host)


def test_an_anonymous_tenant_on_a_network_listener_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = _settings(anonymous_tenant="default")
    with pytest.raises(ConfigError) as refused:
        check_anonymous(settings, "0.0.0.0", "gateway")
    message = str(refused.value)
    assert "CONVEYOR_ANONYMOUS_TENANT" in message and "0.0.0.0" in message
    assert "CONVEYOR_ALLOW_ANONYMOUS_ON_NETWORK" in message


def test_an_anonymous_tenant_is_always_announced_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="conveyor.server.runtime")
    check_anonymous(_settings(anonymous_tenant="default"), "127.0.0.1", "gateway")
    allowed = _settings(anonymous_tenant="default", allow_anonymous_on_network=True)
    check_anonymous(allowed, "0.0.0.0", "gateway")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(r.__dict__["tenant"] == "default" for r in warnings)
    assert [r.__dict__["on_network"] for r in warnings] == [False, True]


def test_without_an_anonymous_tenant_any_listener_is_fine(caplog: pytest.LogCaptureFixture) -> None:
    check_anonymous(_settings(), "0.0.0.0", "gateway")
    assert not caplog.records


# --------------------------------------------------------------------------- provider


def test_the_provider_is_the_simulator_unless_set_and_never_gets_the_real_key() -> None:
    settings = _settings(ANTHROPIC_API_KEY="sk-ant-real")
    assert settings.provider == "simulator"
    assert settings.provider_base_url == "http://127.0.0.1:8765"
    assert check_provider(settings) == "simulator"


@pytest.mark.parametrize("key", [None, "", "   "])
def test_the_real_api_without_a_key_refuses_to_start(key: str | None) -> None:
    values: dict[str, object] = {"provider": "anthropic"}
    if key is not None:
        values["ANTHROPIC_API_KEY"] = key
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        check_provider(_settings(**values))


def test_the_real_api_gets_its_key_and_url() -> None:
    settings = _settings(provider="anthropic", ANTHROPIC_API_KEY="sk-ant-real")
    assert check_provider(settings) == "sk-ant-real"
    assert settings.provider_base_url == "https://api.anthropic.com"
    proxied = _settings(
        provider="anthropic", ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL="http://proxy:8080"
    )
    assert proxied.provider_base_url == "http://proxy:8080"


def test_x_sim_labels_become_headers_for_the_simulator_only() -> None:
    labels = {"x-sim-fail": "400", "team": "a"}
    assert simulator_headers(labels, 2) == {"x-sim-fail": "400", "x-sim-attempt": "2"}

    def runner(settings: Settings) -> JobRunner:
        return JobRunner(settings, engine=None, provider=None, events=None)  # type: ignore[arg-type]

    assert runner(_settings()).use_sim_headers
    real = _settings(provider="anthropic", ANTHROPIC_API_KEY="k")
    assert not runner(real).use_sim_headers


# --------------------------------------------------------------------------- model labels


def test_known_and_allowed_models_keep_their_name_and_the_rest_are_other() -> None:
    names = ModelNames.from_settings(
        _settings(
            allowed_models=["claude-*", "house-model"],
            rate_limits={"limited-model": {"requests_per_minute": 5}, "*": {}},
            known_models=["team-*"],
        )
    )
    assert names("claude-sonnet-4-5") == "claude-sonnet-4-5"  # built in
    assert all(names(m) == m for m in sdk_models())  # what the SDK knows
    assert names("house-model") == "house-model"  # named exactly in allowed_models
    assert names("limited-model") == "limited-model"  # rate_limits names it
    assert names("team-x") == "team-x"  # known_models, a pattern by the operator's choice
    # A pattern of allowed_models admits unboundedly many names: they stay `other`.
    assert names("claude-invented-123") == OTHER_MODEL
    assert names("*") == OTHER_MODEL
    assert {names(f"made-up-{i}") for i in range(1000)} == {OTHER_MODEL}


# --------------------------------------------------------------------------- key caches


@dataclass
class KeyStore:
    """Stands in for the api_keys table: counts lookups."""

    valid: dict[str, tenants_db.KeyOwner] = field(default_factory=dict)
    lookups: int = 0

    async def resolve(self, engine: AsyncEngine, digest: str) -> tenants_db.KeyOwner | None:
        self.lookups += 1
        return self.valid.get(digest)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyStore]:
    keys = KeyStore()
    monkeypatch.setattr(tenants_db, "resolve_key", keys.resolve)
    yield keys


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def test_a_flood_of_wrong_keys_stays_bounded_and_keeps_the_valid_ones(
    store: KeyStore,
) -> None:
    good = generate_key()
    store.valid[hash_key(good)] = tenants_db.KeyOwner(uuid.uuid4(), "acme", "ci", "member")
    authenticator = Authenticator(engine=None, cache_s=60, cache_size=50)  # type: ignore[arg-type]
    assert (await authenticator.resolve(_bearer(good))).tenant == "acme"
    for _ in range(500):
        with pytest.raises(Unauthenticated):
            await authenticator.resolve(_bearer(generate_key()))
    assert len(authenticator.refused) == 50 and len(authenticator.valid) == 1
    lookups = store.lookups
    assert (await authenticator.resolve(_bearer(good))).tenant == "acme"
    assert store.lookups == lookups, "the valid key was still cached"


async def test_a_refused_key_is_remembered(store: KeyStore) -> None:
    authenticator = Authenticator(engine=None, cache_s=60)  # type: ignore[arg-type]
    wrong = generate_key()
    for _ in range(10):
        with pytest.raises(Unauthenticated):
            await authenticator.resolve(_bearer(wrong))
    assert store.lookups == 1


async def test_the_valid_key_cache_drops_the_least_recently_used(store: KeyStore) -> None:
    keys = [generate_key() for _ in range(3)]
    for i, key in enumerate(keys):
        store.valid[hash_key(key)] = tenants_db.KeyOwner(uuid.uuid4(), f"t{i}", "k", "member")
    authenticator = Authenticator(engine=None, cache_s=60, cache_size=2)  # type: ignore[arg-type]
    for key in (keys[0], keys[1], keys[0], keys[2]):  # keys[1] is the least recently used
        await authenticator.resolve(_bearer(key))
    assert store.lookups == 3
    await authenticator.resolve(_bearer(keys[0]))
    assert store.lookups == 3, "keys[0] was kept"
    await authenticator.resolve(_bearer(keys[1]))
    assert store.lookups == 4, "keys[1] had been dropped"


@pytest.mark.parametrize("key", ["cvk_short", "x" * 47, "cvk_" + "!" * 43, "cvk_" + "a" * 44])
async def test_a_key_not_shaped_like_one_is_refused_without_a_lookup(
    store: KeyStore, key: str
) -> None:
    authenticator = Authenticator(engine=None)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated):
        await authenticator.resolve(_bearer(key))
    assert store.lookups == 0
