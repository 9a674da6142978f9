"""The body form of a SubmitJobRequest: `request_json`, the whole Messages API body.

`body_form` refuses a request that also sets the short typed form, decodes the JSON,
checks it with `validate_body` (paths under `request`, e.g.
`request.messages[2].content[0].source.media_type`, after the batch prefix) and
returns the model and the rest of the body, which is stored and sent as it is.
"""

from __future__ import annotations

from typing import Any

import orjson

from conveyor.contract.request_body import BodyLimits, validate_body
from conveyor.core.errors import InvalidArgument
from conveyor.v1 import jobs_pb2

BODY_FIELD = "request_json"
"""The proto field that carries the body."""
BODY_PATH = "request"
"""The name of the body's root in field paths of refusals."""
_REPEATED_SHORT_FORM = ("messages", "stop_sequences", "metadata")
_SCALAR_SHORT_FORM = ("model", "system", "max_tokens")


def short_form_fields(req: jobs_pb2.SubmitJobRequest) -> list[str]:
    """The fields of the short typed form that `req` sets."""
    out = [name for name in _SCALAR_SHORT_FORM if getattr(req, name)]
    if req.HasField("temperature"):
        out.append("temperature")
    out += [name for name in _REPEATED_SHORT_FORM if len(getattr(req, name))]
    return out


def body_form(
    req: jobs_pb2.SubmitJobRequest, limits: BodyLimits, prefix: str = ""
) -> tuple[str, dict[str, Any]]:
    """(model, body without model) of a request in the body form, or InvalidArgument."""
    both = short_form_fields(req)
    if both:
        raise InvalidArgument(
            f"{prefix}{both[0]}",
            f"the short form cannot be combined with {BODY_FIELD}: put it in the body",
        )
    if len(req.request_json) > limits.max_body_bytes:
        raise InvalidArgument(
            f"{prefix}{BODY_FIELD}",
            f"is {len(req.request_json)} bytes, at most {limits.max_body_bytes}",
        )
    try:
        decoded = orjson.loads(req.request_json)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"{prefix}{BODY_FIELD}", f"is not valid UTF-8 JSON: {exc}") from None
    body = validate_body(decoded, limits, path=f"{prefix}{BODY_PATH}")
    model = body.pop("model")
    return model, body
