"""Membership in a real etcd: registrations, prefix watches, and how both survive outages."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aetcd
import pytest

from pigeon.config import CommonConfig
from pigeon.etcd_server import EtcdServer, etcd_binary, free_port
from pigeon.membership import ClusterView, encode, registered
from pigeon.registry import (
    RECANCEL_S,
    PrefixWatch,
    Registration,
    RegistryConflictError,
    RegistryUnavailableError,
    _cancel,
)
from pigeon.v1 import types_pb2
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/pigeon/nodes/"
KEY = PREFIX + "n1"


async def retry(call: Callable[[], Awaitable[Any]], within: float = 5.0) -> Any:
    """Run an etcd call until it succeeds (right after a restart, the channel may still be down)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except aetcd.exceptions.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def client_for(server: EtcdServer) -> Any:
    return aetcd.Client(host=server.host, port=server.client_port, timeout=2)


# --- EtcdServer ---------------------------------------------------------------------------------


async def test_etcd_server_restart_keeps_ports_and_data(etcd: EtcdServer) -> None:
    endpoint = etcd.endpoint
    client = client_for(etcd)
    try:
        await client.put(b"/k", b"v")
        await asyncio.to_thread(etcd.stop)
        assert not etcd.running
        await asyncio.to_thread(etcd.start)
        assert etcd.endpoint == endpoint
        got = await retry(lambda: client.get(b"/k"))
        assert got is not None and got.value == b"v"
    finally:
        await client.close()


async def test_paused_etcd_stalls_calls_until_resumed_and_can_still_be_stopped(
    etcd: EtcdServer,
) -> None:
    client = aetcd.Client(host=etcd.host, port=etcd.client_port, timeout=0.3)
    try:
        await client.put(b"/k", b"1")
        etcd.pause()

        async def stalled() -> bool:
            try:
                await client.put(b"/k", b"2")
            except aetcd.exceptions.ConnectionTimeoutError:
                return True
            return False

        # SIGSTOP takes effect a moment later: the first calls may still succeed.
        deadline = time.monotonic() + 5
        while not await stalled():
            assert time.monotonic() < deadline, "calls kept succeeding while etcd was paused"
        etcd.resume()
        await retry(lambda: client.put(b"/k", b"3"))

        etcd.pause()
        started = time.monotonic()
        await asyncio.to_thread(etcd.stop, 5)
        assert not etcd.running
        assert time.monotonic() - started < 5  # SIGTERM was acted on, no SIGKILL needed
    finally:
        await client.close()


def test_etcd_server_that_cannot_start_raises_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = EtcdServer(tmp_path / "etcd", client_port=busy.getsockname()[1])
        try:
            with pytest.raises(RuntimeError, match="exited with code") as info:
                server.start(timeout=10)
            assert "address already in use" in str(info.value)
            assert not server.running
        finally:
            server.stop()


def test_etcd_server_picks_distinct_free_ports(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "etcd")
    assert server.client_port != server.peer_port
    assert server.endpoint == f"127.0.0.1:{server.client_port}"
    assert os.access(etcd_binary(), os.X_OK)
    assert free_port() > 0


def test_free_port_never_returns_a_port_twice_before_it_is_bound() -> None:
    # Servers bind their ports only when they start: ports picked together must all differ.
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)


# --- Registration seen through a PrefixWatch -----------------------------------------------------


async def test_registration_appears_under_prefix_and_update_changes_it(etcd: EtcdServer) -> None:
    changes: list[tuple[str, bytes | None]] = []
    async with (
        PrefixWatch([etcd.endpoint], PREFIX, on_change=lambda k, v: changes.append((k, v))) as w,
        Registration([etcd.endpoint], KEY, b"v1") as reg,
    ):
        await w.wait_for(lambda view: view.get(KEY) == b"v1", timeout=5)
        assert w.connected
        assert reg.registered

        assert await reg.update(b"v2") is True
        await w.wait_for(lambda view: view.get(KEY) == b"v2", timeout=5)
        assert w.view == {KEY: b"v2"}
        assert changes == [(KEY, b"v1"), (KEY, b"v2")]


