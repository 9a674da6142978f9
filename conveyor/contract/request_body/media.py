"""Images and PDFs inside a request body: where they are, what their bytes say.

Image sizes are read from the header bytes of PNG, JPEG, GIF and WebP (no image
library); a PDF's page count from its page objects (or its page tree's /Count).
"""

from __future__ import annotations

import binascii
import re
import struct
from collections.abc import Iterator
from typing import Any

IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def media_blocks(body: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """Every image and document block of the messages, with its path below the body.

    Blocks nested in a tool_result's content or a document's content source count too.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            yield from _walk(message["content"], f".messages[{i}].content")


def _walk(blocks: list[Any], path: str) -> Iterator[tuple[dict[str, Any], str]]:
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        here = f"{path}[{j}]"
        if kind in ("image", "document"):
            yield block, here
            source = block.get("source")
            if isinstance(source, dict) and isinstance(source.get("content"), list):
                yield from _walk(source["content"], f"{here}.source.content")
        elif kind == "tool_result" and isinstance(block.get("content"), list):
            yield from _walk(block["content"], f"{here}.content")


def decode_base64(data: str) -> bytes | None:
    """The bytes of standard base64 text, or None if it is not valid base64."""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def image_type(data: bytes) -> str | None:
    """The media type the image's first bytes announce (PNG, JPEG, GIF, WebP), if any."""
    for magic, media_type in IMAGE_MAGIC:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels from the header bytes, or None if not found."""
    try:
        kind = image_type(data)
        if kind == "image/png" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return int(w), int(h)
        if kind == "image/gif":
            w, h = struct.unpack("<HH", data[6:10])
            return int(w), int(h)
        if kind == "image/webp":
            return _webp_size(data)
        if kind == "image/jpeg":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: 24-bit width-1 and height-1
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 ":  # lossy: after the 3-byte frame tag and start code
        w, h = struct.unpack("<HH", data[26:30])
        return int(w) & 0x3FFF, int(h) & 0x3FFF
    if chunk == b"VP8L":  # lossless: 14 bits each after the signature byte
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the JPEG segments to the start-of-frame marker, which holds the size."""
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF:
            h, w = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(w), int(h)
        pos += 2 + int(length)
    return None


_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_COUNT = re.compile(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)|/Count\s+(\d+)[^>]*?/Type\s*/Pages\b")


def pdf_pages(data: bytes) -> int | None:
    """Pages of a PDF: its /Type /Page objects, or its page tree's /Count when the
    objects are compressed; None if neither is found."""
    pages = len(_PAGE.findall(data))
    counts = [int(a or b) for a, b in _COUNT.findall(data)]
    best = max([pages, *counts])
    return best or None
