"""What a hostile caller can make a real cluster do: huge or undecodable requests, idle and
surplus connections, floods of failed authentications. Each is refused cheaply, with the status a
client can act on, and other users keep being served."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import grpc
import grpc.aio
import httpx
import pytest

from pigeon.auth import mint_user_token
from pigeon.errors import PigeonError, from_rpc_error
from pigeon.local import LocalCluster
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

pytestmark = pytest.mark.integration

WAIT = 10.0
IDLE_S = 2
ENV = {
    "PATH": "/usr/bin",
    "PIGEON_IDLE_TIMEOUT": str(IDLE_S),
    "PIGEON_AUTH_FAILURE_RATE": "0.1",
    "PIGEON_AUTH_FAILURE_BURST": "5",
}
NODE_ENV = {"PIGEON_USER_RATE": "1", "PIGEON_USER_BURST": "150"}
MB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        tmp_path_factory.mktemp("hostile"),
        gate_port=0,
        gate_http_port=0,
        env=ENV,
        node_env=NODE_ENV,
        nodes=1,
    )
    with local:
        yield local


@pytest.fixture
async def gate(cluster: LocalCluster) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(
        cluster.gate.address, options=[("grpc.max_send_message_length", 8 * MB)]
    ) as channel:
        yield channel


def jwt(cluster: LocalCluster, user: str) -> str:
    return mint_user_token(cluster.secrets.jwt_secret, user)


async def refusal(call: object) -> PigeonError:
    """The error a call ends with (it must end with one)."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return from_rpc_error(exc)
    raise AssertionError("the call succeeded")


async def session(gate: grpc.aio.Channel, cluster: LocalCluster, user: str) -> tuple[str, str]:
    """A user's node address and session token, through Gate.Connect."""
    reply = await gate_pb2_grpc.GateStub(gate).Connect(
        gate_pb2.ConnectRequest(token=jwt(cluster, user)), timeout=WAIT
    )
    return reply.node_address, reply.session_token


def from_address(address: str, token: str = "") -> list[tuple[str, str]]:
    """Metadata of a call that a trusted proxy (loopback) forwards for ``address``."""
    metadata = [("x-forwarded-for", address)]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    return metadata


# --- requests too big for their method, or not a message at all ------------------------------


async def test_a_huge_connect_token_is_refused_before_it_is_decoded(
    gate: grpc.aio.Channel, cluster: LocalCluster
) -> None:
    stub = gate_pb2_grpc.GateStub(gate)
    huge = "eyJhbGciOiJIUzI1NiJ9." + "A" * (4 * MB - 1024) + ".c2ln"
    error = await refusal(stub.Connect(gate_pb2.ConnectRequest(token=huge), timeout=WAIT))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "REQUEST_TOO_LARGE"
    assert "Connect takes at most 16384" in str(error)
    # Another user is served as before.
    reply = await stub.Connect(gate_pb2.ConnectRequest(token=jwt(cluster, "ann")), timeout=WAIT)
    assert reply.user_id == "ann"


async def test_a_large_request_to_a_method_that_takes_ids_is_refused_before_decoding(
    gate: grpc.aio.Channel, cluster: LocalCluster
) -> None:
    address, token = await session(gate, cluster, "bea")
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 8 * MB)]
    ) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        ids = [f"m{i:07d}" for i in range(300_000)]
        error = await refusal(
            stub.MarkRead(
                node_pb2.MarkReadRequest(message_ids=ids),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=WAIT,
            )
        )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "REQUEST_TOO_LARGE"


