"""REST, grpc-gateway style: the transcoder against an in-process echo service (every kind of
binding and parameter, every status code, stream framing and shutdown), then every Gate and Node
route against a real local cluster, Server-Sent Events that resume without a gap, the OpenAPI
document, and schemathesis against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
import schemathesis
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped, unused-ignore]
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

import pigeon.http
import pigeon.rest
from pigeon.auth import mint_user_token
from pigeon.errors import PigeonError, ResourceExhausted
from pigeon.http import HttpServer
from pigeon.local import LocalCluster, ServiceProcess
from pigeon.openapi import PathTemplate, http_bindings, openapi_document
from pigeon.rest import HTTP_STATUS, RestGateway
from pigeon.server import GrpcServer, Principal, Service
from pigeon.v1 import gate_pb2, node_pb2
from tests.certs import make_certificates

ENV = {"PATH": "/usr/bin"}
WAIT = 10.0  # seconds any single condition may take

GATE = gate_pb2.DESCRIPTOR.services_by_name["Gate"]
NODE = node_pb2.DESCRIPTOR.services_by_name["Node"]


# --- an echo service with every kind of binding ------------------------------------------------


def _echo_file() -> descriptor_pb2.FileDescriptorProto:
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/rest_echo.proto",
        package="pigeon.test",
        syntax="proto3",
        dependency=["google/api/annotations.proto", "google/protobuf/timestamp.proto"],
    )
    kind = file.enum_type.add(name="Kind")
    for number, name in enumerate(["KIND_UNSPECIFIED", "KIND_A", "KIND_B"]):
        kind.value.add(name=name, number=number)
    inner = file.message_type.add(name="Inner")
    inner.field.add(name="id", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    inner.field.add(name="n", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    echo = file.message_type.add(name="Echo")
    entry = echo.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    fields: list[tuple[str, int, int, str]] = [
        ("name", F.TYPE_STRING, F.LABEL_OPTIONAL, ""),
        ("ids", F.TYPE_STRING, F.LABEL_REPEATED, ""),
        ("flag", F.TYPE_BOOL, F.LABEL_OPTIONAL, ""),
        ("count", F.TYPE_UINT32, F.LABEL_OPTIONAL, ""),
        ("big", F.TYPE_INT64, F.LABEL_OPTIONAL, ""),
        ("kind", F.TYPE_ENUM, F.LABEL_OPTIONAL, ".pigeon.test.Kind"),
        ("inner", F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".pigeon.test.Inner"),
        ("labels", F.TYPE_MESSAGE, F.LABEL_REPEATED, ".pigeon.test.Echo.LabelsEntry"),
        ("at", F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".google.protobuf.Timestamp"),
        ("data", F.TYPE_BYTES, F.LABEL_OPTIONAL, ""),
        ("ratio", F.TYPE_DOUBLE, F.LABEL_OPTIONAL, ""),
        ("page_size", F.TYPE_UINT32, F.LABEL_OPTIONAL, ""),
    ]
    for number, (name, type_, label, type_name) in enumerate(fields, start=1):
        added = echo.field.add(name=name, number=number, type=type_, label=label)
        if type_name:
            added.type_name = type_name
    service = file.service.add(name="EchoService")

    def rpc(name: str, rule: http_pb2.HttpRule, *, stream: bool = False) -> None:
        method = service.method.add(
            name=name,
            input_type=".pigeon.test.Echo",
            output_type=".pigeon.test.Echo",
            server_streaming=stream,
        )
        method.options.Extensions[annotations_pb2.http].CopyFrom(rule)

    get = http_pb2.HttpRule(get="/v1/rooms/{name=rooms/*}/echo")
    get.additional_bindings.add(get="/v1/echo/{inner.id}")
    rpc("Get", get)
    rpc("Post", http_pb2.HttpRule(post="/v1/echo:post", body="*"))
    rpc(
        "PostInner",
        http_pb2.HttpRule(post="/v1/echo/{name}:inner", body="inner", response_body="inner"),
    )
    rpc("Fail", http_pb2.HttpRule(get="/v1/fail/{name}"))
    rpc("Stream", http_pb2.HttpRule(get="/v1/echo-stream"), stream=True)
    return file


descriptor_pool.Default().Add(_echo_file())
ECHO_SERVICE = descriptor_pool.Default().FindServiceByName("pigeon.test.EchoService")
Echo: Any = message_factory.GetMessageClass(
    descriptor_pool.Default().FindMessageTypeByName("pigeon.test.Echo")
)


@dataclass
class EchoBackend:
    """What the echo service saw: credentials per call, and its open streams."""

    tokens: list[str | None] = field(default_factory=list)
    stream_started: asyncio.Event = field(default_factory=asyncio.Event)
    stream_ended: asyncio.Event = field(default_factory=asyncio.Event)

    def authenticate(self, token: str | None) -> Principal:
        self.tokens.append(token)
        return Principal("anonymous", "")

    async def echo(self, request: Any, _context: Any) -> Any:
        return request

    async def fail(self, request: Any, _context: Any) -> Any:
        code = grpc.StatusCode[request.name]
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise ResourceExhausted("slow down", retry_after=1.5, reason="RATE_LIMITED")
        error = PigeonError(f"failed with {code.name}", reason=f"TEST_{code.name}")
        error.code = code
        raise error

    async def stream(self, request: Any, _context: Any) -> AsyncIterator[Any]:
        try:
            for i in range(request.count):
                yield Echo(name=f"event {i}{request.name}", ids=["line\nbreak"])
            self.stream_started.set()
            if request.flag:
                await asyncio.Event().wait()  # hold the stream open until cancelled
        finally:
            self.stream_ended.set()

    def service(self) -> Service:
        def unary(fn: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=Echo.FromString, response_serializer=Echo.SerializeToString
            )

        handler = grpc.method_handlers_generic_handler(
            ECHO_SERVICE.full_name,
            {
                "Get": unary(self.echo),
                "Post": unary(self.echo),
                "PostInner": unary(self.echo),
                "Fail": unary(self.fail),
                "Stream": grpc.unary_stream_rpc_method_handler(
                    self.stream,
                    request_deserializer=Echo.FromString,
                    response_serializer=Echo.SerializeToString,
                ),
            },
        )
        return Service(ECHO_SERVICE.full_name, lambda s: s.add_generic_rpc_handlers((handler,)))


@dataclass
class EchoApp:
    backend: EchoBackend
    gateway: RestGateway
    http: httpx.AsyncClient
    grpc_address: str


@contextlib.asynccontextmanager
async def echo_app(**options: Any) -> AsyncIterator[EchoApp]:
    backend = EchoBackend()
    gateway = RestGateway([ECHO_SERVICE], **options)
    auth = {f"/{ECHO_SERVICE.full_name}/": backend.authenticate}
    async with (
        GrpcServer([backend.service()], auth=auth, grace=1) as server,
        HttpServer(gateway.routes) as http_server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_server.port}", timeout=WAIT) as http,
    ):
        yield EchoApp(backend, gateway, http, f"127.0.0.1:{server.port}")


@pytest.fixture
async def echo() -> AsyncIterator[EchoApp]:
    async with echo_app() as app, app.gateway.forward_to(app.grpc_address):
        yield app


def error_info(body: dict[str, Any]) -> dict[str, Any]:
    infos = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert len(infos) == 1, body
    info: dict[str, Any] = infos[0]
    return info


async def test_path_variables_and_query_parameters_fill_the_request(echo: EchoApp) -> None:
    query = (
        "ids=a&ids=b&flag=true&count=7&big=-5&kind=KIND_B&inner.id=x&inner.n=3"
        "&labels[color]=red&at=2024-01-02T03:04:05Z&data=aGk&ratio=0.5&pageSize=9&unknown=1"
    )
    reply = await echo.http.get(f"/v1/rooms/rooms/a%2Fb/echo?{query}")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "name": "rooms/a/b",
        "ids": ["a", "b"],
        "flag": True,
        "count": 7,
        "big": "-5",
        "kind": "KIND_B",
        "inner": {"id": "x", "n": "3"},
        "labels": {"color": "red"},
        "at": "2024-01-02T03:04:05Z",
        "data": "aGk=",
        "ratio": 0.5,
        "pageSize": 9,
    }


async def test_query_takes_enums_by_number_and_proto_names(echo: EchoApp) -> None:
    reply = await echo.http.get("/v1/rooms/rooms/r/echo?kind=1&page_size=3&flag=0")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["kind"], body["pageSize"], body["flag"]) == ("KIND_A", 3, False)


async def test_the_path_wins_over_the_query_for_a_bound_field(echo: EchoApp) -> None:
    reply = await echo.http.get("/v1/echo/from-path?inner.id=from-query&inner.n=2")
    assert reply.status_code == 200, reply.text
    assert reply.json()["inner"] == {"id": "from-path", "n": "2"}


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("count=abc", "count must be an unsigned 32-bit integer"),
        ("count=-1", "out of range"),
        ("big=99999999999999999999", "out of range for a 64-bit integer"),
        ("flag=maybe", "flag must be true or false"),
        ("kind=KIND_C", "must be one of KIND_UNSPECIFIED, KIND_A, KIND_B"),
        ("count=1&count=2", "count is given 2 times but takes one value"),
        ("inner=x", "inner is a message: set its fields as inner.<field>"),
        ("at=yesterday", "at:"),
    ],
)
async def test_bad_query_parameters_are_400_naming_the_parameter(
    echo: EchoApp, query: str, says: str
) -> None:
    reply = await echo.http.get(f"/v1/rooms/rooms/r/echo?{query}")
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert says in body["message"]
    assert error_info(body)["reason"] == "BAD_PARAMETER"


async def test_body_star_is_the_whole_request_in_proto3_json(echo: EchoApp) -> None:
    sent = {
        "name": "n",
        "ids": ["1"],
        "big": "12",
        "inner": {"id": "i", "n": "0"},
        "labels": {"a": "b"},
    }
    reply = await echo.http.post("/v1/echo:post?name=ignored", json=sent)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert {k: body[k] for k in sent} == sent
    # Proto field names are accepted as well as JSON names.
    reply = await echo.http.post("/v1/echo:post", json={"page_size": 4})
    assert reply.json()["pageSize"] == 4
    # An empty body is an empty request, as grpc-gateway treats it.
    reply = await echo.http.post("/v1/echo:post", content=b"")
    assert reply.status_code == 200 and reply.json()["name"] == ""


async def test_a_field_body_and_response_body(echo: EchoApp) -> None:
    reply = await echo.http.post("/v1/echo/room-1:inner", json={"id": "z", "n": 4})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"id": "z", "n": "4"}


@pytest.mark.parametrize(
    ("content", "says", "reason"),
    [
        (b'{"name": ', "request body is not valid JSON", "BAD_JSON"),
        (
            b'{"name": "\xff"}',
            "request body is not valid UTF-8 (byte 0xff at offset 10)",
            "BAD_JSON",
        ),
        (b"[1, 2]", "request body must be a JSON object, got an array", "BAD_REQUEST_BODY"),
        (b'{"nmae": "x"}', 'has no field named "nmae"', "BAD_REQUEST_BODY"),
        (b'{"count": "many"}', "Failed to parse count field", "BAD_REQUEST_BODY"),
        (b'{"name": "\\ud800"}', "Unpaired surrogate", "BAD_REQUEST_BODY"),
        (b"[" * 100_000, "nested too deeply", "BAD_JSON"),
    ],
)
async def test_bad_bodies_are_400_with_a_clear_message(
    echo: EchoApp, content: bytes, says: str, reason: str
) -> None:
    reply = await echo.http.post("/v1/echo:post", content=content)
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert body["code"] == 3
    assert says in body["message"], body["message"]
    assert error_info(body)["reason"] == reason


async def test_a_body_over_the_limit_is_413() -> None:
    async with echo_app(max_body_bytes=1000) as app, app.gateway.forward_to(app.grpc_address):
        reply = await app.http.post("/v1/echo:post", json={"name": "x" * 2000})
    assert reply.status_code == 413
    assert error_info(reply.json())["reason"] == "BODY_TOO_LARGE"


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
async def test_grpc_errors_map_to_http_statuses_as_grpc_gateway_maps_them(
    echo: EchoApp, code: grpc.StatusCode
) -> None:
    reply = await echo.http.get(f"/v1/fail/{code.name}")
    expected = {
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
    }[code]
    assert HTTP_STATUS[code] == expected
    assert reply.status_code == expected, reply.text
    body = reply.json()
    assert body["code"] == code.value[0]
    info = error_info(body)
    assert info["domain"] == "pigeon.v1"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert body["message"] == "slow down (retry after 1.5s)"
        assert info["reason"] == "RATE_LIMITED"
        retry = [d for d in body["details"] if d["@type"].endswith("google.rpc.RetryInfo")]
        assert retry == [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.500s"}
        ]
        assert reply.headers["retry-after"] == "2"
    else:
        assert body["message"] == f"failed with {code.name}"
        assert info["reason"] == f"TEST_{code.name}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        assert reply.headers["www-authenticate"] == "Bearer"


async def test_unknown_routes_are_404_and_wrong_methods_405_as_json(echo: EchoApp) -> None:
    for path in ("/v1/nothing/here", "/v1/nothing%0Ahere", "/"):
        missing = await echo.http.get(path)
        assert missing.status_code == 404
        assert missing.json()["code"] == 5 and missing.json()["message"] == "Not Found"
    wrong = await echo.http.delete("/v1/echo:post")
    assert wrong.status_code == 405
    assert wrong.json()["code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert wrong.headers["allow"] == "OPTIONS, POST"


async def test_the_authorization_header_is_passed_through(echo: EchoApp) -> None:
    await echo.http.get("/v1/echo/x", headers={"Authorization": "Bearer secret-1"})
    await echo.http.get("/v1/echo/x?access_token=not-for-unary-calls")
    assert echo.backend.tokens == ["secret-1", None]
    refused = await echo.http.get("/v1/echo/x", headers={b"Authorization": b"Bearer caf\xc3\xa9"})
    assert refused.status_code == 401
    assert error_info(refused.json())["reason"] == "BAD_AUTHORIZATION"


async def test_before_forwarding_starts_calls_are_503() -> None:
    async with echo_app() as app:
        reply = await app.http.get("/v1/echo/x")
    assert reply.status_code == 503
    assert error_info(reply.json())["reason"] == "NOT_READY"


async def test_a_stream_is_served_as_server_sent_events(echo: EchoApp) -> None:
    async with echo.http.stream("GET", "/v1/echo-stream?count=2&access_token=t-1") as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["cache-control"] == "no-cache"
        text = (await reply.aread()).decode()
    assert text == (
        "retry: 2000\n\n"
        'data: {"name":"event 0","ids":["line\\nbreak"],"flag":false,"count":0,"big":"0",'
        '"kind":"KIND_UNSPECIFIED","labels":{},"data":"","ratio":0.0,"pageSize":0}\n\n'
        'data: {"name":"event 1","ids":["line\\nbreak"],"flag":false,"count":0,"big":"0",'
        '"kind":"KIND_UNSPECIFIED","labels":{},"data":"","ratio":0.0,"pageSize":0}\n\n'
    )
    # EventSource cannot send headers: the stream takes the token from the query.
    assert echo.backend.tokens == ["t-1"]


async def test_a_stream_is_served_as_ndjson_on_request(echo: EchoApp) -> None:
    headers = {"Accept": "application/x-ndjson"}
    async with echo.http.stream("GET", "/v1/echo-stream?count=2", headers=headers) as reply:
        assert reply.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in reply.aiter_lines() if line]
    assert [line["result"]["name"] for line in lines] == ["event 0", "event 1"]


async def test_a_client_that_leaves_cancels_the_grpc_call(echo: EchoApp) -> None:
    async with echo.http.stream("GET", "/v1/echo-stream?count=1&flag=true") as reply:
        async with asyncio.timeout(WAIT):
            async for line in reply.aiter_lines():
                if line.startswith("data:"):
                    break
            await echo.backend.stream_started.wait()
    # The connection is closed: the server-side handler must see its call cancelled.
    async with asyncio.timeout(WAIT):
        await echo.backend.stream_ended.wait()


async def test_stopping_forwarding_ends_open_streams_cleanly() -> None:
    async with echo_app() as app:
        received: list[str] = []
        async with app.gateway.forward_to(app.grpc_address):
            reply_cm = app.http.stream("GET", "/v1/echo-stream?count=1&flag=true")
            reply = await reply_cm.__aenter__()
            lines = reply.aiter_lines()
            async with asyncio.timeout(WAIT):
                while not received:
                    line = await anext(lines)
                    if line.startswith("data:"):
                        received.append(line)
        # The response ends as a complete chunked body (httpx would raise on a cut one).
        async with asyncio.timeout(WAIT):
            rest = [line async for line in lines]
        await reply_cm.__aexit__(None, None, None)
        assert rest == [""]
        async with asyncio.timeout(WAIT):
            await app.backend.stream_ended.wait()


@contextlib.asynccontextmanager
async def raw_connection(
    client: httpx.AsyncClient, request: bytes, *, receive_buffer: int = 0
) -> AsyncIterator[socket.socket]:
    """A plain socket to the app that has sent ``request``: for what httpx will not do."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setblocking(False)
        if receive_buffer:
            # Before connecting, so that the window the server sees is this small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        async with asyncio.timeout(WAIT):
            await loop.sock_connect(sock, ("127.0.0.1", client.base_url.port or 80))
            await loop.sock_sendall(sock, request)
        yield sock
    finally:
        sock.close()


