"""Faults under load: while SDK clients on several nodes receive a steady stream of messages,
processes die, drain, lose etcd, fall behind or fail to write. A checker records every
acknowledged message and every delivery; after each fault every acknowledged message has reached
every device of its recipient exactly once, in seq order, with no gap."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest

from pigeon.auth import mint_user_token
from pigeon.client import ClientError, Message, Publication, SystemClient, UserClient
from pigeon.local import LocalCluster
from pigeon.v1 import gate_pb2, gate_pb2_grpc
from tests.cluster_client import ClusterClient

pytestmark = [pytest.mark.fault, pytest.mark.integration]

USERS = 20
RATE = 40  # messages per second, offered by the senders together


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        tmp_path_factory.mktemp("faults"),
        nodes=3,
        dispatchers=2,
        gate_port=0,
        gate_http_port=0,
        env={"PATH": "/usr/bin"},
        # Short heartbeats so that clients notice silent failures quickly.
        node_env={"PIGEON_HEARTBEAT_INTERVAL": "1", "PIGEON_STREAM_QUEUE_SIZE": "256"},
    )
    with local:
        yield local


@dataclass
class Device:
    user: str
    client: UserClient
    received: list[Message] = field(default_factory=list)


@dataclass
class Checker:
    """What was acknowledged to senders, and what each device received."""

    acknowledged: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    failed_bodies: set[str] = field(default_factory=set)
    devices: list[Device] = field(default_factory=list)

    def problems(self) -> list[str]:
        found = []
        for device in self.devices:
            ids = [m.id for m in device.received]
            seqs = [m.seq for m in device.received]
            wanted = self.acknowledged[device.user]
            if len(ids) != len(set(ids)):
                found.append(f"{device.user}: duplicates")
            if missing := wanted - set(ids):
                found.append(f"{device.user}: {len(missing)} acknowledged messages missing")
            if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                found.append(f"{device.user}: seqs out of order or with a gap: {seqs}")
            if lost := {m.body for m in device.received} & self.failed_bodies:
                found.append(f"{device.user}: got messages whose send failed: {lost}")
        return found

    async def settled(self, timeout: float = 30.0) -> None:
        """Wait until every device has everything acknowledged for it, then check it all."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(
                    not self.acknowledged[d.user] <= {m.id for m in d.received}
                    for d in self.devices
                ):
                    await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # a late duplicate would arrive now
        assert self.problems() == []


@contextlib.asynccontextmanager
async def traffic(cluster: LocalCluster, name: str) -> AsyncIterator[Checker]:
    """Devices connected through the Gate and senders offering RATE messages/s until exit."""
    checker = Checker()
    users = [f"{name}-{i}" for i in range(USERS)]
    gate = cluster.gate.address
    for i, user in enumerate(users):
        # Every fourth user has a second device.
        for _ in range(2 if i % 4 == 0 else 1):
            device = Device(user, None)  # type: ignore[arg-type]
            device.client = UserClient(
                gate,
                lambda user=user: mint_user_token(cluster.secrets.jwt_secret, user),
                on_message=device.received.append,
            )
            checker.devices.append(device)
    await asyncio.gather(*(d.client.connect() for d in checker.devices))
    system = SystemClient(gate, cluster.secrets.api_key)
    stop = asyncio.Event()
    rng = random.Random(name)

    async def sender(number: int) -> None:
        while not stop.is_set():
            to = rng.sample(users, rng.randint(1, 3))
            body = f"{name} message {number}-{rng.random()}"
            try:
                message_id = await system.publish(to=to, body=body, source="checker")
            except ClientError:
                checker.failed_bodies.add(body)
            else:
                for user in to:
                    checker.acknowledged[user].add(message_id)
            await asyncio.sleep(4 / RATE)

    senders = [asyncio.create_task(sender(n)) for n in range(4)]
    try:
        yield checker
    finally:
        stop.set()
        await asyncio.gather(*senders, return_exceptions=True)
        await checker.settled()
        await asyncio.gather(*(d.client.close() for d in checker.devices))
        await system.close()


async def while_running(seconds: float) -> None:
    await asyncio.sleep(seconds)


def busiest_node(cluster: LocalCluster, checker: Checker):
    counts: dict[str, int] = defaultdict(int)
    for device in checker.devices:
        session = getattr(device.client, "node_id", None)
        if session:
            counts[session] += 1
    name = max(counts, key=counts.__getitem__) if counts else cluster.nodes[0].name
    return next(n for n in cluster.nodes if n.name == name)