async def test_large_sends_are_charged_to_the_senders_rate_limit(
    gate: grpc.aio.Channel, cluster: LocalCluster
) -> None:
    # The node lets a user make 150 calls at once, then 1/s; a 1 MB Send costs 66 of them.
    address, token = await session(gate, cluster, "cal")
    metadata = [("authorization", f"Bearer {token}")]
    draft = types_pb2.Draft(to=["dan"], body="x" * 60_000)
    big = node_pb2.SendRequest(batch=[draft] * 18)
    assert big.ByteSize() > MB
    async with grpc.aio.insecure_channel(address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        for _ in range(2):
            reply = await stub.Send(big, metadata=metadata, timeout=WAIT)
            assert len(reply.message_ids) == 18
        error = await refusal(stub.Send(big, metadata=metadata, timeout=WAIT))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "RATE_LIMITED"
        # Small calls still fit in what is left.
        small = node_pb2.SendRequest(to=["dan"], body="hi")
        assert (await stub.Send(small, metadata=metadata, timeout=WAIT)).message_id


@pytest.mark.parametrize(
    ("method", "credential"),
    [
        ("/pigeon.v1.Gate/Connect", ""),
        ("/pigeon.v1.Gate/Publish", "api_key"),
        ("/pigeon.v1.Node/Send", "session"),
        ("/pigeon.v1.Node/Publish", "cluster_secret"),
        ("/pigeon.v1.Dispatcher/Publish", "cluster_secret"),
    ],
)
async def test_undecodable_requests_are_invalid_argument_with_no_internals(
    gate: grpc.aio.Channel, cluster: LocalCluster, method: str, credential: str
) -> None:
    target = cluster.gate
    token = ""
    if credential == "api_key":
        token = cluster.secrets.api_key
    elif credential == "cluster_secret":
        token = cluster.secrets.cluster_secret
    if method.startswith("/pigeon.v1.Node/"):
        target = cluster.nodes[0]
    elif method.startswith("/pigeon.v1.Dispatcher/"):
        target = cluster.dispatchers[0]
    if credential == "session":
        _, token = await session(gate, cluster, "eve")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    async with grpc.aio.insecure_channel(target.address) as channel:
        call = channel.unary_unary(method)(b"\xff\xff\xff", metadata=metadata, timeout=WAIT)
        for _ in range(3):
            error = await refusal(
                channel.unary_unary(method)(b"\xff\xff\xff", metadata=metadata, timeout=WAIT)
            )
        error = await refusal(call)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_REQUEST"
    assert "Error" not in str(error) and "Exception" not in str(error)
    assert "Traceback" not in target.log_tail(200)


async def test_an_undecodable_request_on_a_stream_is_invalid_argument(
    cluster: LocalCluster,
) -> None:
    metadata = [("authorization", f"Bearer {cluster.secrets.cluster_secret}")]
    async with grpc.aio.insecure_channel(cluster.dispatchers[0].address) as channel:
        call = channel.stream_stream("/pigeon.v1.Dispatcher/Subscribe")(
            metadata=metadata, timeout=WAIT
        )
        await call.write(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    error = from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_REQUEST"
    assert "Traceback" not in cluster.dispatchers[0].log_tail(200)


async def test_without_a_credential_an_undecodable_request_is_unauthenticated(
    cluster: LocalCluster,
) -> None:
    # The credential is checked before a byte of the request is decoded.
    async with grpc.aio.insecure_channel(cluster.nodes[0].address) as channel:
        error = await refusal(
            channel.unary_unary("/pigeon.v1.Node/Send")(b"\xff\xff\xff", timeout=WAIT)
        )
    assert error.code == grpc.StatusCode.UNAUTHENTICATED


# --- connections ----------------------------------------------------------------------------


async def test_an_idle_grpc_connection_is_closed(cluster: LocalCluster) -> None:
    async with grpc.aio.insecure_channel(cluster.gate.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), WAIT)
        state = channel.get_state()
        assert state == grpc.ChannelConnectivity.READY

        async def left_ready() -> None:
            while channel.get_state() == grpc.ChannelConnectivity.READY:
                await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)

        # The server's GOAWAY takes the channel out of READY (it reconnects on its next call).
        await asyncio.wait_for(left_ready(), IDLE_S + WAIT)
        reply = await gate_pb2_grpc.GateStub(channel).Connect(
            gate_pb2.ConnectRequest(token=jwt(cluster, "fay")), timeout=WAIT
        )
        assert reply.user_id == "fay"


async def test_a_connection_that_never_starts_http2_is_closed(cluster: LocalCluster) -> None:
    host, port = cluster.gate.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.settimeout(30)
        # The server's handshake bound ends it; the client sent nothing at all.
        data = await asyncio.to_thread(sock.recv, 1024)
        while data:
            data = await asyncio.to_thread(sock.recv, 1024)