async def read_to_end(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(WAIT):
        while chunk := await loop.sock_recv(sock, 65536):
            received += chunk
    return received


async def test_a_client_that_stops_reading_a_stream_is_dropped_and_its_call_cancelled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # raising=False: the test must also run (and fail) where the bound does not exist.
    monkeypatch.setattr(pigeon.http, "WRITE_TIMEOUT", 0.5, raising=False)
    caplog.set_level(logging.WARNING, logger="pigeon.http")
    # Events of 8 KB, more than the client's buffers and the server's together can hold.
    request = f"GET /v1/echo-stream?count=1000000&name={'x' * 8000} HTTP/1.1\r\nHost: t\r\n\r\n"
    async with (
        echo_app() as app,
        app.gateway.forward_to(app.grpc_address),
        raw_connection(app.http, request.encode(), receive_buffer=4096) as never_reads,
    ):
        async with asyncio.timeout(WAIT):
            await app.backend.stream_ended.wait()
        # What the server had sent but the client had not taken is gone with the connection.
        with pytest.raises(ConnectionResetError):
            await read_to_end(never_reads)
    assert "took nothing of what it was sent for 0.5s: connection dropped" in caplog.text


async def test_a_connection_that_never_finishes_its_first_request_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pigeon.http, "HEADER_TIMEOUT", 0.5, raising=False)
    async with (
        echo_app() as app,
        raw_connection(app.http, b"GET /v1/echo/x HTTP/1.1\r\nHost: t\r\nX-Slow:") as slow,
    ):
        # Closed by the server with nothing sent back; a healthy client is served meanwhile.
        assert await read_to_end(slow) == b""
        assert (await app.http.get("/openapi.json")).status_code == 200
    # The same for a next request on a kept-alive connection: its headers have the same time.
    first = b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n"
    async with echo_app() as app, raw_connection(app.http, first) as kept:
        loop = asyncio.get_running_loop()
        assert (await loop.sock_recv(kept, 65536)).startswith(b"HTTP/1.1 200")
        # Any byte stops uvicorn's own keep-alive timer; this request never becomes whole.
        await loop.sock_sendall(kept, b"GET /openapi.json HTTP/1.1\r\nHo")
        async with asyncio.timeout(WAIT):
            while await loop.sock_recv(kept, 65536):  # the first answer's rest, then the end
                pass


