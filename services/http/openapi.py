"""The OpenAPI 3.1 document of the HTTP API, generated from the contract.

    python -m services.http.openapi           # write services/http/openapi.json
    python -m services.http.openapi --check   # exit 1 when the checked-in file is stale

Paths and operations come from the `google.api.http` rules (the same `routes()`
the server serves), schemas from the message descriptors in their JSON mapping
(services/http/transcode.py), and descriptions from the comments in protos/, read
with protoc's source info (grpc_tools, a dev dependency). The server serves the
checked-in file at GET /openapi.json; `make check-openapi` keeps it current.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from .app import OPENAPI_FILE
from .errors import HTTP_STATUS
from .transcode import (
    Route,
    is_json_bytes,
    is_map,
    is_repeated,
    map_value,
    message_of,
    routes,
)

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
PACKAGE = "conveyor.v1."
REF = "#/components/schemas/"

INT32 = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_FIXED32,
}
INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED64,
}
WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "A duration in seconds with an `s` suffix, e.g. `1.5s`.",
    },
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
}

API_DESCRIPTION = """\
Conveyor's JobService and JobEvents over HTTP/JSON, one to one with the gRPC
contract (protos/conveyor/v1, `google.api.http` rules).

**Authentication.** `Authorization: Bearer <api key>`, as on gRPC; a call acts
for the key's tenant, and another tenant's job is NOT_FOUND. A key is never
taken from a URL or a cookie.

**JSON.** The proto3 JSON mapping: lowerCamelCase names in answers (either the
proto or the JSON name in requests), int64 as strings, enums by name, Timestamp
and Duration as strings. Exception: a `bytes` field named `*_json` (a Messages
API body, content blocks, usage) is the JSON value itself, not base64.

**Query strings** (calls without a body): proto field names (or JSON names); a
list repeats its parameter or separates values by commas (`ids=a,b`); a map
entry is `labels[team]=search`; an enum value may drop its prefix
(`statuses=pending`), and `status` is another name for `statuses`. An unknown
parameter is INVALID_ARGUMENT.

