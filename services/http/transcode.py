"""The HTTP mapping of the contract, read from the `google.api.http` rules in protos/.

`routes()` walks the service descriptors of JobService and JobEvents once at start
and makes one `Route` per RPC: its verb and path template, where the request
message comes from (the JSON body, the path, the query string) and the gRPC
method to call. No route is written by hand: a new RPC with an http rule is
served as soon as the stubs are regenerated.

JSON is the proto3 JSON mapping (protobuf's json_format: lowerCamelCase names
out, either name in; int64 as strings; enums by name; Timestamp and Duration as
strings), with one exception: a `bytes` field whose name ends in `_json` holds
UTF-8 JSON (a Messages API body, content blocks, usage), so HTTP carries it as the
JSON value itself instead of base64: `"requestJson": {"model": ...}`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.api import annotations_pb2, http_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from conveyor.core.errors import InvalidArgument
from conveyor.v1 import events_pb2, jobs_pb2, operations_pb2, schedules_pb2

JOB_SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
JOB_EVENTS = events_pb2.DESCRIPTOR.services_by_name["JobEvents"]
SCHEDULE_SERVICE = schedules_pb2.DESCRIPTOR.services_by_name["ScheduleService"]
OPERATIONS_SERVICE = operations_pb2.DESCRIPTOR.services_by_name["OperationsService"]
SERVICES = (JOB_SERVICE, JOB_EVENTS, SCHEDULE_SERVICE, OPERATIONS_SERVICE)
"""The services the HTTP API serves: every method with an http rule."""
NOTIFIER_SERVICES = frozenset({JOB_EVENTS.full_name})
"""Those the notifier serves; the gateway serves the others."""

JSON_BYTES_SUFFIX = "_json"
WELL_KNOWN_STRINGS = {"google.protobuf.Timestamp", "google.protobuf.Duration"}
"""Message types whose JSON form is a string (so they can be query parameters)."""
MAP_PARAM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[([^\]]*)\]$")
"""A map entry in a query string: `labels[team]=search` (OpenAPI's deepObject style)."""
TEMPLATE_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
VERBS = ("get", "post", "put", "patch", "delete")


def is_json_bytes(f: FieldDescriptor) -> bool:
    """A bytes field that holds UTF-8 JSON: carried over HTTP as the JSON value."""
    return f.type == FieldDescriptor.TYPE_BYTES and f.name.endswith(JSON_BYTES_SUFFIX)


def is_map(f: FieldDescriptor) -> bool:
    return bool(
        f.type == FieldDescriptor.TYPE_MESSAGE
        and f.message_type is not None
        and f.message_type.GetOptions().map_entry
    )


def is_repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def message_of(f: FieldDescriptor) -> Descriptor:
    """The message type of a message (or map) field."""
    assert f.message_type is not None, f.full_name
    return f.message_type


def map_value(f: FieldDescriptor) -> FieldDescriptor:
    """The value field of a map field's entry."""
    value = message_of(f).fields_by_name["value"]
    assert value is not None
    return value


# --------------------------------------------------------------------------- JSON bytes

Plan = list[tuple[FieldDescriptor, "Plan | None"]]
"""Per message type, the fields that are or lead to JSON-bytes fields (None: the field
itself holds JSON), so a walk visits nothing else."""
_plans: dict[str, Plan] = {}


def _plan(message: Descriptor) -> Plan:
    name = message.full_name
    if name in _plans:
        return _plans[name]
    _plans[name] = []  # recursive types (Struct) end here
    out: Plan = []
    for f in message.fields:
        if is_json_bytes(f):
            out.append((f, None))
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            target = map_value(f) if is_map(f) else None
            if target is not None and target.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            sub = _plan(message_of(target if target is not None else f))
            if sub:
                out.append((f, sub))
    _plans[name] = out
    return out


def _values(f: FieldDescriptor, value: Any) -> Iterable[Any]:
    """The message values a JSON value of field `f` holds (list items, map values)."""
    if is_map(f):
        return value.values() if isinstance(value, dict) else ()
    if is_repeated(f):
        return value if isinstance(value, list) else ()
    return (value,)


def _outgoing(data: dict[str, Any], plan: Plan) -> None:
    """base64 JSON-bytes fields of MessageToDict's output become their JSON values."""
    for f, sub in plan:
        key = f.json_name
        if key not in data:
            continue
        if sub is None:
            raw = base64.b64decode(data[key])
            if not raw:
                del data[key]
                continue
            try:
                data[key] = orjson.loads(raw)
            except orjson.JSONDecodeError:  # not JSON after all: the text as it is
                data[key] = raw.decode(errors="replace")
            continue
        for item in _values(f, data[key]):
            if isinstance(item, dict):
                _outgoing(item, sub)


def _incoming(data: dict[str, Any], plan: Plan, path: str) -> None:
    """JSON values of JSON-bytes fields in a request become base64, as json_format takes."""
    for f, sub in plan:
        for key in (f.json_name, f.name):
            if key not in data:
                continue
            if sub is None:
                value = data[key]
                data[key] = "" if value is None else base64.b64encode(orjson.dumps(value)).decode()
                continue
            items = _values(f, data[key])
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    _incoming(item, sub, f"{path}{f.name}[{i}]." if is_repeated(f) else path)


def to_json(message: Message) -> dict[str, Any]:
    """A message in the HTTP API's JSON form (every field without presence included)."""
    data: dict[str, Any] = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True
    )
    plan = _plan(message.DESCRIPTOR)  # type: ignore[arg-type]
    if plan:
        _outgoing(data, plan)
    return data


