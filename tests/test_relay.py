"""A node's relay against a real dispatcher over gRPC, in one process: which of its users a node
keeps off the dispatchers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
import pytest

from dispatcher.routing import Router
from dispatcher.servicer import DispatcherServicer
from node.relay import DispatcherRelay
from pigeon.v1 import dispatcher_pb2_grpc, types_pb2
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


class Node:
    """The relay side of one node, with the users it holds."""

    def __init__(self, node_id: str, view: dict[str, types_pb2.DispatcherInfo]) -> None:
        self.users: set[str] = set()
        self.relay = DispatcherRelay(
            node_id=node_id,
            cluster_secret="secret",
            dispatchers=lambda: view,
            users=lambda: self.users,
            deliver=lambda envelopes: None,
            report_interval=0.01,
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
