"""The Python SDK: what an application sees, first against scripted fake servers (duplicates, gaps,
silence, fallbacks, expiring sessions), then against a real cluster through node crashes, drains
and a Gate restart."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_health.v1 import health_pb2, health_pb2_grpc

import pigeon.client
import pigeon.errors
from pigeon.auth import mint_user_token
from pigeon.client import (
    ClientClosed,
    ClientError,
    Connected,
    Cursor,
    Disconnected,
    Event,
    InvalidArgument,
    Message,
    MessageKind,
    NotFound,
    Publication,
    ResourceExhausted,
    SystemClient,
    Unauthenticated,
    Unavailable,
    UserClient,
)
from pigeon.client._channel import Channels
from pigeon.client.backoff import Backoff
from pigeon.errors import PigeonError, abort
from pigeon.errors import ResourceExhausted as ServerResourceExhausted
from pigeon.errors import Unauthenticated as ServerUnauthenticated
from pigeon.etcd_server import free_port
from pigeon.local import LocalCluster, ServiceProcess
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent

# Fakes: a Gate and a Node whose Subscribe streams follow a script, one per subscribe call.

Script = Callable[[node_pb2.SubscribeRequest], AsyncIterator[node_pb2.SubscribeResponse]]


def welcome(seq: int = 0, broadcast_seq: int = 0, heartbeat: float = 15.0, unread: int = 0) -> Any:
    event = node_pb2.SubscribeResponse(
        welcome=node_pb2.Welcome(user_id="bob", node_id="fake-node"),
        unread_count=unread,
        cursor=types_pb2.Cursor(seq=seq, broadcast_seq=broadcast_seq),
    )
    event.welcome.heartbeat_interval.FromNanoseconds(int(heartbeat * 1e9))
    return event


def messages(*seqs: int, broadcast: bool = False) -> Any:
    kind = types_pb2.MESSAGE_KIND_BROADCAST if broadcast else types_pb2.MESSAGE_KIND_USER
    return node_pb2.SubscribeResponse(
        messages=[
            types_pb2.Message(id=f"m{s}", seq=s, kind=kind, sender="alice", body=f"body {s}")
            for s in seqs
        ]
    )


def replay_done(replayed: int = 0) -> Any:
    return node_pb2.SubscribeResponse(replay_done=node_pb2.ReplayDone(replayed=replayed))


def since(request: node_pb2.SubscribeRequest) -> int | None:
    return request.since_seq if request.HasField("since_seq") else None


async def hold() -> None:
    """Keep a stream open until the client leaves (the server cancels the handler then)."""
    await asyncio.sleep(3600)


class FakeNode(node_pb2_grpc.NodeServicer):
    def __init__(self, *scripts: Script) -> None:
        self.scripts = scripts
        self.subscribes: list[node_pb2.SubscribeRequest] = []
        self.unread_replies: list[int | PigeonError] = []

    async def Subscribe(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.subscribes.append(request)
        script = self.scripts[min(len(self.subscribes), len(self.scripts)) - 1]
        async for event in script(request):
            yield event

    async def GetUnreadCount(self, request: Any, context: Any) -> Any:
        reply = self.unread_replies.pop(0) if self.unread_replies else 0
        if isinstance(reply, PigeonError):
            await abort(context, reply)
        return node_pb2.GetUnreadCountResponse(unread_count=reply)


class FakeGate(gate_pb2_grpc.GateServicer):
    def __init__(self, node_address: str, **reply: Any) -> None:
        self.node_address = node_address
        self.address = ""  # where this fake serves, once it does
        self.reply = reply
        self.connects = 0
        self.refuse: PigeonError | None = None
        self.publishes: list[gate_pb2.PublishRequest] = []
        self.publish_errors: list[PigeonError] = []

    async def Connect(self, request: Any, context: Any) -> Any:
        self.connects += 1
        if self.refuse is not None:
            await abort(context, self.refuse)
        reply = gate_pb2.ConnectResponse(
            node_id="fake-node",
            node_address=self.node_address,
            session_token=f"session-{self.connects}",
            user_id="bob",
            backoff=gate_pb2.Backoff(multiplier=2.0),
        )
        reply.backoff.initial.FromMilliseconds(20)
        reply.backoff.max.FromMilliseconds(100)
        for key, value in self.reply.items():
            if key == "fallbacks":
                reply.fallbacks.extend(value)
            elif key == "expires_in":
                reply.session_expires_at.FromNanoseconds(int((time.time() + value) * 1e9))
            else:
                setattr(reply, key, value)
        return reply

    async def Publish(self, request: Any, context: Any) -> Any:
        self.publishes.append(request)
        if self.publish_errors:
            await abort(context, self.publish_errors.pop(0))
        return gate_pb2.PublishResponse(message_id="p1", message_ids=["p1"])


@contextlib.asynccontextmanager
async def serve(*servicers: Any) -> AsyncIterator[str]:
    server = grpc.aio.server()
    for servicer in servicers:
        if isinstance(servicer, FakeNode):
            node_pb2_grpc.add_NodeServicer_to_server(servicer, server)
        else:
            gate_pb2_grpc.add_GateServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def fake_cluster(*scripts: Script, **reply: Any) -> AsyncIterator[tuple[FakeGate, FakeNode]]:
    # The fakes implement only the RPCs the client calls (the stubs mark the rest abstract).
    node = FakeNode(*scripts)  # type: ignore[abstract]
    async with serve(node) as node_address:
        gate = FakeGate(node_address, **reply)  # type: ignore[abstract]
        async with serve(gate) as gate_address:
            gate.address = gate_address
            yield gate, node


async def collect(
    client: UserClient, until: Callable[[list[Event]], bool], timeout: float = 5.0
) -> list[Event]:
    seen: list[Event] = []
    async with asyncio.timeout(timeout):
        async for event in client.events():
            seen.append(event)
            if until(seen):
                return seen
    raise AssertionError(f"events ended early: {seen}")


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events if isinstance(e, Message)]


def count_messages(n: int) -> Callable[[list[Event]], bool]:
    return lambda seen: len(seqs(seen)) >= n


@pytest.mark.unit
async def test_duplicates_are_dropped_and_order_is_kept() -> None:
    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        yield messages(1, 2)
        yield replay_done(2)
        yield messages(2, 3)
        yield messages(1)
        yield messages(4)
        await hold()

    async with (
        fake_cluster(script) as (gate, _),
        UserClient(gate.address, "jwt", cursor=Cursor(0, 0)) as client,
    ):
        seen = await collect(client, count_messages(4))
        assert seqs(seen) == [1, 2, 3, 4]
        assert client.cursor == Cursor(4, 0)


@pytest.mark.unit
async def test_a_live_gap_is_filled_by_resubscribing_from_the_cursor() -> None:
    async def first(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        yield replay_done()
        yield messages(1)
        yield messages(3)  # 2 went missing
        await hold()

    async def second(request: Any) -> AsyncIterator[Any]:
        assert since(request) == 1
        yield welcome(seq=1)
        yield messages(2, 3)
        yield replay_done(2)
        await hold()

    async with (
        fake_cluster(first, second) as (gate, node),
        UserClient(gate.address, "jwt") as client,
    ):
        seen = await collect(client, count_messages(3))
    assert seqs(seen) == [1, 2, 3]
    assert [e.reason for e in seen if isinstance(e, Disconnected)] == ["gap"]
    assert [since(r) for r in node.subscribes] == [None, 1]


@pytest.mark.unit
async def test_replayed_messages_may_skip_deleted_seqs_without_a_resubscribe() -> None:
    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome(seq=0)
        yield messages(1, 3)  # 2 was deleted
        yield replay_done(2)
        yield messages(4)
        await hold()

    async with (
        fake_cluster(script) as (gate, node),
        UserClient(gate.address, "jwt", cursor=Cursor(0, None)) as client,
    ):
        seen = await collect(client, count_messages(3))
    assert seqs(seen) == [1, 3, 4]
    assert len(node.subscribes) == 1


@pytest.mark.unit
async def test_broadcasts_count_in_their_own_stream() -> None:
    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome(seq=5, broadcast_seq=9)
        yield replay_done()
        yield messages(10, broadcast=True)
        yield messages(6)
        yield messages(10, broadcast=True)
        await hold()

    async with fake_cluster(script) as (gate, _), UserClient(gate.address, "jwt") as client:
        seen = await collect(client, count_messages(2))
        await asyncio.sleep(0.05)
        assert [(m.stream, m.seq) for m in seen if isinstance(m, Message)] == [
            ("broadcast", 10),
            ("inbox", 6),
        ]
        assert client.cursor == Cursor(6, 10)


@pytest.mark.unit
async def test_silence_for_two_and_a_half_heartbeats_reconnects() -> None:
    async def silent(request: Any) -> AsyncIterator[Any]:
        yield welcome(heartbeat=0.1)
        yield replay_done()
        await hold()

    async with fake_cluster(silent) as (gate, node), UserClient(gate.address, "jwt") as client:
        started = time.monotonic()
        seen = await collect(
            client, lambda s: any(isinstance(e, Disconnected) for e in s), timeout=3
        )
        waited = time.monotonic() - started
        assert [e.reason for e in seen if isinstance(e, Disconnected)] == ["heartbeat_timeout"]
        assert 0.2 <= waited < 1.5
        await collect(client, lambda s: any(isinstance(e, Connected) for e in s))
        assert len(node.subscribes) == 2


@pytest.mark.unit
async def test_an_unreachable_node_is_skipped_for_the_fallback() -> None:
    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        await hold()

    node = FakeNode(script)  # type: ignore[abstract]
    async with serve(node) as node_address:
        dead = f"127.0.0.1:{free_port()}"
        fallback = gate_pb2.NodeAddress(node_id="fake-node", address=node_address)
        gate = FakeGate(dead, fallbacks=[fallback])  # type: ignore[abstract]
        async with serve(gate) as gate_address, UserClient(gate_address, "jwt") as client:
            seen = await collect(client, lambda s: any(isinstance(e, Connected) for e in s))
            connected = [e for e in seen if isinstance(e, Connected)]
            assert connected[0].node_address == node_address
            assert client.node_id == "fake-node"


@contextlib.asynccontextmanager
async def hanging_node_and_fallback() -> AsyncIterator[tuple[str, str, FakeNode, FakeNode]]:
    """A Gate that names a node that accepts streams and never welcomes, and a working fallback:
    (the Gate's address, the fallback's address, the fallback, the hanging node)."""

    async def hung(request: Any) -> AsyncIterator[Any]:
        await hold()  # accepts the stream, never welcomes
        yield welcome()

    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        yield replay_done()
        await hold()

    node, hanging = FakeNode(script), FakeNode(hung)  # type: ignore[abstract]
    async with serve(node) as node_address, serve(hanging) as hanging_address:
        fallback = gate_pb2.NodeAddress(node_id="fake-node", address=node_address)
        gate = FakeGate(hanging_address, fallbacks=[fallback])  # type: ignore[abstract]
        async with serve(gate) as gate_address:
            yield gate_address, node_address, node, hanging


@pytest.mark.unit
async def test_a_node_that_hangs_leaves_time_for_the_fallback_on_the_first_connect() -> None:
    async with (
        hanging_node_and_fallback() as (gate_address, _, node, hanging),
        UserClient(gate_address, "jwt", connect_timeout=4) as client,
    ):
        assert client.node_id == "fake-node"
        assert len(hanging.subscribes) == 1 and len(node.subscribes) == 1


@pytest.mark.unit
async def test_the_session_is_renewed_before_it_expires() -> None:
    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        yield replay_done()
        await hold()

    async with (
        fake_cluster(script, expires_in=1.0) as (gate, _node),
        UserClient(gate.address, "jwt") as client,
    ):
        seen = await collect(
            client, lambda s: sum(isinstance(e, Connected) for e in s) == 2, timeout=3
        )
        assert [e.reason for e in seen if isinstance(e, Disconnected)] == ["session_refresh"]
        assert gate.connects >= 2


@pytest.mark.unit
async def test_a_call_with_an_expired_session_reconnects_and_is_retried_once() -> None:
    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        await hold()

    async with fake_cluster(script) as (gate, node):
        node.unread_replies = [ServerUnauthenticated("session token expired"), 7]
        async with UserClient(gate.address, "jwt") as client:
            assert await client.unread_count() == 7
            assert gate.connects == 2
            node.unread_replies = [ServerUnauthenticated("no"), ServerUnauthenticated("still no")]
            with pytest.raises(Unauthenticated):
                await client.unread_count()


@pytest.mark.unit
async def test_a_client_that_does_not_receive_holds_only_a_renewed_session() -> None:
    async with fake_cluster(expires_in=0.5) as (gate, node):
        node.unread_replies = [3, ServerUnauthenticated("session token expired"), 4]
        async with UserClient(gate.address, "jwt", receive=False) as client:
            assert await client.unread_count() == 3
            assert await client.unread_count() == 4
            async with asyncio.timeout(3):
                while gate.connects < 3:  # renewed before expiry, without a call failing
                    await asyncio.sleep(0.02)
            assert node.subscribes == []
            with pytest.raises(RuntimeError):
                async for _ in client.events():
                    pass


@pytest.mark.unit
async def test_a_refused_token_fails_at_once_with_the_servers_reason() -> None:
    async with fake_cluster() as (gate, _):
        gate.refuse = ServerUnauthenticated("user token expired", reason="TOKEN_EXPIRED")
        started = time.monotonic()
        with pytest.raises(Unauthenticated) as raised:
            async with UserClient(gate.address, "jwt"):
                pass
        assert raised.value.reason == "TOKEN_EXPIRED"
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert str(raised.value) == "user token expired"
        assert time.monotonic() - started < 2


@pytest.mark.unit
async def test_a_token_function_that_fails_for_a_moment_is_tried_again() -> None:
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionError("the site's backend is unreachable")
        return "jwt"

    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        yield replay_done()
        await hold()

    async with fake_cluster(script) as (gate, _), UserClient(gate.address, token) as client:
        seen = await collect(client, lambda s: any(isinstance(e, Connected) for e in s))
    assert calls == 3 and gate.connects == 1
    assert [type(e) for e in seen] == [Connected]


@pytest.mark.unit
async def test_no_gate_fails_after_the_connect_timeout() -> None:
    with pytest.raises(Unavailable, match="could not connect"):
        async with UserClient(f"127.0.0.1:{free_port()}", "jwt", connect_timeout=0.5):
            pass


@pytest.mark.unit
async def test_a_drain_hint_reconnects_after_the_hinted_delay() -> None:
    async def draining(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        yield replay_done()
        hint = node_pb2.SubscribeResponse(reconnect=node_pb2.Reconnect(reason="draining"))
        hint.reconnect.retry_after.FromMilliseconds(100)
        yield hint

    async def calm(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        await hold()

    async with (
        fake_cluster(draining, calm) as (gate, _),
        UserClient(gate.address, "jwt") as client,
    ):
        seen = await collect(client, lambda s: sum(isinstance(e, Connected) for e in s) == 2)
    [hint] = [e for e in seen if isinstance(e, Disconnected)]
    assert hint.reason == "draining" and 0.1 <= hint.retry_in <= 0.2
    assert [e.reconnected for e in seen if isinstance(e, Connected)] == [False, True]


@pytest.mark.unit
async def test_a_node_that_welcomes_then_fails_every_time_is_retried_with_growing_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def failing(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        raise RuntimeError("the store failed during the replay")

    # Each pause at its bound: the Gate's backoff here is 20 ms, doubling, at most 100 ms.
    monkeypatch.setattr("pigeon.client.backoff.random.uniform", lambda low, high: high)
    async with fake_cluster(failing) as (gate, _), UserClient(gate.address, "jwt") as client:
        seen = await collect(client, lambda s: sum(isinstance(e, Disconnected) for e in s) == 4)
    pauses = [e.retry_in for e in seen if isinstance(e, Disconnected)]
    assert pauses == pytest.approx([0.04, 0.08, 0.1, 0.1])


@pytest.mark.unit
async def test_callbacks_get_every_event_in_order() -> None:
    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome(unread=2)
        yield replay_done()
        yield messages(1, 2)
        await hold()

    got: list[object] = []
    done = asyncio.Event()

    async def on_message(message: Message) -> None:
        got.append(message.seq)
        if message.seq == 2:
            done.set()

    async with (
        fake_cluster(script) as (gate, _),
        UserClient(gate.address, "jwt", on_message=on_message, on_unread=got.append) as client,
    ):
        async with asyncio.timeout(5):
            await done.wait()
        with pytest.raises(RuntimeError):
            async for _ in client.events():
                pass
    assert got == [2, 1, 2]


@pytest.mark.unit
async def test_a_client_closed_from_its_callback_closes_its_channels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def script(request: Any) -> AsyncIterator[Any]:
        yield welcome()
        yield replay_done()
        yield messages(1, 2)
        await hold()

    closed: list[Channels] = []
    close = Channels.close

    async def recorded(channels: Channels) -> None:
        closed.append(channels)
        await close(channels)

    monkeypatch.setattr(Channels, "close", recorded)
    clients: list[UserClient] = []
    got: list[int] = []
    finished: list[int] = []

    async def on_message(message: Message) -> None:
        got.append(message.seq)
        await clients[0].close()
        await asyncio.sleep(0)  # the callback goes on after close()
        finished.append(message.seq)

    async with fake_cluster(script) as (gate, _):
        clients.append(UserClient(gate.address, "jwt", on_message=on_message))
        async with clients[0] as client:
            async with asyncio.timeout(5):
                await client.wait_closed()
        assert len(closed) == 1
        # Nothing after the close is handed out, not even the rest of that event.
        assert got == finished == [1]


@pytest.mark.unit
async def test_system_client_retries_with_the_same_idempotency_key() -> None:
    async with fake_cluster() as (gate, _):
        gate.publish_errors = [pigeon.errors.Unavailable("node down")]
        async with SystemClient(gate.address, "key") as system:
            assert await system.publish(to="bob", body="hi") == "p1"
            first, second = gate.publishes
            assert first.idempotency_key and first.idempotency_key == second.idempotency_key
            gate.publish_errors = [ServerResourceExhausted("slow down", retry_after=2)]
            with pytest.raises(ResourceExhausted) as raised:
                await system.publish(to="bob", body="hi")
            assert raised.value.retry_after == 2.0
            assert len(gate.publishes) == 3


class _BadTrailerGate(FakeGate):
    """Ends every Publish with ``trailer`` in grpc-status-details-bin, as a broken peer might."""

    def __init__(self, code: grpc.StatusCode, trailer: bytes) -> None:
        super().__init__("")
        self.code, self.trailer = code, trailer

    async def Publish(self, request: Any, context: Any) -> Any:
        await context.abort(
            self.code, "body is empty", (("grpc-status-details-bin", self.trailer),)
        )


def _unparsable_error_info_beside_a_retry_info() -> bytes:
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromSeconds(2)
    status = status_pb2.Status(
        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="body is empty"
    )
    status.details.add(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff\xff")
    status.details.add().Pack(retry)
    data: bytes = status.SerializeToString()
    return data


@pytest.mark.integration
@pytest.mark.parametrize(
    ("code", "trailer", "error", "retry_after"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, b"\xff\xff\xff", InvalidArgument, 0.0),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _unparsable_error_info_beside_a_retry_info(),
            ResourceExhausted,
            2.0,
        ),
    ],
    ids=["not_protobuf", "bad_error_info"],
)
async def test_a_garbage_details_trailer_still_raises_the_typed_error(
    code: grpc.StatusCode, trailer: bytes, error: type[Exception], retry_after: float
) -> None:
    gate = _BadTrailerGate(code, trailer)  # type: ignore[abstract]
    async with serve(gate) as address, SystemClient(address, "key") as system:
        with pytest.raises(error) as raised:
            await system.publish(to="bob", body="hi")
    assert isinstance(raised.value, ClientError)
    assert (raised.value.code, raised.value.message) == (code, "body is empty")
    assert raised.value.reason == code.name
    assert raised.value.retry_after == retry_after


@pytest.mark.unit
async def test_system_client_gives_up_after_its_retry_timeout() -> None:
    started = time.monotonic()
    async with SystemClient(f"127.0.0.1:{free_port()}", "key", retry_timeout=0.5) as system:
        with pytest.raises(Unavailable):
            await system.publish(to="bob", body="hi")
    assert time.monotonic() - started < 3


@pytest.mark.unit
def test_the_sdk_imports_only_grpc_protobuf_and_the_stubs() -> None:
    # Measured against what `import grpc` loads by itself (it imports grpc_health,
    # grpc_reflection and grpc_tools when they are installed).
    code = (
        "import json, sys, grpc, google.protobuf\n"
        "before = set(sys.modules)\n"
        "import pigeon.client\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    loaded = json.loads(result.stdout)
    assert {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names) <= {
        "google",
        "grpc",
        "grpc_status",
        "pigeon",
    }
    assert [m for m in loaded if m.startswith("pigeon.") and not m.startswith("pigeon.v1")] == [
        m for m in loaded if m.startswith("pigeon.client")
    ]
    # google.api: the generated stubs import the HTTP annotations of the protos. google.rpc
    # (googleapis-common-protos, as google.api) and grpc_status read the error details.
    assert sorted(m for m in loaded if m.startswith("google.api")) == [
        "google.api",
        "google.api.annotations_pb2",
        "google.api.http_pb2",
    ]
    assert not [m for m in loaded if m.startswith(("jwt", "cryptography"))]


# Against a real cluster: three nodes, a dispatcher, the Gate, etcd, SQLite.

ENV = {"PATH": "/usr/bin"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        tmp_path_factory.mktemp("sdk"), nodes=3, gate_port=0, gate_http_port=0, env=ENV
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def token(cluster: LocalCluster, user: str) -> str:
    return mint_user_token(cluster.secrets.jwt_secret, user)


def node_of(cluster: LocalCluster, client: UserClient) -> ServiceProcess:
    return next(n for n in cluster.nodes if n.name == client.node_id)


class Inbox:
    """A user's events read in the background."""

    def __init__(self, client: UserClient) -> None:
        self.client = client
        self.messages: list[Message] = []
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.client.events():
            self.events.append(event)
            if isinstance(event, Message):
                self.messages.append(event)
            self.changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.task.done():
                    self.task.result()
                    raise AssertionError("the event stream ended")
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def restart(service: ServiceProcess, timeout: float = 30.0) -> None:
    """Start a stopped service and wait until it serves.

    Polls with a channel that retries a refused connection within 50 ms: gRPC's default channel
    backoff (1 s, then 1.6 s...) would add seconds to every restart.
    """
    service.start()
    options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]
    async with grpc.aio.insecure_channel(service.address, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.05)


