"""Property-based tests over every RPC's request messages: whatever a caller sends, the answer
is a result or a precise status with a message, never INTERNAL, never a crash or a hang."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gate.servicer import GateServicer
from node.validate import encode_page_token
from pigeon.auth import ClusterSecret, SessionTokens, UserTokenVerifier, mint_user_token
from pigeon.server import PUBLIC, GrpcServer, Principal, Service
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, types_pb2
from tests.conftest_store import make_store
from tests.node_harness import API_KEY, CLUSTER_SECRET, RunningNode, running_node

pytestmark = pytest.mark.integration

JWT_SECRET = "property-test-jwt-secret-0123456789"
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FD = pb_descriptor.FieldDescriptor
# Text that stresses validation: empty, long, control and non-BMP characters, lone surrogates are
# not valid in protobuf strings, so the alphabet avoids them.
TEXT = st.one_of(
    st.sampled_from(["", "bob", "alice", "x" * 200, "\x00", "../etc", "carol"]),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
)


# Page tokens that decode, with numbers from tiny to far beyond 64 bits.
PAGE_TOKENS = st.builds(
    encode_page_token,
    st.one_of(st.integers(0, 10), st.integers(0, 2**70)),
    st.one_of(st.integers(0, 10), st.integers(0, 2**70)),
)


def strategy_for(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """A strategy for any message of this type (every field, bounded sizes)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            fields[field.name] = st.dictionaries(TEXT, TEXT, max_size=4)
            continue
        one = st.one_of(TEXT, PAGE_TOKENS) if field.name == "page_token" else _scalar(field, depth)
        if one is None:
            continue
        is_repeated = getattr(field, "is_repeated", None)
        repeated = is_repeated if is_repeated is not None else field.label == FD.LABEL_REPEATED
        fields[field.name] = st.lists(one, max_size=4) if repeated else one
    return st.fixed_dictionaries({}, optional=fields)


def _scalar(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    if field.type == FD.TYPE_STRING:
        return TEXT
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type in (FD.TYPE_UINT32, FD.TYPE_UINT64):
        limit = 2**32 - 1 if field.type == FD.TYPE_UINT32 else 2**64 - 1
        edges = [e for e in (2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1) if e <= limit]
        return st.one_of(st.integers(0, 20), st.sampled_from(edges), st.integers(0, limit))
    if field.type in (FD.TYPE_INT32, FD.TYPE_INT64):
        return st.integers(-(2**31), 2**31 - 1)
    if field.type == FD.TYPE_DOUBLE:
        return st.floats(allow_nan=False)
    if field.type == FD.TYPE_ENUM:
        return st.integers(-1, len(field.enum_type.values) + 1)
    if field.type == FD.TYPE_MESSAGE and depth < 2:
        return strategy_for(field.message_type, depth + 1)
    return None


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    """A message of type cls from a dict drawn by strategy_for."""
    message = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if isinstance(value, dict) and field.message_type.GetOptions().map_entry:
            target.update(value)
        elif isinstance(value, dict):
            target.CopyFrom(build(type(target), value))
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    entry = target.add()
                    entry.CopyFrom(build(type(entry), item))
                else:
                    target.append(item)
        else:
            setattr(message, name, value)
    return message


class Caller:
    """Calls any RPC of a service by name with a given request, over real gRPC."""

    def __init__(self, channel: grpc.aio.Channel, service: pb_descriptor.ServiceDescriptor) -> None:
        self._channel = channel
        self._service = service

    async def call(self, method: str, request: Message, metadata: list[tuple[str, str]]) -> None:
        descriptor = self._service.methods_by_name[method]
        path = f"/{self._service.full_name}/{method}"
        response_type = _message_class(descriptor.output_type)
        if descriptor.server_streaming:
            stream = self._channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )(request, metadata=metadata, timeout=5)
            # The first events (welcome, replay) are enough; then leave.
            async with asyncio.timeout(5):
                async for _ in stream:
                    break
            stream.cancel()
            return
        await self._channel.unary_unary(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )(request, metadata=metadata, timeout=5)


def _message_class(descriptor: pb_descriptor.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


async def expect_precise_answer(call: Any) -> None:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details())
        assert exc.details(), exc.code()


NODE_METHODS = [m.name for m in node_pb2.DESCRIPTOR.services_by_name["Node"].methods]
GATE_METHODS = [m.name for m in gate_pb2.DESCRIPTOR.services_by_name["Gate"].methods]
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def loop() -> Any:
    runner = asyncio.Runner()
    with runner:
        yield runner


