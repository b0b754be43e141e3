"""REST for browsers and curl: HTTP/JSON transcoded to a service's own gRPC server, grpc-gateway
style.

Every route comes from a ``google.api.http`` annotation (see :mod:`pigeon.openapi`); none is
written by hand. A request is turned into the RPC's request message (path variables, query
parameters, the JSON body in the proto3 JSON mapping) and sent over a loopback ``grpc.aio``
channel to the same process's gRPC server, with the ``authorization`` header as metadata, so that
authentication, rate limits, validation and errors are exactly those of a gRPC call. The answer
goes back as JSON; a gRPC error as the HTTP status grpc-gateway would give it, with the
``google.rpc.Status`` (code, message, details such as ``ErrorInfo`` and ``RetryInfo``) as body.

A server-streaming RPC is served as Server-Sent Events (each event one ``data:`` line of JSON,
its ``id:`` the stream cursor, so an ``EventSource`` resumes with ``Last-Event-ID``) or, with
``Accept: application/x-ndjson``, as newline-delimited JSON. ``EventSource`` cannot send headers,
so a streaming route also takes the credential as the ``access_token`` query parameter.

Example:
    .. code-block:: python

        rest = RestGateway([node_pb2.DESCRIPTOR.services_by_name["Node"]])
        async with (
            listen(config, services, auth, rest.routes) as listeners,
            rest.forward_to(listeners.address),
        ):
            ...
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import logging
import math
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message

# googleapis-common-protos ships .pyi stubs but no py.typed marker (see pigeon.errors).
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from starlette.background import BackgroundTask
from starlette.datastructures import MutableHeaders, URLPath
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Mount, NoMatchFound, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from pigeon.auth import bearer_token
from pigeon.client.errors import received_status
from pigeon.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PigeonError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    rich_status,
)
from pigeon.offload import WorkerProcess
from pigeon.openapi import (
    SCALAR_MESSAGES,
    Comments,
    HttpBinding,
    field_named,
    http_bindings,
    is_map,
    message_of,
    openapi_document,
)
from pigeon.ratelimit import LargeRequests
from pigeon.server import MAX_REQUEST_BYTES, PUBLIC, Authenticator, authenticator_for
from pigeon.version import __version__

__all__ = [
    "BODY_TIMEOUT",
    "HTTP_STATUS",
    "MAX_CREDENTIAL_LENGTH",
    "RestGateway",
    "default_web_root",
    "http_status",
]

log = logging.getLogger("pigeon.rest")

HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
"""gRPC status → HTTP status, as grpc-gateway's ``runtime.HTTPStatusFromCode`` maps them."""

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# The end-of-stream marker of UnaryStreamCall.read(); the grpc stubs do not declare it.
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]

# How long a reconnecting EventSource waits, in milliseconds (browsers default to about 3 s).
SSE_RETRY_MS = 2000
# Seconds a closing gateway gives its event streams to forward what their node sent last.
STREAMS_END_WITHIN = 1.0

# Bodies up to this size are parsed on the event loop (a few ms at most); larger ones in the
# gateway's worker process, at most PARSING_AT_ONCE at a time.
PARSE_ON_LOOP_BYTES = 4 * 1024
PARSING_AT_ONCE = 2
PARSE_WAITING_MAX = 8
# The largest body of a call that takes no credential (Gate.Connect: a JWT).
PUBLIC_BODY_BYTES = 64 * 1024

BODY_TIMEOUT = 30.0
"""Seconds a client has to send a request's whole body; slower gets 408."""

MAX_CREDENTIAL_LENGTH = 4096
"""Longest ``authorization`` value (or ``access_token`` with its ``Bearer`` prefix) passed on.

gRPC refuses a call whose metadata passes 8 KiB (at random between that and 16 KiB) with
RESOURCE_EXHAUSTED, which would reach the client as a 429 to retry; a real token is far shorter.
"""

# The web page runs only its own script and style, talks to any node (other origins), and is
# not to be framed: a message that slipped past its text-only rendering could run nothing.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src *; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _WithPageHeaders:
    """An ASGI app whose every response, its errors (a 404) included, carries _PAGE_HEADERS:
    a script or style under /web, or a page put there later, is as locked down as the page."""

    def __init__(self, app: ASGIApp) -> None:
        # Its own exception handling: an error answered further out would go without them.
        self._app = ExceptionMiddleware(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _PAGE_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self._app(scope, receive, send_with_headers)


_SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Proxies such as nginx buffer responses unless told not to; events must not wait.
    "X-Accel-Buffering": "no",
}

