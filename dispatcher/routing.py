"""The dispatcher's core: which node holds which user, and a bounded queue per subscribed node."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

from prometheus_client import Counter, Gauge

from pigeon.v1 import dispatcher_pb2
from pigeon.wire import prefix_within

__all__ = ["NodeLink", "Router"]

SENT = Counter(
    "pigeon_dispatcher_envelopes_sent", "Envelopes queued to subscribed nodes", ["node_id"]
)
UNROUTED = Counter(
    "pigeon_dispatcher_envelopes_unrouted", "Envelopes for users no subscribed node holds"
)
OVERFLOWS = Counter(
    "pigeon_dispatcher_node_overflows", "Node streams ended because they fell behind"
)
NODES = Gauge("pigeon_dispatcher_nodes", "Nodes subscribed to this dispatcher")
ROUTED_USERS = Gauge("pigeon_dispatcher_users", "Users with at least one node in the table")


MAX_REPLY_BYTES = 1 << 20
# How long an acknowledgement of published envelopes may wait for company (seconds).
PUBLISH_ACK_DELAY = 0.01
# How long a report's acknowledgement waits for the other holders of its users (seconds): as
# long as a node waits for it (its ready timeout), so a stalled node holds nobody up for longer.
HOLD_TIMEOUT = 2.0

log = logging.getLogger("pigeon.dispatcher")


class NodeLink:
    """One node's subscribe stream: what is queued for it, flushed as one message.

    Besides envelopes it carries the node's shared users: which of its users another node holds
    too (the node keeps messages for the others off the dispatchers). A report that makes a user
    shared is acknowledged to its node only once every other holder has applied the news, so
    whatever they store after that acknowledgement is relayed.
    """

    def __init__(self, node_id: str, limit: int) -> None:
        self.node_id = node_id
        self.limit = limit
        self._sent = SENT.labels(node_id)
        self.users: set[str] = set()
        self.applied_version = 0
        # The publish_seq of the node's last envelopes on this stream that are routed.
        self.published_seq = 0
        self._sent_published_seq = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self.overflowed = False
        self._queue: list[dispatcher_pb2.Envelope] = []
        self._ack_pending = False
        self._wake = asyncio.Event()
        self.closed = False
        # The node's shared users, each with the version of the message that tells (or told)
        # the node; the changes not sent yet; the last version sent and the last applied.
        self.shared: dict[str, int] = {}
        self._shared_full = True
        self._shared_added: set[str] = set()
        self._shared_removed: set[str] = set()
        self.shared_version = 0
        self.applied_shared_version = 0
        # Report acknowledgements held back: (report version, {other holder: shared version},
        # when to stop waiting).
        self.held: list[tuple[int, dict[NodeLink, int], float]] = []

    def put(self, envelope: dispatcher_pb2.Envelope) -> None:
        if self.overflowed or self.closed:
            return
        self._queue.append(envelope)
        if len(self._queue) > self.limit:
            # The node resubscribes; its users recover anything missed from the store.
            self.overflowed = True
            self._queue.clear()
            OVERFLOWS.inc()
        self._sent.inc()
        self._wake.set()

    @property
    def gone(self) -> bool:
        """Whether nothing more reaches the node on this stream."""
        return self.closed or self.overflowed

    def acknowledge(self, version: int) -> None:
        self.applied_version = version
        self._ack_pending = True
        self._wake.set()

    def acknowledge_published(self, seq: int) -> None:
        # Not urgent (the node keeps a window of batches in flight): it goes with the next
        # message to the node, or alone after a short while, so steady traffic costs the node
        # no extra message per batch.
        self.published_seq = seq
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                PUBLISH_ACK_DELAY, self._publish_ack_due
            )

    def _publish_ack_due(self) -> None:
        self._ack_timer = None
        if self._sent_published_seq < self.published_seq:
            self._ack_pending = True
            self._wake.set()

    def share(self, user: str) -> int:
        """Tell the node another node holds user too; returns the version that says so."""
        version = self.shared.get(user)
        if version is None:
            # Goes out with the next message that carries shared users.
            version = self.shared[user] = self.shared_version + 1
            self._shared_removed.discard(user)
            self._shared_added.add(user)
            self._wake.set()
        return version

    def unshare(self, user: str) -> None:
        """Tell the node no other node holds user now."""
        if self.shared.pop(user, None) is not None:
            self._shared_added.discard(user)
            self._shared_removed.add(user)
            self._wake.set()

    def _has_shared_news(self) -> bool:
        return bool(self._shared_added or self._shared_removed)

    def close(self) -> None:
        self.closed = True
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._wake.set()

    async def take(self) -> dispatcher_pb2.DispatcherSubscribeResponse | None:
        """The next message for the node, or None when the stream should end."""
        while not (
            self._queue
            or self._ack_pending
            or self._shared_full
            or self._has_shared_news()
            or self.overflowed
            or self.closed
        ):
            self._wake.clear()
            await self._wake.wait()
        if self.overflowed or self.closed:
            return None
        # One message of at most MAX_REPLY_BYTES (gRPC refuses over 4 MB by default); the rest
        # goes in the next one.
        envelopes = prefix_within(self._queue, MAX_REPLY_BYTES)
        reply = dispatcher_pb2.DispatcherSubscribeResponse(
            envelopes=envelopes,
            applied_report_version=self.applied_version,
            published_seq=self.published_seq,
        )
        self._sent_published_seq = self.published_seq
        del self._queue[: len(envelopes)]
        self._ack_pending = False
        if self._shared_full or self._has_shared_news():
            self.shared_version += 1
            reply.shared.version = self.shared_version
            if self._shared_full:
                # The stream's first message.
                reply.publish_on_stream = True
                self._shared_full = False
                reply.shared.full = True
                reply.shared.added.extend(self.shared)
            else:
                reply.shared.added.extend(self._shared_added)
                reply.shared.removed.extend(self._shared_removed)
            self._shared_added.clear()
            self._shared_removed.clear()
        return reply


class Router:
    """Routes envelopes to the nodes that need them.

    In routed mode (the default) an envelope goes only to the nodes whose reports say they hold
    its recipient; in broadcast mode (the original design) to every subscribed node, which drops
    what it does not hold. Broadcast messages go to every node in both modes. Never back to the
    node the envelope came from.
    """

    # What attach makes for each subscribed node.
    link_type: type[NodeLink] = NodeLink

    def __init__(self, mode: str = "routed", queue_limit: int = 10000) -> None:
        if mode not in ("routed", "broadcast"):
            raise ValueError(f"routing mode must be routed or broadcast, not {mode!r}")
        self.mode = mode
        self.queue_limit = queue_limit
        self.links: dict[str, NodeLink] = {}
        self.routes: dict[str, set[str]] = {}
        # Nodes whose etcd key went and has not come back.
        self.departed: set[str] = set()

    def attach(self, node_id: str) -> NodeLink:
        """A node subscribed; a newer stream from the same node replaces the older one."""
        old = self.links.get(node_id)
        if old is not None:
            self.detach(old)
        link = self.link_type(node_id, self.queue_limit)
        self.links[node_id] = link
        self.departed.discard(node_id)  # subscribing, it is alive (a lease may lag behind)
        NODES.set(len(self.links))
        return link

    def detach(self, link: NodeLink) -> None:
        link.close()
        if self.links.get(link.node_id) is not link:
            return
        # Node ids are made anew at each start unless configured: keep no series for old ones.
        SENT.remove(link.node_id)
        self.departed.discard(link.node_id)
        del self.links[link.node_id]
        self._forget(link, link.users)
        link.users.clear()
        link.held.clear()
        NODES.set(len(self.links))
        # Acknowledgements waiting for this node's word need it no more: the node relays
        # everything until a new stream tells it what is shared.
        self._release_held()

    def report(self, link: NodeLink, report: dispatcher_pb2.RoutingReport, version: int) -> None:
        """Apply a node's report of the users it holds."""
        if link.closed:
            return  # a late report on a stream that a newer one replaced
        if report.full:
            self._forget(link, link.users - set(report.added))
            link.users = set()
        else:
            removed = set(report.removed)
            self._forget(link, removed & link.users)
            link.users -= removed
        waits: dict[NodeLink, int] = {}
        for user in report.added:
            link.users.add(user)
            holders = self.routes.setdefault(user, set())
            holders.add(link.node_id)
            if len(holders) > 1:
                link.share(user)
                for node_id in holders:
                    other = self.links.get(node_id)
                    if other is not None and other is not link:
                        waits[other] = max(waits.get(other, 0), other.share(user))
        ROUTED_USERS.set(len(self.routes))
        if waits or link.held:
            loop = asyncio.get_running_loop()
            link.held.append((version, waits, loop.time() + HOLD_TIMEOUT))
            loop.call_later(HOLD_TIMEOUT, self._release, link)
            self._release(link)
        else:
            link.acknowledge(version)

    def shared_applied(self, link: NodeLink, version: int) -> None:
        """The node applied the shared-user changes up to version."""
        if version > link.applied_shared_version:
            link.applied_shared_version = version
            self._release_held()

    def _release_held(self) -> None:
        for link in list(self.links.values()):
            if link.held:
                self._release(link)

    def _release(self, link: NodeLink) -> None:
        """Acknowledge, in order, the reports whose other holders have all caught up, or that
        waited for them long enough."""
        now = asyncio.get_running_loop().time()
        while link.held:
            version, waits, until = link.held[0]
            behind = [
                other
                for other, needed in waits.items()
                if not other.gone
                and other.node_id not in self.departed
                and other.applied_shared_version < needed
            ]
            if behind and now < until:
                return
            if behind:
                log.warning(
                    "node %s did not confirm in %.0f s that it shares users with node %s; "
                    "acknowledging %s's report without it",
                    ", ".join(sorted(other.node_id for other in behind)),
                    HOLD_TIMEOUT,
                    link.node_id,
                    link.node_id,
                )
            link.held.pop(0)
            link.acknowledge(version)

    def _forget(self, link: NodeLink, users: Iterable[str]) -> None:
        for user in users:
            link.unshare(user)
            holders = self.routes.get(user)
            if holders is not None:
                holders.discard(link.node_id)
                if not holders:
                    del self.routes[user]
                elif len(holders) == 1:
                    (last,) = holders
                    other = self.links.get(last)
                    if other is not None:
                        other.unshare(user)
        ROUTED_USERS.set(len(self.routes))

    def route(self, envelopes: Sequence[dispatcher_pb2.Envelope]) -> None:
        links = self.links
        for envelope in envelopes:
            origin = envelope.origin_node_id
            if envelope.broadcast or self.mode == "broadcast":
                for node_id, link in list(links.items()):
                    if node_id != origin:
                        link.put(envelope)
                        if link.overflowed:
                            self._fell_behind(link)
                continue
            holders = self.routes.get(envelope.recipient)
            if not holders:
                UNROUTED.inc()
                continue
            # A copy: a holder that falls behind leaves the table during the loop.
            for node_id in tuple(holders):
                holder = links.get(node_id)
                if holder is not None and node_id != origin:
                    holder.put(envelope)
                    if holder.overflowed:
                        self._fell_behind(holder)

    def _fell_behind(self, link: NodeLink) -> None:
        """A node's queue overflowed: it is routed to no more, and holds up no other node's
        report, from now on. Its stream ends when its writer next looks, which may be much
        later: it waits on the node to read (gRPC cannot end a stream from outside meanwhile)."""
        self.detach(link)

    def node_left(self, node_id: str) -> None:
        """The node's etcd key went (it stopped, or its lease ran out: frozen, cut off). Its
        stream may look open for a while yet; reports of other nodes wait for it no more."""
        if node_id in self.links:
            self.departed.add(node_id)
            self._release_held()

    def node_joined(self, node_id: str) -> None:
        self.departed.discard(node_id)