@pytest.mark.parametrize(
    ("method", "url", "content", "says", "reason"),
    [
        (
            "POST",
            "/v1/echo:post",
            b'{"count": ' + b"1" * 5000 + b"}",
            "request body has a number longer than 4300 digits",
            "BAD_JSON",
        ),
        ("GET", "/v1/rooms/rooms/r/echo?kind=" + "1" * 5000, b"", "kind must be one of", ""),
        ("GET", "/v1/rooms/rooms/r/echo?kind=-" + "9" * 5000, b"", "kind must be one of", ""),
    ],
)
async def test_integers_too_long_for_python_are_400_not_500(
    echo: EchoApp, method: str, url: str, content: bytes, says: str, reason: str
) -> None:
    reply = await echo.http.request(method, url, content=content)
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["message"]
    assert error_info(reply.json())["reason"] == (reason or "BAD_PARAMETER")


async def test_an_over_long_credential_is_401_before_any_call(echo: EchoApp) -> None:
    # Past gRPC's metadata limit, which would refuse the call with RESOURCE_EXHAUSTED (429).
    header = await echo.http.get("/v1/echo/x", headers={"Authorization": "Bearer " + "a" * 20_000})
    query = await echo.http.get("/v1/echo-stream?access_token=" + "a" * 12_000)
    for reply in (header, query):
        assert reply.status_code == 401, reply.text
        assert "credential is longer than 4096 characters" in reply.json()["message"]
        assert error_info(reply.json())["reason"] == "BAD_AUTHORIZATION"
    assert echo.backend.tokens == []


