"""The CLI points at a job's trace in Jaeger when a Jaeger URL is configured."""

from __future__ import annotations

import pytest

from conveyor.cli import trace_link
from conveyor.core.config import get_settings


@pytest.fixture(autouse=True)
def _fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_a_trace_link_needs_a_configured_jaeger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_JAEGER_URL", raising=False)
    assert trace_link("ab" * 16) is None


def test_the_link_opens_the_jobs_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_JAEGER_URL", "http://127.0.0.1:16686/")
    assert trace_link("ab" * 16) == "http://127.0.0.1:16686/trace/" + "ab" * 16
    assert trace_link("") is None