def from_json(data: Any, message: Message) -> None:
    """Merge a JSON object in the HTTP API's form into `message`; InvalidArgument if it
    is not one (naming the field when json_format says which)."""
    if not isinstance(data, dict):
        raise InvalidArgument("body", "must be a JSON object")
    plan = _plan(message.DESCRIPTOR)  # type: ignore[arg-type]
    try:
        if plan:
            _incoming(data, plan, "")
        json_format.ParseDict(data, message, ignore_unknown_fields=False, max_recursion_depth=64)
    except (json_format.ParseError, ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(_field_of(str(exc)), _describe(str(exc))) from None
    except RecursionError:
        raise InvalidArgument("body", "is nested too deeply") from None


def _field_of(text: str) -> str:
    """The field a json_format error names (best effort), else `body`."""
    found = re.search(r'no field named "([^"]+)"', text) or re.search(
        r"Failed to parse ([A-Za-z0-9_]+) field", text
    )
    return found.group(1) if found else "body"


def _describe(text: str) -> str:
    return text.split("\n")[0][:300]


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """One RPC as an HTTP endpoint."""

    service: str
    """Full service name, e.g. conveyor.v1.JobService."""
    method: MethodDescriptor
    verb: str
    """GET, POST, PUT, PATCH or DELETE."""
    template: str
    """The rule's path, e.g. /v1/jobs/{id}:cancel."""
    body: str
    """`*` (the whole request is the body), "" (none: query parameters), or the name of
    the one field the body holds (the others are query parameters)."""
    path_fields: tuple[str, ...] = field(default=())
    request_class: type[Message] = field(default=Message)
    response_class: type[Message] = field(default=Message)

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def grpc_path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def aiohttp_path(self) -> str:
        """The template with variables that match one segment without `:`."""
        return TEMPLATE_VAR.sub(lambda m: "{" + m.group(1) + ":[^/:]+}", self.template)

    def query_fields(self) -> list[FieldDescriptor]:
        """Request fields given in the query string: all but the path's and the body's."""
        if self.body == "*":
            return []
        return [
            f
            for f in self.method.input_type.fields
            if f.name not in self.path_fields and f.name != self.body and query_capable(f)
        ]


def query_capable(f: FieldDescriptor) -> bool:
    """Whether a field can be a query parameter: scalars, enums, lists of them, maps of
    scalars (`name[key]=value`), Timestamp and Duration."""
    if is_map(f):
        return map_value(f).type != FieldDescriptor.TYPE_MESSAGE
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return message_of(f).full_name in WELL_KNOWN_STRINGS and not is_repeated(f)
    return True


def rule_of(method: MethodDescriptor) -> http_pb2.HttpRule | None:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return None
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
    return rule


def routes() -> list[Route]:
    """Every RPC of SERVICES that carries an http rule, as a Route."""
    out: list[Route] = []
    for service in SERVICES:
        for method in service.methods:
            rule = rule_of(method)
            if rule is None:
                continue
            kind = rule.WhichOneof("pattern")
            if kind not in VERBS:
                raise ValueError(f"{method.full_name}: http rule {kind!r} is not served")
            if rule.body not in ("", "*") and rule.body not in method.input_type.fields_by_name:
                raise ValueError(f"{method.full_name}: body {rule.body!r} names no field")
            template = str(getattr(rule, kind))
            names = tuple(TEMPLATE_VAR.findall(template))
            for name in names:
                if name not in method.input_type.fields_by_name:
                    raise ValueError(f"{method.full_name}: {template} names no field {name}")
            out.append(
                Route(
                    service=service.full_name,
                    method=method,
                    verb=kind.upper(),
                    template=template,
                    body=rule.body,
                    path_fields=names,
                    request_class=GetMessageClass(method.input_type),
                    response_class=GetMessageClass(method.output_type),
                )
            )
    return out


# --------------------------------------------------------------------------- query strings


def _scalar(f: FieldDescriptor, text: str, where: str) -> Any:
    """One query-string value as the JSON value json_format takes for field `f`."""
    t = f.type
    if t == FieldDescriptor.TYPE_BOOL:
        lowered = text.lower()
        if lowered in ("true", "1", ""):
            return True
        if lowered in ("false", "0"):
            return False
        raise InvalidArgument(where, "must be true or false")
    if t == FieldDescriptor.TYPE_ENUM:
        if re.fullmatch(r"-?[0-9]+", text):
            return int(text)
        enum = f.enum_type
        assert enum is not None
        names = enum.values_by_name
        if text in names:
            return text
        # `status=pending` for JOB_STATUS_PENDING: the enum's prefix may be left out.
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        full = prefix + text.upper()
        if full in names:
            return full
        raise InvalidArgument(where, f"{text[:64]!r} is not a {enum.name}")
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        try:
            return float(text)
        except ValueError:
            raise InvalidArgument(where, "must be a number") from None
    if t == FieldDescriptor.TYPE_STRING or t == FieldDescriptor.TYPE_MESSAGE:
        return text
    if t == FieldDescriptor.TYPE_BYTES:
        return text
    if not re.fullmatch(r"-?[0-9]{1,20}", text):  # every integer type
        raise InvalidArgument(where, "must be an integer")
    return int(text)


def query_to_json(route: Route, query: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The query string of a GET as the JSON object of its request message.

    Names are the field's proto or JSON name; a list repeats its parameter or
    separates values with commas (`ids=a,b`); a map entry is `labels[key]=value`;
    `status` is `statuses` (one or more). An unknown parameter is InvalidArgument (a
    misspelt filter must not list everything).
    """
    fields: dict[str, FieldDescriptor] = {}
    for f in route.query_fields():
        fields[f.name] = f
        fields[f.json_name] = f
    if "statuses" in fields:
        fields.setdefault("status", fields["statuses"])
    out: dict[str, Any] = {}
    for name, text in query:
        entry = MAP_PARAM.match(name)
        if entry is not None:
            mapped = fields.get(entry.group(1))
            if mapped is None or not is_map(mapped):
                raise InvalidArgument(name, "is not a parameter of this call")
            key = entry.group(2)
            out.setdefault(mapped.json_name, {})[key] = _scalar(
                map_value(mapped), text, f"{mapped.name}[{key}]"
            )
            continue
        found = fields.get(name)
        if found is None or is_map(found):
            raise InvalidArgument(name, "is not a parameter of this call")
        f = found
        if is_repeated(f):
            parts = [p for p in text.split(",") if p] if text else []
            out.setdefault(f.json_name, []).extend(_scalar(f, p, f.name) for p in parts)
        else:
            out[f.json_name] = _scalar(f, text, f.name)
    return out


def request_from(
    route: Route,
    body: Any,
    path: Mapping[str, str],
    query: Iterable[tuple[str, str]],
) -> Message:
    """The request message of a call: body (rules with body `*`), query (rules
    without), then the path variables, which win over both."""
    data: Any
    if route.body == "*":
        extra = [name for name, _ in query]
        if extra:
            raise InvalidArgument(extra[0], "is not a parameter of this call (send a JSON body)")
        data = {} if body is None else body
    else:
        data = query_to_json(route, query)
        if route.body and body is not None:
            data[route.body] = body
    if isinstance(data, dict):
        for name in route.path_fields:
            data.pop(name, None)
            data.pop(route.method.input_type.fields_by_name[name].json_name, None)
    message = route.request_class()
    from_json(data, message)
    for name in route.path_fields:
        try:
            setattr(message, name, path[name])
        except (ValueError, TypeError):  # e.g. an unpaired surrogate from %-decoding
            raise InvalidArgument(name, "is not valid text") from None
    return message
