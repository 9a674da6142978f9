"""Answers every endpoint shares: errors with the API's JSON shape and headers, and the
rate-limit headers of a successful answer."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from devtools.simulator.jsonio import dumps

__all__ = ["ERRORS", "default_ratelimit_headers", "error_response"]

ERRORS: Final[dict[str, tuple[int, str, str]]] = {
    "400": (400, "invalid_request_error", "Simulated invalid request (x-sim-fail: 400)"),
    "401": (401, "authentication_error", "invalid x-api-key"),
    "404": (404, "not_found_error", "Not found"),
    "429": (
        429,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization (simulated).",
    ),
    "500": (500, "api_error", "Internal server error"),
    "529": (529, "overloaded_error", "Overloaded"),
}
"""Status, error type and message of each error answer."""


def error_response(
    kind: str, request_id: str, retry_after_s: float, message: str | None = None
) -> web.Response:
    """An error answer with the real JSON shape (`kind` is a key of `ERRORS`)."""
    status, error_type, default_message = ERRORS[kind]
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message or default_message},
        "request_id": request_id,
    }
    headers = {"request-id": request_id, "x-should-retry": "true"}
    if status in (429, 529):
        headers["retry-after"] = f"{retry_after_s:g}"
    if status == 429:
        headers["anthropic-ratelimit-requests-remaining"] = "0"
    if status < 500 and status != 429:
        headers["x-should-retry"] = "false"
    return web.Response(
        status=status, body=dumps(body), content_type="application/json", headers=headers
    )


def default_ratelimit_headers(reset: str) -> dict[str, str]:
    """The generous `anthropic-ratelimit-*` headers of an answer when no limit is enforced."""
    return {
        "anthropic-ratelimit-requests-limit": "100000",
        "anthropic-ratelimit-requests-remaining": "99999",
        "anthropic-ratelimit-requests-reset": reset,
        "anthropic-ratelimit-tokens-limit": "100000000",
        "anthropic-ratelimit-tokens-remaining": "99999000",
        "anthropic-ratelimit-tokens-reset": reset,
        "anthropic-ratelimit-input-tokens-limit": "80000000",
        "anthropic-ratelimit-input-tokens-remaining": "79999000",
        "anthropic-ratelimit-input-tokens-reset": reset,
        "anthropic-ratelimit-output-tokens-limit": "20000000",
        "anthropic-ratelimit-output-tokens-remaining": "19999000",
        "anthropic-ratelimit-output-tokens-reset": reset,
    }
