"""pigeon.server's guard on a real grpc.aio server: each Pigeon method is authenticated by its
policy entry, methods without one are closed, health stays open, errors become statuses."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from pigeon import server as server_module
from pigeon.errors import InvalidArgument, Unauthenticated
from pigeon.server import GrpcServer, Principal, Service, current_principal
from pigeon.v1 import node_pb2, node_pb2_grpc

pytestmark = pytest.mark.integration


class _Node(node_pb2_grpc.NodeServicer):
    async def Send(self, request: node_pb2.SendRequest, context: Any) -> node_pb2.SendResponse:
        if request.body == "bad":
            raise InvalidArgument("body must not be bad", field="body")
        if request.body == "boom":
            raise RuntimeError("a bug")
        return node_pb2.SendResponse(message_id=current_principal().id)

    async def GetUnreadCount(
        self, request: node_pb2.GetUnreadCountRequest, context: Any
    ) -> node_pb2.GetUnreadCountResponse:
        return node_pb2.GetUnreadCountResponse(unread_count=7)


def _user(token: str | None) -> Principal:
    if token != "good":
        raise Unauthenticated("bad token", reason="TOKEN_BAD_SIGNATURE")
    return Principal("user", "alice")


async def test_policy_guards_each_method_and_health_stays_open() -> None:
    service = Service(
        "pigeon.v1.Node", lambda s: node_pb2_grpc.add_NodeServicer_to_server(_Node(), s)
    )
    # Only Send has an entry: GetUnreadCount is closed.
    policy = {"/pigeon.v1.Node/Send": _user}
    async with (
        GrpcServer([service], auth=policy) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = node_pb2_grpc.NodeStub(channel)
        reply = await stub.Send(
            node_pb2.SendRequest(body="hi"), metadata=(("authorization", "Bearer good"),), timeout=5
        )
        assert reply.message_id == "alice"

        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.Send(
                node_pb2.SendRequest(body="hi"),
                metadata=(("authorization", "Bearer x"),),
                timeout=5,
            )
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bad token" in (denied.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await stub.GetUnreadCount(
                node_pb2.GetUnreadCountRequest(),
                metadata=(("authorization", "Bearer good"),),
                timeout=5,
            )
        assert closed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "takes no callers" in (closed.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.Send(
                node_pb2.SendRequest(body="bad"),
                metadata=(("authorization", "Bearer good"),),
                timeout=5,
            )
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as internal:
            await stub.Send(
                node_pb2.SendRequest(body="boom"),
                metadata=(("authorization", "Bearer good"),),
                timeout=5,
            )
        assert internal.value.code() == grpc.StatusCode.INTERNAL
        assert "incident" in (internal.value.details() or "")

        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="pigeon.v1.Node"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_service_added_by_generic_handler_alone_is_guarded_too() -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        return current_principal().id.encode() + b":" + request

    handler = grpc.method_handlers_generic_handler(
        "pigeon.test.Raw", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    service = Service("pigeon.test.Raw", lambda s: s.add_generic_rpc_handlers((handler,)))
    async with (
        GrpcServer([service], auth={"/pigeon.test.Raw/": _user}) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        # No serializers: raw bytes both ways.
        call = channel.unary_unary("/pigeon.test.Raw/Echo", None, None)
        good = (("authorization", "Bearer good"),)
        assert await call(b"hi", metadata=good, timeout=5) == b"alice:hi"
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call(b"hi", timeout=5)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_server_whose_stop_never_finishes_is_left_after_the_margin(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # grpc's stop waits without a bound for the core's shutdown; stand in for one that never comes.
    monkeypatch.setattr(server_module, "STOP_MARGIN", 0.3)
    service = Service(
        "pigeon.v1.Node", lambda s: node_pb2_grpc.add_NodeServicer_to_server(_Node(), s)
    )
    async with GrpcServer([service], auth={"/pigeon.v1.Node/": _user}, grace=0.1) as server:
        real_stop = server._server.stop  # type: ignore[union-attr]

        async def never(grace: float | None) -> None:
            await real_stop(grace)
            await asyncio.Event().wait()

        monkeypatch.setattr(server._server, "stop", never)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert "did not finish stopping" in caplog.text


class _Streaming(node_pb2_grpc.NodeServicer):
    async def Subscribe(self, request: Any, context: Any) -> Any:
        yield node_pb2.SubscribeResponse()
        await asyncio.sleep(60)  # a stream ends when its client leaves

    async def Send(self, request: node_pb2.SendRequest, context: Any) -> node_pb2.SendResponse:
        await asyncio.sleep(60)  # longer than the caller waits
        return node_pb2.SendResponse()


async def test_calls_the_caller_leaves_or_lets_expire_are_counted() -> None:
    def count(method: str, code: str) -> float:
        labels = {"method": f"/pigeon.v1.Node/{method}", "code": code}
        return REGISTRY.get_sample_value("pigeon_grpc_requests_total", labels) or 0.0

    service = Service(
        "pigeon.v1.Node", lambda s: node_pb2_grpc.add_NodeServicer_to_server(_Streaming(), s)
    )
    policy = {"/pigeon.v1.Node/": _user}
    left, expired = count("Subscribe", "CANCELLED"), count("Send", "DEADLINE_EXCEEDED")
    good = (("authorization", "Bearer good"),)
    async with (
        GrpcServer([service], auth=policy) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = node_pb2_grpc.NodeStub(channel)
        stream = stub.Subscribe(node_pb2.SubscribeRequest(), metadata=good)
        await stream.read()
        stream.cancel()
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Send(node_pb2.SendRequest(body="hi"), metadata=good, timeout=0.3)
        async with asyncio.timeout(10):
            while (
                count("Subscribe", "CANCELLED") == left
                or count("Send", "DEADLINE_EXCEEDED") == expired
            ):
                await asyncio.sleep(0.05)


async def test_a_listener_takes_at_most_max_connections_and_counts_them() -> None:
    service = Service(
        "pigeon.v1.Node", lambda s: node_pb2_grpc.add_NodeServicer_to_server(_Node(), s)
    )
    request = node_pb2.SendRequest(body="hi")
    good = (("authorization", "Bearer good"),)
    async with GrpcServer([service], auth={"/pigeon.v1.Node/": _user}, max_connections=2) as server:
        address = f"127.0.0.1:{server.port}"
        # Separate connections: channels with the same target would share one.
        options = [("grpc.use_local_subchannel_pool", 1)]
        first = grpc.aio.insecure_channel(address, options=options)
        second = grpc.aio.insecure_channel(address, options=options)
        third = grpc.aio.insecure_channel(address, options=options)
        try:
            for channel in (first, second):
                await node_pb2_grpc.NodeStub(channel).Send(request, metadata=good, timeout=5)
            assert server_module.count_connections(server.port) == 2
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await node_pb2_grpc.NodeStub(third).Send(request, metadata=good, timeout=1)
            assert refused.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            await first.close()
            await node_pb2_grpc.NodeStub(third).Send(
                request, metadata=good, timeout=5, wait_for_ready=True
            )
        finally:
            for channel in (first, second, third):
                await channel.close()