@pytest.fixture(scope="module", params=["sqlite", "mongodb"])
def node(
    loop: asyncio.Runner, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    uri = request.getfixturevalue("mongo_uri") if request.param == "mongodb" else None
    store = make_store(request.param, tmp_path_factory.mktemp("props"), uri)
    loop.run(store.open())
    context = running_node(store, heartbeat_interval=1.0)
    running: RunningNode = loop.run(context.__aenter__())
    try:
        yield running
    finally:
        loop.run(context.__aexit__(None, None, None))
        loop.run(store.close())


@contextlib.asynccontextmanager
async def gate_server(node_address: str) -> AsyncIterator[str]:
    node_info = types_pb2.NodeInfo(
        node_id="node-test", address=node_address, state=types_pb2.NODE_STATE_SERVING
    )
    channels: dict[str, grpc.aio.Channel] = {}

    def channel(address: str) -> grpc.aio.Channel:
        return channels.setdefault(address, grpc.aio.insecure_channel(address))

    servicer = GateServicer(
        nodes=lambda: [node_info],
        dispatchers=lambda: [],
        user_tokens=UserTokenVerifier(secret=JWT_SECRET),
        sessions=SessionTokens(CLUSTER_SECRET),
        node_channel=channel,
        heartbeat_interval=5,
        epsilon=0.25,
        fallbacks=2,
        session_ttl=60,
        cluster_secret=ClusterSecret(CLUSTER_SECRET),
    )
    full = gate_pb2.DESCRIPTOR.services_by_name["Gate"].full_name
    from pigeon.auth import ApiKeys

    keys = ApiKeys([API_KEY])

    def system(token: str | None) -> Principal:
        return Principal("system", keys.check(token))

    service = Service(full, lambda s: gate_pb2_grpc.add_GateServicer_to_server(servicer, s))
    async with GrpcServer(
        [service], auth={f"/{full}/Connect": PUBLIC, f"/{full}/": system}, grace=1
    ) as server:
        try:
            yield f"127.0.0.1:{server.port}"
        finally:
            for open_channel in channels.values():
                await open_channel.close(None)


@pytest.mark.parametrize("method", NODE_METHODS)
def test_node_answers_any_request_precisely(node: RunningNode, loop: Any, method: str) -> None:
    service = node_pb2.DESCRIPTOR.services_by_name["Node"]
    request_class = _message_class(service.methods_by_name[method].input_type)
    metadata = node.as_system() if method == "Publish" else node.as_user("alice")

    @SETTINGS
    @given(values=strategy_for(request_class.DESCRIPTOR))
    def check(values: dict[str, Any]) -> None:
        request = build(request_class, values)

        async def run() -> None:
            async with grpc.aio.insecure_channel(node.address) as channel:
                caller = Caller(channel, service)
                await expect_precise_answer(caller.call(method, request, metadata))

        loop.run(run())

    check()
    # Still serving afterwards.
    loop.run(expect_precise_answer(_ping(node)))


async def _ping(node: RunningNode) -> None:
    async with grpc.aio.insecure_channel(node.address) as channel:
        caller = Caller(channel, node_pb2.DESCRIPTOR.services_by_name["Node"])
        await caller.call("GetUnreadCount", node_pb2.GetUnreadCountRequest(), node.as_user("a"))


@pytest.mark.parametrize("method", GATE_METHODS)
def test_gate_answers_any_request_precisely(node: RunningNode, loop: Any, method: str) -> None:
    service = gate_pb2.DESCRIPTOR.services_by_name["Gate"]
    request_class = _message_class(service.methods_by_name[method].input_type)
    good_token = mint_user_token(JWT_SECRET, "alice")
    metadata = [("authorization", f"Bearer {API_KEY}")]

    @SETTINGS
    @given(values=strategy_for(request_class.DESCRIPTOR), real_token=st.booleans())
    def check(values: dict[str, Any], real_token: bool) -> None:
        request = build(request_class, values)
        if method == "Connect" and real_token:
            request.token = good_token  # type: ignore[attr-defined]

        async def run() -> None:
            async with (
                gate_server(node.address) as address,
                grpc.aio.insecure_channel(address) as channel,
            ):
                caller = Caller(channel, service)
                await expect_precise_answer(caller.call(method, request, metadata))

        loop.run(run())

    check()
