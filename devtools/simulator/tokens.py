"""Input tokens of a Messages API request, as the simulator counts them.

Text (system, message text, tool_result content, tool_use inputs as JSON, tool
definitions as JSON, plain-text documents) counts ceil(characters / 4), the rule the
worker's budget uses too, so a text-only request costs what it always did. Other
blocks count a number of tokens each:

- an image: ceil(width * height / 750) after the API's downscaling to a long edge of
  at most 1568 px, read from the base64 data's header (PNG, JPEG, GIF, WebP); an
  image by url or file id, whose size is unknown here, counts `IMAGE_UNKNOWN_TOKENS`
  (the API's largest image);
- a PDF: `PDF_PAGE_TOKENS` per page (pages counted in the file), a PDF by url or
  file id one page;
- thinking and redacted_thinking blocks of earlier turns: nothing (the API drops
  them from the context).

`segments(body)` splits a request into its cacheable units in the API's prefix order
(tools, then system, then messages), each with its characters, fixed tokens and
cache breakpoint; `caching.PromptCache` hashes their prefixes.
"""

from __future__ import annotations

import binascii
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from devtools.simulator.jsonio import dumps, dumps_sorted

__all__ = [
    "IMAGE_UNKNOWN_TOKENS",
    "PDF_PAGE_TOKENS",
    "Segment",
    "count_input_tokens",
    "decode_base64",
    "estimate_input_tokens",
    "image_size",
    "image_tokens",
    "pdf_pages",
    "segments",
    "tokens_of",
]

IMAGE_UNKNOWN_TOKENS: Final = 1600
"""An image whose size is unknown (url, file id): the most an image costs after resizing."""
IMAGE_MAX_EDGE: Final = 1568
"""The API downscales images to this long edge before counting them."""
PDF_PAGE_TOKENS: Final = 1500
"""Tokens per PDF page (the API documents 1,500 to 3,000: text plus the page's image)."""

_PDF_PAGE: Final = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


@dataclass(frozen=True, slots=True)
class Segment:
    """One cacheable unit of a request: a tool, a system block or a message block."""

    key: bytes
    """What identifies the unit in a cache prefix (its canonical JSON without cache_control)."""
    chars: int
    """Characters of text, counted ceil(chars / 4) with the others."""
    tokens: int
    """Fixed tokens (images, documents)."""
    ttl: str | None
    """The cache breakpoint's TTL ("5m", "1h") when the unit carries cache_control."""


def tokens_of(chars: int, tokens: int) -> int:
    """Tokens of `chars` characters of text plus `tokens` fixed tokens."""
    return math.ceil(chars / 4) + tokens


def estimate_input_tokens(system: Any, messages: list[Any]) -> int:
    """ceil(characters of system and message text / 4) plus images and documents, at least 1."""
    chars, tokens = _cost(system)
    for msg in messages:
        if isinstance(msg, dict):
            c, t = _cost(msg.get("content"))
            chars, tokens = chars + c, tokens + t
    return max(1, tokens_of(chars, tokens))


def count_input_tokens(body: dict[str, Any]) -> int:
    """All the input tokens of a request: tools, system and messages, at least 1
    (what the `segments` add up to, without building their keys)."""
    chars, tokens = _cost(body.get("system"))
    tools = body.get("tools")
    if isinstance(tools, list):
        chars += sum(len(dumps(_without_cache(t))) for t in tools if isinstance(t, dict))
    for msg in body.get("messages") or []:
        if isinstance(msg, dict):
            c, t = _cost(msg.get("content"))
            chars, tokens = chars + c, tokens + t
    return max(1, tokens_of(chars, tokens))


def segments(body: dict[str, Any]) -> list[Segment]:
    """The request's cacheable units in prefix order: tools, system, message blocks.

    A top-level `cache_control` puts a breakpoint on the last unit, as the API does.
    """
    out: list[Segment] = []
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                out.append(_segment(tool, len(dumps(_without_cache(tool))), 0))
    system = body.get("system")
    if isinstance(system, str):
        if system:
            out.append(_segment(system, len(system), 0))
    elif isinstance(system, list):
        for block in system:
            chars, tokens = _cost([block])
            out.append(_segment(block, chars, tokens))
    for msg in body.get("messages") or []:
        if not isinstance(msg, dict):
            continue
        role = msg.get("role")
        content = msg.get("content")
        if isinstance(content, str):
            out.append(_segment({"role": role, "text": content}, len(content), 0))
        elif isinstance(content, list):
            for block in content:
                chars, tokens = _cost([block])
                out.append(_segment({"role": role, "block": block}, chars, tokens))
    top = body.get("cache_control")
    if isinstance(top, dict) and out:
        last = out[-1]
        out[-1] = Segment(last.key, last.chars, last.tokens, _ttl(top))
    return out


