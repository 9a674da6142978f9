"""The provider's SDK client (conveyor.llm.provider._Client) remembers what the SDK
rebuilt on every call; what it sends must stay exactly what the SDK itself sends."""

from __future__ import annotations

import anthropic
import httpx2
import pytest

from conveyor.llm.provider import _Client, classify

SSE = b"event: message_start\ndata: {}\n\nevent: message_stop\ndata: {}\n\n"


def _recording(sent: list[httpx2.Request], status: int = 200) -> httpx2.AsyncClient:
    def answer(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        if status != 200:
            return httpx2.Response(
                status,
                json={"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
            )
        return httpx2.Response(200, content=SSE, headers={"content-type": "text/event-stream"})

    return httpx2.AsyncClient(transport=httpx2.MockTransport(answer))


async def _call(client: anthropic.AsyncAnthropic, extra_headers: dict[str, str]) -> None:
    async with client.messages.with_streaming_response.create(
        model="claude-sonnet-4-5",
        max_tokens=8,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers=extra_headers,
        extra_body={"temperature": 0.5},
    ) as response:
        await response.http_response.aread()


def _kwargs(http: httpx2.AsyncClient) -> dict[str, object]:
    return {
        "api_key": "test-key",
        "base_url": "http://127.0.0.1:9/",
        "max_retries": 0,
        "http_client": http,
    }


async def test_requests_are_what_the_sdk_sends_on_every_call() -> None:
    ours: list[httpx2.Request] = []
    sdks: list[httpx2.Request] = []
    client = _Client(**_kwargs(_recording(ours)))
    reference = anthropic.AsyncAnthropic(**_kwargs(_recording(sdks)))  # type: ignore[arg-type]
    for attempt in ("1", "2", "3"):  # the remembered parts are reused from the second call on
        for c in (client, reference):
            await _call(c, {"x-sim-attempt": attempt, "anthropic-beta": f"beta-{attempt}"})
    assert len(ours) == len(sdks) == 3
    for mine, theirs in zip(ours, sdks, strict=True):
        assert (mine.method, str(mine.url)) == (theirs.method, str(theirs.url))
        assert str(mine.url) == "http://127.0.0.1:9/v1/messages"
        assert mine.content == theirs.content
        assert list(mine.headers.multi_items()) == list(theirs.headers.multi_items())
    assert "test-key" in (ours[0].headers.get("x-api-key") or ours[0].headers["authorization"])
    assert ours[1].headers["x-sim-attempt"] == "2"
    assert ours[2].headers["anthropic-beta"] == "beta-3"
    assert ours[0].headers["user-agent"].startswith("AsyncAnthropic/Python ")


async def test_a_call_is_sent_once_and_its_error_classified_as_the_sdk_s() -> None:
    ours: list[httpx2.Request] = []
    sdks: list[httpx2.Request] = []
    client = _Client(**_kwargs(_recording(ours, status=529)))
    reference = anthropic.AsyncAnthropic(**_kwargs(_recording(sdks, status=529)))  # type: ignore[arg-type]
    errors = []
    for c in (client, reference):
        with pytest.raises(anthropic.APIStatusError) as caught:
            await _call(c, {})
        errors.append(classify(caught.value))
    assert len(ours) == len(sdks) == 1  # max_retries=0: the SDK does not retry
    assert errors[0] == errors[1]
    assert errors[0].retryable and errors[0].http_status == 529


def test_copies_of_the_client_keep_the_same_headers() -> None:
    client = _Client(api_key="test-key", base_url="http://127.0.0.1:9/")
    copy = client.with_options(max_retries=0)
    assert isinstance(copy, _Client)
    assert copy.default_headers == client.default_headers
    assert client.default_headers is not client.default_headers  # callers get their own dict