async def in_thread(call: Callable[[], object]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, call)


async def test_killing_a_node_loses_nothing(cluster: LocalCluster) -> None:
    async with traffic(cluster, "kill-node") as checker:
        await while_running(2)
        victim = busiest_node(cluster, checker)
        victim.kill()
        await while_running(3)
    victim.start()
    victim.wait_healthy(30)


async def test_killing_a_dispatcher_loses_nothing(cluster: LocalCluster) -> None:
    async with traffic(cluster, "kill-dispatcher"):
        await while_running(2)
        cluster.dispatchers[0].kill()
        await while_running(3)
    cluster.dispatchers[0].start()
    cluster.dispatchers[0].wait_healthy(30)


async def test_a_rolling_restart_loses_nothing(cluster: LocalCluster) -> None:
    async with traffic(cluster, "rolling"):
        for node in cluster.nodes:
            await while_running(1)
            await in_thread(node.stop)  # SIGTERM: it drains
            node.start()
            await in_thread(lambda node=node: node.wait_healthy(30))
        await while_running(1)


async def test_an_etcd_outage_of_ten_seconds_loses_nothing(cluster: LocalCluster) -> None:
    async with traffic(cluster, "etcd"):
        await while_running(1)
        await in_thread(cluster.etcd.stop)
        await while_running(10)
        await in_thread(cluster.etcd.start)
        await while_running(2)


async def test_restarting_the_gate_loses_nothing(cluster: LocalCluster) -> None:
    async with traffic(cluster, "gate"):
        await while_running(1)
        await in_thread(cluster.gate.stop)
        cluster.gate.start()
        await in_thread(lambda: cluster.gate.wait_healthy(30))
        await while_running(2)


async def test_a_slow_consumer_is_cut_recovers_and_slows_no_one(cluster: LocalCluster) -> None:
    async with traffic(cluster, "slow") as checker:
        # A client whose application stops reading: its small buffer fills, the client stops
        # reading the stream, the node's queue for it overflows and the node cuts it.
        stalled = asyncio.Event()
        slow_received: list[Message] = []

        async def sluggish(message: Message) -> None:
            slow_received.append(message)
            if not stalled.is_set():
                await stalled.wait()

        slow = UserClient(
            cluster.gate.address,
            lambda: mint_user_token(cluster.secrets.jwt_secret, "slow-reader"),
            on_message=sluggish,
            max_buffered=4,
        )
        await slow.connect()
        publisher = SystemClient(cluster.gate.address, cluster.secrets.api_key)
        big = "z" * 30_000
        ids: list[str] = []

        def cut() -> float:
            return sum(
                ClusterClient.metric(n, "pigeon_node_slow_consumers_total") for n in cluster.nodes
            )

        # Until the transport's buffers are full and the node's queue for it overflows.
        for i in range(80):
            batch = [Publication(to=["slow-reader"], body=f"{big}{i}-{j}") for j in range(20)]
            ids.extend(await publisher.publish_batch(batch))
            if cut():
                break
        assert cut(), "the stalled stream was never cut"
        stalled.set()
        async with asyncio.timeout(30):
            while {m.id for m in slow_received} != set(ids):
                await asyncio.sleep(0.1)
        assert sorted(m.seq for m in slow_received) == [m.seq for m in slow_received]
        assert len(slow_received) == len(ids)
        await slow.close()
        await publisher.close()
    assert checker.problems() == []


async def test_a_store_that_fails_a_write_never_acknowledges_it(cluster: LocalCluster) -> None:
    database = cluster.data_dir / "pigeon.db"
    async with traffic(cluster, "store") as checker:
        await while_running(1)
        with contextlib.closing(sqlite3.connect(database, timeout=10)) as db:
            db.execute(
                "CREATE TRIGGER fail_writes BEFORE INSERT ON inbox "
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            )
            db.commit()
        # A sender without retries sees the failure itself, not an acknowledgement.
        body = "written while the store fails"
        async with grpc.aio.insecure_channel(cluster.gate.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await gate_pb2_grpc.GateStub(channel).Publish(
                    gate_pb2.PublishRequest(to=["store-1", "store-2"], body=body),
                    metadata=[("authorization", f"Bearer {cluster.secrets.api_key}")],
                    timeout=10,
                )
        checker.failed_bodies.add(body)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "store" in (refused.value.details() or "")
        await while_running(1)
        with contextlib.closing(sqlite3.connect(database, timeout=10)) as db:
            db.execute("DROP TRIGGER fail_writes")
            db.commit()
        await while_running(2)
