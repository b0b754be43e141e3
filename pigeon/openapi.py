"""The HTTP/JSON face of Pigeon's services, read from the compiled descriptors.

Two things come from the same descriptors, so that they cannot disagree:

- which URL each RPC answers: the ``google.api.http`` annotation of every method, parsed into
  :class:`HttpBinding` and :class:`PathTemplate` (the grammar of ``google/api/http.proto``:
  literals, ``*``, ``**``, ``{field.path}``, ``{field=sub/*}`` and a trailing ``:verb``), which the
  transcoder in :mod:`pigeon.rest` serves;
- the OpenAPI 3 document of those bindings (:func:`openapi_document`), with the proto comments as
  descriptions and the proto3 JSON mapping as schemas.

The generated ``*_pb2`` modules carry no comments (protoc strips source info from them), so the
comments come from ``pigeon/v1/descriptors.binpb``: a ``FileDescriptorSet`` compiled with
``--include_source_info`` by ``make gen`` next to the stubs, and drift-checked with them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import unquote

# googleapis-common-protos ships .pyi stubs but no py.typed marker (see pigeon.errors).
from google.api import annotations_pb2  # type: ignore[import-untyped, unused-ignore]
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    EnumValueDescriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.rpc import status_pb2  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "DESCRIPTOR_SET",
    "SCALAR_MESSAGES",
    "Comments",
    "HttpBinding",
    "PathTemplate",
    "Variable",
    "clean_comment",
    "field_named",
    "http_bindings",
    "is_map",
    "message_of",
    "openapi_document",
    "resolve_field",
    "schema_name",
]

log = logging.getLogger("pigeon.openapi")

DESCRIPTOR_SET = "descriptors.binpb"
"""The descriptor set with source info, beside the generated stubs in ``pigeon.v1``."""

# Well-known types that the proto3 JSON mapping writes as a JSON string, and their schemas.
_STRING_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "example": "1.5s",
    },
    "google.protobuf.FieldMask": {"type": "string"},
}
_WRAPPERS = {
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
SCALAR_MESSAGES = frozenset(_STRING_WKT) | _WRAPPERS
"""Message types written as one JSON scalar, so a path or query parameter can set them."""


# --- path templates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    """A ``{field.path=segments}`` part of a path template.

    Attributes:
        field_path: The request field the matched text goes into, e.g. ``("message_id",)``.
        segments: What it matches; ``("*",)`` (one path segment) when the template says nothing.
    """

    field_path: tuple[str, ...]
    segments: tuple[str, ...] = ("*",)

    @property
    def name(self) -> str:
        """The field path as written in the template, e.g. ``message_id`` or ``parent.id``."""
        return ".".join(self.field_path)


Segment = str | Variable
"""One ``/``-separated part of a template: a literal, ``*``, ``**`` or a :class:`Variable`."""


@dataclass(frozen=True)
class PathTemplate:
    """A parsed ``google.api.http`` path template, compiled for matching.

    Attributes:
        text: The template as written in the proto.
        segments: Its parts between slashes.
        verb: The custom verb after the last ``:`` (``read`` in ``/v1/messages:read``), or ``""``.
    """

    text: str
    segments: tuple[Segment, ...]
    verb: str
    _regex: re.Pattern[str] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        """Parse a template.

        Args:
            text: E.g. ``/v1/messages/{message_id}`` or ``/v1/messages:read``.

        Returns:
            The compiled template.

        Raises:
            ValueError: The text does not follow the ``google/api/http.proto`` grammar.
        """
        if not text.startswith("/"):
            raise ValueError(f"path template {text!r} must start with '/'")
        body, verb = _split_verb(text[1:], text)
        segments = tuple(_parse_segment(part, text) for part in _split_top(body, text))
        pattern = "/".join(_segment_regex(s, i) for i, s in enumerate(segments))
        suffix = re.escape(":" + verb) if verb else ""
        return cls(text, segments, verb, re.compile(f"^/{pattern}{suffix}$"))

    @property
    def variables(self) -> tuple[Variable, ...]:
        """The variables, in template order."""
        return tuple(s for s in self.segments if isinstance(s, Variable))

    def match(self, raw_path: str) -> dict[tuple[str, ...], str] | None:
        """Match a request path, still percent-encoded as it came on the wire.

        Matching the raw path keeps an escaped ``%2F`` inside one segment instead of splitting
        there; the captured values are returned percent-decoded.

        Args:
            raw_path: The request path without the query string.

        Returns:
            Each variable's field path and decoded value, or None when the path does not match.
        """
        found = self._regex.match(raw_path)
        if found is None:
            return None
        return {
            v.field_path: _unquote(found.group(f"v{i}"))
            for i, v in enumerate(self.segments)
            if isinstance(v, Variable)
        }

    def openapi_path(self) -> str:
        """The template in OpenAPI's notation: ``/v1/messages/{message_id}``, ``/v1/x:verb``."""
        parts = [f"{{{s.name}}}" if isinstance(s, Variable) else s for s in self.segments]
        return "/" + "/".join(parts) + (":" + self.verb if self.verb else "")