async def test_a_client_that_leaves_mid_upload_is_no_incident(
    echo: EchoApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pigeon.rest")
    request = b'POST /v1/echo:post HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"name"'
    async with raw_connection(echo.http, request):
        pass
    async with asyncio.timeout(WAIT):
        while not [r for r in caplog.records if r.name == "pigeon.rest"]:
            await asyncio.sleep(0.05)
    assert [r.levelname for r in caplog.records if r.name == "pigeon.rest"] == ["DEBUG"]


async def test_a_body_that_does_not_arrive_in_time_is_408(
    echo: EchoApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pigeon.rest, "BODY_TIMEOUT", 0.5, raising=False)
    request = b"POST /v1/echo:post HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"
    async with raw_connection(echo.http, request) as slow:
        # The server answers and closes: the rest of the body cannot start another request.
        answer = await read_to_end(slow)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower()
    assert error_info(json.loads(body))["reason"] == "BODY_TIMEOUT"


async def test_head_is_get_without_the_body_and_options_lists_the_methods(echo: EchoApp) -> None:
    get = await echo.http.get("/v1/echo/x?name=n")
    head = await echo.http.head("/v1/echo/x?name=n")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "application/json"
    assert head.headers["content-length"] == str(len(get.content))
    # A stream: the call is made (so a bad credential still gets its 401), then ended.
    stream = await echo.http.head("/v1/echo-stream?count=1&flag=true")
    assert stream.status_code == 200 and stream.content == b""
    assert stream.headers["content-type"].startswith("text/event-stream")
    async with asyncio.timeout(WAIT):
        await echo.backend.stream_ended.wait()
    options = await echo.http.options("/v1/echo/x")
    assert options.status_code == 204 and options.headers["allow"] == "GET, HEAD, OPTIONS"
    wrong = await echo.http.head("/v1/echo:post")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "OPTIONS, POST"


def test_path_templates_follow_the_http_rule_grammar() -> None:
    template = PathTemplate.parse("/v1/{name=projects/*/rooms/**}:watch")
    assert template.verb == "watch"
    assert template.match("/v1/projects/p/rooms/a/b:watch") == {("name",): "projects/p/rooms/a/b"}
    assert template.match("/v1/projects/p:watch") is None
    assert template.openapi_path() == "/v1/{name}:watch"
    assert PathTemplate.parse("/v1/messages:read").match("/v1/messages:read") == {}
    assert PathTemplate.parse("/v1/messages/{message_id}").match("/v1/messages:read") is None
    for bad in ["v1/x", "/v1/{x", "/v1/x}", "/v1//x", "/v1/{a b}", "/v1/x:"]:
        with pytest.raises(ValueError):
            PathTemplate.parse(bad)


def test_every_gate_and_node_rpc_has_a_binding() -> None:
    routes = {
        (b.http_method, b.template.text): b.method.name
        for s in (GATE, NODE)
        for b in http_bindings(s)
    }
    assert set(routes.values()) == {m.name for s in (GATE, NODE) for m in s.methods}
    assert routes[("POST", "/v1/messages:read")] == "MarkRead"
    assert routes[("DELETE", "/v1/messages/{message_id}")] == "DeleteMessage"


def test_the_echo_document_flattens_nested_query_fields() -> None:
    document = openapi_document([ECHO_SERVICE], title="echo", version="0")
    get = document["paths"]["/v1/rooms/{name}/echo"]["get"]
    names = [p["name"] for p in get["parameters"]]
    assert names[0] == "name" and get["parameters"][0]["schema"]["pattern"] == "^rooms/[^/]+$"
    assert {"ids", "inner.id", "inner.n", "pageSize", "at"} <= set(names)
    assert "labels" not in names
    assert "/v1/echo/{inner.id}" in document["paths"]
    schemathesis.openapi.from_dict(document).validate()


# --- a real cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        tmp_path_factory.mktemp("rest"), gate_port=0, gate_http_port=0, env=ENV, nodes=2
    )
    local.start()
    try:
        yield local
    finally:
        local.stop()


@dataclass
class User:
    """A user connected through the Gate's REST API."""

    id: str
    connect: dict[str, Any]
    node: httpx.AsyncClient

    @property
    def token(self) -> str:
        return str(self.connect["sessionToken"])


