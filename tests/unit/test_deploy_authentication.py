"""What the deployments (compose and Kubernetes) set up for authentication: no service
takes key-less calls on the network, and the notifier (which signs webhooks) and the
gateway's container (where operators run `conveyor webhooks secret rotate`) hold one
key for the webhook signing secrets, which nothing else holds.
"""

from __future__ import annotations

import pytest

from conveyor.core.config import Settings
from tests.unit.deploy_files import (
    GRPC_PORT_FIELDS,
    SERVICES,
    compose_env,
    container_env,
    k8s_get,
    settings_from,
    the_container,
)


def anonymous_problem(settings: Settings, name: str) -> str | None:
    """Why a service with these settings would refuse to start over its anonymous tenant."""
    from conveyor.core.config import ConfigError
    from conveyor.server.runtime import check_anonymous

    host = getattr(settings, f"{name}_host", None)
    if host is None:
        return None
    try:
        check_anonymous(settings, host, name, warn=False)
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", SERVICES)
def test_no_deployed_service_takes_key_less_calls_on_the_network(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for env in (compose_env(name), container_env(the_container(k8s_get("Deployment", name)))):
        settings = settings_from(env, monkeypatch)
        assert settings.anonymous_tenant is None, "every call needs an API key"
        assert not settings.allow_anonymous_on_network
        assert anonymous_problem(settings, name) is None


@pytest.mark.parametrize("name", list(GRPC_PORT_FIELDS))
def test_an_anonymous_tenant_on_a_deployed_listener_would_refuse_to_start(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**compose_env(name), "CONVEYOR_ANONYMOUS_TENANT": "default"}
    problem = anonymous_problem(settings_from(env, monkeypatch), name)
    assert problem is not None and "0.0.0.0" in problem


WEBHOOK_KEY_HOLDERS = ("gateway", "notifier")
"""The notifier signs; the gateway's container is where operators run
`conveyor webhooks secret rotate` (it seals with the same key). Nothing else needs it."""


def stack_webhook_keys(
    envs: dict[str, dict[str, str | None]], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str | None]:
    keys: dict[str, str | None] = {}
    for name, env in envs.items():
        key = settings_from(env, monkeypatch).webhook_secrets_key
        keys[name] = key.get_secret_value() if key is not None else None
    return keys


def assert_webhooks_can_be_signed(keys: dict[str, str | None]) -> None:
    """A secret made where the CLI runs opens in the notifier, which can then sign."""
    from conveyor.server.webhooks import SecretBox, new_secret, signed_headers, verify_signature

    made, signer = keys["gateway"], keys["notifier"]
    assert made is not None and signer is not None, "without the key no webhook is sent"
    secret = new_secret()
    sealed = SecretBox(made).seal("acme", "id-1", secret)
    opened = SecretBox(signer).open("acme", "id-1", sealed)
    headers = signed_headers([opened], b"{}", "d1", "job.succeeded")
    assert verify_signature(secret, b"{}", headers)
    assert all(keys[n] is None for n in SERVICES if n not in WEBHOOK_KEY_HOLDERS), (
        "only the services that need it hold the key"
    )


def test_compose_gives_the_notifier_and_the_cli_one_key_for_webhook_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = stack_webhook_keys({n: compose_env(n) for n in SERVICES}, monkeypatch)
    assert_webhooks_can_be_signed(keys)


def test_kubernetes_gives_the_notifier_and_the_cli_one_key_for_webhook_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    envs = {n: container_env(the_container(k8s_get("Deployment", n))) for n in SERVICES}
    keys = stack_webhook_keys(envs, monkeypatch)
    assert_webhooks_can_be_signed(keys)