def _segment(unit: Any, chars: int, tokens: int) -> Segment:
    cache: Any = None
    if isinstance(unit, dict):
        inner = unit.get("block", unit)
        cache = inner.get("cache_control") if isinstance(inner, dict) else None
    ttl = _ttl(cache) if isinstance(cache, dict) else None
    return Segment(dumps_sorted(_without_cache(unit)), chars, tokens, ttl)


def _ttl(cache_control: dict[str, Any]) -> str:
    ttl = cache_control.get("ttl")
    return ttl if isinstance(ttl, str) else "5m"


def _without_cache(unit: Any) -> Any:
    """The unit without its cache_control markers (they do not change the prefix)."""
    if isinstance(unit, dict):
        return {k: _without_cache(v) for k, v in unit.items() if k != "cache_control"}
    if isinstance(unit, list):
        return [_without_cache(v) for v in unit]
    return unit


def _cost(content: Any) -> tuple[int, int]:
    """(characters of text, fixed tokens) of a content string or list of blocks."""
    if isinstance(content, str):
        return len(content), 0
    if not isinstance(content, list):
        return 0, 0
    chars = tokens = 0
    for block in content:
        if isinstance(block, str):
            chars += len(block)
            continue
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        text = block.get("text")
        if isinstance(text, str):
            chars += len(text)
        elif kind == "image":
            tokens += _image_cost(block.get("source"))
        elif kind == "document":
            c, t = _document_cost(block)
            chars, tokens = chars + c, tokens + t
        elif kind in ("thinking", "redacted_thinking"):
            continue
        elif "content" in block:  # tool_result, search_result
            c, t = _cost(block["content"])
            chars, tokens = chars + c, tokens + t
        elif kind in ("tool_use", "server_tool_use"):
            chars += len(dumps(block.get("input", {})))
        else:  # other server-tool blocks: a rough fixed cost
            chars += 1000
    return chars, tokens


def _image_cost(source: Any) -> int:
    if isinstance(source, dict) and source.get("type") == "base64":
        data = decode_base64(source.get("data"))
        size = image_size(data) if data is not None else None
        if size is not None:
            return image_tokens(size[1], size[2])
    return IMAGE_UNKNOWN_TOKENS


def _document_cost(block: dict[str, Any]) -> tuple[int, int]:
    chars = 0
    for name in ("title", "context"):
        value = block.get(name)
        if isinstance(value, str):
            chars += len(value)
    source = block.get("source")
    if not isinstance(source, dict):
        return chars, PDF_PAGE_TOKENS
    kind = source.get("type")
    if kind == "text":
        data = source.get("data")
        return chars + (len(data) if isinstance(data, str) else 0), 0
    if kind == "content":
        c, t = _cost(source.get("content"))
        return chars + c, t
    if kind == "base64":
        data = decode_base64(source.get("data"))
        return chars, PDF_PAGE_TOKENS * (pdf_pages(data) if data is not None else 1)
    return chars, PDF_PAGE_TOKENS


def image_tokens(width: int, height: int) -> int:
    """ceil(width * height / 750) after downscaling the long edge to IMAGE_MAX_EDGE."""
    scale = min(1.0, IMAGE_MAX_EDGE / max(width, height, 1))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return max(1, math.ceil(w * h / 750))


def pdf_pages(data: bytes) -> int:
    """Pages of a PDF (its `/Type /Page` objects), at least 1."""
    return max(1, len(_PDF_PAGE.findall(data)))


def decode_base64(data: Any) -> bytes | None:
    """The bytes of base64 text, or None when it is not valid base64."""
    if not isinstance(data, str):
        return None
    try:
        return binascii.a2b_base64(data.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """(media type, width, height) from an image's header; None if not an image we know."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return "image/png", width, height
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return "image/gif", width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[str, int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return "image/webp", width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return "image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return "image/webp", width, height
    return None


def _jpeg_size(data: bytes) -> tuple[str, int, int] | None:
    for marker, at in _jpeg_markers(data):
        # Start-of-frame markers (not DHT C4, JPG C8, DAC CC) carry the size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return "image/jpeg", width, height
    return None


def _jpeg_markers(data: bytes) -> Iterator[tuple[int, int]]:
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return
        marker = data[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        yield marker, at
        if marker == 0xDA:  # start of scan: no more headers
            return
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        at += 2 + length
