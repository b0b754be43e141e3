"""Nodes as real processes sharing one store: gapless seqs across processes, and a drain that
loses nothing."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import grpc
import pytest

from pigeon.local import LocalCluster, ServiceProcess
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2
from tests.cluster_client import ClusterClient
from tests.node_harness import Listener

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path) -> Iterator[LocalCluster]:
    with LocalCluster(
        tmp_path, nodes=2, gate_port=0, gate_http_port=0, env={"PATH": "/usr/bin"}
    ) as local:
        yield local


async def all_seqs(client: ClusterClient, user: str) -> list[int]:
    node = client.cluster.nodes[-1]
    seqs, token = [], ""
    while True:
        page = await client.stub(node).ListMessages(
            node_pb2.ListMessagesRequest(page_size=200, page_token=token),
            metadata=client.as_user(user, node),
        )
        seqs.extend(m.seq for m in page.messages)
        token = page.next_page_token
        if not token:
            return sorted(seqs)


def replayed(listener: Listener) -> bool:
    return any(e.HasField("replay_done") for e in listener.events)


async def stops_with_the_draining_hint(listener: Listener, node: ServiceProcess) -> None:
    """The stream ends with a hint to reconnect elsewhere, and the node exits with 0."""
    await listener.wait(lambda lst: lst.task.done(), timeout=15)
    hints = [e.reconnect.reason for e in listener.events if e.HasField("reconnect")]
    assert hints == ["draining"]
    assert node.process is not None and node.process.wait(15) == 0


async def test_concurrent_senders_on_two_nodes_give_one_recipient_a_gapless_seq(
    cluster: LocalCluster,
) -> None:
    client = ClusterClient(cluster)
    try:
        a, b = cluster.nodes

        async def sender(node, name: str) -> None:
            for i in range(40):
                await client.send(node, name, ["zed"], f"{name}-{i}")

        await asyncio.gather(*(sender(n, f"s{i}-{n.name}") for n in (a, b) for i in range(3)))
        assert await all_seqs(client, "zed") == list(range(1, 241))
    finally:
        await client.close()


async def test_sigterm_drains_streams_to_other_nodes_and_loses_nothing(
    cluster: LocalCluster,
) -> None:
    client = ClusterClient(cluster)
    try:
        a, b = cluster.nodes
        listener = client.subscribe(a, "drained")
        await listener.wait(replayed)
        acknowledged: list[str] = []

        async def traffic() -> None:
            for i in range(200):
                acknowledged.append(await client.send(b, "alice", ["drained"], f"m{i}"))
                await asyncio.sleep(0.002)

        sending = asyncio.create_task(traffic())
        await listener.wait(lambda lst: len(lst.messages) >= 20)
        a.signal(signal.SIGTERM)
        await stops_with_the_draining_hint(listener, a)
        # The node left the Gates' view at once, without waiting for its lease.
        channel = grpc.aio.insecure_channel(cluster.gate.address)
        listed = await gate_pb2_grpc.GateStub(channel).ListNodes(
            gate_pb2.ListNodesRequest(),
            metadata=[("authorization", f"Bearer {cluster.secrets.api_key}")],
        )
        assert [n.node_id for n in listed.nodes] == ["node-2"]
        await channel.close(None)
        await sending
        # Resuming on the other node from the last cursor gets the rest, with no gap.
        cursor = max(e.cursor.seq for e in listener.events if e.HasField("cursor"))
        resumed = client.subscribe(b, "drained", since=cursor)
        await resumed.wait(replayed)
        got = [m.seq for m in listener.messages if m.seq <= cursor] + [
            m.seq for m in resumed.messages
        ]
        assert got == list(range(1, 201))
        assert len(acknowledged) == 200
        await resumed.close()
    finally:
        await client.close()


async def test_a_node_stopped_while_etcd_is_down_still_drains_its_streams(
    cluster: LocalCluster,
) -> None:
    client = ClusterClient(cluster)
    try:
        a, _ = cluster.nodes
        listener = client.subscribe(a, "stranded")
        await listener.wait(replayed)
        await asyncio.to_thread(cluster.etcd.stop)
        a.signal(signal.SIGTERM)
        # The node cannot leave etcd's view (its lease ends it), but it drains all the same.
        await stops_with_the_draining_hint(listener, a)
    finally:
        await client.close()
