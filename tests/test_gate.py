"""The Gate against real etcd and real nodes: placement, health view, publishing, auth."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pigeon.auth import mint_user_token
from pigeon.local import LocalCluster, ServiceProcess
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc
from tests.cluster_client import ClusterClient

pytestmark = pytest.mark.integration

ENV = {"PATH": "/usr/bin"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        tmp_path_factory.mktemp("gate"), nodes=3, gate_port=0, gate_http_port=0, env=ENV
    )
    with local:
        yield local


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[ClusterClient]:
    client = ClusterClient(cluster)
    try:
        yield client
    finally:
        await client.close()


def gate_stub(gate: ServiceProcess) -> tuple[grpc.aio.Channel, gate_pb2_grpc.GateStub]:
    channel = grpc.aio.insecure_channel(gate.address)
    return channel, gate_pb2_grpc.GateStub(channel)


def token(cluster: LocalCluster, user: str, **options: object) -> str:
    return mint_user_token(cluster.secrets.jwt_secret, user, **options)  # type: ignore[arg-type]


def api_key(cluster: LocalCluster) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {cluster.secrets.api_key}")]


async def user_placed_on(gate: gate_pb2_grpc.GateStub, cluster: LocalCluster, node_id: str) -> str:
    for candidate in (f"k-{i}" for i in range(100)):
        request = gate_pb2.ConnectRequest(token=token(cluster, candidate))
        if (await gate.Connect(request, timeout=5)).node_id == node_id:
            return candidate
    raise AssertionError(f"no user of 100 was placed on {node_id}")


async def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code(), caught.value.details() or ""


async def test_placement_is_stable_and_every_gate_agrees(cluster: LocalCluster) -> None:
    second = cluster.add_gate()
    try:
        channel_1, gate_1 = gate_stub(cluster.gate)
        channel_2, gate_2 = gate_stub(second)
        chosen = set()
        for user in [f"p-{i}" for i in range(30)]:
            request = gate_pb2.ConnectRequest(token=token(cluster, user))
            first = await gate_1.Connect(request, timeout=5)
            again = await gate_1.Connect(request, timeout=5)
            other = await gate_2.Connect(request, timeout=5)
            assert first.node_id == again.node_id == other.node_id
            assert first.node_id not in {f.node_id for f in first.fallbacks}
            assert len(first.fallbacks) == 2
            chosen.add(first.node_id)
        assert chosen == {"node-1", "node-2", "node-3"}
        await channel_1.close(None)
        await channel_2.close(None)
    finally:
        second.stop()
        cluster.gates.remove(second)


async def test_every_bad_user_token_is_unauthenticated_with_its_reason(
    cluster: LocalCluster,
) -> None:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none"}).encode()).rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps({"sub": "eve", "exp": 9e9}).encode())
    unsigned = f"{header.decode()}.{payload.rstrip(b'=').decode()}."
    cases = {
        "": "missing",
        "not-a-jwt": "malformed",
        token(cluster, "alice", ttl=-120): "expired",
        mint_user_token("another-secret-entirely-0123456789", "alice"): "signature",
        unsigned: "algorithm",
        token(cluster, "alice", audience="another-app"): "audience",
        # Valid only from ten minutes on: far beyond the leeway of a skewed clock.
        token(cluster, "alice", extra={"nbf": int(time.time()) + 600}): "not yet valid",
        token(cluster, "", extra={"sub": ""}): "sub",
    }
    channel, gate = gate_stub(cluster.gate)
    for bad, says in cases.items():
        code, message = await status_of(gate.Connect(gate_pb2.ConnectRequest(token=bad)))
        assert code == grpc.StatusCode.UNAUTHENTICATED, (bad, message)
        assert says in message.lower(), (bad, message)
    await channel.close(None)


async def test_one_user_connecting_in_a_loop_is_rate_limited_and_others_are_not(
    cluster: LocalCluster,
) -> None:
    # The Gate's defaults: 100 calls/s per user, bursts of 200.
    channel, gate = gate_stub(cluster.gate)
    looping = gate_pb2.ConnectRequest(token=token(cluster, "looping"))

    async def connect() -> grpc.StatusCode:
        try:
            await gate.Connect(looping, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(connect() for _ in range(500)))
    assert codes.count(grpc.StatusCode.OK) >= 200
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    await gate.Connect(gate_pb2.ConnectRequest(token=token(cluster, "patient")), timeout=30)
    await channel.close(None)


async def test_system_calls_need_an_api_key_not_a_user_token(cluster: LocalCluster) -> None:
    channel, gate = gate_stub(cluster.gate)
    publish = gate_pb2.PublishRequest(to=["alice"], body="x")
    code, message = await status_of(gate.Publish(publish))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in message
    wrong = [("authorization", "Bearer nope")]
    code, message = await status_of(gate.Publish(publish, metadata=wrong))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid API key" in message
    as_user = [("authorization", f"Bearer {token(cluster, 'alice')}")]
    code, message = await status_of(gate.Publish(publish, metadata=as_user))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not an API key" in message
    code, _ = await status_of(gate.ListNodes(gate_pb2.ListNodesRequest(), metadata=as_user))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    await channel.close(None)


async def test_publish_reaches_online_users_everywhere_and_waits_for_offline_ones(
    client: ClusterClient,
) -> None:
    cluster = client.cluster
    listeners = [client.subscribe(node, f"pub-{node.name}") for node in cluster.nodes]
    for listener in listeners:
        await listener.wait(lambda lst: any(e.HasField("replay_done") for e in lst.events))
    channel, gate = gate_stub(cluster.gate)
    recipients = [f"pub-{node.name}" for node in cluster.nodes] + ["pub-offline"]
    reply = await gate.Publish(
        gate_pb2.PublishRequest(to=recipients, title="Invoice", body="due", source="billing"),
        metadata=api_key(cluster),
        timeout=10,
    )
    for listener in listeners:
        await listener.wait(lambda lst: [m.id for m in lst.messages] == [reply.message_id])
        assert listener.messages[0].sender == "billing"
        await listener.close()
    # The offline user finds it in the inbox on any node.
    inbox = await client.stub(cluster.nodes[0]).ListMessages(
        node_pb2.ListMessagesRequest(), metadata=client.as_user("pub-offline", cluster.nodes[0])
    )
    assert [m.id for m in inbox.messages] == [reply.message_id]
    # A batch gives one id per message, and a retried key is stored once.
    batch = gate_pb2.PublishRequest(
        batch=[
            {"to": ["pub-offline"], "body": "one", "idempotency_key": "k-1"},  # type: ignore[list-item]
            {"to": ["pub-offline"], "body": "two", "idempotency_key": "k-2"},  # type: ignore[list-item]
        ]
    )
    first = await gate.Publish(batch, metadata=api_key(cluster), timeout=10)
    again = await gate.Publish(batch, metadata=api_key(cluster), timeout=10)
    assert len(set(first.message_ids)) == 2 and list(again.message_ids) == list(first.message_ids)
    await channel.close(None)


async def test_list_nodes_shows_addresses_version_uptime_and_load(client: ClusterClient) -> None:
    cluster = client.cluster
    channel, gate = gate_stub(cluster.gate)
    listener = client.subscribe(cluster.nodes[0], "counted")
    await listener.wait(lambda lst: any(e.HasField("replay_done") for e in lst.events))
    async with asyncio.timeout(15):
        while True:
            listed = await gate.ListNodes(gate_pb2.ListNodesRequest(), metadata=api_key(cluster))
            by_id = {n.node_id: n for n in listed.nodes}
            if by_id["node-1"].connections >= 1:
                break
            await asyncio.sleep(0.2)
    assert set(by_id) == {"node-1", "node-2", "node-3"}
    node = by_id["node-1"]
    assert node.address == cluster.nodes[0].address and node.http_address
    assert node.version and node.uptime.ToNanoseconds() > 0
    await listener.close()
    await channel.close(None)


async def test_a_killed_node_leaves_the_view_within_its_lease_and_publish_fails_over(
    tmp_path: Path,
) -> None:
    with LocalCluster(tmp_path, nodes=2, gate_port=0, gate_http_port=0, env=ENV) as cluster:
        channel, gate = gate_stub(cluster.gate)
        user = await user_placed_on(gate, cluster, "node-1")
        cluster.nodes[0].kill()
        # Publishing to that user right away retries on the surviving node.
        reply = await gate.Publish(
            gate_pb2.PublishRequest(to=[user], body="still delivered"),
            metadata=api_key(cluster),
            timeout=10,
        )
        assert reply.message_id
        # The lease (5 s) lapses and the Gate stops placing anyone on node-1.
        async with asyncio.timeout(12):
            while True:
                listed = await gate.ListNodes(
                    gate_pb2.ListNodesRequest(), metadata=api_key(cluster)
                )
                if [n.node_id for n in listed.nodes] == ["node-2"]:
                    break
                await asyncio.sleep(0.2)
        placed = await gate.Connect(gate_pb2.ConnectRequest(token=token(cluster, user)))
        assert placed.node_id == "node-2"
        await channel.close(None)


async def test_a_hung_node_leaves_time_for_the_next_within_the_callers_deadline(
    tmp_path: Path,
) -> None:
    with LocalCluster(tmp_path, nodes=2, gate_port=0, gate_http_port=0, env=ENV) as cluster:
        channel, gate = gate_stub(cluster.gate)
        user = await user_placed_on(gate, cluster, "node-1")
        # Frozen, node-1 still holds its lease and its connection: the Gate keeps choosing it.
        cluster.nodes[0].signal(signal.SIGSTOP)
        try:
            reply = await gate.Publish(
                gate_pb2.PublishRequest(to=[user], body="taken by node-2", idempotency_key="h-1"),
                metadata=api_key(cluster),
                timeout=6,
            )
        finally:
            cluster.nodes[0].signal(signal.SIGCONT)
        assert reply.message_id
        # node-1 wakes to the abandoned call; the message is still stored once.
        client = ClusterClient(cluster)
        try:
            await asyncio.sleep(1)
            for node in cluster.nodes:
                inbox = await client.stub(node).ListMessages(
                    node_pb2.ListMessagesRequest(), metadata=client.as_user(user, node), timeout=10
                )
                assert [m.id for m in inbox.messages] == [reply.message_id]
        finally:
            await client.close()
        await channel.close(None)


async def test_a_gate_restarted_while_etcd_is_down_serves_once_etcd_is_back(
    tmp_path: Path,
) -> None:
    with LocalCluster(tmp_path, nodes=1, gate_port=0, gate_http_port=0, env=ENV) as cluster:
        cluster.etcd.stop()
        cluster.gate.stop()
        cluster.gate.start()
        channel, gate = gate_stub(cluster.gate)
        request = gate_pb2.ConnectRequest(token=token(cluster, "alice"))
        # Up (it answers) but not healthy: it knows no node and says why.
        async with asyncio.timeout(20):
            while True:
                code, message = await status_of(gate.Connect(request, timeout=5))
                if "no healthy node" in message:
                    break
                await asyncio.sleep(0.2)
        assert code == grpc.StatusCode.UNAVAILABLE and "etcd is out of reach" in message
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        cluster.etcd.start()
        await asyncio.to_thread(cluster.gate.wait_healthy, 30)
        async with asyncio.timeout(20):
            while True:
                try:
                    placed = await gate.Connect(request, timeout=5)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.2)
        assert placed.node_id == "node-1"
        await channel.close(None)


async def test_the_view_size_gauge_follows_nodes_coming_and_going_without_traffic(
    tmp_path: Path,
) -> None:
    async def gauge_becomes(cluster: LocalCluster, wanted: float) -> None:
        seen = None
        try:
            async with asyncio.timeout(20):
                while True:
                    seen = await asyncio.to_thread(
                        ClusterClient.metric, cluster.gate, "pigeon_gate_view_nodes"
                    )
                    if seen == wanted:
                        return
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise AssertionError(f"pigeon_gate_view_nodes stayed {seen}, not {wanted}") from None

    # No Connect or Publish in this test: the Gate only ever hears from etcd.
    with LocalCluster(tmp_path, nodes=2, gate_port=0, gate_http_port=0, env=ENV) as cluster:
        await gauge_becomes(cluster, 2)
        cluster.nodes[1].stop()
        await gauge_becomes(cluster, 1)


async def test_a_key_configured_on_the_gate_alone_publishes_through_it(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, nodes=1, gate_port=0, gate_http_port=0, env=ENV)
    # The nodes know other keys (a backend that publishes to them directly, say).
    cluster.nodes[0].env["PIGEON_API_KEYS"] = "a key of the nodes alone"
    with cluster:
        channel, gate = gate_stub(cluster.gate)
        # The Gate checks the caller's key and forwards with the cluster secret.
        reply = await gate.Publish(
            gate_pb2.PublishRequest(to=["bob"], body="through the Gate"),
            metadata=api_key(cluster),
            timeout=10,
        )
        assert reply.message_id
        await channel.close(None)
        async with grpc.aio.insecure_channel(cluster.nodes[0].address) as node_channel:
            node = node_pb2_grpc.NodeStub(node_channel)
            request = node_pb2.NodePublishRequest(to=["bob"], body="straight to the node")
            code, message = await status_of(node.Publish(request, metadata=api_key(cluster)))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid API key" in message
            own = [("authorization", "Bearer a key of the nodes alone")]
            assert (await node.Publish(request, metadata=own, timeout=10)).message_id
