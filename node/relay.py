"""The node's side of the dispatcher layer: one Subscribe stream to every dispatcher in etcd
(routing reports out, envelopes in) and batched publishing to one of them, with failover.

Publishing goes on the Subscribe stream of the chosen dispatcher (numbered batches, acknowledged
once routed; unacknowledged ones go to another dispatcher when the stream ends or stays silent
too long)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType

import grpc
import grpc.aio
from prometheus_client import Counter

from node.convert import resync_envelope
from pigeon.runtime import cancel_and_wait
from pigeon.service import ChannelCache
from pigeon.v1 import dispatcher_pb2, dispatcher_pb2_grpc, types_pb2
from pigeon.wire import prefix_within

__all__ = ["DispatcherRelay", "RelayRefusedError"]

log = logging.getLogger("pigeon.node.relay")

RECEIVED = Counter("pigeon_node_envelopes_received", "Envelopes received from dispatchers")
PUBLISHED = Counter("pigeon_node_envelopes_published", "Envelopes handed to a dispatcher")
PUBLISH_FAILURES = Counter(
    "pigeon_node_publish_failures", "Publishes to a dispatcher that failed", ["dispatcher_id"]
)
DROPPED = Counter(
    "pigeon_node_envelopes_dropped",
    "Envelopes dropped with no dispatcher (recipients recover them from the store)",
)

OUTBOX_LIMIT = 100_000
# Recipients of dropped envelopes remembered for a resync hint; past this, every user gets one.
HINT_LIMIT = 100_000
PUBLISH_BATCH = 1024
# Batches a stream may carry before the first of them is acknowledged.
PUBLISH_WINDOW = 4
# A dispatcher's answers that say this node is not let in (a cluster secret not theirs): the
# stream is tried again only slowly, and a node every dispatcher refuses does not start. Others,
# even INTERNAL (a stream reset while it opened, say), may pass.
REFUSALS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# gRPC refuses messages over 4 MB by default; stay well under it.
MAX_REQUEST_BYTES = 1 << 20
# Seconds the publisher waits for a stream that takes envelopes before it looks again (a
# dispatcher may have left the view meanwhile, or refused this node).
RETRY_PAUSE = 0.1
# Passes through the event loop's queue after which an overdue acknowledgement counts as
# missing: from a batch queued to the stream to its acknowledgement read takes about five
# (request generator, gRPC's writer, the reply's callback, the reader's wake-up).
OVERDUE_PASSES = 6
REFUSED_PAUSE_MAX = 5.0


class RelayRefusedError(Exception):
    """Every dispatcher refused this node's stream (UNAUTHENTICATED or PERMISSION_DENIED: a
    cluster secret that is not theirs)."""

    def __init__(self, refusals: Mapping[str, grpc.StatusCode]) -> None:
        listed = ", ".join(f"{d} ({code.name})" for d, code in sorted(refusals.items()))
        super().__init__(
            f"every dispatcher refused this node: {listed}; PIGEON_CLUSTER_SECRET must be the "
            "same on every node, dispatcher and Gate"
        )
        self.refusals = dict(refusals)


def _parts(users: list[str], max_bytes: int) -> list[list[str]]:
    """users in consecutive parts of at most max_bytes on the wire each (at least one part)."""
    parts: list[list[str]] = [[]]
    size = 0
    for user in users:
        length = len(user.encode()) + 3  # the field's tag and length
        if size + length > max_bytes and parts[-1]:
            parts.append([])
            size = 0
        parts[-1].append(user)
        size += length
    return parts


async def _acked(link: _Link, left: int) -> None:
    """Wait until at most `left` of the link's batches are unacknowledged (its deadline or its
    end bounds the wait)."""
    while len(link.unacked) > left and link.publishes:
        link.acked.clear()
        await link.acked.wait()


class _Link:
    """The stream to one dispatcher, the routing changes not yet reported on it, and what the
    dispatcher said of this node's users that other nodes hold too."""

    def __init__(self, dispatcher_id: str, address: str) -> None:
        self.dispatcher_id = dispatcher_id
        self.address = address
        self.added: set[str] = set()
        self.removed: set[str] = set()
        self.connected = False
        self.sent_version = 0
        self.applied_version = 0
        self.changed = asyncio.Event()
        self.applied = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        # Users another node holds too, as the dispatcher told this stream (synced once it sent
        # the full list), and users added since, by the report version that carries them.
        self.shared: set[str] = set()
        self.synced = False
        self.unconfirmed: dict[str, int] = {}
        self.shared_version = 0
        self.ack_shared = False
        # The full report that opened this stream, until its acknowledgement (0 after).
        self.opening_version = 0
        # Bumped when a stream opens and when it ends: the request generator of an ended one
        # sees the change and stops.
        self.streams = 0
        # Publishing on the stream: whether the dispatcher said it takes envelopes on it, the
        # batches not acknowledged yet (publish_seq, envelopes, when the wait for it ends), the
        # last publish_seq written, and the running stream's deadline for the oldest batch.
        self.publishes = False
        self.publish_seq = 0
        self.written_seq = 0
        self.unacked: deque[tuple[int, list[dispatcher_pb2.Envelope], float]] = deque()
        self.acked = asyncio.Event()
        self.deadline: asyncio.Timeout | None = None
        # Ends the stream through the deadline once the oldest batch is overdue (_overdue).
        self.guard: asyncio.Handle | None = None
        # The status the dispatcher last refused the stream with (retrying cannot help), if any.
        self.refused: grpc.StatusCode | None = None

    def add(self, user_id: str) -> None:
        self.removed.discard(user_id)
        self.added.add(user_id)
        self.unconfirmed[user_id] = self.sent_version + 1
        self.changed.set()

    def remove(self, user_id: str) -> None:
        self.added.discard(user_id)
        self.removed.add(user_id)
        self.unconfirmed.pop(user_id, None)
        self.changed.set()

    def solo(self, user_id: str) -> bool:
        """True if this dispatcher knows of no other node holding the user."""
        return (
            self.synced
            and user_id not in self.shared
            and self.unconfirmed.get(user_id, 0) <= self.applied_version
        )

    def start(self) -> int:
        """A new stream: it begins with a full report, and knows nothing shared yet. Returns the
        stream's number."""
        self.streams += 1
        self.added.clear()
        self.removed.clear()
        self.sent_version += 1
        self.opening_version = self.sent_version
        self.applied_version = 0
        self.shared.clear()
        self.synced = False
        self.unconfirmed.clear()
        self.ack_shared = False
        self.publish_seq = self.written_seq = 0
        return self.streams

    def publish(self, envelopes: list[dispatcher_pb2.Envelope], timeout: float) -> None:
        """Queue a batch for this stream; the dispatcher must acknowledge it within timeout."""
        self.publish_seq += 1
        due = asyncio.get_running_loop().time() + timeout
        self.unacked.append((self.publish_seq, envelopes, due))
        if len(self.unacked) == 1:
            self._arm()
        self.changed.set()

    def unwritten(self) -> list[tuple[int, list[dispatcher_pb2.Envelope]]]:
        return [(seq, batch) for seq, batch, _ in self.unacked if seq > self.written_seq]

    def written(self, seq: int, timeout: float) -> None:
        """The batch goes to gRPC now: the dispatcher has the whole timeout from here, however
        long the node itself took to get to it."""
        self.written_seq = seq
        due = asyncio.get_running_loop().time() + timeout
        for i, (queued, envelopes, was_due) in enumerate(self.unacked):
            if queued == seq:
                self.unacked[i] = (seq, envelopes, max(was_due, due))
                return

    def published(self, seq: int) -> int:
        """The dispatcher routed the batches up to seq; returns how many envelopes they held."""
        count = 0
        while self.unacked and self.unacked[0][0] <= seq:
            count += len(self.unacked.popleft()[1])
        self._arm()
        self.acked.set()
        return count

    def take_unacked(self) -> list[dispatcher_pb2.Envelope]:
        """The stream ended: what it may not have delivered, to be published elsewhere."""
        envelopes = [envelope for _, batch, _ in self.unacked for envelope in batch]
        self.unacked.clear()
        self._arm()
        self.publishes = False
        self.acked.set()
        return envelopes

    def _arm(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
            self.guard = None
        if self.deadline is not None and not self.deadline.expired() and self.unacked:
            self.guard = asyncio.get_running_loop().call_at(self.unacked[0][2], self._overdue)

    def _overdue(self, passes: int = 0) -> None:
        """The oldest batch's time is up by the clock. On a busy loop (a broadcast wakes 10,000
        stream writers, and a pass through the queue takes a second) the batch may not have
        been written yet, or its acknowledgement may wait in the queue: the stream ends only
        once the queue was gone through OVERDUE_PASSES times without it. A batch written
        meanwhile has its whole time from the write. On an idle loop this takes microseconds; on
        a busy one, the node is late, not the dispatcher."""
        self.guard = None
        if self.deadline is None or self.deadline.expired() or not self.unacked:
            return
        loop = asyncio.get_running_loop()
        if self.unacked[0][2] > loop.time():
            self._arm()  # written late: its time runs from the write
            return
        if passes < OVERDUE_PASSES:
            self.guard = loop.call_soon(self._overdue, passes + 1)
            return
        self.deadline.reschedule(loop.time())

    def update_shared(self, shared: dispatcher_pb2.SharedUsers) -> None:
        if shared.full:
            self.shared = set(shared.added)
            self.synced = True
        else:
            self.shared.update(shared.added)
            self.shared.difference_update(shared.removed)
        # Said back at once: the dispatcher holds another node's acknowledgement until then.
        self.shared_version = shared.version
        self.ack_shared = True
        self.changed.set()

    def confirm(self, version: int) -> None:
        """The dispatcher applied reports up to version (and told this stream what they share)."""
        self.applied_version = version
        if self.unconfirmed:
            self.unconfirmed = {u: v for u, v in self.unconfirmed.items() if v > version}
        self.applied.set()

    @property
    def target(self) -> int:
        """The report version that will cover every change made so far."""
        return self.sent_version + 1 if (self.added or self.removed) else self.sent_version


class DispatcherRelay:
    """Connects a node to every dispatcher it finds.

    Args:
        node_id: this node's id (reported on every stream).
        cluster_secret: sent as the bearer token of internal calls.
        dispatchers: the live dispatchers by id (the etcd view), read on every change check.
        users: the users this node holds now (for full reports).
        deliver: called with envelopes received from a dispatcher.
        report_interval: seconds over which routing changes are batched into one report.
        publish_timeout: seconds a publish may take before the next dispatcher is tried.
        channel: makes a channel to a dispatcher address (TLS or not).
    """

    def __init__(
        self,
        *,
        node_id: str,
        cluster_secret: str,
        dispatchers: Callable[[], Mapping[str, types_pb2.DispatcherInfo]],
        users: Callable[[], Iterable[str]],
        deliver: Callable[[Sequence[dispatcher_pb2.Envelope]], None],
        report_interval: float = 0.02,
        publish_timeout: float = 1.0,
        channel: Callable[[str], grpc.aio.Channel] = grpc.aio.insecure_channel,
        check_interval: float = 0.2,
        ready_timeout: float = 2.0,
        resync: Callable[[], None] | None = None,
    ) -> None:
        self._node_id = node_id
        self._metadata = (("authorization", f"Bearer {cluster_secret}"),)
        self._dispatchers = dispatchers
        self._users = users
        self._deliver = deliver
        self._report_interval = report_interval
        self._publish_timeout = publish_timeout
        self._check_interval = check_interval
        self._ready_timeout = ready_timeout
        self._resync = resync
        # Dispatchers whose last publish failed: tried last.
        self._failed: set[str] = set()
        self._channels = ChannelCache(channel)
        self._weights: dict[str, bytes] = {}
        self._links: dict[str, _Link] = {}
        self._outbox: list[dispatcher_pb2.Envelope] = []
        self._outbox_ready = asyncio.Event()
        # Users whose envelopes were dropped (None: every user's), told once a dispatcher is back.
        self._hints: dict[str, None] | None = {}
        self._connected_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def __aenter__(self) -> DispatcherRelay:
        self._tasks = [
            asyncio.create_task(self._supervise(), name="relay-supervisor"),
            asyncio.create_task(self._publish_loop(), name="relay-publisher"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        tasks = [*self._tasks, *(link.task for link in self._links.values() if link.task)]
        try:
            await cancel_and_wait(*tasks)
        finally:
            await self._channels.close()

    # The Relay protocol (called by the node core).

    def relay(self, envelopes: Sequence[dispatcher_pb2.Envelope]) -> None:
        if not self._dispatchers():
            self._dropped(envelopes)
            return
        self._outbox.extend(envelopes)
        if len(self._outbox) > OUTBOX_LIMIT:
            # Dispatchers unreachable for long: keep memory bounded (the messages are stored;
            # their recipients get a resync hint when a dispatcher is back).
            excess = len(self._outbox) - OUTBOX_LIMIT
            self._dropped(self._outbox[:excess])
            del self._outbox[:excess]
        self._outbox_ready.set()

    def _dropped(self, envelopes: Sequence[dispatcher_pb2.Envelope]) -> None:
        """Remember whose envelopes no dispatcher took. Their messages are stored; without a
        hint the recipients' streams on other nodes would see them only with a later message or
        a reconnect (their own dispatcher streams may never have broken)."""
        # Hints (resync envelopes) carry no message: only dropped messages count.
        DROPPED.inc(sum(1 for e in envelopes if not e.resync))
        hints = self._hints
        for envelope in envelopes:
            if hints is None:
                break
            if envelope.broadcast or len(hints) >= HINT_LIMIT:
                hints = None
            elif envelope.HasField("message") or envelope.resync:
                hints[envelope.recipient] = None
        self._hints = hints

    def _take_hints(self) -> list[dispatcher_pb2.Envelope]:
        hints, self._hints = self._hints, {}
        if hints is None:
            return [resync_envelope(self._node_id)]
        return [resync_envelope(self._node_id, user) for user in hints]

    def user_added(self, user_id: str) -> None:
        for link in self._links.values():
            link.add(user_id)

    def user_removed(self, user_id: str) -> None:
        for link in self._links.values():
            link.remove(user_id)

    def elsewhere(self, user_id: str) -> bool:
        """False only if every dispatcher has said that no other node holds the user (a local
        user's messages then need no relay); True while any of them cannot say."""
        dispatchers = self._dispatchers()
        if not dispatchers:
            return True
        links = self._links
        for dispatcher_id in dispatchers:
            link = links.get(dispatcher_id)
            if link is None or not link.solo(user_id):
                return True
        return False

    async def routes_ready(self, user_id: str | None = None) -> None:
        """Wait until every connected dispatcher has applied the routing changes made so far
        (those of user_id, if given), so a message stored after this returns is routed here
        (bounded: a dispatcher that does not answer in time is not waited for)."""

        def pending(link: _Link, target: int) -> bool:
            if user_id is None:
                return link.applied_version < target or bool(link.added or link.removed)
            # The report that carries the user (changes go in parts when there are many).
            return user_id in link.added or link.unconfirmed.get(user_id, 0) > link.applied_version

        targets = [(link, link.target) for link in self._links.values() if link.connected]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._ready_timeout):
                for link, target in targets:
                    while link.connected and pending(link, target):
                        link.applied.clear()
                        await link.applied.wait()

    def refusals(self) -> dict[str, grpc.StatusCode]:
        """The dispatchers (in the view) that refused this node's last stream, and how."""
        return {
            d: link.refused
            for d in self._dispatchers()
            if (link := self._links.get(d)) is not None and link.refused is not None
        }

    async def wait_connected(self, within: float) -> bool:
        """Wait (bounded) until there is a connected stream to every dispatcher in the view, so a
        node starting up takes no users before it can be routed to. True if all connected."""

        def all_connected() -> bool:
            dispatchers = self._dispatchers()
            if dispatchers and len(self.refusals()) == len(dispatchers):
                raise RelayRefusedError(self.refusals())
            return all(
                (link := self._links.get(d)) is not None and link.connected for d in dispatchers
            )

        try:
            async with asyncio.timeout(within):
                while not all_connected():
                    self._connected_changed.clear()
                    await self._connected_changed.wait()
        except TimeoutError:
            return False
        return True

    # Streams to dispatchers.

    async def _supervise(self) -> None:
        while True:
            live = self._dispatchers()
            for dispatcher_id, info in live.items():
                link = self._links.get(dispatcher_id)
                if link is None or link.address != info.address:
                    if link is not None and link.task is not None:
                        link.task.cancel()
                    link = _Link(dispatcher_id, info.address)
                    link.task = asyncio.create_task(self._run_link(link))
                    self._links[dispatcher_id] = link
                    log.info("subscribing to dispatcher %s at %s", dispatcher_id, info.address)
            for dispatcher_id in list(self._links):
                if dispatcher_id not in live:
                    link = self._links.pop(dispatcher_id)
                    if link.task is not None:
                        link.task.cancel()
                    log.info("dispatcher %s left", dispatcher_id)
            await self._channels.keep_only(link.address for link in self._links.values())
            await asyncio.sleep(self._check_interval)

    async def _run_link(self, link: _Link) -> None:
        delay = 0.05
        while True:
            stub = dispatcher_pb2_grpc.DispatcherStub(self._channels.get(link.address))
            call = stub.Subscribe(self._reports(link), metadata=self._metadata)
            try:
                async with asyncio.timeout(None) as link.deadline:
                    await self._read_link(link, call)
                log.warning("dispatcher %s ended the stream; resubscribing", link.dispatcher_id)
            except TimeoutError:
                self._failed.add(link.dispatcher_id)
                PUBLISH_FAILURES.labels(link.dispatcher_id).inc()
                log.warning(
                    "dispatcher %s acknowledged no publish within %.1f s; resubscribing",
                    link.dispatcher_id,
                    self._publish_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                refused = exc.code() in REFUSALS
                if not refused or link.refused != exc.code():
                    log.warning(
                        "stream to dispatcher %s broke (%s: %s); resubscribing",
                        link.dispatcher_id,
                        exc.code().name,
                        exc.details(),
                    )
                if refused:
                    link.refused = exc.code()
                    self._connected_changed.set()
                    delay = max(delay, REFUSED_PAUSE_MAX / 4)
            finally:
                link.deadline = None
                call.cancel()
                # gRPC may keep reading the ended stream's requests: its generator must see that
                # it ended, or it waits for changes for ever if the dispatcher left.
                link.streams += 1
                link.changed.set()
                was_connected, link.connected = link.connected, False
                link.synced = False
                link.applied.set()
                self._requeue(link.take_unacked())
                if was_connected:
                    delay = 0.05
                    # Envelopes for this node that the dispatcher had taken, maybe already
                    # acknowledged to their sender, ended with the stream. They are stored:
                    # the local streams check the store, without waiting for a later message
                    # to show the gap.
                    if self._resync is not None and not self._closing:
                        self._resync()
            await asyncio.sleep(delay)
            delay = min(delay * 2, REFUSED_PAUSE_MAX if link.refused else 1.0)

    async def _read_link(
        self, link: _Link, call: AsyncIterable[dispatcher_pb2.DispatcherSubscribeResponse]
    ) -> None:
        async for reply in call:
            if not link.connected:
                link.connected = True
                link.refused = None
                self._connected_changed.set()
                # Users who came while the stream opened are in reports after the opening one
                # (routes_ready does not wait for a stream that is not connected yet): the
                # local streams check the store once those are applied too.
                if link.opening_version:
                    link.opening_version = link.target
                if self._hints != {}:
                    self._outbox_ready.set()  # a dispatcher to take the resync hints
            if reply.publish_on_stream:
                link.publishes = True
                self._outbox_ready.set()
            if reply.published_seq:
                PUBLISHED.inc(link.published(reply.published_seq))
                self._failed.discard(link.dispatcher_id)
            if reply.HasField("shared"):
                link.update_shared(reply.shared)
            if reply.applied_report_version > link.applied_version:
                link.confirm(reply.applied_report_version)
                if 0 < link.opening_version <= link.applied_version:
                    link.opening_version = 0
                    # Envelopes for this node may have been lost while the stream was
                    # down. The opening report is acknowledged once the other nodes
                    # holding its users relay theirs here, so what the local streams
                    # read from the store now leaves nothing out.
                    if self._resync is not None:
                        self._resync()
            if reply.envelopes:
                RECEIVED.inc(len(reply.envelopes))
                self._deliver(reply.envelopes)

    async def _reports(
        self, link: _Link
    ) -> AsyncIterator[dispatcher_pb2.DispatcherSubscribeRequest]:
        # A new stream starts from a full report: the dispatcher forgot this node when the last
        # one ended.
        stream = link.start()
        # In parts: a node's user ids can pass what one gRPC message may hold (4 MB). The parts
        # after the first are additions, each its own version; their users count as shared
        # until the dispatcher has applied the part that names them.
        first, *rest = _parts(list(self._users()), MAX_REQUEST_BYTES)
        version = link.sent_version
        for number, part in enumerate([first, *rest]):
            for user in part:
                link.unconfirmed[user] = version + number
        link.sent_version = link.opening_version = version + len(rest)
        yield dispatcher_pb2.DispatcherSubscribeRequest(
            node_id=self._node_id,
            report=dispatcher_pb2.RoutingReport(full=True, added=first),
            report_version=version,
        )
        for number, part in enumerate(rest, 1):
            yield dispatcher_pb2.DispatcherSubscribeRequest(
                report=dispatcher_pb2.RoutingReport(added=part), report_version=version + number
            )
        loop = asyncio.get_running_loop()
        report_due: float | None = None
        while True:
            if not link.changed.is_set():
                wait = None if report_due is None else report_due - loop.time()
                if wait is None or wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await link.changed.wait()
            if link.streams != stream:
                # gRPC may leave an ended stream's requests unread: what is left goes on the new.
                return
            link.changed.clear()
            # Envelopes go at once; routing changes gather over a short window into one report.
            for seq, envelopes in link.unwritten():
                link.written(seq, self._publish_timeout)
                yield dispatcher_pb2.DispatcherSubscribeRequest(
                    envelopes=envelopes, publish_seq=seq
                )
            request = dispatcher_pb2.DispatcherSubscribeRequest()
            if not (link.added or link.removed):
                report_due = None
            elif report_due is None:
                report_due = loop.time() + self._report_interval
            if report_due is not None and loop.time() >= report_due:
                report_due = None
                link.sent_version += 1
                removed = _parts(list(link.removed), MAX_REQUEST_BYTES // 2)[0]
                added = _parts(list(link.added), MAX_REQUEST_BYTES // 2)[0]
                request.report.added.extend(added)
                request.report.removed.extend(removed)
                request.report_version = link.sent_version
                link.added.difference_update(added)
                link.removed.difference_update(removed)
                if link.added or link.removed:
                    # More than one message holds: the rest goes in the next report, at once.
                    report_due = loop.time()
                    for user in link.added:
                        link.unconfirmed[user] = link.sent_version + 1
            if link.ack_shared:
                link.ack_shared = False
                request.applied_shared_version = link.shared_version
            if request.HasField("report") or request.applied_shared_version:
                yield request

    # Publishing.

    def _publish_order(self) -> list[types_pb2.DispatcherInfo]:
        """Dispatchers in the order this node tries them: spread nodes over dispatchers."""
        return sorted(
            self._dispatchers().values(),
            key=lambda info: self._weight(info.dispatcher_id),
            reverse=True,
        )

    def _weight(self, dispatcher_id: str) -> bytes:
        weight = self._weights.get(dispatcher_id)
        if weight is None:
            weight = hashlib.blake2b(
                f"{self._node_id}\x00{dispatcher_id}".encode(), digest_size=8
            ).digest()
            self._weights[dispatcher_id] = weight
        return weight

    async def _publish_loop(self) -> None:
        failed = self._failed
        current: _Link | None = None
        while True:
            await self._outbox_ready.wait()
            if not self._outbox and self._hints == {}:
                self._outbox_ready.clear()
                continue
            order = self._publish_order()
            # Those that failed lately go last, not out: one of them may be the only one left.
            order.sort(key=lambda info: info.dispatcher_id in failed)
            link = self._stream_for(order)
            if link is None:
                current = None
                self._outbox_ready.clear()
                if order and len(self.refusals()) < len(order):
                    # A stream is opening (its first reply wakes this loop) or reopening; look
                    # again soon all the same, as the view may change meanwhile.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RETRY_PAUSE):
                            await self._outbox_ready.wait()
                    self._outbox_ready.set()
                    continue
                # No dispatcher, or each refuses this node: waiting cannot help, and dropping
                # keeps memory bounded (the messages are stored; their recipients get a resync
                # hint once a dispatcher takes envelopes).
                self._dropped(self._outbox)
                self._outbox.clear()
                continue
            if self._hints != {}:
                # Ahead of newer envelopes.
                self._outbox[:0] = self._take_hints()
            if current is not None and current is not link and current.unacked:
                # Moving to another stream: the last one's batches land first, so each
                # recipient's messages keep their order.
                await _acked(current, 0)
                continue
            if len(link.unacked) >= PUBLISH_WINDOW:
                await _acked(link, PUBLISH_WINDOW - 1)
                continue
            batch = prefix_within(self._outbox, MAX_REQUEST_BYTES, PUBLISH_BATCH)
            del self._outbox[: len(batch)]
            link.publish(batch, self._publish_timeout)
            current = link

    def _stream_for(self, order: list[types_pb2.DispatcherInfo]) -> _Link | None:
        """The first dispatcher in order whose stream takes envelopes, if any."""
        for info in order:
            link = self._links.get(info.dispatcher_id)
            if link is not None and link.publishes:
                return link
        return None

    def _requeue(self, envelopes: list[dispatcher_pb2.Envelope]) -> None:
        """Put back, ahead of newer ones, envelopes a stream ended without acknowledging (a
        dispatcher may have routed some: receiving nodes drop what they already delivered)."""
        if envelopes:
            self._outbox[:0] = envelopes
            self._outbox_ready.set()