@pytest.mark.integration
async def test_the_inbox_calls_work_and_push_unread_counts(cluster: LocalCluster) -> None:
    gate = cluster.gate.address
    async with (
        UserClient(gate, token(cluster, "inbox-bob")) as bob,
        UserClient(gate, token(cluster, "inbox-alice")) as alice,
    ):
        inbox = Inbox(bob)
        ids = [
            await alice.send("inbox-bob", f"note {i}", title=f"t{i}", metadata={"i": str(i)})
            for i in range(3)
        ]
        await inbox.wait(lambda: len(inbox.messages) == 3 and bob.unread == 3)
        assert [m.body for m in inbox.messages] == ["note 0", "note 1", "note 2"]
        assert inbox.messages[0].title == "t0" and inbox.messages[0].metadata == {"i": "0"}
        assert inbox.messages[0].kind is MessageKind.USER and inbox.messages[0].sender == (
            "inbox-alice"
        )

        page = await bob.list_messages(page_size=2)
        assert [m.id for m in page.messages] == [ids[2], ids[1]] and page.next_page_token
        older = await bob.list_messages(page_size=2, page_token=page.next_page_token)
        assert [m.id for m in older.messages] == [ids[0]]
        assert (await bob.get_message(ids[1])).body == "note 1"

        assert await bob.mark_read(ids[0]) == 2
        await inbox.wait(lambda: bob.unread == 2)
        assert await bob.mark_read(up_to_seq=2) == 1
        assert [m.id for m in (await bob.list_messages(read_filter="unread")).messages] == [ids[2]]
        assert await bob.delete(ids[2]) == 0
        assert await bob.unread_count() == 0
        await inbox.wait(lambda: bob.unread == 0)
        with pytest.raises(NotFound):
            await bob.get_message(ids[2])
        with pytest.raises(InvalidArgument) as raised:
            await alice.send("inbox-bob", "")
        assert raised.value.reason == "EMPTY_BODY"
        await inbox.close()


