"""The dispatcher's routing table, in memory."""

from __future__ import annotations

import pytest

from dispatcher.routing import Router
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
