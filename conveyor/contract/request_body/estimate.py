"""Input tokens of a request body, estimated before the call for the shared rate-limit budget.

The provider's count comes back with the answer; this is what a worker takes from
the input-tokens bucket before calling. The formula:

- text: ceil(characters / 4) over the system prompt, text blocks, tool_result and
  search_result text, thinking text, redacted_thinking data, tool_use inputs (as
  JSON), plain-text and content-source documents, and any other block (as JSON);
- an image: its pixels / 750 (the API's formula) after the API's own downscaling
  to a long edge of at most 1,568 px, capped at 1,600 tokens; when the size
  cannot be read from the base64 header bytes (a url or file image, an
  unrecognised header) it counts IMAGE_DEFAULT_TOKENS (1,600: the most an image
  within the API's limits costs);
- a PDF: PDF_PAGE_TOKENS (3,000) per page, pages read from the bytes (page objects
  or the page tree's /Count), else one page per PDF_BYTES_PER_PAGE (100 KB) of
  data; a url or file PDF, whose bytes Conveyor does not see, counts
  DOCUMENT_DEFAULT_TOKENS (15,000, five pages);
- tools: ceil(JSON characters of the tool without its cache_control / 4) +
  TOOL_TOKENS (30) each, plus TOOL_USE_SYSTEM_TOKENS (350) once for the system
  prompt the API adds when tools are given.

The result is at least 1.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from conveyor.contract.request_body.media import decode_base64, image_size, media_blocks, pdf_pages

IMAGE_MAX_EDGE = 1568
IMAGE_PIXELS_PER_TOKEN = 750
IMAGE_MAX_TOKENS = 1600
IMAGE_DEFAULT_TOKENS = 1600
PDF_PAGE_TOKENS = 3000
PDF_BYTES_PER_PAGE = 100_000
DOCUMENT_DEFAULT_TOKENS = 15_000
TOOL_TOKENS = 30
TOOL_USE_SYSTEM_TOKENS = 350
CHARS_PER_TOKEN = 4


def image_tokens(width: int, height: int) -> int:
    """The API's width * height / 750, after scaling the long edge down to 1,568 px."""
    long_edge = max(width, height, 1)
    if long_edge > IMAGE_MAX_EDGE:
        scale = IMAGE_MAX_EDGE / long_edge
        width, height = round(width * scale), round(height * scale)
    return min(IMAGE_MAX_TOKENS, max(1, math.ceil(width * height / IMAGE_PIXELS_PER_TOKEN)))


def _json_chars(value: Any) -> int:
    return len(orjson.dumps(value))


def _text_chars(content: Any) -> int:
    """Characters of text in a string or a list of blocks (images and documents excluded)."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            total += len(block.get("text") or "")
        elif kind == "thinking":
            total += len(block.get("thinking") or "")
        elif kind == "redacted_thinking":
            total += len(block.get("data") or "")
        elif kind == "tool_use":
            total += _json_chars(block.get("input", {})) + len(block.get("name") or "")
        elif kind in ("tool_result", "search_result"):
            total += _text_chars(block.get("content"))
        elif kind == "document":
            source = block.get("source") or {}
            if source.get("type") == "text":
                total += len(source.get("data") or "")
            elif source.get("type") == "content":
                total += _text_chars(source.get("content"))
        elif kind != "image":
            total += _json_chars(block)
    return total


def _media_tokens(block: dict[str, Any]) -> int:
    source = block.get("source") or {}
    base64 = source.get("type") == "base64" and isinstance(source.get("data"), str)
    if block.get("type") == "image":
        data = decode_base64(source["data"]) if base64 else None
        size = image_size(data) if data else None
        return image_tokens(*size) if size else IMAGE_DEFAULT_TOKENS
    if not base64:  # text and content sources are counted as text; url/file unseen
        return DOCUMENT_DEFAULT_TOKENS if source.get("type") in ("url", "file") else 0
    data = decode_base64(source["data"]) or b""
    pages = pdf_pages(data) or max(1, math.ceil(len(data) / PDF_BYTES_PER_PAGE))
    return pages * PDF_PAGE_TOKENS


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """Estimated input tokens of a (validated) request body; see the module docstring."""
    chars = _text_chars(body.get("system"))
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            chars += _text_chars(message.get("content"))
    tokens = math.ceil(chars / CHARS_PER_TOKEN)
    tokens += sum(_media_tokens(block) for block, _ in media_blocks(body))
    tools = body.get("tools") or ()
    if tools:
        tokens += TOOL_USE_SYSTEM_TOKENS
        for tool in tools:
            if isinstance(tool, dict):
                bare = {k: v for k, v in tool.items() if k != "cache_control"}
                tokens += math.ceil(_json_chars(bare) / CHARS_PER_TOKEN) + TOOL_TOKENS
    return max(1, tokens)