@pytest.mark.integration
async def test_system_messages_reach_users_once_and_the_cluster_is_listed(
    cluster: LocalCluster,
) -> None:
    gate = cluster.gate.address
    async with (
        UserClient(gate, token(cluster, "sys-bob")) as bob,
        SystemClient(gate, cluster.secrets.api_key) as shop,
    ):
        inbox = Inbox(bob)
        first = await shop.publish(
            to="sys-bob", body="shipped", source="shop", idempotency_key="o1"
        )
        again = await shop.publish(
            to="sys-bob", body="shipped", source="shop", idempotency_key="o1"
        )
        assert again == first
        await shop.publish(broadcast=True, body="maintenance tonight", title="Notice")
        ids = await shop.publish_batch(
            [Publication(to=["sys-bob"], body=f"batch {i}", source="shop") for i in range(3)]
        )
        assert len(ids) == 3
        await inbox.wait(lambda: len(inbox.messages) == 5)
        await asyncio.sleep(0.2)  # a duplicate would have arrived by now
        assert [(m.sender, m.body) for m in inbox.messages if m.stream == "inbox"] == [
            ("shop", "shipped"),
            ("shop", "batch 0"),
            ("shop", "batch 1"),
            ("shop", "batch 2"),
        ]
        [broadcast] = [m for m in inbox.messages if m.stream == "broadcast"]
        assert broadcast.kind is MessageKind.BROADCAST and broadcast.title == "Notice"

        listed = await shop.list_nodes()
        assert sorted(n.node_id for n in listed.nodes) == ["node-1", "node-2", "node-3"]
        assert [d.dispatcher_id for d in listed.dispatchers] == ["dispatcher-1"]
        await inbox.close()
    with pytest.raises(Unauthenticated):
        async with SystemClient(gate, "not-the-key") as stranger:
            await stranger.publish(to="sys-bob", body="hi")