@dataclass
class Rest:
    cluster: LocalCluster
    gate: httpx.AsyncClient
    clients: list[httpx.AsyncClient]

    @property
    def api_key(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cluster.secrets.api_key}"}

    def jwt(self, user: str, **options: Any) -> str:
        return mint_user_token(self.cluster.secrets.jwt_secret, user, **options)

    async def user(self, user_id: str) -> User:
        reply = await self.gate.post("/v1/connect", json={"token": self.jwt(user_id)})
        assert reply.status_code == 200, reply.text
        connect = reply.json()
        node = httpx.AsyncClient(
            base_url=f"http://{connect['nodeHttpAddress']}",
            headers={"Authorization": f"Bearer {connect['sessionToken']}"},
            timeout=WAIT,
        )
        self.clients.append(node)
        return User(user_id, connect, node)

    async def publish(self, to: list[str], body: str, **fields: Any) -> list[str]:
        reply = await self.gate.post(
            "/v1/publish", json={"to": to, "body": body, **fields}, headers=self.api_key
        )
        assert reply.status_code == 200, reply.text
        return list(reply.json()["messageIds"])

    def node_of(self, user: User) -> ServiceProcess:
        return next(n for n in self.cluster.nodes if n.name == user.connect["nodeId"])


@pytest.fixture
async def rest(cluster: LocalCluster) -> AsyncIterator[Rest]:
    async with httpx.AsyncClient(
        base_url=f"http://{cluster.gate.http_address}", timeout=WAIT
    ) as gate:
        api = Rest(cluster, gate, [])
        try:
            yield api
        finally:
            for client in api.clients:
                await client.aclose()


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: Any


async def sse_events(reply: httpx.Response) -> AsyncIterator[SseEvent]:
    """Parse a text/event-stream body, as EventSource does."""
    fields: dict[str, str] = {}
    data: list[str] = []
    async for line in reply.aiter_lines():
        if not line:
            if data:
                yield SseEvent(
                    fields.get("id"), fields.get("event", "message"), json.loads("\n".join(data))
                )
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value


async def metric(node: ServiceProcess, name: str) -> float:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        reply = await http.get(node.metrics_url)
    # A page that is not the metrics would read as zero for every name.
    reply.raise_for_status()
    text = reply.text
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


async def until(condition: Any, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.05)


async def test_connect_returns_the_node_and_a_session_token(rest: Rest) -> None:
    user = await rest.user("ann")
    body = user.connect
    assert body["userId"] == "ann"
    assert body["nodeHttpAddress"] in {n.http_address for n in rest.cluster.nodes}
    assert body["heartbeatInterval"].endswith("s")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", body["sessionExpiresAt"])
    assert [f["httpAddress"] for f in body["fallbacks"]]


async def test_connect_with_an_expired_token_is_401_with_the_reason(rest: Rest) -> None:
    reply = await rest.gate.post("/v1/connect", json={"token": rest.jwt("ann", ttl=-60)})
    assert reply.status_code == 401
    body = reply.json()
    assert body["code"] == 16 and "expired" in body["message"]
    assert error_info(body) == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "TOKEN_EXPIRED",
        "domain": "pigeon.v1",
    }


async def test_gate_publish_and_list_nodes_take_an_api_key(rest: Rest) -> None:
    assert (await rest.gate.get("/v1/nodes")).status_code == 401
    user_jwt = {"Authorization": f"Bearer {rest.jwt('ann')}"}
    # A user's JWT is recognised, and refused, as not being an API key.
    assert (await rest.gate.post("/v1/publish", json={}, headers=user_jwt)).status_code == 403
    listed = await rest.gate.get("/v1/nodes", headers=rest.api_key)
    assert listed.status_code == 200
    assert [n["nodeId"] for n in listed.json()["nodes"]] == ["node-1", "node-2"]
    assert [d["dispatcherId"] for d in listed.json()["dispatchers"]] == ["dispatcher-1"]
    assert len(await rest.publish(["ann"], "hello ann")) == 1


async def test_a_publish_answers_when_the_message_was_stored(rest: Rest) -> None:
    reply = await rest.gate.post(
        "/v1/publish", json={"to": ["dee"], "body": "stamped"}, headers=rest.api_key
    )
    assert reply.status_code == 200, reply.text
    answered = reply.json()
    dee = await rest.user("dee")
    (stored,) = (await dee.node.get("/v1/messages")).json()["messages"]
    assert stored["id"] == answered["messageId"]
    # The same instant the inbox shows, as Send answers it.
    assert answered["createdAt"] == stored["createdAt"]


async def test_the_inbox_over_rest(rest: Rest) -> None:
    bo = await rest.user("bo")
    sent = await bo.node.post("/v1/messages", json={"to": ["cy"], "title": "t", "body": "hi cy"})
    assert sent.status_code == 200, sent.text
    assert sent.json()["createdAt"].endswith("Z")
    await rest.publish(["cy"], "from billing", source="billing", metadata={"invoice": "7"})
    cy = await rest.user("cy")

    listed = (await cy.node.get("/v1/messages")).json()
    assert [m["body"] for m in listed["messages"]] == ["from billing", "hi cy"]
    first, second = listed["messages"][1], listed["messages"][0]
    assert (first["seq"], first["sender"], first["kind"]) == ("1", "bo", "MESSAGE_KIND_USER")
    assert second["metadata"] == {"invoice": "7"} and second["sender"] == "billing"

    page = (await cy.node.get("/v1/messages?pageSize=1")).json()
    assert [m["body"] for m in page["messages"]] == ["from billing"]
    older = await cy.node.get(f"/v1/messages?pageSize=1&pageToken={page['nextPageToken']}")
    assert [m["body"] for m in older.json()["messages"]] == ["hi cy"]
    by_kind = await cy.node.get("/v1/messages?kind=MESSAGE_KIND_SYSTEM")
    assert [m["body"] for m in by_kind.json()["messages"]] == ["from billing"]
    by_sender = await cy.node.get("/v1/messages?sender=bo")
    assert [m["body"] for m in by_sender.json()["messages"]] == ["hi cy"]

    got = await cy.node.get(f"/v1/messages/{first['id']}")
    assert got.json()["message"]["body"] == "hi cy"
    assert (await cy.node.get("/v1/unread")).json() == {"unreadCount": "2"}
    read = await cy.node.post("/v1/messages:read", json={"messageIds": [first["id"]]})
    assert read.json() == {"unreadCount": "1"}
    unread = await cy.node.get("/v1/messages?readFilter=READ_FILTER_UNREAD")
    assert [m["body"] for m in unread.json()["messages"]] == ["from billing"]
    # Enums by number too.
    read_only = await cy.node.get("/v1/messages?readFilter=2")
    assert [m["body"] for m in read_only.json()["messages"]] == ["hi cy"]

    deleted = await cy.node.delete(f"/v1/messages/{second['id']}")
    assert deleted.json() == {"unreadCount": "0"}
    gone = await cy.node.get(f"/v1/messages/{second['id']}")
    assert gone.status_code == 404
    assert error_info(gone.json())["reason"] == "MESSAGE_NOT_FOUND"
    # bo cannot read cy's message: his inbox does not have it.
    assert (await bo.node.get(f"/v1/messages/{first['id']}")).status_code == 404