_WEB_ROOT = Path(__file__).resolve().parent.parent / "clients" / "web"


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status grpc-gateway answers a gRPC status code with (500 for an unknown one)."""
    return HTTP_STATUS.get(code, 500)


def default_web_root() -> Path | None:
    """The inbox page (``clients/web``) of a source checkout, or None when it is not there."""
    return _WEB_ROOT if (_WEB_ROOT / "index.html").is_file() else None


class _BadRequest(Exception):
    """A request the transcoder cannot turn into a message: sent as 400 (or ``status``)."""

    def __init__(self, error: PigeonError, status: int = 400) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status
        self.headers: dict[str, str] = {}


def _invalid(message: str, reason: str, **metadata: str) -> _BadRequest:
    return _BadRequest(InvalidArgument(message, reason=reason, **metadata))


# --- request messages --------------------------------------------------------------------------

_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})

_INTEGERS: dict[int, tuple[int, int, str]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1, "a 32-bit integer"),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1, "a 32-bit integer"),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1, "a 32-bit integer"),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1, "an unsigned 32-bit integer"),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1, "an unsigned 32-bit integer"),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1, "a 64-bit integer"),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1, "a 64-bit integer"),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1, "a 64-bit integer"),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1, "an unsigned 64-bit integer"),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1, "an unsigned 64-bit integer"),
}


def _scalar(descriptor: FieldDescriptor, text: str, where: str) -> Any:
    """Convert the text of a path or query parameter to a field's value."""
    kind = descriptor.type
    if kind == FieldDescriptor.TYPE_STRING:
        return text
    if kind == FieldDescriptor.TYPE_BOOL:
        # The spellings Go's strconv.ParseBool accepts, as grpc-gateway does.
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise _invalid(f"{where} must be true or false, got {text!r}", "BAD_PARAMETER", field=where)
    if kind in _INTEGERS:
        low, high, what = _INTEGERS[kind]
        try:
            value = int(text, 10)
        except ValueError:
            raise _invalid(
                f"{where} must be {what}, got {text[:40]!r}", "BAD_PARAMETER", field=where
            ) from None
        if not low <= value <= high:
            raise _invalid(f"{where} is out of range for {what}", "BAD_PARAMETER", field=where)
        return value
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        try:
            return float(text)
        except ValueError:
            raise _invalid(
                f"{where} must be a number, got {text[:40]!r}", "BAD_PARAMETER", field=where
            ) from None
    if kind == FieldDescriptor.TYPE_BYTES:
        try:
            padded = text + "=" * (-len(text) % 4)
            return base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
        except ValueError:
            raise _invalid(f"{where} must be base64", "BAD_PARAMETER", field=where) from None
    if kind == FieldDescriptor.TYPE_ENUM:
        enum = descriptor.enum_type
        assert enum is not None
        by_name = enum.values_by_name.get(text)
        if by_name is not None:
            return by_name.number
        # isascii: "²".isdigit() is true, but int("²") fails; one sign only ("--1" is no number).
        # An enum number is 32-bit: more than 10 digits is none, and int() refuses over 4300.
        number = text.removeprefix("-")
        if (
            number.isascii()
            and number.isdigit()
            and len(number) <= 10
            and int(text) in enum.values_by_number
        ):
            return int(text)
        names = ", ".join(v.name for v in enum.values)
        raise _invalid(
            f"{where} must be one of {names} (or its number), got {text[:40]!r}",
            "BAD_PARAMETER",
            field=where,
        )
    raise _invalid(f"{where} cannot be set from text", "BAD_PARAMETER", field=where)


def _scalar_message(descriptor: Descriptor, text: str, where: str) -> Message:
    """A Timestamp, Duration, FieldMask or wrapper message from a parameter's text."""
    # Any: which well-known type this is is only known at run time.
    made = message_factory.GetMessageClass(descriptor)()
    message: Any = made
    if descriptor.full_name in (
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
    ):
        try:
            message.FromJsonString(text)
        except ValueError as exc:
            raise _invalid(f"{where}: {exc}", "BAD_PARAMETER", field=where) from None
        return made
    value = descriptor.fields_by_name["value"]
    message.value = _scalar(value, text, where)
    return made