@pytest.mark.integration
async def test_a_saved_cursor_resumes_with_what_came_while_offline(cluster: LocalCluster) -> None:
    gate = cluster.gate.address
    async with UserClient(gate, token(cluster, "cur-alice")) as alice:
        async with UserClient(gate, token(cluster, "cur-bob")) as bob:
            inbox = Inbox(bob)
            await alice.send("cur-bob", "seen")
            await inbox.wait(lambda: len(inbox.messages) == 1)
            saved = bob.cursor
            await inbox.close()
        await alice.send("cur-bob", "while offline 1")
        await alice.send("cur-bob", "while offline 2")
        async with UserClient(gate, token(cluster, "cur-bob"), cursor=saved) as bob:
            inbox = Inbox(bob)
            await inbox.wait(lambda: len(inbox.messages) == 2)
            assert [m.body for m in inbox.messages] == ["while offline 1", "while offline 2"]
            await inbox.close()


# The examples in the SDK's docstrings are run as they are printed.

EXAMPLES = [
    (pigeon.client, ["shop: Your order has shipped (#", "unread: "]),
    (UserClient, ["unread: ", "alice: Lunch at noon?"]),
    (SystemClient, ["published ", "2 more", "node-1 127.0.0.1:"]),
]


def runnable_blocks(obj: object) -> list[str]:
    """The code blocks of a docstring that are whole programs."""
    doc = inspect.getdoc(obj) or ""
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:[ \t]+.*\n|\n)+)", doc + "\n")
    return [textwrap.dedent(b) for b in blocks if "asyncio.run(" in b]