async def test_node_calls_without_a_session_token_are_401(rest: Rest) -> None:
    node = rest.cluster.nodes[0]
    async with httpx.AsyncClient(base_url=f"http://{node.http_address}", timeout=WAIT) as http:
        for call in (http.get("/v1/messages"), http.get("/v1/unread"), http.get("/v1/stream")):
            reply = await call
            assert reply.status_code == 401, reply.text
            assert reply.headers["content-type"] == "application/json"
            assert reply.json()["code"] == 16
        forged = await http.get("/v1/unread", headers={"Authorization": "Bearer forged"})
        assert forged.status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "content", "says"),
    [
        ("POST", "/v1/messages", b"{bad", "request body is not valid JSON"),
        ("POST", "/v1/messages", b'{"to": ["x"], "body": "\xc3"}', "not valid UTF-8"),
        ("POST", "/v1/messages", b'{"to": ["x"], "bdy": "hi"}', 'no field named "bdy"'),
        ("POST", "/v1/messages", b'{"to": ["x"]}', "body"),
        ("POST", "/v1/messages", b'{"to": "x", "body": "hi"}', "repeated field to"),
        ("GET", "/v1/messages?pageSize=ten", b"", "pageSize must be an unsigned 32-bit integer"),
        ("GET", "/v1/messages?pageSize=100000", b"", "over the limit"),
        ("GET", "/v1/messages?readFilter=SOME", b"", "READ_FILTER_UNREAD"),
        ("GET", "/v1/messages?readFilter=--1", b"", "READ_FILTER_UNREAD"),
        ("GET", "/v1/messages/%0Ax", b"", "control characters"),
        ("POST", "/v1/messages:read", b'{"upToSeq": "-1"}', "upToSeq"),
    ],
)
async def test_bad_input_is_400_saying_what_to_fix(
    rest: Rest, method: str, path: str, content: bytes, says: str
) -> None:
    user = await rest.user("dee")
    reply = await user.node.request(method, path, content=content or None)
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == 3
    assert says in reply.json()["message"]


async def test_a_body_larger_than_the_server_takes_is_413_not_429(rest: Rest) -> None:
    user = await rest.user("big")
    reply = await user.node.post("/v1/messages", json={"to": ["x"], "body": "x" * 5_000_000})
    assert reply.status_code == 413, reply.text
    assert error_info(reply.json())["reason"] == "BODY_TOO_LARGE"


async def test_unknown_routes_and_methods_over_the_cluster(rest: Rest) -> None:
    assert (await rest.gate.get("/v1/messages")).status_code == 404  # a node route, not the Gate's
    assert (await rest.gate.get("/nope")).json()["code"] == 5
    wrong = await rest.gate.get("/v1/connect")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "OPTIONS, POST"


async def test_events_resume_with_last_event_id_and_miss_nothing(rest: Rest) -> None:
    eve = await rest.user("eve")
    node = rest.node_of(eve)
    streams_before = await metric(node, "pigeon_node_streams")
    seen: list[dict[str, Any]] = []
    last_id = ""

    url = f"/v1/stream?access_token={eve.token}"
    async with httpx.AsyncClient(base_url=str(eve.node.base_url), timeout=WAIT) as anonymous:
        async with anonymous.stream("GET", url) as reply:
            assert reply.status_code == 200, await reply.aread()
            events = sse_events(reply)
            async with asyncio.timeout(WAIT):
                first = await anext(events)
                assert first.data["welcome"]["userId"] == "eve"
                assert first.id == "0.0" and first.data["unreadCount"] == "0"
                last_id = first.id
                await rest.publish(["eve"], "one")
                await rest.publish(["eve"], "two")
                await rest.publish(["eve"], "three")
                while len(seen) < 3:
                    event = await anext(events)
                    seen.extend(event.data["messages"])
                    last_id = event.id or last_id
        assert last_id == "3.0"

        # The client left: its gRPC stream on the node is cancelled, not left dangling.
        async def stream_closed() -> bool:
            return await metric(node, "pigeon_node_streams") == streams_before

        await until(stream_closed)

        # Messages published while the client is away come first on reconnect.
        await rest.publish(["eve"], "four")
        await rest.publish(["eve"], "five")
        async with anonymous.stream("GET", url, headers={"Last-Event-ID": last_id}) as reply:
            events = sse_events(reply)
            async with asyncio.timeout(WAIT):
                event = await anext(events)
                assert event.id == "3.0" and "welcome" in event.data
                while "replayDone" not in event.data:
                    event = await anext(events)
                    seen.extend(event.data["messages"])
                await rest.publish(["eve"], "six")
                while len(seen) < 6:
                    seen.extend((await anext(events)).data["messages"])

    assert [m["body"] for m in seen] == ["one", "two", "three", "four", "five", "six"]
    assert [m["seq"] for m in seen] == ["1", "2", "3", "4", "5", "6"]


async def test_a_new_event_source_resumes_with_last_event_id_in_the_query(rest: Rest) -> None:
    fay = await rest.user("fay")
    await rest.publish(["fay"], "m1")
    await rest.publish(["fay"], "m2")
    url = f"/v1/stream?access_token={fay.token}&last_event_id=1.0"
    async with (
        httpx.AsyncClient(base_url=str(fay.node.base_url), timeout=WAIT) as anonymous,
        anonymous.stream("GET", url) as reply,
    ):
        events = sse_events(reply)
        async with asyncio.timeout(WAIT):
            welcome = await anext(events)
            replay = await anext(events)
    assert welcome.id == "1.0"
    assert [m["body"] for m in replay.data["messages"]] == ["m2"] and replay.id == "2.0"