def _set_text(message: Message, path: Sequence[str], texts: Sequence[str], where: str) -> bool:
    """Set the field at a dotted path from parameter text(s).

    A path whose last step is ``name[key]`` sets one entry of a map field.

    Returns:
        False when the path names no field (grpc-gateway ignores such query parameters).

    Raises:
        _BadRequest: The text does not fit the field, or several values for a single field.
    """
    target: Message = message
    for step in path[:-1]:
        found = field_named(_descriptor(target), step)
        if found is None or message_of(found) is None or found.is_repeated:
            return False
        target = getattr(target, found.name)
    last = path[-1]
    key: str | None = None
    if last.endswith("]") and "[" in last:
        last, _, key = last[:-1].partition("[")
    found = field_named(_descriptor(target), last)
    if found is None:
        return False
    if key is not None:
        if not is_map(found):
            return False
        entry = message_of(found)
        assert entry is not None
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        if message_of(value_field) is not None:
            raise _invalid(f"{where} cannot be set from text", "BAD_PARAMETER", field=where)
        mapping = getattr(target, found.name)
        mapping[_scalar(key_field, key, where)] = _scalar(value_field, texts[-1], where)
        return True
    if is_map(found):
        raise _invalid(f"{where} is a map: set entries as {where}[key]=value", "BAD_PARAMETER")
    if not found.is_repeated and len(texts) > 1:
        raise _invalid(
            f"{where} is given {len(texts)} times but takes one value",
            "BAD_PARAMETER",
            field=where,
        )
    nested = message_of(found)
    if nested is not None and nested.full_name not in SCALAR_MESSAGES:
        raise _invalid(
            f"{where} is a message: set its fields as {where}.<field>",
            "BAD_PARAMETER",
            field=where,
        )
    if found.is_repeated:
        items = getattr(target, found.name)
        for text in texts:
            if nested is not None:
                items.add().CopyFrom(_scalar_message(nested, text, where))
            else:
                items.append(_scalar(found, text, where))
    elif nested is not None:
        getattr(target, found.name).CopyFrom(_scalar_message(nested, texts[0], where))
    else:
        setattr(target, found.name, _scalar(found, texts[0], where))
    return True


def _decode_json(body: bytes) -> Any:
    """Parse a request body; None for an empty one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(
            f"request body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})",
            "BAD_JSON",
        ) from None
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "BAD_JSON",
        ) from None
    except RecursionError:
        raise _invalid("request body is nested too deeply", "BAD_JSON") from None
    except ValueError:
        # Python refuses to convert an integer with more digits than this (CVE-2020-10735).
        raise _invalid(
            f"request body has a number longer than {sys.get_int_max_str_digits()} digits",
            "BAD_JSON",
        ) from None


def _decode_into(body: bytes, message: Message, field: str | None) -> None:
    value = _decode_json(body)
    if value is not None:
        _parse_into(value, message, field)


def _json_to_wire(
    module: str, name: str, body: bytes, field: str | None
) -> tuple[bytes | None, tuple[str, str, dict[str, str]] | None]:
    """In the worker process: a body decoded into the request type ``module.name``, as protobuf
    bytes, or the error the decoding met as (message, reason, metadata). (None, None) when the
    type cannot be found there (one made at run time), for the caller to decode it itself."""
    try:
        message = getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, TypeError):
        return None, None
    try:
        _decode_into(body, message, field)
    except _BadRequest as exc:
        return None, (exc.error.message, exc.error.reason, exc.error.metadata)
    return message.SerializeToString(), None


def _parse_into(value: Any, message: Message, field: str | None) -> None:
    """Merge parsed JSON into the request, the whole message or one field of it."""
    if field is None and not isinstance(value, dict):
        raise _invalid(
            f"request body must be a JSON object, got {_json_type(value)}", "BAD_REQUEST_BODY"
        )
    document = value if field is None else {field: value}
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        # json_format's messages name the field and the problem; keep them on one line.
        detail = " ".join(str(exc).split())
        raise _invalid(f"bad request body: {detail}", "BAD_REQUEST_BODY") from None


def _descriptor(message: Message) -> Descriptor:
    # The upb runtime's descriptor class is not the one the stubs name; they behave the same.
    return cast(Descriptor, message.DESCRIPTOR)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def _to_json(message: Message) -> dict[str, Any]:
    # Emit unset fields with their zero values, as grpc-gateway does (EmitUnpopulated), so that
    # a client reads "unreadCount": "0" instead of guessing from an absent key.
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# --- errors ------------------------------------------------------------------------------------


def _status_json(status: status_pb2.Status) -> dict[str, Any]:
    details = []
    for detail in status.details:
        try:
            details.append(json_format.MessageToDict(detail))
        except (TypeError, KeyError, json_format.Error):
            # A detail type this process does not know: pass it on undecoded.
            details.append(
                {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode()}
            )
    return {"code": status.code, "message": status.message, "details": details}


def _error_response(status: status_pb2.Status, http: int | None = None) -> Response:
    code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    headers: dict[str, str] = {}
    if code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            seconds = retry.retry_delay.ToNanoseconds() / 1e9
            headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    return JSONResponse(
        _status_json(status), status_code=http or http_status(code), headers=headers
    )


def _pigeon_error_response(error: PigeonError, http: int | None = None) -> Response:
    return _error_response(rich_status(error), http)


# --- the gateway -------------------------------------------------------------------------------


class _Everything(BaseRoute):
    """A route that takes every HTTP request not taken before it.

    ``Mount("")`` would do, but its pattern does not match a path with a newline in it
    (``/v1/messages/%0A``), which then falls through to Starlette's plain-text 404.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return (Match.FULL, {}) if scope["type"] == "http" else (Match.NONE, {})

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class _Route:
    """A binding with what the transcoder needs at request time."""

    binding: HttpBinding
    request_type: type[Message]
    response_type: type[Message]
    resumable: bool  # a stream whose events carry a Cursor and whose request takes one