def _split_verb(body: str, text: str) -> tuple[str, str]:
    # The verb is a ':' outside braces in the last segment; a ':' inside a variable's pattern or
    # in an earlier segment is not one.
    depth = 0
    colon = -1
    for i, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"path template {text!r} has an unmatched '}}'")
        elif depth == 0 and char == "/":
            colon = -1
        elif depth == 0 and char == ":" and colon < 0:
            colon = i
    if depth != 0:
        raise ValueError(f"path template {text!r} has an unclosed '{{'")
    if colon < 0:
        return body, ""
    verb = body[colon + 1 :]
    if not verb or any(c in verb for c in "/{}*:"):
        raise ValueError(f"path template {text!r} has a bad verb {verb!r}")
    return body[:colon], verb


def _split_top(body: str, text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "/" and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    if any(not p for p in parts):
        raise ValueError(f"path template {text!r} has an empty segment")
    return parts


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _parse_segment(part: str, text: str) -> Segment:
    if part.startswith("{"):
        if not part.endswith("}"):
            raise ValueError(f"path template {text!r}: bad variable {part!r}")
        inner = part[1:-1]
        path_text, _, pattern = inner.partition("=")
        field_path = tuple(path_text.split("."))
        if not all(_IDENT.match(name) for name in field_path):
            raise ValueError(f"path template {text!r}: bad field path {path_text!r}")
        if not pattern:
            return Variable(field_path)
        subs = tuple(pattern.split("/"))
        for sub in subs:
            if not sub or any(c in sub for c in "{}:") or ("*" in sub and sub not in ("*", "**")):
                raise ValueError(f"path template {text!r}: bad variable pattern {pattern!r}")
        return Variable(field_path, subs)
    if part in ("*", "**"):
        return part
    if any(c in part for c in "{}*"):
        raise ValueError(f"path template {text!r}: bad segment {part!r}")
    return part


def _segment_regex(segment: Segment, index: int) -> str:
    if isinstance(segment, Variable):
        inner = "/".join(_segment_regex(s, index) for s in segment.segments)
        return f"(?P<v{index}>{inner})"
    if segment == "*":
        return "[^/]+"
    if segment == "**":
        return ".+"
    return re.escape(segment)


def _unquote(text: str) -> str:
    return unquote(text, errors="strict")


# --- bindings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpBinding:
    """One HTTP method and path template that an RPC answers.

    Attributes:
        service: The gRPC service.
        method: The RPC.
        http_method: ``GET``, ``POST``, ``PUT``, ``PATCH``, ``DELETE`` or a custom method.
        template: The path template.
        body: ``""`` (no body: fields come from the path and the query), ``"*"`` (the whole
            request but the path fields), or the name of the one request field the body fills.
        response_body: ``""`` for the whole response, else the response field to answer with.
        index: 0 for the annotation itself, 1, 2, ... for its additional bindings.
    """

    service: ServiceDescriptor
    method: MethodDescriptor
    http_method: str
    template: PathTemplate
    body: str
    response_body: str
    index: int = 0

    @property
    def rpc_path(self) -> str:
        """The gRPC method path, e.g. ``/pigeon.v1.Node/Send``."""
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def server_streaming(self) -> bool:
        """True for a server-streaming RPC (served as Server-Sent Events or NDJSON)."""
        return bool(self.method.server_streaming)

    def bound_fields(self) -> list[tuple[str, ...]]:
        """Field paths the path and the body fill; the query may set only the other fields."""
        bound = [v.field_path for v in self.template.variables]
        if self.body and self.body != "*":
            bound.append((self.body,))
        return bound


def http_bindings(service: ServiceDescriptor) -> list[HttpBinding]:
    """Every HTTP binding of a service's methods, in declaration order.

    Args:
        service: The service descriptor, e.g. ``node_pb2.DESCRIPTOR.services_by_name["Node"]``.

    Returns:
        The bindings of every method that has a ``google.api.http`` annotation, with its
        additional bindings after it.

    Raises:
        ValueError: An annotation names a field that does not exist, binds a path variable to a
            repeated or message field, or annotates a client-streaming RPC.
    """
    bindings: list[HttpBinding] = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        rule = options.Extensions[annotations_pb2.http]
        rules = [rule, *rule.additional_bindings]
        for index, one in enumerate(rules):
            binding = _binding(service, method, one, index)
            _check_binding(binding)
            bindings.append(binding)
    return bindings


def _binding(
    service: ServiceDescriptor, method: MethodDescriptor, rule: Any, index: int
) -> HttpBinding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise ValueError(f"{method.full_name}: google.api.http rule has no pattern")
    if kind == "custom":
        http_method, path = rule.custom.kind.upper(), rule.custom.path
    else:
        http_method, path = kind.upper(), getattr(rule, kind)
    return HttpBinding(
        service=service,
        method=method,
        http_method=http_method,
        template=PathTemplate.parse(path),
        body=rule.body,
        response_body=rule.response_body,
        index=index,
    )


def _check_binding(binding: HttpBinding) -> None:
    name = binding.method.full_name
    if binding.method.client_streaming:
        raise ValueError(f"{name}: client-streaming RPCs cannot be served over HTTP/JSON")
    request = binding.method.input_type
    for variable in binding.template.variables:
        target = resolve_field(request, variable.field_path)
        if target is None:
            raise ValueError(f"{name}: path variable {variable.name} is not a request field")
        nested = message_of(target)
        if target.is_repeated or (nested is not None and nested.full_name not in SCALAR_MESSAGES):
            raise ValueError(f"{name}: path variable {variable.name} must be a scalar field")
    # google/api/http.proto: the body names a field at the top level of the request.
    if binding.body not in ("", "*") and request.fields_by_name.get(binding.body) is None:
        raise ValueError(f"{name}: body {binding.body!r} is not a top-level request field")
    if (
        binding.response_body
        and binding.method.output_type.fields_by_name.get(binding.response_body) is None
    ):
        raise ValueError(f"{name}: response_body {binding.response_body!r} is not a response field")


def message_of(descriptor: FieldDescriptor) -> Descriptor | None:
    """The message type of a message field; None for scalar and enum fields."""
    if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
        return None
    return descriptor.message_type


def is_map(descriptor: FieldDescriptor) -> bool:
    """True for a ``map<K, V>`` field (a repeated field of a generated map-entry message)."""
    message = message_of(descriptor)
    return message is not None and message.GetOptions().map_entry


def field_named(message: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its proto name (``page_size``) or its JSON name (``pageSize``)."""
    found = message.fields_by_name.get(name)
    if found is None:
        found = message.fields_by_camelcase_name.get(name)
    return found


def resolve_field(message: Descriptor, path: Sequence[str]) -> FieldDescriptor | None:
    """Follow a dotted field path through nested messages; None if a step does not exist."""
    current: Descriptor | None = message
    found: FieldDescriptor | None = None
    for step in path:
        if current is None:
            return None
        found = field_named(current, step)
        if found is None:
            return None
        current = message_of(found)
    return found


# --- comments ----------------------------------------------------------------------------------


class Comments:
    """The leading comments of proto elements, by full name, from a descriptor set with source
    info.

    Args:
        files: ``FileDescriptorProto`` messages compiled with ``--include_source_info``.
    """

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto] = ()) -> None:
        self._text: dict[str, str] = {}
        for file in files:
            self._add_file(file)

    @classmethod
    def load(cls, package: str = "pigeon.v1", name: str = DESCRIPTOR_SET) -> Comments:
        """Read the descriptor set that ``make gen`` writes beside the stubs.

        Args:
            package: The package that holds it.
            name: Its file name.

        Returns:
            The comments; empty (with a warning in the log) when the file is missing, so that a
            broken install still serves a document, only without descriptions.
        """
        try:
            data = resources.files(package).joinpath(name).read_bytes()
        except (FileNotFoundError, ModuleNotFoundError) as exc:
            log.warning("no %s in %s (run `make gen`): OpenAPI without descriptions", name, package)
            log.debug("descriptor set not found", exc_info=exc)
            return cls()
        files = descriptor_pb2.FileDescriptorSet.FromString(data).file
        return cls(files)

    def __len__(self) -> int:
        return len(self._text)

    def of(
        self,
        element: Descriptor
        | FieldDescriptor
        | EnumDescriptor
        | EnumValueDescriptor
        | ServiceDescriptor
        | MethodDescriptor,
    ) -> str:
        """The cleaned-up leading comment of an element, or ``""``."""
        if isinstance(element, EnumValueDescriptor):
            return self._text.get(f"{element.type.full_name}.{element.name}", "")
        return self._text.get(element.full_name, "")

    def _add_file(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        by_path = {
            tuple(loc.path): loc.leading_comments
            for loc in file.source_code_info.location
            if loc.leading_comments
        }
        prefix = f"{file.package}." if file.package else ""
        # Field numbers of FileDescriptorProto / DescriptorProto / ... in source_code_info paths.
        for i, message in enumerate(file.message_type):
            self._add_message(message, prefix, (4, i), by_path)
        for i, enum in enumerate(file.enum_type):
            self._add_enum(enum, prefix, (5, i), by_path)
        for i, service in enumerate(file.service):
            name = prefix + service.name
            self._put(name, by_path.get((6, i)))
            for j, method in enumerate(service.method):
                self._put(f"{name}.{method.name}", by_path.get((6, i, 2, j)))

    def _add_message(
        self,
        message: descriptor_pb2.DescriptorProto,
        prefix: str,
        path: tuple[int, ...],
        by_path: Mapping[tuple[int, ...], str],
    ) -> None:
        name = prefix + message.name
        self._put(name, by_path.get(path))
        for i, one in enumerate(message.field):
            self._put(f"{name}.{one.name}", by_path.get((*path, 2, i)))
        for i, nested in enumerate(message.nested_type):
            self._add_message(nested, name + ".", (*path, 3, i), by_path)
        for i, enum in enumerate(message.enum_type):
            self._add_enum(enum, name + ".", (*path, 4, i), by_path)

    def _add_enum(
        self,
        enum: descriptor_pb2.EnumDescriptorProto,
        prefix: str,
        path: tuple[int, ...],
        by_path: Mapping[tuple[int, ...], str],
    ) -> None:
        name = prefix + enum.name
        self._put(name, by_path.get(path))
        for i, value in enumerate(enum.value):
            self._put(f"{name}.{value.name}", by_path.get((*path, 2, i)))

    def _put(self, name: str, raw: str | None) -> None:
        if raw:
            self._text[name] = clean_comment(raw)


def clean_comment(raw: str) -> str:
    """Turn a proto comment into prose: hard-wrapped lines joined, paragraphs and list items kept.

    Args:
        raw: A ``leading_comments`` value: lines that each start with the space after ``//``.

    Returns:
        The text, paragraphs separated by a blank line.
    """
    paragraphs: list[list[str]] = [[]]
    for line in raw.strip("\n").split("\n"):
        text = line.strip()
        if not text:
            if paragraphs[-1]:
                paragraphs.append([])
        elif text.startswith(("- ", "* ")) and paragraphs[-1]:
            paragraphs[-1].append("\n" + text)
        else:
            paragraphs[-1].append(text)
    joined = (" ".join(p).replace(" \n", "\n") for p in paragraphs if p)
    return "\n\n".join(joined)


def _summary(text: str) -> str:
    """The first sentence of a comment, for an operation's summary."""
    first = text.split("\n\n", 1)[0]
    found = re.search(r"(?<=[.!?])\s", first)
    return first[: found.start()] if found else first


# --- OpenAPI -----------------------------------------------------------------------------------


def schema_name(descriptor: Descriptor | EnumDescriptor) -> str:
    """The component name of a message or enum, as grpc-gateway's openapiv2 spells it.

    The last part of the package, then the names of the enclosing messages and the type:
    ``pigeon.v1.Message`` is ``v1Message``, ``google.rpc.Status`` is ``rpcStatus``.
    """
    package = descriptor.file.package
    relative = descriptor.full_name[len(package) + 1 :] if package else descriptor.full_name
    return package.rsplit(".", 1)[-1] + relative.replace(".", "")


def _ref(descriptor: Descriptor | EnumDescriptor) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{schema_name(descriptor)}"}


def _with_description(schema: dict[str, Any], description: str) -> dict[str, Any]:
    if not description:
        return schema
    if "$ref" in schema:
        # OpenAPI 3.0 ignores the siblings of a $ref: wrap it to keep the field's description.
        return {"allOf": [schema], "description": description}
    return {**schema, "description": description}


_UINT64_PATTERN = r"^(0|[1-9][0-9]{0,18})$"
_INT64_PATTERN = r"^-?(0|[1-9][0-9]{0,17})$"
_INT32 = {"type": "integer", "format": "int32"}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
# The proto3 JSON mapping writes 64-bit integers as strings: JavaScript numbers lose precision
# beyond 2^53. The patterns keep generated examples within range.
_INT64 = {"type": "string", "format": "int64", "pattern": _INT64_PATTERN}
_UINT64 = {"type": "string", "format": "uint64", "pattern": _UINT64_PATTERN}

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}

_ERROR_DESCRIPTION = (
    "An error: `code` is the gRPC status code (3 INVALID_ARGUMENT, 16 UNAUTHENTICATED, "
    "7 PERMISSION_DENIED, 5 NOT_FOUND, 8 RESOURCE_EXHAUSTED, ...), `message` says what to fix, "
    "and `details` carries a google.rpc.ErrorInfo (a stable `reason`, `domain` pigeon.v1 and "
    "structured `metadata`) and, when a limit was hit, a google.rpc.RetryInfo."
)


class _Schemas:
    """Builds the component schemas that the operations refer to, each once."""

    def __init__(self, comments: Comments) -> None:
        self.comments = comments
        self.components: dict[str, dict[str, Any]] = {}

    def message(self, descriptor: Descriptor, *, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """A schema for a message: a $ref, or an inline object when fields are left out."""
        inline = self._inline_wkt(descriptor)
        if inline is not None:
            return inline
        if exclude:
            return self._object(descriptor, exclude)
        name = schema_name(descriptor)
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages refer to themselves
            self.components[name] = self._object(descriptor, ())
        return _ref(descriptor)

    def _inline_wkt(self, descriptor: Descriptor) -> dict[str, Any] | None:
        full = descriptor.full_name
        if full in _STRING_WKT:
            return dict(_STRING_WKT[full])
        if full in _WRAPPERS:
            return self.field(descriptor.fields_by_name["value"])
        if full == "google.protobuf.Struct":
            return {"type": "object", "additionalProperties": {}}
        if full == "google.protobuf.Value":
            return {}
        if full == "google.protobuf.ListValue":
            return {"type": "array", "items": {}}
        if full == "google.protobuf.Empty":
            return {"type": "object"}
        if full == "google.protobuf.Any":
            name = schema_name(descriptor)
            self.components[name] = {
                "type": "object",
                "description": "A message of any type; `@type` names it, the other keys are its "
                "fields in the proto3 JSON mapping.",
                "properties": {"@type": {"type": "string"}},
                "additionalProperties": {},
            }
            return _ref(descriptor)
        return None

    def _object(self, descriptor: Descriptor, exclude: Sequence[str]) -> dict[str, Any]:
        properties = {
            f.json_name: _with_description(self.field(f), self.comments.of(f))
            for f in descriptor.fields
            if f.name not in exclude
        }
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        # The transcoder refuses unknown fields (a typo must not be silently dropped).
        schema["additionalProperties"] = False
        description = self.comments.of(descriptor)
        if description:
            schema["description"] = description
        return schema

    def field(self, descriptor: FieldDescriptor) -> dict[str, Any]:
        """The schema of a field's value in the proto3 JSON mapping."""
        entry = message_of(descriptor)
        if entry is not None and entry.GetOptions().map_entry:
            value = entry.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        one = self.single(descriptor)
        if descriptor.is_repeated:
            return {"type": "array", "items": one}
        return one

    def single(self, descriptor: FieldDescriptor) -> dict[str, Any]:
        """The schema of one value of a field (an item, for a repeated field)."""
        message = message_of(descriptor)
        if message is not None:
            return self.message(message)
        if descriptor.enum_type is not None:
            return self.enum(descriptor.enum_type)
        return dict(_SCALARS[descriptor.type])

    def enum(self, descriptor: EnumDescriptor) -> dict[str, Any]:
        """A $ref to an enum's schema: its value names, each described."""
        name = schema_name(descriptor)
        if name not in self.components:
            lines = [self.comments.of(descriptor)] if self.comments.of(descriptor) else []
            for value in descriptor.values:
                text = self.comments.of(value)
                lines.append(f"- `{value.name}`" + (f": {text}" if text else ""))
            self.components[name] = {
                "type": "string",
                "enum": [v.name for v in descriptor.values],
                "default": descriptor.values[0].name,
                "description": "\n".join(lines),
            }
        return _ref(descriptor)


def openapi_document(
    services: Sequence[ServiceDescriptor],
    *,
    title: str,
    version: str,
    comments: Comments | None = None,
    public: Sequence[str] = (),
) -> dict[str, Any]:
    """Generate the OpenAPI 3 document of services' HTTP bindings.

    Args:
        services: The services whose annotated RPCs the document describes.
        title: The document's title.
        version: The API implementation's version.
        comments: Proto comments for the descriptions; by default :meth:`Comments.load`.
        public: Full names of the methods that take no credential (``pigeon.v1.Gate.Connect``).

    Returns:
        The document as JSON-ready data (OpenAPI 3.0.3): a path per binding, an operation per
        HTTP method (``operationId`` ``<Service>_<Method>``), query and path parameters, request
        bodies and response schemas in the proto3 JSON mapping, the error schema
        (``google.rpc.Status``), and bearer authentication.
    """
    comments = Comments.load() if comments is None else comments
    schemas = _Schemas(comments)
    error = schemas.message(status_pb2.Status.DESCRIPTOR)
    paths: dict[str, dict[str, Any]] = {}
    for service in services:
        for binding in http_bindings(service):
            operations = paths.setdefault(binding.template.openapi_path(), {})
            verb = binding.http_method.lower()
            if verb in operations:
                continue  # an additional binding repeating a path and method adds nothing
            operations[verb] = _operation(binding, schemas, error)
            if binding.method.full_name in public:
                operations[verb]["security"] = []
    descriptions = [comments.of(s) for s in services if comments.of(s)]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": version,
            "description": "\n\n".join(
                [
                    *descriptions,
                    "Generated from the gRPC services' `google.api.http` annotations. JSON "
                    "follows the proto3 JSON mapping: lowerCamelCase names (the proto names are "
                    "accepted too), 64-bit integers as strings, enums by name, timestamps in "
                    "RFC 3339, durations as `1.5s`.",
                ]
            ),
        },
        "tags": [
            {"name": s.name, "description": comments.of(s)} if comments.of(s) else {"name": s.name}
            for s in services
        ],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <credential>`: an API key for system "
                    "senders and operators, the session token from Gate.Connect for a user's "
                    "calls to a node.",
                },
                "accessToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "access_token",
                    "description": "The session token in the query string, for streams opened "
                    "by a browser's EventSource (which cannot send headers).",
                },
            },
        },
        "security": [{"bearerAuth": []}],
    }


def _operation(binding: HttpBinding, schemas: _Schemas, error: dict[str, Any]) -> dict[str, Any]:
    method = binding.method
    text = schemas.comments.of(method)
    suffix = f"_{binding.index}" if binding.index else ""
    operation: dict[str, Any] = {
        "operationId": f"{binding.service.name}_{method.name}{suffix}",
        "tags": [binding.service.name],
    }
    if text:
        operation["summary"] = _summary(text)
        operation["description"] = text
    parameters = [_path_parameter(binding, v, schemas) for v in binding.template.variables]
    request = method.input_type
    path_fields = [v.field_path[0] for v in binding.template.variables if len(v.field_path) == 1]
    if binding.body == "*":
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": schemas.message(request, exclude=path_fields)}
            },
        }
    else:
        if binding.body:
            target = request.fields_by_name[binding.body]  # checked by http_bindings
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schemas.field(target)}},
            }
        bound = binding.bound_fields()
        parameters.extend(_query_parameters(request, (), (), bound, schemas, frozenset()))
    if binding.server_streaming:
        parameters.extend(_stream_parameters())
        operation["security"] = [{"bearerAuth": []}, {"accessToken": []}]
    if parameters:
        operation["parameters"] = parameters
    operation["responses"] = {
        "200": _success(binding, schemas, error),
        "default": {
            "description": _ERROR_DESCRIPTION,
            "content": {"application/json": {"schema": error}},
        },
    }
    return operation


def _success(binding: HttpBinding, schemas: _Schemas, error: dict[str, Any]) -> dict[str, Any]:
    output = binding.method.output_type
    if binding.response_body:
        schema = schemas.field(output.fields_by_name[binding.response_body])
    else:
        schema = schemas.message(output)
    if not binding.server_streaming:
        return {"description": "OK", "content": {"application/json": {"schema": schema}}}
    return {
        "description": (
            "A stream of events, one per message of the gRPC stream. As Server-Sent Events "
            "(the default): each event is one `data:` line of JSON; its `id:` is the stream "
            "cursor `<seq>.<broadcast_seq>` when the event carries one, so a reconnecting "
            "EventSource resumes with `Last-Event-ID`; a failure mid-stream is an `error` "
            "event with the status. With `Accept: application/x-ndjson`: one JSON object per "
            'line, `{"result": ...}` or, last, `{"error": ...}`.'
        ),
        "content": {
            "text/event-stream": {"schema": {"type": "string"}},
            "application/x-ndjson": {
                "schema": {
                    "type": "object",
                    "properties": {"result": schema, "error": error},
                }
            },
        },
    }


def _stream_parameters() -> list[dict[str, Any]]:
    cursor = {"type": "string", "pattern": r"^[0-9]+\.[0-9]+$"}
    return [
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": "Resume after this event: the `id:` of the last event received "
            "(`<seq>.<broadcast_seq>`). Sent by a reconnecting EventSource; overrides the "
            "cursor in the query.",
            "schema": cursor,
        },
        {
            "name": "last_event_id",
            "in": "query",
            "required": False,
            "description": "As the Last-Event-ID header, for a new EventSource that resumes.",
            "schema": cursor,
        },
    ]


def _path_parameter(binding: HttpBinding, variable: Variable, schemas: _Schemas) -> dict[str, Any]:
    target = resolve_field(binding.method.input_type, variable.field_path)
    assert target is not None  # checked by http_bindings
    schema = schemas.single(target)
    if variable.segments != ("*",):
        pattern = "/".join(
            "[^/]+" if s == "*" else ".+" if s == "**" else re.escape(s) for s in variable.segments
        )
        schema = {"type": "string", "pattern": f"^{pattern}$"}
    parameter: dict[str, Any] = {
        "name": variable.name,
        "in": "path",
        "required": True,
        "schema": schema,
    }
    description = schemas.comments.of(target)
    if description:
        parameter["description"] = description
    return parameter


def _query_parameters(
    message: Descriptor,
    prefix: tuple[str, ...],
    names: tuple[str, ...],
    bound: Sequence[tuple[str, ...]],
    schemas: _Schemas,
    seen: frozenset[str],
) -> Iterator[dict[str, Any]]:
    """The query parameters of a request: its fields not bound to the path or body, nested
    messages flattened with dots as grpc-gateway does (``a.b=1``).

    ``prefix`` is the proto-name path of ``message`` (to compare with ``bound``), ``names`` the
    same path in JSON names (to name the parameters).
    """
    if message.full_name in seen:
        return  # a recursive message: its fields are reachable at the first level already
    seen = seen | {message.full_name}
    for one in message.fields:
        path = (*prefix, one.name)
        if any(path[: len(b)] == b or b[: len(path)] == path for b in bound):
            continue
        nested = message_of(one)
        if nested is not None:
            if nested.GetOptions().map_entry:
                continue  # maps are accepted as name[key]=value but are not worth documenting
            if nested.full_name not in SCALAR_MESSAGES:
                if not one.is_repeated:
                    yield from _query_parameters(
                        nested, path, (*names, one.json_name), bound, schemas, seen
                    )
                continue
        parameter: dict[str, Any] = {
            "name": ".".join((*names, one.json_name)),
            "in": "query",
            "required": False,
            "schema": schemas.field(one),
        }
        if one.is_repeated:
            parameter["style"] = "form"
            parameter["explode"] = True
        description = schemas.comments.of(one)
        if description:
            parameter["description"] = description
        yield parameter