@pytest.mark.integration
@pytest.mark.parametrize(("obj", "expected"), EXAMPLES, ids=lambda o: getattr(o, "__name__", ""))
def test_the_docstring_examples_run(
    cluster: LocalCluster, obj: object, expected: list[str]
) -> None:
    [code] = runnable_blocks(obj)
    env = {
        **ENV,
        "PIGEON_GATE": cluster.gate.address,
        "PIGEON_API_KEYS": cluster.secrets.api_key,
        "BOB_TOKEN": token(cluster, "bob"),
        "ALICE_TOKEN": token(cluster, "alice"),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout


def test_the_readme_shows_the_tested_sdk_example() -> None:
    [example] = runnable_blocks(pigeon.client)
    readme = (ROOT / "README.md").read_text()
    assert example.strip() in readme, "README's SDK example must be pigeon.client's docstring one"


@pytest.mark.integration
async def test_a_listener_gets_every_message_once_in_order_through_crash_drain_and_gate_restart(
    cluster: LocalCluster,
) -> None:
    gate = cluster.gate.address
    async with (
        UserClient(gate, token(cluster, "crash-carol")) as carol,
        UserClient(gate, token(cluster, "crash-dave")) as dave,
    ):
        inbox = Inbox(carol)
        sent = 0
        stopping = False

        async def traffic() -> None:
            nonlocal sent
            while not stopping:
                try:
                    # The key of message n stays the same across retries: stored once.
                    await dave.send("crash-carol", f"m{sent}", idempotency_key=f"k{sent}")
                except Unavailable:
                    await asyncio.sleep(0.1)
                    continue
                sent += 1
                await asyncio.sleep(0.01)

        async def more(count: int = 10) -> None:
            target = len(inbox.messages) + count
            await inbox.wait(lambda: len(inbox.messages) >= target)

        sender = asyncio.create_task(traffic())
        await more()

        crashed = node_of(cluster, carol)
        crashed.kill()
        await more()
        assert carol.node_id != crashed.name

        drained = node_of(cluster, carol)
        await asyncio.to_thread(drained.stop)
        await more()
        assert carol.node_id != drained.name
        await restart(drained)

        # The Gate goes down, and carol's node with it: she must wait for the Gate to come back
        # (and then find the one node left). The last test of the module: nodes stay down.
        await asyncio.to_thread(cluster.gate.stop)
        crashed = node_of(cluster, carol)
        crashed.kill()
        async with asyncio.timeout(10):
            while carol.connected:
                await asyncio.sleep(0.02)
        await restart(cluster.gate)
        await more()

        stopping = True
        await sender
        await inbox.wait(lambda: len(inbox.messages) >= sent)
        await asyncio.sleep(0.3)  # a duplicate would have arrived by now
        assert [m.body for m in inbox.messages] == [f"m{i}" for i in range(sent)]
        assert [m.seq for m in inbox.messages] == list(range(1, sent + 1))
        reasons = [e.reason for e in inbox.events if isinstance(e, Disconnected)]
        assert "draining" in reasons
        assert sum(isinstance(e, Connected) and e.reconnected for e in inbox.events) >= 3
        await inbox.close()


class ServerCancelled(PigeonError):
    """What a client sees of a Gate that stops mid-call (gRPC cancels what is left)."""

    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


@pytest.mark.unit
async def test_system_client_retries_a_call_its_gate_cancelled_with_the_same_key() -> None:
    async with fake_cluster() as (gate, _):
        gate.publish_errors = [ServerCancelled("the Gate is stopping")]
        async with SystemClient(gate.address, "key") as system:
            assert await system.publish(to="bob", body="hi") == "p1"
        first, second = gate.publishes
        assert first.idempotency_key == second.idempotency_key


@pytest.mark.unit
async def test_system_client_close_ends_a_wait_to_retry_at_once() -> None:
    async with fake_cluster() as (gate, _):
        gate.publish_errors = [pigeon.errors.Unavailable("node down")] * 1000
        # Waits of a second or so between attempts.
        system = SystemClient(gate.address, "key", backoff=Backoff(initial=1.0, max=1.0))
        publishing = asyncio.create_task(system.publish(to="bob", body="hi"))
        await wait_until(lambda: len(gate.publishes) >= 1, 5, "the first attempt")
        await system.close()
        attempts = len(gate.publishes)
        async with asyncio.timeout(0.5):
            with pytest.raises(ClientClosed):
                await publishing
        # No attempt, and no channel, after the close.
        assert system._channels._channels == {} and len(gate.publishes) == attempts


@pytest.mark.unit
async def test_a_batch_publication_to_one_user_given_as_a_string() -> None:
    async with fake_cluster() as (gate, _), SystemClient(gate.address, "key") as system:
        await system.publish_batch([Publication(to="bob", body="hi")])
        with pytest.raises(ValueError, match="at least one"):
            await system.publish_batch([])
    assert list(gate.publishes[0].batch[0].to) == ["bob"]


@pytest.mark.unit
def test_root_certificates_turn_tls_on_and_channels_follow_the_running_loop() -> None:
    assert Channels(secure=False, root_certificates=b"pem")._credentials is not None
    assert Channels(secure=False, root_certificates=None)._credentials is None
    channels = Channels(secure=False, root_certificates=None)

    async def get() -> grpc.aio.Channel:
        return channels.get("127.0.0.1:1")

    # A client used again from a second asyncio.run gets a channel of that loop.
    assert asyncio.run(get()) is not asyncio.run(get())