**Errors** are one shape, `{"error": {"code", "http_status", "message",
"details"?, "retry_after_s"?, "reason"?, "metadata"?}}`: the gRPC status code's
name, its HTTP status (google.rpc's mapping), the field violations of
INVALID_ARGUMENT, the wait of RESOURCE_EXHAUSTED (also `Retry-After`), the
google.rpc.ErrorInfo reason.

**Server-Sent Events.** WatchJob and WatchJobs answer `text/event-stream`; each
`data:` line is one JobEvent in JSON. The event `id` of WatchJob is the job's
sequence number; that of WatchJobs a cursor (`<job>:<sequence>,...`, `<job>`
being the job's index in `ids` or, with labels, its id). Send it back as
`Last-Event-ID` (EventSource does) to resume exactly. The stream ends with
`event: end` when the jobs are finished, or `event: error` carrying an error
object (e.g. reason WATCH_FELL_BEHIND for a reader too slow: resume with the
last id). Comment lines keep an idle stream open. EventSource cannot send an
Authorization header: read the stream with `fetch` and a stream reader.
"""


# --------------------------------------------------------------------------- comments


def source_comments() -> dict[str, str]:
    """Leading comments of every message, field, enum, value, service and method in
    protos/conveyor/v1, by full name (e.g. `conveyor.v1.Job.id`)."""
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "conveyor" / "v1").glob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTOS}",
                f"-I{include}",
                f"--descriptor_set_out={out}",
                "--include_source_info",
                *files,
            ]
        )
        if code != 0:
            raise RuntimeError("protoc failed reading protos/")
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    comments: dict[str, str] = {}
    for file in fds.file:
        names: dict[tuple[int, ...], str] = {}
        prefix = file.package

        def messages(
            items: Any, path: tuple[int, ...], scope: str, names: dict[tuple[int, ...], str]
        ) -> None:
            for i, m in enumerate(items):
                full = f"{scope}.{m.name}"
                names[(*path, i)] = full
                for j, f in enumerate(m.field):
                    names[(*path, i, 2, j)] = f"{full}.{f.name}"
                for j, e in enumerate(m.enum_type):
                    names[(*path, i, 4, j)] = f"{full}.{e.name}"
                    for k, v in enumerate(e.value):
                        names[(*path, i, 4, j, 2, k)] = f"{full}.{e.name}.{v.name}"
                messages(m.nested_type, (*path, i, 3), full, names)

        messages(file.message_type, (4,), prefix, names)
        for i, e in enumerate(file.enum_type):
            names[(5, i)] = f"{prefix}.{e.name}"
            for k, v in enumerate(e.value):
                names[(5, i, 2, k)] = f"{prefix}.{e.name}.{v.name}"
        for i, s in enumerate(file.service):
            names[(6, i)] = f"{prefix}.{s.name}"
            for k, m in enumerate(s.method):
                names[(6, i, 2, k)] = f"{prefix}.{s.name}.{m.name}"
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            if name is not None and location.leading_comments:
                lines = [line.removeprefix(" ") for line in location.leading_comments.split("\n")]
                comments[name] = "\n".join(lines).strip()
    return comments


# --------------------------------------------------------------------------- schemas


class Schemas:
    """Component schemas, made as messages and enums are first referred to."""

    def __init__(self, comments: dict[str, str]) -> None:
        self.comments = comments
        self.components: dict[str, dict[str, Any]] = {}

    @staticmethod
    def name(full_name: str) -> str:
        return full_name.removeprefix(PACKAGE)

    def ref(self, full_name: str) -> dict[str, Any]:
        return {"$ref": REF + self.name(full_name)}

    def enum(self, enum: EnumDescriptor) -> dict[str, Any]:
        name = self.name(enum.full_name)
        if name not in self.components:
            values = [v.name for v in enum.values]
            notes = [
                f"- `{v.name}`: {self.comments[f'{enum.full_name}.{v.name}']}"
                for v in enum.values
                if f"{enum.full_name}.{v.name}" in self.comments
            ]
            text = "\n".join(filter(None, [self.comments.get(enum.full_name, ""), *notes]))
            self.components[name] = {"type": "string", "enum": values, "description": text}
        return self.ref(enum.full_name)

    def message(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[message.full_name])
        name = self.name(message.full_name)
        if name not in self.components:
            self.components[name] = {}  # a recursive reference finds it
            self.components[name] = self.object(message)
        return self.ref(message.full_name)

    def object(self, message: Descriptor, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
        properties = {
            f.json_name: self.field(f, message.full_name)
            for f in message.fields
            if f.name not in leave_out
        }
        out: dict[str, Any] = {"type": "object", "properties": properties}
        text = self.comments.get(message.full_name)
        if text:
            out["description"] = text
        return out

    def field(self, f: FieldDescriptor, owner: str) -> dict[str, Any]:
        if is_map(f):
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self.single(map_value(f)),
            }
        elif is_repeated(f):
            schema = {"type": "array", "items": self.single(f)}
        else:
            schema = self.single(f)
        text = self.comments.get(f"{owner}.{f.name}")
        if text:
            if "$ref" in schema:  # 3.1 allows siblings of $ref
                schema = {**schema, "description": text}
            else:
                schema["description"] = (schema.get("description", "") + "\n\n" + text).strip()
        return schema

    def single(self, f: FieldDescriptor) -> dict[str, Any]:
        t = f.type
        if is_json_bytes(f):
            return {"description": "A JSON value (UTF-8 JSON bytes on gRPC)."}
        if t == FieldDescriptor.TYPE_MESSAGE:
            return self.message(message_of(f))
        if t == FieldDescriptor.TYPE_ENUM:
            assert f.enum_type is not None
            return self.enum(f.enum_type)
        if t == FieldDescriptor.TYPE_STRING:
            return {"type": "string"}
        if t == FieldDescriptor.TYPE_BYTES:
            return {"type": "string", "format": "byte"}
        if t == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        if t in INT32:
            return {"type": "integer", "format": "int32"}
        if t in INT64:
            return {"type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]+$"}
        return {"type": "number"}


def error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "description": "Every refusal of the HTTP API.",
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "http_status", "message"],
                "properties": {
                    "code": {
                        "type": "string",
                        "enum": [c.name for c in HTTP_STATUS],
                        "description": "The gRPC status code's name.",
                    },
                    "http_status": {"type": "integer", "description": "The HTTP status."},
                    "message": {"type": "string"},
                    "details": {
                        "type": "array",
                        "description": "INVALID_ARGUMENT: the fields at fault.",
                        "items": {
                            "type": "object",
                            "required": ["field", "description"],
                            "properties": {
                                "field": {"type": "string"},
                                "description": {"type": "string"},
                            },
                        },
                    },
                    "retry_after_s": {
                        "type": "number",
                        "description": "RESOURCE_EXHAUSTED: when to try again.",
                    },
                    "reason": {"type": "string", "description": "google.rpc.ErrorInfo reason."},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            }
        },
    }


# --------------------------------------------------------------------------- document


def _parameters(route: Route, schemas: Schemas) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for name in route.path_fields:
        f = route.method.input_type.fields_by_name[name]
        params.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^[^/:]+$"},
                "description": schemas.comments.get(f"{route.method.input_type.full_name}.{name}"),
            }
        )
    for f in route.query_fields():
        schema = schemas.field(f, route.method.input_type.full_name)
        description = schema.pop("description", None)
        param: dict[str, Any] = {"name": f.name, "in": "query", "schema": schema}
        if is_map(f):
            param.update(style="deepObject", explode=True)
        elif is_repeated(f):
            param.update(style="form", explode=True)
        if description:
            param["description"] = description
        params.append(param)
    if route.streaming:
        params.append(
            {
                "name": "Last-Event-ID",
                "in": "header",
                "schema": {"type": "string"},
                "description": "Resume after this event id (as an EventSource sends it).",
            }
        )
    return [{k: v for k, v in p.items() if v is not None} for p in params]


def _operation(route: Route, schemas: Schemas) -> dict[str, Any]:
    method = route.method
    comment = schemas.comments.get(f"{route.service}.{method.name}", "")
    op: dict[str, Any] = {
        "operationId": method.name,
        "tags": [route.service.removeprefix(PACKAGE)],
        "summary": comment.split("\n")[0] if comment else method.name,
        "description": comment,
        "security": [{"bearer": []}],
    }
    params = _parameters(route, schemas)
    if params:
        op["parameters"] = params
    if route.body == "*":
        if route.path_fields:
            body = schemas.object(method.input_type, leave_out=route.path_fields)
        else:
            body = schemas.message(method.input_type)
        op["requestBody"] = {
            "required": not route.path_fields,
            "content": {"application/json": {"schema": body}},
        }
    elif route.body:  # one field is the body
        field = method.input_type.fields_by_name[route.body]
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": schemas.field(field, method.input_type.full_name)}
            },
        }
    out = schemas.message(method.output_type)
    if route.streaming:
        ok: dict[str, Any] = {
            "description": (
                f"Server-Sent Events: each `data:` is a {schemas.name(method.output_type.full_name)}"
                " in JSON (see the API description for ids, resume and the end of a stream)."
            ),
            "content": {
                "text/event-stream": {"schema": {"type": "string"}, "x-sse-data": out},
            },
        }
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": out}}}
    op["responses"] = {
        "200": ok,
        "default": {
            "description": "An error (4xx: the request; 5xx: try again).",
            "content": {"application/json": {"schema": {"$ref": REF + "Error"}}},
        },
    }
    return op


def build() -> dict[str, Any]:
    """The whole document."""
    schemas = Schemas(source_comments())
    paths: dict[str, dict[str, Any]] = {}
    for route in routes():
        paths.setdefault(route.template, {})[route.verb.lower()] = _operation(route, schemas)
    paths["/healthz"] = {
        "get": {
            "operationId": "Health",
            "summary": "Whether the HTTP service runs (no key needed).",
            "responses": {
                "200": {
                    "description": "Serving",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"status": {"type": "string"}},
                            }
                        }
                    },
                }
            },
        }
    }
    components = dict(sorted(schemas.components.items()))
    components["Error"] = error_schema()
    return {
        "openapi": "3.1.0",
        "info": {"title": "Conveyor HTTP API", "version": "v1", "description": API_DESCRIPTION},
        "tags": [
            {"name": s, "description": schemas.comments.get(PACKAGE + s, "")}
            for s in ("JobService", "JobEvents")
        ],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: `Authorization: Bearer cvk_...`.",
                }
            },
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OPENAPI_FILE.read_text() if OPENAPI_FILE.exists() else ""
        if current != text:
            print(f"{OPENAPI_FILE.relative_to(ROOT)} is stale: run make openapi", file=sys.stderr)
            return 1
        print("openapi document is up to date")
        return 0
    OPENAPI_FILE.write_text(text)
    print(f"wrote {OPENAPI_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
