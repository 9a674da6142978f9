"""What the tests of the HTTP/JSON API (services/http) share: a job body, a submit, and
sessions on the stack's HTTP API with the default tenant's key (`http`) and with
none (`anonymous`), fixtures through `conftest.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.stack import Stack

MODEL = "claude-sonnet-4-5"


def job_body(prompt: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "maxTokens": 64,
        **extra,
    }


@pytest.fixture
async def http(stack: Stack, api_key: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A session on the stack's HTTP API carrying the default tenant's key."""
    headers = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession(stack.http_url, headers=headers) as session:
        yield session


@pytest.fixture
async def anonymous(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(stack.http_url) as session:
        yield session


async def submit(http: aiohttp.ClientSession, **extra: Any) -> dict[str, Any]:
    async with http.post("/v1/jobs", json=job_body(**extra)) as r:
        assert r.status == 200, await r.text()
        job: dict[str, Any] = (await r.json())["job"]
        return job