def _route(binding: HttpBinding) -> _Route:
    method = binding.method
    output = method.output_type
    request = method.input_type
    cursor = output.fields_by_name.get("cursor")
    cursor_type = message_of(cursor) if cursor is not None else None
    resumable = (
        binding.server_streaming
        and cursor_type is not None
        and cursor_type.full_name == "pigeon.v1.Cursor"
        and {"since_seq", "since_broadcast_seq"} <= set(request.fields_by_name)
    )
    return _Route(
        binding=binding,
        request_type=message_factory.GetMessageClass(request),
        response_type=message_factory.GetMessageClass(output),
        resumable=resumable,
    )


class RestGateway:
    """The REST face of one process's gRPC services.

    Build it before the servers start, pass :attr:`routes` to :func:`pigeon.service.listen`, then
    enter :meth:`forward_to` with the gRPC server's address once it listens. Requests that come
    before (or after) that get 503.

    Args:
        services: The gRPC services to serve; every annotated RPC of each becomes a route.
        title: The OpenAPI document's title; defaults to "Pigeon <Service> API".
        cors_origins: Origins allowed to call from a browser; ``"*"`` allows any (safe here:
            REST takes bearer credentials, never cookies); empty turns CORS off.
        web_root: A folder with ``index.html`` to serve at ``/`` (its files under ``/web/``).
        unary_timeout: Deadline of each unary call, seconds.
        max_body_bytes: Largest request body accepted; larger gets 413. The default is what
            the gRPC server takes.
        auth: The gRPC server's policy (:func:`pigeon.server` authenticators by method): a
            call with a body is authenticated here first, so one the server would refuse costs
            no body read or parse; its PUBLIC methods (Gate.Connect) are so marked in the
            OpenAPI document and take bodies of at most 64 KB.
    """

    def __init__(
        self,
        services: Sequence[ServiceDescriptor],
        *,
        title: str = "",
        cors_origins: Sequence[str] = ("*",),
        web_root: Path | None = None,
        unary_timeout: float = 30.0,
        max_body_bytes: int = MAX_REQUEST_BYTES,
        auth: Mapping[str, Authenticator] | None = None,
    ) -> None:
        self._services = list(services)
        self._auth = auth
        self._parse_waiting = 0
        # Literal templates before ones with variables, so /v1/messages:read is never taken for
        # a message id; otherwise in declaration order.
        bindings = [b for s in self._services for b in http_bindings(s)]
        bindings.sort(key=lambda b: len(b.template.variables))
        self._routes = [_route(b) for b in bindings]
        self._title = title or f"Pigeon {' and '.join(s.name for s in self._services)} API"
        self._cors_origins = list(cors_origins)
        self._web_root = web_root
        self._unary_timeout = unary_timeout
        self._max_body_bytes = max_body_bytes
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[str, Any] = {}
        self._streams: set[grpc.aio.UnaryStreamCall[Any, Any]] = set()
        self._no_streams = asyncio.Event()
        self._closing = False
        self._document: bytes | None = None
        self._parsing = asyncio.Semaphore(PARSING_AT_ONCE)
        self._large = LargeRequests()
        self._worker = WorkerProcess()

    # The HTTP side.

    @property
    def routes(self) -> list[BaseRoute]:
        """One Starlette route that serves ``/openapi.json``, the web page (if any) and every
        transcoded RPC, behind CORS; everything else under it is a JSON 404."""
        inner: list[BaseRoute] = [Route("/openapi.json", self._openapi_page, methods=["GET"])]
        if self._web_root is not None:
            inner.append(Route("/", self._index, methods=["GET"]))
            static = StaticFiles(directory=self._web_root)
            inner.append(Mount("/web", app=_WithPageHeaders(static)))
        inner.append(_Everything(self._transcode))
        app: ASGIApp = Router(routes=inner)
        if self._cors_origins:
            app = CORSMiddleware(
                app,
                allow_origins=self._cors_origins,
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                allow_headers=["authorization", "content-type", "accept", "last-event-id"],
                expose_headers=["retry-after", "www-authenticate"],
                max_age=600,
            )
        return [_Everything(app)]

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document of the served routes."""
        return openapi_document(
            self._services,
            title=self._title,
            version=__version__,
            comments=Comments.load(),
            public=[r.binding.method.full_name for r in self._routes if self._public(r)],
        )

    async def _openapi(self, _: Request) -> Response:
        if self._document is None:
            self._document = json.dumps(self.openapi(), indent=1).encode()
        return Response(self._document, media_type="application/json")

    async def _index(self, _: Request) -> Response:
        assert self._web_root is not None
        return FileResponse(
            self._web_root / "index.html", headers={"Cache-Control": "no-cache", **_PAGE_HEADERS}
        )

    async def _openapi_page(self, request: Request) -> Response:
        # Data, not a page; still never to be sniffed into one, nor framed.
        response = await self._openapi(request)
        response.headers.update(_PAGE_HEADERS)
        return response

    # The gRPC side.

    @contextlib.asynccontextmanager
    async def forward_to(
        self,
        address: str,
        open_channel: Callable[[str], grpc.aio.Channel] = grpc.aio.insecure_channel,
    ) -> AsyncIterator[None]:
        """Forward requests to the gRPC server at ``address`` while the context is open.

        On exit, open streams are ended (an event stream ends cleanly, so a browser reconnects
        elsewhere) and the channel is closed.

        Args:
            address: ``host:port`` of this process's gRPC server, as its certificate names it
                when it uses TLS.
            open_channel: Opens the channel (plaintext by default; pass the process's TLS
                channel factory when the server uses TLS).
        """
        self._closing = False
        self._calls = {}
        self._channel = open_channel(address)
        try:
            yield
        finally:
            self._closing = True
            # A stream whose node side has ended (a drain's reconnect hint) still has its last
            # events to forward: a moment for that before the rest are cut.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STREAMS_END_WITHIN):
                    if self._streams:
                        await self._no_streams.wait()
            channel, self._channel = self._channel, None
            for call in list(self._streams):
                call.cancel()
            self._worker.close()
            await channel.close(None)

    def _callable(self, route: _Route) -> Any:
        """The channel's multi-callable for a route's RPC, made once per channel."""
        path = route.binding.rpc_path
        found = self._calls.get(path)
        if found is None:
            assert self._channel is not None
            make = (
                self._channel.unary_stream
                if route.binding.server_streaming
                else self._channel.unary_unary
            )
            found = make(
                path,
                request_serializer=route.request_type.SerializeToString,
                response_deserializer=route.response_type.FromString,
            )
            self._calls[path] = found
        return found

    # Transcoding.

    async def _transcode(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self._dispatch(request)
        except _BadRequest as exc:
            response = _pigeon_error_response(exc.error, exc.status)
            response.headers.update(exc.headers)
        except ClientDisconnect:
            # The client left while sending its body: nobody to answer, nothing went wrong here.
            log.debug("REST %s %s: the client left mid-request", request.method, request.url.path)
            return
        except Exception:
            incident = uuid.uuid4().hex[:12]
            # Only the method and path: the query may hold an access token.
            log.exception(
                "REST %s %s failed (incident %s)", request.method, request.url.path, incident
            )
            response = _pigeon_error_response(Internal(f"internal error (incident {incident})"))
        await response(scope, receive, send)

    async def _dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.scope["path"].encode()
        path = raw.decode("latin-1").split("?", 1)[0]
        matched: list[tuple[_Route, dict[tuple[str, ...], str]]] = []
        for route in self._routes:
            try:
                variables = route.binding.template.match(path)
            except UnicodeDecodeError:
                raise _invalid("the path is not valid UTF-8 once decoded", "BAD_PATH") from None
            if variables is not None:
                matched.append((route, variables))
        if not matched:
            return _pigeon_error_response(NotFound("Not Found", reason="NO_ROUTE"))
        # HEAD is GET without the body (RFC 9110 9.3.2); uvicorn leaves the body out.
        method = "GET" if request.method == "HEAD" else request.method
        for route, found in matched:
            if route.binding.http_method == method:
                variables = found
                break
        else:
            methods = {r.binding.http_method for r, _ in matched} | {"OPTIONS"}
            if "GET" in methods:
                methods.add("HEAD")
            allow = ", ".join(sorted(methods))
            # A CORS preflight never gets here: the CORS middleware answers it.
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": allow})
            status = status_pb2.Status(
                code=grpc.StatusCode.UNIMPLEMENTED.value[0], message="Method Not Allowed"
            )
            response = _error_response(status, 405)
            response.headers["Allow"] = allow
            return response
        if self._channel is None:
            return _pigeon_error_response(
                Unavailable("the service is starting or stopping; retry", reason="NOT_READY")
            )
        metadata = _metadata(request, route)
        public = self._public(route)
        caller, refused = (
            ("", None) if public or not route.binding.body else self._caller(route, metadata)
        )
        if refused is not None:
            # Refused before its body is read or parsed (a large one costs seconds of this
            # process's only thread): the server refuses an empty request the same way, and
            # counts the failure against the caller's address. The connection cannot carry
            # another request after it.
            response = _pigeon_error_response(refused)
            if not route.binding.server_streaming:
                try:
                    await self._callable(route)(
                        route.request_type(), metadata=metadata, timeout=self._unary_timeout
                    )
                except grpc.aio.AioRpcError as exc:
                    response = _error_response(received_status(exc).status)
            response.headers["Connection"] = "close"
            return response
        message = await self._request_message(route, variables, request, caller, public=public)
        if route.binding.server_streaming:
            return await self._stream(route, message, metadata, request)
        try:
            reply = await self._callable(route)(
                message, metadata=metadata, timeout=self._unary_timeout
            )
        except grpc.aio.AioRpcError as exc:
            return _error_response(received_status(exc).status)
        body = route.binding.response_body
        data: Any = _to_json(reply)
        if body:
            data = data.get(reply.DESCRIPTOR.fields_by_name[body].json_name)
        return JSONResponse(data)

    def _public(self, route: _Route) -> bool:
        """Whether the server's policy takes the route's calls with no credential."""
        return (
            self._auth is not None
            and authenticator_for(self._auth, route.binding.rpc_path) is PUBLIC
        )

    def _caller(
        self, route: _Route, metadata: list[tuple[str, str]]
    ) -> tuple[str, PigeonError | None]:
        """Who the server's policy takes the call to be (empty when unknown), or the error it
        would refuse the call with."""
        if self._auth is None:
            return "", None
        authenticate = authenticator_for(self._auth, route.binding.rpc_path)
        if authenticate is None:
            return "", None
        try:
            principal = authenticate(bearer_token(metadata))
        except PigeonError as exc:
            return "", exc
        return f"{principal.kind}:{principal.id}", None

    async def _request_message(
        self,
        route: _Route,
        variables: Mapping[tuple[str, ...], str],
        request: Request,
        caller: str = "",
        *,
        public: bool = False,
    ) -> Message:
        """The RPC's request: the body, then the path variables, then the query (grpc-gateway's
        order, so the path wins over the body)."""
        binding = route.binding
        message = route.request_type()
        if binding.body:
            # A public call (Gate.Connect) carries a token, not a batch of messages.
            limit = min(PUBLIC_BODY_BYTES, self._max_body_bytes) if public else None
            field = None if binding.body == "*" else binding.body
            body = await self._read_body(request, limit)
            if len(body) <= PARSE_ON_LOOP_BYTES:
                _decode_into(body, message, field)
            else:
                # Refused only once the body is read: a client still uploading when the
                # connection closes sees a reset, not the answer that says when to retry.
                try:
                    with self._large.admit(caller or "?", len(body)):
                        await self._decode_off_loop(body, message, field)
                except (ResourceExhausted, Unavailable) as exc:
                    status = 429 if isinstance(exc, ResourceExhausted) else 503
                    raise _BadRequest(exc, status) from None
        for field_path, text in variables.items():
            _set_text(message, field_path, [text], ".".join(field_path))
        if binding.body != "*":
            _apply_query(message, request.query_params.multi_items(), binding.bound_fields())
        if route.resumable:
            _apply_resume(message, request)
        return message

    async def _decode_off_loop(self, body: bytes, message: Message, field: str | None) -> None:
        """Decode a body in the worker process, a few at a time and only so many waiting; the
        loop only merges the protobuf bytes.

        protobuf's JSON parser is pure Python, seconds for megabytes of small elements, and on a
        thread it would hold the loop's GIL meanwhile.
        """
        if self._parse_waiting >= PARSE_WAITING_MAX:
            raise ResourceExhausted(
                "too many large requests are being read; retry", retry_after=1.0, reason="BUSY"
            )
        self._parse_waiting += 1
        try:
            async with self._parsing:
                kind = type(message)
                wire, error = await self._worker.run(
                    _json_to_wire, kind.__module__, kind.__qualname__, body, field
                )
        finally:
            self._parse_waiting -= 1
        if error is not None:
            text, reason, metadata = error
            raise _BadRequest(InvalidArgument(text, reason=reason, **metadata))
        if wire is None:
            await asyncio.to_thread(_decode_into, body, message, field)
        else:
            message.MergeFromString(wire)

    async def _read_body(self, request: Request, limit: int | None = None) -> bytes:
        max_bytes = self._max_body_bytes if limit is None else limit
        chunks: list[bytes] = []
        size = 0
        # Neither uvicorn nor the call's deadline bounds the upload: a client that sends headers
        # and then a trickle (or nothing) would hold its connection and this task for good.
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_bytes:
                        too_large = _BadRequest(
                            InvalidArgument(
                                f"request body is larger than {max_bytes} bytes",
                                reason="BODY_TOO_LARGE",
                                limit=str(max_bytes),
                            ),
                            413,
                        )
                        # The rest of the body is not read: no other request can follow it.
                        too_large.headers["Connection"] = "close"
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            error = _BadRequest(
                DeadlineExceeded(
                    f"the request body did not arrive within {BODY_TIMEOUT:g}s",
                    reason="BODY_TIMEOUT",
                ),
                408,
            )
            # The rest of the body may still come: the connection cannot carry another request.
            error.headers["Connection"] = "close"
            raise error from None
        return b"".join(chunks)

    # Streams.

    async def _stream(
        self,
        route: _Route,
        message: Message,
        metadata: list[tuple[str, str]],
        request: Request,
    ) -> Response:
        ndjson = _wants_ndjson(request.headers.get("accept", ""))
        call = self._callable(route)(message, metadata=metadata)
        self._streams.add(call)
        self._no_streams.clear()
        # Wait for the first event before answering, so that a call refused at once (bad token,
        # bad cursor) gets its own HTTP status instead of a 200 with an error inside.
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            self._end_stream(call)
            return _error_response(received_status(exc).status)
        except BaseException:
            self._end_stream(call)
            raise
        media_type = "application/x-ndjson" if ndjson else "text/event-stream"
        if request.method == "HEAD":
            # The call is accepted (the credential and cursor are good): that is all HEAD asks.
            self._end_stream(call)
            return Response(media_type=media_type, headers=None if ndjson else _SSE_HEADERS)
        frames = self._frames(route, call, first, ndjson=ndjson)
        # The body generator cancels the call when it ends; the background task also covers a
        # client that leaves before the body's first chunk, when the generator never starts.
        end = BackgroundTask(self._end_stream, call)
        return StreamingResponse(
            frames, media_type=media_type, headers=None if ndjson else _SSE_HEADERS, background=end
        )

    def _end_stream(self, call: Any) -> None:
        self._streams.discard(call)
        if not self._streams:
            self._no_streams.set()
        call.cancel()

    async def _frames(
        self, route: _Route, call: Any, first: Any, *, ndjson: bool
    ) -> AsyncIterator[bytes]:
        """The response body of a stream; cancelling it (the client left) cancels the call."""
        try:
            event = first
            if not ndjson:
                yield f"retry: {SSE_RETRY_MS}\n\n".encode()
            while event is not _EOF:
                if ndjson:
                    yield (_dumps({"result": _to_json(event)}) + "\n").encode()
                else:
                    yield _sse_event(event, route.resumable)
                event = await call.read()
        except grpc.aio.AioRpcError as exc:
            error = _status_json(received_status(exc).status)
            if ndjson:
                yield (_dumps({"error": error}) + "\n").encode()
            else:
                yield f"event: error\ndata: {_dumps(error)}\n\n".encode()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._closing or (task is not None and task.cancelling()):
                raise
            # forward_to is closing: end the response normally rather than cutting it.
        finally:
            self._end_stream(call)


def _sse_event(event: Any, resumable: bool) -> bytes:
    head = ""
    if resumable and event.HasField("cursor"):
        cursor = event.cursor
        head = f"id: {cursor.seq}.{cursor.broadcast_seq}\n"
    # json.dumps escapes newlines inside strings, so the event is one data: line.
    return f"{head}data: {_dumps(_to_json(event))}\n\n".encode()


def _wants_ndjson(accept: str) -> bool:
    kinds = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    if "text/event-stream" in kinds:
        return False
    return bool(kinds & {"application/x-ndjson", "application/json"})


def _apply_query(
    message: Message, items: Iterable[tuple[str, str]], bound: Sequence[tuple[str, ...]]
) -> None:
    grouped: dict[str, list[str]] = {}
    for key, value in items:
        grouped.setdefault(key, []).append(value)
    for key, texts in grouped.items():
        path = tuple(key.split("."))
        proto_path = _proto_path(_descriptor(message), path)
        # Fields set by the path or the body are not taken from the query (grpc-gateway's
        # filter), so a query cannot override the resource named in the URL.
        if any(proto_path[: len(b)] == b for b in bound):
            continue
        _set_text(message, path, texts, key)


def _proto_path(message: Descriptor, path: Sequence[str]) -> tuple[str, ...]:
    """A query key's field path with JSON names replaced by proto names, as far as it resolves."""
    names: list[str] = []
    current: Descriptor | None = message
    for step in path:
        found = field_named(current, step.split("[", 1)[0]) if current is not None else None
        if found is None:
            names.append(step)
            current = None
            continue
        names.append(found.name)
        current = message_of(found)
    return tuple(names)


