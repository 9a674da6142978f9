"""What the bodies of the corpus are made of: the model, media files (real PNG, GIF and
WebP files of a few pixels; a JPEG header only, enough for the size and type checks;
a small real two-page PDF), two tools, and builders of bodies, turns and blocks.
"""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

__all__ = [
    "MODEL",
    "Body",
    "GIF_1X1",
    "WEBP_1X1",
    "b64",
    "PNG_B64",
    "BIG_PNG_B64",
    "JPEG_B64",
    "GIF_B64",
    "WEBP_B64",
    "PDF_B64",
    "WEATHER_TOOL",
    "TIME_TOOL",
    "body",
    "user",
    "assistant",
    "text",
    "image",
    "tool_use",
    "tool_result",
    "PDF_BLOCK",
    "EPHEMERAL_5M",
    "EPHEMERAL_1H",
    "THINKING",
]

MODEL = "claude-sonnet-4-6"
Body = dict[str, Any]


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _jpeg_header(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


GIF_1X1 = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
WEBP_1X1 = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")


def _pdf(pages: int) -> bytes:
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objs = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>",
        *["<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"] * pages,
    ]
    out = b"%PDF-1.4\n"
    for i, obj in enumerate(objs, start=1):
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    return out + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG_B64 = b64(_png(40, 30))
BIG_PNG_B64 = b64(_png(3000, 2000))  # estimated as downscaled to 1568 x 1045
JPEG_B64 = b64(_jpeg_header(800, 600))
GIF_B64 = b64(GIF_1X1)
WEBP_B64 = b64(WEBP_1X1)
PDF_B64 = b64(_pdf(2))

WEATHER_TOOL: Body = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
TIME_TOOL: Body = {
    "name": "get_time",
    "description": "Local time of a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def body(*messages: Body | str, **extra: Any) -> Body:
    """A body with max_tokens 1024; a str message is a user turn."""
    msgs = [{"role": "user", "content": m} if isinstance(m, str) else m for m in messages]
    return {"model": MODEL, "max_tokens": 1024, "messages": msgs, **extra}


def user(*content: Any) -> Body:
    return {"role": "user", "content": list(content)}


def assistant(*content: Any) -> Body:
    return {"role": "assistant", "content": list(content)}


def text(t: str, **extra: Any) -> Body:
    return {"type": "text", "text": t, **extra}


def image(media_type: str, data: str, **extra: Any) -> Body:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": data},
        **extra,
    }


def tool_use(tid: str, name: str, args: Body) -> Body:
    return {"type": "tool_use", "id": tid, "name": name, "input": args}


def tool_result(tid: str, content: Any, **extra: Any) -> Body:
    return {"type": "tool_result", "tool_use_id": tid, "content": content, **extra}


PDF_BLOCK: Body = {
    "type": "document",
    "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
}
EPHEMERAL_5M: Body = {"type": "ephemeral", "ttl": "5m"}
EPHEMERAL_1H: Body = {"type": "ephemeral", "ttl": "1h"}
THINKING: Body = {"type": "enabled", "budget_tokens": 2048}
_ASK = "What is the weather in Paris?"
_CALL = tool_use("toolu_01", "get_weather", {"city": "Paris"})
