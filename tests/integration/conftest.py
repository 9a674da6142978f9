"""Fixtures of the integration tests, kept with the helpers they go with."""

from tests.integration.hostile_requests import target
from tests.integration.http_api import anonymous, http
from tests.integration.webhook_receiver import default_secret, receiver

__all__ = ["anonymous", "default_secret", "http", "receiver", "target"]