async def test_an_idle_http_connection_is_closed(cluster: LocalCluster) -> None:
    host, port = cluster.gate.http_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.settimeout(30)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        data = await asyncio.to_thread(sock.recv, 65536)
        while data:
            received += data
            data = await asyncio.to_thread(sock.recv, 65536)
    assert received.startswith(b"HTTP/1.1 200")


# --- failed authentication -------------------------------------------------------------------


async def test_failed_authentication_is_throttled_per_address_but_valid_calls_are_served(
    gate: grpc.aio.Channel, cluster: LocalCluster
) -> None:
    stub = gate_pb2_grpc.GateStub(gate)
    attacker = from_address("203.0.113.7", "not-a-key")
    codes = []
    for _ in range(8):
        error = await refusal(stub.ListNodes(gate_pb2.ListNodesRequest(), metadata=attacker))
        codes.append(error.code)
    assert codes[:5] == [grpc.StatusCode.UNAUTHENTICATED] * 5
    assert codes[5:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    throttled = await refusal(stub.ListNodes(gate_pb2.ListNodesRequest(), metadata=attacker))
    assert throttled.reason == "TOO_MANY_AUTH_FAILURES"
    assert throttled.retry_after is not None and throttled.retry_after > 0
    # Bad user tokens on Connect count the same way.
    error = await refusal(
        stub.Connect(gate_pb2.ConnectRequest(token="x.y.z"), metadata=attacker[:1])
    )
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Valid credentials from the same address are served.
    valid = from_address("203.0.113.7", cluster.secrets.api_key)
    assert (await stub.ListNodes(gate_pb2.ListNodesRequest(), metadata=valid)).nodes
    reply = await stub.Connect(
        gate_pb2.ConnectRequest(token=jwt(cluster, "gus")), metadata=attacker[:1]
    )
    assert reply.user_id == "gus"
    # Another address is not throttled.
    other = from_address("203.0.113.8", "not-a-key")
    error = await refusal(stub.ListNodes(gate_pb2.ListNodesRequest(), metadata=other))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED


async def test_failed_authentication_over_rest_is_429_with_retry_after(
    cluster: LocalCluster,
) -> None:
    async with httpx.AsyncClient(
        base_url=f"http://{cluster.gate.http_address}", timeout=WAIT
    ) as http:
        # uvicorn takes X-Forwarded-For from loopback, a trusted proxy by default.
        attacker = {"X-Forwarded-For": "198.51.100.9", "Authorization": "Bearer not-a-key"}
        statuses = []
        for _ in range(7):
            reply = await http.post("/v1/publish", headers=attacker, json={"to": ["x"]})
            statuses.append(reply.status_code)
        assert statuses == [401] * 5 + [429] * 2
        assert float(reply.headers["Retry-After"]) > 0
        assert reply.json()["message"].startswith("too many failed authentications")
        valid = {
            "X-Forwarded-For": "198.51.100.9",
            "Authorization": f"Bearer {cluster.secrets.api_key}",
        }
        reply = await http.get("/v1/nodes", headers=valid)
        assert reply.status_code == 200, reply.text
        reply = await http.get(
            "/v1/nodes",
            headers={"X-Forwarded-For": "198.51.100.10", "Authorization": "Bearer nope"},
        )
        assert reply.status_code == 401


async def test_a_user_parses_at_most_two_large_rest_bodies_at_once(
    gate: grpc.aio.Channel, cluster: LocalCluster
) -> None:
    _, token = await session(gate, cluster, "hal")
    body = {"to": [f"u{i:06d}" for i in range(300_000)], "body": "x"}
    async with httpx.AsyncClient(
        base_url=f"http://{cluster.nodes[0].http_address}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    ) as http:
        replies = await asyncio.gather(*(http.post("/v1/messages", json=body) for _ in range(4)))
    reasons = sorted((r.status_code, r.json()["details"][0]["reason"]) for r in replies)
    assert (429, "TOO_MANY_LARGE_REQUESTS") in reasons, reasons
    # None of them was stored, and the user can still send.
    assert all(r.status_code in (400, 429) for r in replies), reasons