def _apply_resume(message: Any, request: Request) -> None:
    """Resume a stream from ``Last-Event-ID`` (what a reconnecting EventSource sends) or the
    ``last_event_id`` query parameter (for a new EventSource); they win over the query cursor."""
    text = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not text:
        return
    seq_text, dot, broadcast_text = text.strip().partition(".")
    if not (
        dot
        and (seq_text + broadcast_text).isascii()
        and seq_text.isdigit()
        and broadcast_text.isdigit()
    ):
        raise _invalid(
            f"Last-Event-ID must be <seq>.<broadcast_seq> as sent in an event's id, got "
            f"{text[:40]!r}",
            "BAD_CURSOR",
            field="Last-Event-ID",
        )
    # 2**64 has 20 digits; int() would refuse a much longer one with a ValueError.
    if len(seq_text) > 20 or len(broadcast_text) > 20:
        raise _invalid("Last-Event-ID is out of range", "BAD_CURSOR", field="Last-Event-ID")
    seq, broadcast = int(seq_text), int(broadcast_text)
    if seq >= 2**64 or broadcast >= 2**64:
        raise _invalid("Last-Event-ID is out of range", "BAD_CURSOR", field="Last-Event-ID")
    message.since_seq = seq
    message.since_broadcast_seq = broadcast