async def test_ndjson_stream_on_a_node(rest: Rest) -> None:
    gil = await rest.user("gil")
    await rest.publish(["gil"], "old")
    headers = {"Accept": "application/x-ndjson"}
    async with gil.node.stream("GET", "/v1/stream?sinceSeq=0", headers=headers) as reply:
        assert reply.headers["content-type"] == "application/x-ndjson"
        lines = reply.aiter_lines()
        async with asyncio.timeout(WAIT):
            welcome = json.loads(await anext(lines))["result"]
            replay = json.loads(await anext(lines))["result"]
            done = json.loads(await anext(lines))["result"]
    assert welcome["welcome"]["userId"] == "gil" and welcome["unreadCount"] == "1"
    assert [m["body"] for m in replay["messages"]] == ["old"]
    assert done["replayDone"] == {"replayed": "1"}


async def test_a_stream_refused_at_once_gets_its_http_status(rest: Rest) -> None:
    hal = await rest.user("hal")
    ahead = await hal.node.get("/v1/stream?sinceSeq=99")
    assert ahead.status_code == 400
    assert error_info(ahead.json())["reason"] == "BAD_CURSOR"
    garbled = await hal.node.get("/v1/stream", headers={"Last-Event-ID": "seven"})
    assert garbled.status_code == 400 and "Last-Event-ID" in garbled.json()["message"]
    # Longer than Python converts to an integer at all.
    huge = await hal.node.get("/v1/stream", headers={"Last-Event-ID": "1" * 5000 + ".0"})
    assert huge.status_code == 400 and "Last-Event-ID is out of range" in huge.json()["message"]
    async with httpx.AsyncClient(base_url=str(hal.node.base_url), timeout=WAIT) as anonymous:
        forged = await anonymous.get("/v1/stream?access_token=forged")
    assert forged.status_code == 401 and forged.json()["code"] == 16


