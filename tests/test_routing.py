"""The dispatcher's routing table, in memory."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.routing import NodeLink, Router
from pigeon.v1 import dispatcher_pb2, types_pb2

pytestmark = pytest.mark.unit


def envelope(recipient: str, origin: str = "a") -> dispatcher_pb2.Envelope:
    return dispatcher_pb2.Envelope(
        recipient=recipient, origin_node_id=origin, message=types_pb2.Message(id="m", seq=1)
    )


def report(*added: str, full: bool = False, removed: tuple[str, ...] = ()):
    return dispatcher_pb2.RoutingReport(full=full, added=list(added), removed=list(removed))


def test_routed_mode_sends_only_to_holders_and_never_back() -> None:
    router = Router("routed")
    b, c = router.attach("b"), router.attach("c")
    router.report(b, report("bob", full=True), 1)
    router.report(c, report("carol", full=True), 1)
    router.route([envelope("bob"), envelope("carol"), envelope("nobody"), envelope("bob", "b")])
    assert [e.recipient for e in b._queue] == ["bob"]
    assert [e.recipient for e in c._queue] == ["carol"]


def test_broadcast_mode_sends_everywhere_but_the_origin() -> None:
    router = Router("broadcast")
    a, b = router.attach("a"), router.attach("b")
    router.route([envelope("anyone", origin="a")])
    assert len(a._queue) == 0 and len(b._queue) == 1


def test_a_replaced_stream_leaves_no_stale_route_behind() -> None:
    router = Router("routed")
    old = router.attach("b")
    new = router.attach("b")  # the node resubscribed before the old stream ended
    router.report(old, report("bob"), 2)  # a late report on the old stream
    router.report(new, report("carol", full=True), 1)
    router.detach(new)
    router.route([envelope("bob"), envelope("carol")])  # no node holds them; nothing breaks
    assert router.routes == {}


def test_removed_users_stop_being_routed() -> None:
    router = Router("routed")
    b = router.attach("b")
    router.report(b, report("bob", "bill", full=True), 1)
    router.report(b, report(removed=("bob",)), 2)
    router.route([envelope("bob"), envelope("bill")])
    assert [e.recipient for e in b._queue] == ["bill"]
    assert b.applied_version == 2


async def take(link: NodeLink) -> dispatcher_pb2.DispatcherSubscribeResponse:
    reply = await asyncio.wait_for(link.take(), 1)
    assert reply is not None
    return reply


async def test_a_users_second_node_is_acknowledged_once_the_first_knows() -> None:
    router = Router("routed")
    a, b = router.attach("a"), router.attach("b")
    router.report(a, report("alice", "ann", full=True), 1)
    first = await take(a)
    assert first.applied_report_version == 1
    assert first.shared.full and list(first.shared.added) == []
    router.shared_applied(a, first.shared.version)

    router.report(b, report("alice", full=True), 1)
    opening = await take(b)
    assert opening.shared.full and list(opening.shared.added) == ["alice"]
    # Held: node a could still be keeping alice's messages to itself.
    assert opening.applied_report_version == 0
    told = await take(a)
    assert not told.shared.full and list(told.shared.added) == ["alice"]
    router.shared_applied(a, told.shared.version)
    assert (await take(b)).applied_report_version == 1

    router.report(b, report(removed=("alice",)), 2)
    assert list((await take(a)).shared.removed) == ["alice"]
    reply = await take(b)
    assert reply.applied_report_version == 2 and list(reply.shared.removed) == ["alice"]


async def test_held_acknowledgements_follow_report_order_and_a_leaving_node() -> None:
    router = Router("broadcast")  # the shared users are the same in both modes
    a, b = router.attach("a"), router.attach("b")
    router.report(a, report("alice", full=True), 1)
    router.shared_applied(a, (await take(a)).shared.version)
    router.report(b, report(full=True), 1)
    router.report(b, report("alice"), 2)
    router.report(b, report("bea"), 3)  # needs no one, but follows report 2
    assert b.applied_version == 1
    router.detach(a)  # gone: node a relays everything until it subscribes again
    assert b.applied_version == 3
    # Alice is b's alone now.
    assert "alice" not in b.shared


def _stalled_holder_of_alice(router: Router) -> tuple[NodeLink, NodeLink]:
    """Node a holds alice (and ann) and has stopped reading (it never applies news); node b
    reports her too, then a user of its own."""
    a, b = router.attach("a"), router.attach("b")
    router.report(a, report("alice", "ann", full=True), 1)
    router.report(b, report(full=True), 1)
    router.report(b, report("alice"), 2)
    router.report(b, report("bea"), 3)  # needs no one, but follows report 2
    assert b.applied_version == 1
    return a, b


async def test_a_stalled_holder_holds_up_reports_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("dispatcher.routing.HOLD_TIMEOUT", 0.2)
    router = Router("routed")
    _, b = _stalled_holder_of_alice(router)
    async with asyncio.timeout(5):
        while b.applied_version < 3:
            await asyncio.sleep(0.02)
    # Nothing waits any more: a later report is acknowledged at once.
    router.report(b, report("bill"), 4)
    assert b.applied_version == 4


async def test_a_holder_that_left_the_cluster_or_fell_behind_holds_up_no_report() -> None:
    router = Router("routed")
    a, b = _stalled_holder_of_alice(router)
    router.node_left("a")  # its etcd key went; its stream may look open for long yet
    assert b.applied_version == 3
    router.node_joined("a")

    router = Router("routed", queue_limit=2)
    a, b = _stalled_holder_of_alice(router)
    router.route([envelope("ann", origin="c") for _ in range(3)])  # a's queue overflows
    assert a.overflowed and "a" not in router.links and router.routes["alice"] == {"b"}
    assert b.applied_version == 3


async def test_a_departed_node_that_subscribes_again_is_waited_for_again() -> None:
    router = Router("routed")
    router.node_left("ghost")  # never subscribed here: nothing to remember
    assert router.departed == set()
    a, b = _stalled_holder_of_alice(router)
    router.node_left("a")
    assert b.applied_version == 3
    a = router.attach("a")  # back (its lease may not be renewed yet): alive all the same
    router.report(a, report("alice", full=True), 1)
    router.report(b, report("bob"), 4)  # needs no one
    router.report(b, report(removed=("alice",)), 5)
    router.report(b, report("alice"), 6)  # shared with a again: held until a knows
    assert b.applied_version == 5
