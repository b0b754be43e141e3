"""A node's relay against real dispatchers over gRPC, in one process: which of its users a node
keeps off the dispatchers, publishing on the Subscribe stream with failover, and what a node's
streams do when a dispatcher's stream ends."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from prometheus_client import REGISTRY

from dispatcher.routing import NodeLink, Router
from dispatcher.servicer import DispatcherServicer
from node.core import NodeCore
from node.relay import DispatcherRelay
from node.store.sqlite import SqliteStore
from node.validate import Outgoing
from pigeon.etcd_server import EtcdServer, free_port
from pigeon.local import ServiceProcess
from pigeon.v1 import dispatcher_pb2, dispatcher_pb2_grpc, node_pb2, types_pb2
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


class Node:
    """The relay side of one node, with the users it holds."""

    def __init__(
        self,
        node_id: str,
        view: dict[str, types_pb2.DispatcherInfo],
        publish_timeout: float = 1.0,
    ) -> None:
        self.users: set[str] = set()
        self.got: list[str] = []
        self.relay = DispatcherRelay(
            node_id=node_id,
            cluster_secret="secret",
            dispatchers=lambda: view,
            users=lambda: self.users,
            deliver=lambda envelopes: self.got.extend(e.message.id for e in envelopes),
            report_interval=0.01,
            publish_timeout=publish_timeout,
            check_interval=0.05,
            # Long enough never to run out here: routes_ready returns on the acknowledgement.
            ready_timeout=30,
        )

    def add(self, user: str) -> None:
        self.users.add(user)
        self.relay.user_added(user)

    def remove(self, user: str) -> None:
        self.users.discard(user)
        self.relay.user_removed(user)


@pytest.fixture
async def dispatcher() -> AsyncIterator[
    tuple[grpc.aio.Server, dict[str, types_pb2.DispatcherInfo]]
]:
    server = grpc.aio.server()
    dispatcher_pb2_grpc.add_DispatcherServicer_to_server(DispatcherServicer(Router()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    view = {"d1": types_pb2.DispatcherInfo(dispatcher_id="d1", address=f"127.0.0.1:{port}")}
    try:
        yield server, view
    finally:
        await server.stop(None)


async def test_a_user_is_kept_local_until_another_node_holds_it(
    dispatcher: tuple[grpc.aio.Server, dict[str, types_pb2.DispatcherInfo]],
) -> None:
    server, view = dispatcher
    a, b = Node("a", view), Node("b", view)
    async with a.relay, b.relay:
        assert await a.relay.wait_connected(5)
        assert await b.relay.wait_connected(5)
        await wait_until(
            lambda: not a.relay.elsewhere("nobody-yet"), 5, "a to learn what is shared"
        )

        a.add("una")
        # Until the dispatcher has applied the report that adds her, another node may hold her.
        assert a.relay.elsewhere("una")
        await a.relay.routes_ready()
        assert not a.relay.elsewhere("una")

        b.add("una")
        await b.relay.routes_ready()
        # b's routes are in force only once a has been told: a relays her messages from now on.
        assert a.relay.elsewhere("una")
        assert b.relay.elsewhere("una")

        b.remove("una")
        await wait_until(lambda: not a.relay.elsewhere("una"), 5, "una to be a's alone")

        # With the dispatcher gone nobody can say who else holds her.
        await server.stop(None)
        await wait_until(lambda: a.relay.elsewhere("una"), 5, "a to notice the dispatcher left")


async def test_a_node_that_subscribes_later_learns_which_users_are_shared(
    dispatcher: tuple[grpc.aio.Server, dict[str, types_pb2.DispatcherInfo]],
) -> None:
    _, view = dispatcher
    a, b = Node("a", view), Node("b", view)
    a.add("ola")
    a.add("ben")
    async with a.relay:
        assert await a.relay.wait_connected(5)
        await a.relay.routes_ready()
        assert not a.relay.elsewhere("ola")
        b.add("ola")  # held by b before b subscribes: its opening report says so
        async with b.relay:
            assert await b.relay.wait_connected(5)
            await b.relay.routes_ready()
            assert a.relay.elsewhere("ola") and not a.relay.elsewhere("ben")
            await wait_until(
                lambda: b.relay.elsewhere("ola") and not b.relay.elsewhere("zed"),
                5,
                "b to learn what is shared",
            )
        # b's stream ended: ola is a's alone again.
        await wait_until(lambda: not a.relay.elsewhere("ola"), 5, "ola to be a's alone")


# --- publishing ---------------------------------------------------------------------------


class _Silent(NodeLink):
    """A dispatcher that takes envelopes on the stream and then hangs: never routes or
    acknowledges them."""

    def acknowledge_published(self, seq: int) -> None:
        pass


class _LosingRouter(Router):
    """A dispatcher that takes and acknowledges envelopes and routes none of them, as one that
    dies right after acknowledging."""

    def __init__(self) -> None:
        super().__init__()
        self.taken = 0

    def route(self, envelopes: Sequence[dispatcher_pb2.Envelope]) -> None:
        self.taken += len(envelopes)


class _SilentRouter(_LosingRouter):
    link_type = _Silent


@asynccontextmanager
async def _serving(
    routers: dict[str, Router],
) -> AsyncIterator[tuple[dict[str, grpc.aio.Server], dict[str, types_pb2.DispatcherInfo]]]:
    servers: dict[str, grpc.aio.Server] = {}
    view: dict[str, types_pb2.DispatcherInfo] = {}
    try:
        for dispatcher_id, router in routers.items():
            server = servers[dispatcher_id] = grpc.aio.server()
            dispatcher_pb2_grpc.add_DispatcherServicer_to_server(DispatcherServicer(router), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            view[dispatcher_id] = types_pb2.DispatcherInfo(
                dispatcher_id=dispatcher_id, address=f"127.0.0.1:{port}"
            )
        yield servers, view
    finally:
        for server in servers.values():
            await server.stop(None)


def _received(via: str) -> float:
    value = REGISTRY.get_sample_value("pigeon_dispatcher_envelopes_received_total", {"via": via})
    return value or 0.0


def _failures(dispatcher_id: str) -> float:
    value = REGISTRY.get_sample_value(
        "pigeon_node_publish_failures_total", {"dispatcher_id": dispatcher_id}
    )
    return value or 0.0


def _published() -> float:
    return REGISTRY.get_sample_value("pigeon_node_envelopes_published_total") or 0.0


def _envelopes(prefix: str, count: int, to: str) -> list[dispatcher_pb2.Envelope]:
    return [
        dispatcher_pb2.Envelope(
            recipient=to, origin_node_id="a", message=types_pb2.Message(id=f"{prefix}{i}")
        )
        for i in range(count)
    ]


def _preferred(node_id: str, dispatcher_ids: list[str]) -> str:
    """The dispatcher node_id publishes to first (the relay spreads nodes by this hash)."""
    return max(
        dispatcher_ids,
        key=lambda d: hashlib.blake2b(f"{node_id}\x00{d}".encode(), digest_size=8).digest(),
    )


async def _two_nodes_connected(a: Node, b: Node) -> None:
    for node in (a, b):
        assert await node.relay.wait_connected(5)
    await b.relay.routes_ready()


async def test_envelopes_go_on_the_stream_and_arrive_once_in_order() -> None:
    async with _serving({"d1": Router(), "d2": Router()}) as (_, view):
        a, b = Node("a", view), Node("b", view)
        b.add("ria")
        async with a.relay, b.relay:
            await _two_nodes_connected(a, b)
            by_stream, by_call = _received("stream"), _received("call")
            sent = _envelopes("m", 60, "ria")
            for i in range(0, 60, 6):
                a.relay.relay(sent[i : i + 6])
            expected = [e.message.id for e in sent]
            await wait_until(lambda: len(b.got) >= 60, 5, "b to get the 60 envelopes")
            assert b.got == expected
            assert _received("stream") - by_stream == 60
            assert _received("call") == by_call


async def test_a_dispatcher_that_never_acknowledges_is_left_within_the_publish_timeout() -> None:
    silent = _preferred("a", ["d1", "d2"])
    other = "d2" if silent == "d1" else "d1"
    hung = _SilentRouter()
    async with _serving({silent: hung, other: Router()}) as (_, view):
        a, b = Node("a", view, publish_timeout=0.5), Node("b", view)
        b.add("ria")
        async with a.relay, b.relay:
            await _two_nodes_connected(a, b)
            failures = _failures(silent)
            a.relay.relay(_envelopes("s", 5, "ria"))
            # The silent one swallows them; after 0.5 s they go to the other dispatcher.
            await wait_until(lambda: len(b.got) >= 5, 5, "the envelopes to go round")
            assert b.got == [f"s{i}" for i in range(5)]
            assert _failures(silent) - failures >= 1
            assert hung.taken == 5
            # Later envelopes go to the dispatcher that answers, not to the silent one again.
            a.relay.relay(_envelopes("t", 5, "ria"))
            await wait_until(lambda: len(b.got) >= 10, 5, "the next envelopes")
            assert b.got[5:] == [f"t{i}" for i in range(5)]
            assert hung.taken == 5


@asynccontextmanager
async def _dispatcher_process(
    etcd: EtcdServer, tmp_path: Path
) -> AsyncIterator[dict[str, types_pb2.DispatcherInfo]]:
    """A real dispatcher (`python -m dispatcher`), in a process of its own so that only the
    node's event loop is kept busy."""
    port, http_port = free_port(), free_port()
    dispatcher = ServiceProcess(
        name="d1",
        module="dispatcher",
        env={
            "PATH": "/usr/bin",
            "PIGEON_DISPATCHER_ID": "d1",
            "PIGEON_CLUSTER_SECRET": "secret",
            "PIGEON_ETCD_ENDPOINTS": etcd.endpoint,
            "PIGEON_PORT": str(port),
            "PIGEON_HTTP_PORT": str(http_port),
            "PIGEON_METRICS_ADDRESS": "127.0.0.1:0",
        },
        port=port,
        http_port=http_port,
        log_path=tmp_path / "d1.log",
    )
    dispatcher.start()
    try:
        await asyncio.to_thread(dispatcher.wait_healthy, 30)
        yield {"d1": types_pb2.DispatcherInfo(dispatcher_id="d1", address=dispatcher.address)}
    finally:
        await asyncio.to_thread(dispatcher.stop)