async def test_keys_outside_the_prefix_are_not_in_the_view(etcd: EtcdServer, etcd_client) -> None:
    await etcd_client.put(b"/pigeon/dispatchers/d1", b"d")
    async with PrefixWatch([etcd.endpoint], PREFIX) as w:
        await etcd_client.put(b"/pigeon/nodesX", b"no")
        await etcd_client.put(KEY.encode(), b"yes")
        await w.wait_for(lambda view: KEY in view, timeout=5)
        assert w.view == {KEY: b"yes"}


CHILD = """
import asyncio, sys
from pigeon.registry import Registration

async def main():
    async with Registration([sys.argv[1]], sys.argv[2], b"child", ttl=2):
        print("READY", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_registration_of_a_killed_process_disappears_after_its_ttl(
    etcd: EtcdServer,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, etcd.endpoint, KEY, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
        assert line.strip() == b"READY"
        async with PrefixWatch([etcd.endpoint], PREFIX) as w:
            assert w.view == {KEY: b"child"}
            proc.kill()
            await proc.wait()
            # Gone through lease expiry (ttl 2 s), not through anything the dead process did.
            await w.wait_for(lambda view: KEY not in view, timeout=2 + 3)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_withdraw_removes_the_key_at_once_and_is_idempotent(etcd: EtcdServer) -> None:
    async with (
        PrefixWatch([etcd.endpoint], PREFIX) as w,
        Registration([etcd.endpoint], KEY, b"v", ttl=30) as reg,
    ):
        await w.wait_for(lambda view: KEY in view, timeout=5)
        await reg.withdraw()
        # Far below the ttl of 30 s: removed, not expired.
        await w.wait_for(lambda view: KEY not in view, timeout=2)
        assert not reg.registered
        await reg.withdraw()
        with pytest.raises(RuntimeError, match="withdrawn"):
            await reg.update(b"again")


async def test_leaving_the_registration_context_removes_the_key_at_once(etcd: EtcdServer) -> None:
    async with PrefixWatch([etcd.endpoint], PREFIX) as w:
        async with Registration([etcd.endpoint], KEY, b"v", ttl=30) as reg:
            await w.wait_for(lambda view: KEY in view, timeout=5)
            task = reg._task
        await w.wait_for(lambda view: KEY not in view, timeout=2)
        assert task is not None and task.done()


async def test_a_withdrawn_registration_stops_its_load_updates_and_leaves_quietly(
    etcd: EtcdServer,
) -> None:
    # A draining node: withdrawn first, while its streams (its load figures) keep changing.
    info = types_pb2.NodeInfo(node_id="n1", connections=0)
    config = CommonConfig(etcd_endpoints=[etcd.endpoint])

    def refresh() -> bool:
        info.connections += 1
        return True

    first = encode(info)
    async with PrefixWatch([etcd.endpoint], PREFIX) as w:
        async with registered(config, KEY, info, refresh, 0.02) as reg:
            # Updated while registered.
            await w.wait_for(lambda view: view.get(KEY, first) != first, timeout=5)
            await reg.withdraw()
            await asyncio.sleep(0.2)  # ten refresh ticks
        await w.wait_for(lambda view: KEY not in view, timeout=2)


# --- etcd outages --------------------------------------------------------------------------------


async def test_watch_keeps_its_view_while_etcd_is_down_and_resumes_after_restart(
    etcd: EtcdServer,
) -> None:
    client = client_for(etcd)
    try:
        await client.put(b"/pigeon/nodes/a", b"A")
        async with PrefixWatch([etcd.endpoint], PREFIX, retry_interval=0.2) as w:
            assert w.view == {"/pigeon/nodes/a": b"A"}
            await asyncio.to_thread(etcd.stop)
            await wait_until(lambda: not w.connected, 5, "the watch to notice the outage")
            assert w.view == {"/pigeon/nodes/a": b"A"}

            await asyncio.to_thread(etcd.start)
            await retry(lambda: client.put(b"/pigeon/nodes/b", b"B"))
            await w.wait_for(lambda view: "/pigeon/nodes/b" in view, timeout=5)
            assert w.view == {"/pigeon/nodes/a": b"A", "/pigeon/nodes/b": b"B"}
            # The keys are read again before the watch is back in place.
            await wait_until(lambda: w.connected, 5, "the watch to be back")
    finally:
        await client.close()


async def test_watch_catches_up_when_its_revision_was_compacted_during_an_outage(
    etcd: EtcdServer,
) -> None:
    changes: list[tuple[str, bytes | None]] = []
    client = client_for(etcd)
    try:
        await client.put(b"/pigeon/nodes/a", b"A")
        # A slow retry leaves time to change and compact etcd before the watch comes back.
        async with PrefixWatch(
            [etcd.endpoint],
            PREFIX,
            retry_interval=2.0,
            on_change=lambda k, v: changes.append((k, v)),
        ) as w:
            await asyncio.to_thread(etcd.stop)
            await wait_until(lambda: not w.connected, 5, "the watch to notice the outage")
            await asyncio.to_thread(etcd.start)
            await retry(lambda: client.delete(b"/pigeon/nodes/a"))
            put = await client.put(b"/pigeon/nodes/b", b"B")
            await client.compact(put.header.revision)

            await w.wait_for(lambda view: view == {"/pigeon/nodes/b": b"B"}, timeout=8)
            assert ("/pigeon/nodes/a", None) in changes
    finally:
        await client.close()


async def test_watch_entered_while_etcd_is_down_starts_empty_and_catches_up(
    tmp_path: Path,
) -> None:
    server = EtcdServer(tmp_path / "etcd")
    client = client_for(server)
    try:
        async with PrefixWatch([server.endpoint], PREFIX, retry_interval=0.2) as w:
            assert w.view == {}
            assert not w.connected
            await asyncio.to_thread(server.start)
            await retry(lambda: client.put(KEY.encode(), b"late"))
            await w.wait_for(lambda view: view == {KEY: b"late"}, timeout=5)
            # The view is loaded before the watch is established: both happen shortly.
            await wait_until(lambda: w.connected, 5, "the watch to be established")
    finally:
        await client.close()
        server.stop()


async def test_registration_is_recreated_after_its_lease_is_revoked(
    etcd: EtcdServer, etcd_client
) -> None:
    changes: list[tuple[str, bytes | None]] = []
    async with (
        PrefixWatch([etcd.endpoint], PREFIX, on_change=lambda k, v: changes.append((k, v))) as w,
        Registration([etcd.endpoint], KEY, b"v1", ttl=3) as reg,
    ):
        await reg.update(b"v2")
        await w.wait_for(lambda view: view.get(KEY) == b"v2", timeout=5)
        lost = reg.lease_id

        await etcd_client.revoke_lease(lost)
        # Deleted with the lease, then put back with the current value under a new lease.
        await w.wait_for(
            lambda view: (KEY, None) in changes and view.get(KEY) == b"v2", timeout=3 + 3
        )
        # The watch may see the key before the put's reply reaches the registration.
        await wait_until(lambda: reg.lease_id not in (None, lost), 2, "the new lease id")


async def test_update_during_an_outage_is_written_when_etcd_returns(etcd: EtcdServer) -> None:
    async with (
        PrefixWatch([etcd.endpoint], PREFIX, retry_interval=0.2) as w,
        Registration([etcd.endpoint], KEY, b"v1", ttl=3) as reg,
    ):
        await w.wait_for(lambda view: view.get(KEY) == b"v1", timeout=5)
        await asyncio.to_thread(etcd.stop)
        assert await reg.update(b"v2") is False
        assert reg.value == b"v2"
        await asyncio.to_thread(etcd.start)
        await w.wait_for(lambda view: view.get(KEY) == b"v2", timeout=8)


@pytest.mark.parametrize("revision", ["behind", "past"])
async def test_registration_and_watch_recover_when_etcd_returns_with_other_data(
    etcd: EtcdServer, tmp_path: Path, revision: str
) -> None:
    # The new etcd's revision is either behind the one the watch saw, or (filled before the
    # watch retries) already past it: either way its revisions say nothing of the old data.
    client = client_for(etcd)
    try:
        await client.put(b"/pigeon/nodes/stale", b"S")
        if revision == "behind":
            for i in range(20):
                await client.put(b"/other", str(i).encode())
    finally:
        await client.close()
    async with (
        PrefixWatch([etcd.endpoint], PREFIX, retry_interval=5 if revision == "past" else 0.2) as w,
        Registration([etcd.endpoint], KEY, b"v1", ttl=3),
    ):
        await w.wait_for(lambda view: len(view) == 2, timeout=5)
        await asyncio.to_thread(etcd.kill)
        fresh = EtcdServer(
            tmp_path / "etcd-new", client_port=etcd.client_port, peer_port=etcd.peer_port
        )
        try:
            await asyncio.to_thread(fresh.start)
            if revision == "past":
                client = client_for(fresh)
                try:
                    for i in range(2 * w.revision):
                        await retry(lambda i=i: client.put(b"/other", str(i).encode()))
                finally:
                    await client.close()
            await w.wait_for(lambda view: view == {KEY: b"v1"}, timeout=12)
        finally:
            await asyncio.to_thread(fresh.stop)


async def test_registration_fails_fast_when_etcd_is_down(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(RegistryUnavailableError, match="cannot register"):
        async with Registration([endpoint], KEY, b"v"):
            pass


async def test_registration_entered_while_etcd_is_down_registers_once_it_starts(
    tmp_path: Path,
) -> None:
    server = EtcdServer(tmp_path / "etcd")
    try:
        async with Registration([server.endpoint], KEY, b"v", ttl=3, fail_fast=False) as reg:
            assert not reg.registered
            await asyncio.to_thread(server.start)
            async with PrefixWatch([server.endpoint], PREFIX) as w:
                await w.wait_for(lambda view: view.get(KEY) == b"v", timeout=5)
            # The watch may see the key before the put's reply reaches the registration.
            await wait_until(lambda: reg.registered, 2, "the registration to know it is in")
    finally:
        server.stop()


async def test_watch_and_registration_use_the_next_endpoint_when_one_is_down(
    etcd: EtcdServer,
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with (
        Registration([dead, etcd.endpoint], KEY, b"v", fail_fast=False),
        PrefixWatch([dead, etcd.endpoint], PREFIX, retry_interval=0.1) as w,
    ):
        await w.wait_for(lambda view: view.get(KEY) == b"v", timeout=5)


class PeerNetwork:
    """TCP proxies in front of the peer ports of an etcd cluster's members, each member advertised
    through its own, so that one member can be cut off: isolate(i) drops every peer connection to
    member i and every one from it (etcd names the dialing member in each peer request's
    X-Server-From header), while its clients still reach it."""

    def __init__(self, members: list[EtcdServer]) -> None:
        self.ports = [free_port() for _ in members]
        self._targets = [m.peer_port for m in members]
        self._servers: list[asyncio.Server] = []
        # Open connections: (proxy index, dialing member id or None, the two writers).
        self._open: list[tuple[int, str | None, asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._cut: tuple[int, str] | None = None

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    async def __aenter__(self) -> PeerNetwork:
        for index, port in enumerate(self.ports):
            relay = functools.partial(self._relay, index)
            self._servers.append(await asyncio.start_server(relay, "127.0.0.1", port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self._servers:
            server.close()
        for _, _, a, b in self._open:
            a.transport.abort()
            b.transport.abort()
        for server in self._servers:
            await server.wait_closed()

    def isolate(self, index: int, member_id: str) -> None:
        self._cut = (index, member_id)
        for entry in list(self._open):
            if self._severed(entry[0], entry[1]):
                entry[2].transport.abort()
                entry[3].transport.abort()

    def _severed(self, index: int, origin: str | None) -> bool:
        return self._cut is not None and (index == self._cut[0] or origin == self._cut[1])

    async def _relay(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._targets[index])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.transport.abort()
            return
        found = re.search(rb"(?im)^x-server-from:\s*([0-9a-f]+)", head)
        origin = found.group(1).decode() if found else None
        if self._severed(index, origin):
            writer.transport.abort()
            up_writer.transport.abort()
            return
        entry = (index, origin, writer, up_writer)
        self._open.append(entry)
        up_writer.write(head)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._open.remove(entry)


async def test_watch_moves_to_another_member_when_its_member_loses_the_leader(
    tmp_path: Path,
) -> None:
    # Three members with fast elections, each reached by the others through a proxy.
    timing = ("--heartbeat-interval=50", "--election-timeout=500")
    members = [EtcdServer(tmp_path / f"m{i}", name=f"m{i}", extra_args=timing) for i in range(3)]
    async with PeerNetwork(members) as network:
        cluster = ",".join(f"{m.name}={network.url(i)}" for i, m in enumerate(members))
        for i, member in enumerate(members):
            member.initial_cluster, member.advertise_peer_url = cluster, network.url(i)
        client = client_for(members[0])
        try:
            # Each member waits for the others to be healthy.
            await asyncio.gather(*(asyncio.to_thread(m.start, 30) for m in members))
            await retry(lambda: client.put(b"/pigeon/nodes/a", b"A"), within=10)
            ids = {m.name: f"{m.id:x}" async for m in client.members()}
            endpoints = [members[2].endpoint, members[0].endpoint, members[1].endpoint]
            async with PrefixWatch(endpoints, PREFIX, retry_interval=0.2) as w:
                await w.wait_for(lambda view: "/pigeon/nodes/a" in view, timeout=10)
                network.isolate(2, ids["m2"])
                await retry(lambda: client.put(b"/pigeon/nodes/b", b"B"), within=10)
                # The cut-off member never hears of b: only a watch that leaves it sees it.
                await w.wait_for(lambda view: "/pigeon/nodes/b" in view, timeout=15)
                assert w.view == {"/pigeon/nodes/a": b"A", "/pigeon/nodes/b": b"B"}
                await wait_until(lambda: w.connected, 10, "the watch to be back")
        finally:
            await client.close()
            for member in members:
                await asyncio.to_thread(member.stop)


async def test_a_second_process_with_the_same_key_is_refused_and_the_first_keeps_it(
    etcd: EtcdServer,
) -> None:
    client = client_for(etcd)
    try:
        async with Registration([etcd.endpoint], KEY, b"first", ttl=1) as first:
            with pytest.raises(RegistryConflictError, match="same id"):
                async with Registration([etcd.endpoint], KEY, b"second", ttl=1):
                    pass
            got = await client.get(KEY.encode())
            assert got is not None and got.value == b"first" and got.lease == first.lease_id
    finally:
        await client.close()


async def test_the_key_of_a_crashed_holder_is_waited_out(etcd: EtcdServer) -> None:
    client = client_for(etcd)
    try:
        # A process that died holding the key: nobody refreshes its lease.
        lease = await client.lease(2)
        await client.put(KEY.encode(), b"dead", lease=lease.id)
        async with Registration([etcd.endpoint], KEY, b"new", ttl=1) as registration:
            got = await client.get(KEY.encode())
            assert got is not None and got.value == b"new"
            assert got.lease == registration.lease_id
    finally:
        await client.close()


async def test_a_key_taken_over_and_then_left_is_registered_again(etcd: EtcdServer) -> None:
    client = client_for(etcd)
    try:
        async with (
            Registration([etcd.endpoint], KEY, b"mine", ttl=1),
            PrefixWatch([etcd.endpoint], PREFIX, retry_interval=0.2) as watch,
        ):
            # Another process given the same id overwrites the key, then stops.
            lease = await client.lease(10)
            await client.put(KEY.encode(), b"intruder", lease=lease.id)
            await watch.wait_for(lambda view: view.get(KEY) == b"intruder", timeout=5)
            await client.revoke_lease(lease.id)
            await watch.wait_for(lambda view: view.get(KEY) == b"mine", timeout=10)
    finally:
        await client.close()


async def test_the_cluster_view_tells_of_nodes_that_join_and_leave(etcd: EtcdServer) -> None:
    events: list[tuple[str, str]] = []
    view = ClusterView(
        [etcd.endpoint],
        "/pigeon/",
        on_node_left=lambda node_id: events.append(("left", node_id)),
        on_node_joined=lambda node_id: events.append(("joined", node_id)),
    )
    info = types_pb2.NodeInfo(node_id="n1", address="127.0.0.1:1")
    async with view:
        async with Registration([etcd.endpoint], "/pigeon/nodes/n1", encode(info)) as n1:
            await wait_until(lambda: events == [("joined", "n1")], 10, "n1 to join")
            info.connections = 3
            await n1.update(encode(info))  # an update is no second join
            await wait_until(lambda: view.nodes["n1"].connections == 3, 10, "the update")
        await wait_until(lambda: events == [("joined", "n1"), ("left", "n1")], 10, "n1 to leave")


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again_until_it_ends() -> None:
    # Python 3.11's asyncio.wait_for, inside aetcd's watch iterator, returns its result and drops
    # a cancellation that lands as the wait ends: a watch's task then retried for ever, and
    # leaving the watch (stopping a node, a test's clean-up) hung.
    cancels = 0

    async def swallows_one() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise

    task = asyncio.create_task(swallows_one())
    await asyncio.sleep(0)
    async with asyncio.timeout(RECANCEL_S + 5):
        await _cancel(task)
    assert task.cancelled()
    assert cancels == 2