def _metadata(request: Request, route: _Route) -> list[tuple[str, str]]:
    """The call's metadata: the caller's credential, from the header or, for a stream (which an
    EventSource opens without headers), from the access_token query parameter."""
    # The client as uvicorn resolved it (X-Forwarded-For from trusted proxies): the gRPC server
    # trusts this process's calls to say who the caller is, for its per-address limits.
    client = [("x-forwarded-for", request.client.host)] if request.client else []
    authorization = request.headers.get("authorization") or None
    if authorization is None and route.binding.server_streaming:
        token = request.query_params.get("access_token")
        if token:
            authorization = f"Bearer {token}"
    if authorization is None:
        return client
    if len(authorization) > MAX_CREDENTIAL_LENGTH:
        raise _BadRequest(
            Unauthenticated(
                f"the authorization credential is longer than {MAX_CREDENTIAL_LENGTH} characters",
                reason="BAD_AUTHORIZATION",
            ),
            401,
        )
    # gRPC metadata is printable ASCII; anything else cannot be a valid credential anyway.
    if not (authorization.isascii() and authorization.isprintable()):
        raise _BadRequest(
            Unauthenticated(
                "the authorization credential must be printable ASCII",
                reason="BAD_AUTHORIZATION",
            ),
            401,
        )
    return [*client, ("authorization", authorization)]
