"""Cross-node delivery through real dispatchers: several node processes, real etcd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from pigeon.local import LocalCluster
from tests.cluster_client import ClusterClient
from tests.node_harness import Listener
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

ENV = {"PATH": "/usr/bin"}


def start_cluster(path: Path, **options: object) -> LocalCluster:
    cluster = LocalCluster(path, gate_port=0, gate_http_port=0, env=ENV, **options)  # type: ignore[arg-type]
    cluster.start()
    return cluster


@asynccontextmanager
async def own_cluster(
    path: Path, **options: object
) -> AsyncIterator[tuple[LocalCluster, ClusterClient]]:
    """A cluster for one test, with a client; both stopped afterwards, also on failure."""
    cluster = start_cluster(path, **options)
    client = ClusterClient(cluster)
    try:
        yield cluster, client
    finally:
        await client.close()
        cluster.stop()


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("routed"), nodes=3, dispatchers=2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def client(routed: LocalCluster) -> AsyncIterator[ClusterClient]:
    client = ClusterClient(routed)
    try:
        yield client
    finally:
        await client.close()


def live(listener: Listener) -> bool:
    return any(e.HasField("replay_done") for e in listener.events)


def bodies(listener: Listener) -> list[str]:
    return [m.body for m in listener.messages]


async def test_a_message_reaches_every_device_on_other_nodes_once(client: ClusterClient) -> None:
    a, b, c = client.cluster.nodes
    bob_phone, bob_laptop = client.subscribe(b, "bob-1"), client.subscribe(b, "bob-1")
    carol_b, carol_c = client.subscribe(b, "carol-1"), client.subscribe(c, "carol-1")
    devices = [bob_phone, bob_laptop, carol_b, carol_c]
    for device in devices:
        await device.wait(live)
    await client.send(a, "alice-1", ["bob-1", "carol-1"], "hello from A")
    for device in devices:
        await device.wait(lambda d: bodies(d) == ["hello from A"])
        await device.wait(lambda d: d.unread == 1)
    await asyncio.sleep(0.3)  # a duplicate would have arrived by now
    for device in devices:
        assert bodies(device) == ["hello from A"]
        await device.close()


async def test_routed_mode_sends_nothing_to_a_node_without_recipients(
    client: ClusterClient,
) -> None:
    a, b, c = client.cluster.nodes
    dave = client.subscribe(b, "dave-2")
    await dave.wait(live)
    before_c = client.metric(c, "pigeon_node_envelopes_received_total")
    before_b = client.metric(b, "pigeon_node_envelopes_received_total")
    for i in range(20):
        await client.send(a, "alice-2", ["dave-2"], f"m{i}")
    await dave.wait(lambda d: len(d.messages) == 20)
    assert [m.seq for m in dave.messages] == list(range(1, 21))
    assert client.metric(b, "pigeon_node_envelopes_received_total") - before_b >= 20
    assert client.metric(c, "pigeon_node_envelopes_received_total") == before_c
    await dave.close()


async def test_a_users_messages_leave_the_node_only_once_another_node_holds_them(
    client: ClusterClient,
) -> None:
    a, b, _ = client.cluster.nodes
    published = "pigeon_node_envelopes_published_total"
    fay_a = client.subscribe(a, "fay-4")
    await fay_a.wait(live)
    before = client.metric(a, published)
    for i in range(5):
        await client.send(a, "gus-4", ["fay-4"], f"here {i}")
    await fay_a.wait(lambda d: len(d.messages) == 5)
    # Both dispatchers said no other node holds fay: nothing of hers went to them.
    assert client.metric(a, published) == before

    # Live on node b means node a has been told: what a stores from now on reaches b too.
    fay_b = client.subscribe(b, "fay-4")
    await fay_b.wait(live)
    await client.send(a, "gus-4", ["fay-4"], "to both")
    await fay_b.wait(lambda d: bodies(d) == ["to both"])
    await fay_a.wait(lambda d: bodies(d)[-1] == "to both")
    # Counted once the dispatcher has answered.
    await wait_until(lambda: client.metric(a, published) > before, 5, "the publish")
    await fay_b.close()
    await fay_a.close()


async def test_a_node_that_restarts_is_routed_to_again(client: ClusterClient) -> None:
    a, b, _ = client.cluster.nodes
    b.stop()
    b.start()
    b.wait_healthy(30)
    erin = client.subscribe(b, "erin-3")
    await erin.wait(live)
    await client.send(a, "alice-3", ["erin-3"], "after restart")
    await erin.wait(lambda e: bodies(e) == ["after restart"])
    await erin.close()


async def test_broadcast_mode_delivers_the_same(tmp_path: Path) -> None:
    async with own_cluster(
        tmp_path, nodes=2, dispatchers=1, dispatcher_env={"PIGEON_ROUTING_MODE": "broadcast"}
    ) as (cluster, client):
        a, b = cluster.nodes
        frank = client.subscribe(b, "frank")
        await frank.wait(live)
        await client.send(a, "alice", ["frank", "nobody-online"], "via broadcast mode")
        await frank.wait(lambda f: bodies(f) == ["via broadcast mode"])
        # In broadcast mode B also receives the envelope for the user it does not hold.
        await asyncio.sleep(0.2)
        assert client.metric(b, "pigeon_node_envelopes_received_total") >= 2


async def test_killing_a_dispatcher_mid_traffic_loses_nothing(tmp_path: Path) -> None:
    async with own_cluster(tmp_path, nodes=2, dispatchers=2) as (cluster, client):
        a, b = cluster.nodes
        gina = client.subscribe(b, "gina")
        await gina.wait(live)
        total = 300

        async def traffic() -> None:
            for i in range(total):
                await client.send(a, "alice", ["gina"], f"m{i}")
                await asyncio.sleep(0.002)

        sender = asyncio.create_task(traffic())
        await gina.wait(lambda g: len(g.messages) >= 50)
        # Kill whichever dispatcher A publishes to, and the other one survives.
        cluster.dispatchers[0].kill()
        await sender
        await gina.wait(lambda g: len(g.messages) >= total, timeout=20)
        await asyncio.sleep(0.3)
        assert [m.seq for m in gina.messages] == list(range(1, total + 1))
        await gina.close()


async def test_a_message_a_node_stored_but_never_relayed_arrives_once_that_node_leaves(
    tmp_path: Path,
) -> None:
    # No dispatcher: A stores the message and cannot relay it, as if it died between the two.
    async with own_cluster(tmp_path, nodes=2, dispatchers=0) as (cluster, client):
        a, b = cluster.nodes
        ivy = client.subscribe(b, "ivy")
        await ivy.wait(live)
        await client.send(a, "alice", ["ivy"], "stored, not relayed")
        await asyncio.sleep(0.3)
        assert ivy.messages == []
        await asyncio.to_thread(a.stop)
        await ivy.wait(lambda i: bodies(i) == ["stored, not relayed"], timeout=10)
        await ivy.close()


async def test_a_dispatcher_that_starts_later_is_used_by_every_node(tmp_path: Path) -> None:
    async with own_cluster(tmp_path, nodes=2, dispatchers=0) as (cluster, client):
        a, b = cluster.nodes
        hank = client.subscribe(b, "hank")
        await hank.wait(live)
        cluster.add_dispatcher()
        # Until both nodes have subscribed to it, a message may only be in the store.
        async with asyncio.timeout(15):
            while not hank.messages:
                await client.send(a, "alice", ["hank"], "through the new dispatcher")
                await asyncio.sleep(0.3)
        assert hank.messages[-1].body == "through the new dispatcher"
        assert client.metric(cluster.dispatchers[0], "pigeon_dispatcher_nodes") == 2
        await hank.close()
