"""Fixtures of the unit tests, kept with the helpers they go with."""

from tests.unit.fake_services import sync_fake

__all__ = ["sync_fake"]