async def test_cors_lets_the_page_on_the_gate_call_a_node(rest: Rest) -> None:
    origin = f"http://{rest.cluster.gate.http_address}"
    ivy = await rest.user("ivy")
    preflight = await ivy.node.options(
        "/v1/messages:read",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    simple = await ivy.node.get("/v1/unread", headers={"Origin": origin})
    assert simple.headers["access-control-allow-origin"] == "*"


async def test_the_gate_serves_the_inbox_page(rest: Rest) -> None:
    page = await rest.gate.get("/")
    assert page.status_code == 200 and "Pigeon inbox" in page.text
    script = await rest.gate.get("/web/app.js")
    assert script.status_code == 200 and "EventSource" in script.text
    node = rest.cluster.nodes[0]
    async with httpx.AsyncClient(timeout=WAIT) as http:
        assert (await http.get(f"http://{node.http_address}/")).status_code == 404


async def test_openapi_documents_every_route_with_the_proto_comments(rest: Rest) -> None:
    for service, address in [
        (GATE, rest.cluster.gate.http_address),
        (NODE, rest.cluster.nodes[0].http_address),
    ]:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            reply = await http.get(f"http://{address}/openapi.json")
        assert reply.status_code == 200
        document = reply.json()
        schemathesis.openapi.from_dict(document).validate()
        assert document["openapi"].startswith("3.")
        documented = {
            (verb.upper(), path)
            for path, operations in document["paths"].items()
            for verb in operations
        }
        annotated = {(b.http_method, b.template.openapi_path()) for b in http_bindings(service)}
        assert documented == annotated
        for operations in document["paths"].values():
            for operation in operations.values():
                assert operation["description"], operation["operationId"]
                assert operation["responses"]["default"]["content"]["application/json"]
    gate = (await rest.gate.get("/openapi.json")).json()
    connect = gate["paths"]["/v1/connect"]["post"]
    assert connect["summary"].startswith("Verifies the user's app-issued JWT")
    schemas = gate["components"]["schemas"]
    assert schemas["v1ConnectResponse"]["properties"]["sessionExpiresAt"]["format"] == "date-time"
    assert gate["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    # Connect takes the JWT in its body and no credential; the rest need the document's.
    assert connect["security"] == [] and "security" not in gate["paths"]["/v1/nodes"]["get"]
    assert gate["security"] == [{"bearerAuth": []}]
    async with httpx.AsyncClient(timeout=WAIT) as http:
        node = (await http.get(f"http://{rest.cluster.nodes[0].http_address}/openapi.json")).json()
    message = node["components"]["schemas"]["v1Message"]
    assert message["properties"]["seq"]["type"] == "string"  # uint64 as a string
    assert message["properties"]["metadata"]["additionalProperties"] == {"type": "string"}
    assert node["components"]["schemas"]["v1MessageKind"]["enum"][0] == "MESSAGE_KIND_UNSPECIFIED"
    assert "description" in message["properties"]["seq"]
    stream = node["paths"]["/v1/stream"]["get"]
    assert set(stream["responses"]["200"]["content"]) == {
        "text/event-stream",
        "application/x-ndjson",
    }
    assert {"bearerAuth": []} in stream["security"] and {"accessToken": []} in stream["security"]
    list_messages = node["paths"]["/v1/messages"]["get"]
    assert {p["name"] for p in list_messages["parameters"]} == {
        "pageSize",
        "pageToken",
        "readFilter",
        "sender",
        "kind",
    }


# --- limits and shutdown, on a cluster of their own ------------------------------------------


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One node that lets a user make one call per second after a burst of two."""
    local = LocalCluster(
        tmp_path_factory.mktemp("strict"),
        gate_port=0,
        gate_http_port=0,
        env=ENV,
        nodes=1,
        node_env={"PIGEON_USER_RATE": "1", "PIGEON_USER_BURST": "2"},
    )
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
async def strict_rest(strict: LocalCluster) -> AsyncIterator[Rest]:
    async with httpx.AsyncClient(
        base_url=f"http://{strict.gate.http_address}", timeout=WAIT
    ) as gate:
        api = Rest(strict, gate, [])
        try:
            yield api
        finally:
            for client in api.clients:
                await client.aclose()


async def test_a_rate_limited_user_gets_429_with_retry_after(strict_rest: Rest) -> None:
    jo = await strict_rest.user("jo")
    replies = [await jo.node.get("/v1/unread") for _ in range(4)]
    assert [r.status_code for r in replies[:2]] == [200, 200]
    limited = replies[-1]
    assert limited.status_code == 429, limited.text
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    body = limited.json()
    assert body["code"] == 8 and error_info(body)["reason"] == "RATE_LIMITED"
    retry = [d for d in body["details"] if d["@type"].endswith("google.rpc.RetryInfo")]
    assert retry and retry[0]["retryDelay"].endswith("s")


async def test_a_draining_node_tells_event_streams_to_reconnect_and_ends_them(
    strict_rest: Rest,
) -> None:
    kim = await strict_rest.user("kim")
    node = strict_rest.cluster.nodes[0]
    async with kim.node.stream("GET", "/v1/stream") as reply:
        events = sse_events(reply)
        async with asyncio.timeout(WAIT):
            assert "welcome" in (await anext(events)).data
            node.signal(signal.SIGTERM)
            rest = [event async for event in events]  # a cut body would raise here
    assert rest and "reconnect" in rest[-1].data, rest
    assert rest[-1].data["reconnect"]["reason"] == "draining"
    assert await asyncio.to_thread(node.process.wait, WAIT) == 0  # type: ignore[union-attr]


async def test_rest_and_event_streams_work_over_tls(tmp_path: Path) -> None:
    tls = make_certificates(tmp_path / "certs")
    env = {
        **ENV,
        "PIGEON_TLS_CERT": str(tls.cert),
        "PIGEON_TLS_KEY": str(tls.key),
        "PIGEON_TLS_CA": str(tls.ca),
    }
    verify = ssl.create_default_context(cafile=str(tls.ca))
    with LocalCluster(tmp_path / "c", nodes=1, gate_port=0, gate_http_port=0, env=env) as cluster:
        async with httpx.AsyncClient(verify=verify, timeout=WAIT) as http:
            token = mint_user_token(cluster.secrets.jwt_secret, "tess")
            connect = await http.post(
                f"https://{cluster.gate.http_address}/v1/connect", json={"token": token}
            )
            assert connect.status_code == 200, connect.text
            node = f"https://{connect.json()['nodeHttpAddress']}"
            session = connect.json()["sessionToken"]
            unread = await http.get(
                f"{node}/v1/unread", headers={"Authorization": f"Bearer {session}"}
            )
            assert unread.json() == {"unreadCount": "0"}
            async with http.stream("GET", f"{node}/v1/stream?access_token={session}") as reply:
                async with asyncio.timeout(WAIT):
                    first = await anext(sse_events(reply))
            assert first.data["welcome"]["userId"] == "tess"


# --- schemathesis ------------------------------------------------------------------------------


def start_schemathesis(base_url: str, credential: str, workdir: Path) -> subprocess.Popen[str]:
    st = Path(sys.executable).parent / "st"
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(st),
            "run",
            f"{base_url}/openapi.json",
            "--url",
            base_url,
            "--header",
            f"Authorization: Bearer {credential}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance,response_headers_conformance",
            # The event stream never ends by itself; its tests are above.
            "--exclude-path",
            "/v1/stream",
            "--max-examples",
            "3",
            "--seed",
            "7",
            "--generation-database",
            "none",
            "--request-timeout",
            "10",
            "--no-color",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Schemathesis keeps a .schemathesis/ cache in its working directory: not the checkout.
        cwd=workdir,
        env={"PATH": "/usr/bin", "HOME": str(workdir)},
    )


def test_schemathesis_finds_no_server_error_and_no_response_off_the_schema(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    started = time.monotonic()
    gate = f"http://{cluster.gate.http_address}"
    connect = httpx.post(
        f"{gate}/v1/connect",
        json={"token": mint_user_token(cluster.secrets.jwt_secret, "fuzzer")},
        timeout=WAIT,
    ).json()
    targets = {
        gate: cluster.secrets.api_key,
        f"http://{connect['nodeHttpAddress']}": connect["sessionToken"],
    }
    # The Gate and the node are fuzzed at the same time: the run stays well under a minute.
    runs = {
        base: start_schemathesis(base, credential, tmp_path / str(i))
        for i, (base, credential) in enumerate(targets.items())
    }
    try:
        for base, run in runs.items():
            output, _ = run.communicate(timeout=120)
            assert run.returncode == 0, f"{base}\n{output[-8000:]}"
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
    assert time.monotonic() - started < 60


async def test_metrics_show_each_store_commit_and_its_duration(rest: Rest) -> None:
    nodes = rest.cluster.nodes

    async def total(name: str) -> float:
        return sum([await metric(node, name) for node in nodes])

    stored = await total("pigeon_node_messages_stored_total")
    commits = await total("pigeon_node_commit_seconds_count")
    seconds = await total("pigeon_node_commit_seconds_sum")
    await rest.publish(["gil", "hal"], "one")
    await rest.publish(["gil"], "two")
    assert await total("pigeon_node_messages_stored_total") == stored + 2
    # Each publish waited for its own commit (nothing else was writing).
    assert await total("pigeon_node_commit_seconds_count") == commits + 2
    assert await total("pigeon_node_commit_seconds_sum") > seconds
    # The buckets a dashboard plots: every commit falls in +Inf.
    assert await total('pigeon_node_commit_seconds_bucket{le="+Inf"}') == commits + 2


async def test_a_body_without_a_credential_is_not_read_and_a_large_one_is_parsed_aside(
    rest: Rest,
) -> None:
    user = await rest.user("parsed")
    anonymous = httpx.AsyncClient(base_url=str(user.node.base_url), timeout=WAIT)
    rest.clients.append(anonymous)
    # Refused for the missing or forged credential, not for the body it never looked at; the
    # connection ends with the answer, the body unread.
    forged = {"Authorization": "Bearer forged"}
    for client, path, headers in (
        (anonymous, "/v1/messages", {}),
        (anonymous, "/v1/messages", forged),
        (rest.gate, "/v1/publish", {}),
        (rest.gate, "/v1/publish", forged),
    ):
        reply = await client.post(path, content=b"{not json" + b" " * 100_000, headers=headers)
        assert reply.status_code == 401, (path, reply.text)
        assert reply.headers["connection"] == "close"
    # Connect takes no credential, and no more than a token's worth of body.
    reply = await rest.gate.post("/v1/connect", json={"token": "x" * 100_000})
    assert reply.status_code == 413 and error_info(reply.json())["reason"] == "BODY_TOO_LARGE"
    # A large body from a caller with a credential is parsed (on a thread) and sent.
    batch = [{"to": ["parsed-friend"], "body": f"{i} " + "x" * 2000} for i in range(200)]
    reply = await user.node.post("/v1/messages", json={"batch": batch})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["messageIds"]) == 200