async def test_a_node_too_busy_to_read_acknowledgements_in_time_keeps_its_dispatcher(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # A broadcast to 10,000 local streams keeps the node's loop busy for a second or two, and
    # the acknowledgement of its relay waits in the loop's queue meanwhile: the node took that
    # for a silent dispatcher, resubscribed, and made all its streams read the store.
    async with _dispatcher_process(etcd, tmp_path) as view:
        a, b = Node("a", view), Node("b", view)  # the default publish timeout, 1 s
        b.add("ria")
        async with a.relay, b.relay:
            await _two_nodes_connected(a, b)
            failures = _failures("d1")
            loop = asyncio.get_running_loop()
            busy_until = loop.time() + 6

            def work() -> None:  # 12 ms of a writer's work, queued again until busy_until
                started = time.perf_counter()
                while time.perf_counter() - started < 0.012:
                    pass
                if loop.time() < busy_until:
                    loop.call_soon(work)

            published = _published()
            for _ in range(100):
                loop.call_soon(work)
            # Four publishes in the busy spell: each was a false failover, or very nearly.
            for round_ in range(4):
                envelopes = _envelopes(f"r{round_}-", 5, "ria")
                loop.call_later(1.2 * round_, a.relay.relay, envelopes)
            # Each acknowledgement is read through a queue that takes 1.2 s a pass.
            await wait_until(lambda: _published() - published >= 20, 20, "the acknowledgements")
            await wait_until(lambda: len(b.got) >= 20, 10, "the envelopes to arrive")
            assert b.got == [f"r{r}-{i}" for r in range(4) for i in range(5)]
            assert _failures("d1") == failures


async def test_after_a_dispatcher_stops_envelopes_go_to_the_other() -> None:
    first = _preferred("a", ["d1", "d2"])
    async with _serving({"d1": Router(), "d2": Router()}) as (servers, view):
        a, b = Node("a", view), Node("b", view)
        b.add("ria")
        async with a.relay, b.relay:
            await _two_nodes_connected(a, b)
            a.relay.relay(_envelopes("x", 3, "ria"))
            await wait_until(lambda: len(b.got) >= 3, 5, "the first envelopes")
            await servers[first].stop(None)
            # a's stream to it ends; the next envelopes take the other dispatcher's stream.
            a.relay.relay(_envelopes("y", 3, "ria"))
            await wait_until(
                lambda: {"y0", "y1", "y2"} <= set(b.got), 5, "the envelopes after the stop"
            )
            assert b.got[:3] == ["x0", "x1", "x2"]


async def _two_cores(
    stack: contextlib.AsyncExitStack,
    path: Path,
    view: dict[str, types_pb2.DispatcherInfo],
    a_view: dict[str, types_pb2.DispatcherInfo] | None = None,
) -> list[NodeCore]:
    """Nodes a and b on one SQLite file, relaying through the dispatchers of view (a through
    those of a_view, if given)."""
    return [
        await _core(stack, path, "a", view if a_view is None else a_view),
        await _core(stack, path, "b", view),
    ]


async def _core(
    stack: contextlib.AsyncExitStack,
    path: Path,
    node_id: str,
    view: dict[str, types_pb2.DispatcherInfo],
    *,
    connected: bool = True,
) -> NodeCore:
    """A node core on the SQLite file at path, relaying through the dispatchers of view (once
    its streams to them are answered, if connected)."""
    store = SqliteStore(str(path))
    await store.open()
    stack.push_async_callback(store.close)
    core = await stack.enter_async_context(NodeCore(store, node_id=node_id))
    core.relay = await stack.enter_async_context(
        DispatcherRelay(
            node_id=node_id,
            cluster_secret="secret",
            dispatchers=lambda: view,
            users=core.pool.users,
            deliver=core.receive,
            resync=core.resync,
            report_interval=0.01,
            check_interval=0.05,
        )
    )
    if connected:
        assert await core.relay.wait_connected(5)
    return core


async def _listening(
    stack: contextlib.AsyncExitStack, core: NodeCore, user: str
) -> list[node_pb2.SubscribeResponse]:
    """A stream of user's on core, live (no replay), once the dispatchers route to it."""
    events: list[node_pb2.SubscribeResponse] = []

    async def read() -> None:
        async for event in core.subscribe(user, None, None):
            events.append(event)

    reader = asyncio.create_task(read())
    stack.push_async_callback(_cancelled, reader)
    await wait_until(lambda: any(e.HasField("replay_done") for e in events), 5, "the replay")
    await core.relay.routes_ready()
    return events


async def test_what_a_dispatcher_acknowledged_and_lost_reaches_the_user_when_its_stream_ends(
    tmp_path: Path,
) -> None:
    losing = _LosingRouter()
    async with contextlib.AsyncExitStack() as stack, _serving({"d1": losing}) as (servers, view):
        a, b = await _two_cores(stack, tmp_path / "pigeon.db", view)
        events = await _listening(stack, b, "ria")
        [stored] = await a.send(
            "alice", [Outgoing(to=("ria",), title="", body="lost on the way", metadata={})]
        )
        await wait_until(lambda: losing.taken == 1, 5, "the dispatcher to take the envelope")
        await asyncio.sleep(0.2)
        assert not [m for e in events for m in e.messages]  # lost, not late
        # No later message will show ria's stream the gap: the stream's end must.
        await servers["d1"].stop(None)
        await wait_until(
            lambda: [m.id for e in events for m in e.messages] == [stored.id],
            5,
            "the stored message to reach ria's stream",
        )


async def test_a_node_stream_that_overflows_is_ended_and_its_users_lose_nothing(
    tmp_path: Path,
) -> None:
    # Five envelopes at most queued for a node: one Send of 40 to ria overflows b's queue at once.
    router = Router(queue_limit=5)
    overflows = REGISTRY.get_sample_value("pigeon_dispatcher_node_overflows_total") or 0.0
    async with contextlib.AsyncExitStack() as stack, _serving({"d1": router}) as (_, view):
        a, b = await _two_cores(stack, tmp_path / "pigeon.db", view)
        events = await _listening(stack, b, "ria")
        sent = await a.send(
            "alice",
            [Outgoing(to=("ria",), title="", body=f"m{i}", metadata={}) for i in range(40)],
        )
        await wait_until(
            lambda: len([m for e in events for m in e.messages]) >= 40,
            10,
            "every message to reach ria's stream",
        )
        assert REGISTRY.get_sample_value("pigeon_dispatcher_node_overflows_total") == overflows + 1
        # b resubscribed, and ria's stream filled what the ended stream dropped from the store:
        # every message once, in seq order.
        got = [m for e in events for m in e.messages]
        assert [m.id for m in got] == [s.id for s in sent]
        assert [m.seq for m in got] == list(range(1, 41))
        assert await b.relay.wait_connected(5)  # subscribed again


async def test_what_a_node_dropped_with_no_dispatcher_reaches_the_user_once_one_is_back(
    tmp_path: Path,
) -> None:
    def dropped() -> float:
        return REGISTRY.get_sample_value("pigeon_node_envelopes_dropped_total") or 0.0

    async with contextlib.AsyncExitStack() as stack, _serving({"d1": Router()}) as (_, view):
        seen_by_a: dict[str, types_pb2.DispatcherInfo] = {}  # a sees no dispatcher yet
        a, b = await _two_cores(stack, tmp_path / "pigeon.db", view, a_view=seen_by_a)
        events = await _listening(stack, b, "ria")
        before = dropped()
        [stored] = await a.send(
            "alice", [Outgoing(to=("ria",), title="", body="no dispatcher", metadata={})]
        )
        assert dropped() == before + 1
        await asyncio.sleep(0.2)
        assert not [m for e in events for m in e.messages]
        # b's own dispatcher stream never broke, so only a can tell it.
        seen_by_a.update(view)
        await wait_until(
            lambda: [m.id for e in events for m in e.messages] == [stored.id],
            5,
            "the stored message to reach ria's stream",
        )


async def test_a_dropped_broadcast_or_too_many_dropped_users_make_every_stream_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("node.relay.HINT_LIMIT", 1)
    async with contextlib.AsyncExitStack() as stack, _serving({"d1": Router()}) as (_, view):
        seen_by_a: dict[str, types_pb2.DispatcherInfo] = {}
        a, b = await _two_cores(stack, tmp_path / "pigeon.db", view, a_view=seen_by_a)
        ria, sam = await _listening(stack, b, "ria"), await _listening(stack, b, "sam")
        # Two users' envelopes dropped, one more than a remembers by name.
        sent = await a.send(
            "alice",
            [
                Outgoing(to=(user,), title="", body="dropped", metadata={})
                for user in ("ria", "sam")
            ],
        )
        [news] = await a.publish(
            [Outgoing(to=(), title="", body="to all", metadata={}, broadcast=True)]
        )
        seen_by_a.update(view)
        for events, stored in ((ria, sent[0]), (sam, sent[1])):
            await wait_until(
                lambda events=events, stored=stored: (
                    {m.id for e in events for m in e.messages} == {stored.id, news.id}
                ),
                5,
                "the dropped message and broadcast to reach the stream",
            )


async def test_a_broadcast_dropped_ahead_of_other_envelopes_still_makes_every_stream_check(
    tmp_path: Path,
) -> None:
    async with contextlib.AsyncExitStack() as stack, _serving({"d1": Router()}) as (_, view):
        seen_by_a: dict[str, types_pb2.DispatcherInfo] = {}
        a, b = await _two_cores(stack, tmp_path / "pigeon.db", view, a_view=seen_by_a)
        ria, sam = await _listening(stack, b, "ria"), await _listening(stack, b, "sam")
        # One write, so one drop: the broadcast first, then a message to ria.
        news, to_ria = await a.publish(
            [
                Outgoing(to=(), title="", body="to all", metadata={}, broadcast=True),
                Outgoing(to=("ria",), title="", body="to ria", metadata={}),
            ]
        )
        await asyncio.sleep(0.2)
        assert not [m for e in (*ria, *sam) for m in e.messages]
        seen_by_a.update(view)
        for events, expected in ((ria, {news.id, to_ria.id}), (sam, {news.id})):
            await wait_until(
                lambda events=events, expected=expected: (
                    {m.id for e in events for m in e.messages} == expected
                ),
                5,
                "the dropped broadcast and message to reach the streams",
            )


async def test_a_count_relayed_with_a_broadcast_of_the_same_write_is_taken_once(
    tmp_path: Path,
) -> None:
    async with contextlib.AsyncExitStack() as stack, _serving({"d1": Router()}) as (_, view):
        a, b = await _two_cores(stack, tmp_path / "pigeon.db", view)
        events = await _listening(stack, b, "ria")
        # One write on a: ria's message (with her count, which includes the broadcast), then
        # the broadcast.
        await a.publish(
            [
                Outgoing(to=("ria",), title="", body="for ria", metadata={}),
                Outgoing(to=(), title="", body="to all", metadata={}, broadcast=True),
            ]
        )
        # Each message and the count that goes with it come in one event.
        await wait_until(
            lambda: len([m for e in events for m in e.messages]) == 2, 5, "both messages"
        )
        counts = [e.unread_count for e in events if e.HasField("unread_count")]
        assert counts[-1] == await b.store.unread_count("ria") == 2


async def test_a_dispatcher_that_leaves_leaves_no_task_behind() -> None:
    async with _serving({"d1": Router(), "d2": Router()}) as (servers, view):
        a_view = {"d1": view["d1"]}
        a = Node("a", a_view)
        async with a.relay:
            assert await a.relay.wait_connected(5)
            before = asyncio.all_tasks()
            a_view["d2"] = view["d2"]
            assert await a.relay.wait_connected(5)
            assert asyncio.all_tasks() - before
            await servers["d2"].stop(None)
            del a_view["d2"]
            # Its stream, the stream's request generator and gRPC's reader of it all end.
            await wait_until(lambda: not asyncio.all_tasks() - before, 5, "d2's tasks to end")


class _HeldFirstReply(NodeLink):
    opened: asyncio.Event | None = None

    async def take(self) -> dispatcher_pb2.DispatcherSubscribeResponse | None:
        if self.opened is not None:
            await self.opened.wait()
            self.opened = None
        return await super().take()


class _LateToB(Router):
    """Node b's stream gets no reply until `opened` is set, and b's reports after the opening
    one are applied a second late (a busy dispatcher)."""

    link_type = _HeldFirstReply

    def __init__(self) -> None:
        super().__init__()
        self.opened = asyncio.Event()

    def attach(self, node_id: str) -> NodeLink:
        link = super().attach(node_id)
        if node_id == "b":
            link.opened = self.opened  # type: ignore[attr-defined]
        return link

    def report(self, link: NodeLink, report: dispatcher_pb2.RoutingReport, version: int) -> None:
        if link.node_id == "b" and not report.full:
            asyncio.get_running_loop().call_later(1.0, super().report, link, report, version)
        else:
            super().report(link, report, version)


async def test_a_user_who_comes_while_a_dispatcher_stream_opens_misses_nothing(
    tmp_path: Path,
) -> None:
    router = _LateToB()
    async with contextlib.AsyncExitStack() as stack, _serving({"d1": router}) as (_, view):
        a = await _core(stack, tmp_path / "pigeon.db", "a", view)
        b = await _core(stack, tmp_path / "pigeon.db", "b", view, connected=False)
        await wait_until(lambda: "b" in router.links, 5, "b's opening report (without ria)")
        # ria comes while b's stream is unanswered: nothing to wait for, her stream starts.
        events = await _listening(stack, b, "ria")
        router.opened.set()
        assert await b.relay.wait_connected(5)
        # The dispatcher has not applied the report that adds ria yet: a's message for her
        # finds no route. It is stored, and her stream must still get it.
        [stored] = await a.send(
            "alice", [Outgoing(to=("ria",), title="", body="early", metadata={})]
        )
        await wait_until(
            lambda: [m.id for e in events for m in e.messages] == [stored.id],
            5,
            "the message to reach ria's stream",
        )


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class _Refusing(dispatcher_pb2_grpc.DispatcherServicer):
    """A dispatcher that refuses this node (another cluster secret, say)."""

    def __init__(self) -> None:
        self.subscribes = 0

    async def Subscribe(self, request_iterator: Any, context: Any) -> Any:
        self.subscribes += 1
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid cluster secret")


async def test_a_dispatcher_that_refuses_the_node_is_retried_with_backoff_not_in_a_loop() -> None:
    refusing = _Refusing()
    server = grpc.aio.server()
    dispatcher_pb2_grpc.add_DispatcherServicer_to_server(refusing, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    view = {"d1": types_pb2.DispatcherInfo(dispatcher_id="d1", address=f"127.0.0.1:{port}")}
    dropped = REGISTRY.get_sample_value("pigeon_node_envelopes_dropped_total") or 0.0
    try:
        node = Node("a", view)
        async with node.relay:
            node.relay.relay(_envelopes("r", 3, "ria"))
            # A refused stream is tried again further and further apart, not back to back.
            await asyncio.sleep(2)
    finally:
        await server.stop(None)
    assert 1 <= refusing.subscribes <= 10
    # The three messages count as dropped; the hints that followed them carry none.
    assert REGISTRY.get_sample_value("pigeon_node_envelopes_dropped_total") == dropped + 3


async def test_a_node_with_more_user_ids_than_one_message_holds_subscribes(
    dispatcher: tuple[grpc.aio.Server, dict[str, types_pb2.DispatcherInfo]],
) -> None:
    _, view = dispatcher
    a, b = Node("a", view), Node("b", view)
    # 36,000 ids of 128 characters: 4.7 MB, over gRPC's 4 MB for one message.
    a.users.update(f"{i:0128d}" for i in range(36_000))
    async with a.relay, b.relay:
        await _two_nodes_connected(a, b)
        await a.relay.routes_ready()
        # b's envelopes reach a user of a's last part.
        envelopes = _envelopes("p", 2, f"{35_999:0128d}")
        for envelope in envelopes:
            envelope.origin_node_id = "b"
        b.relay.relay(envelopes)
        await wait_until(lambda: a.got == ["p0", "p1"], 10, "the envelopes")
        # And the parts' users count as held by a alone once the dispatcher has them all.
        assert a.relay.elsewhere(f"{35_999:0128d}") is False


async def test_a_stream_of_a_user_among_many_new_ones_waits_for_the_report_carrying_it() -> None:
    router = Router()
    async with _serving({"d1": router}) as (_, view):
        a, b = Node("a", view), Node("b", view)
        async with a.relay, b.relay:
            await _two_nodes_connected(a, b)
            # 20,000 users of 128 characters at once (a reconnect storm): several reports.
            users = [f"{i:0128d}" for i in range(20_000)]
            for user in users:
                a.add(user)
            await a.relay.routes_ready(users[-1])
            assert router.routes.get(users[-1]) == {"a"}
            await a.relay.routes_ready()
            assert all(router.routes.get(user) == {"a"} for user in users)
