"""The node's core: store, deliver, replay and serve the inbox. It knows nothing of gRPC; the
servicer (and the REST layer) call it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Collection, Iterator, Sequence
from types import TracebackType
from typing import Final, Protocol, TypeVar

from prometheus_client import Counter

from node.commit import GroupCommit
from node.convert import new_message_id, resync_envelope, to_proto, wire_message
from node.store.base import Entry, Kind, NewMessage, ReadFilter, Store, Stored, StoreError
from node.streams import Pool, Stream
from node.validate import (
    MAX_SEQ,
    Limits,
    Outgoing,
    check_id,
    check_page_size,
    decode_page_token,
    encode_page_token,
)
from pigeon.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from pigeon.runtime import cancel_and_wait
from pigeon.sparselog import SparseLog
from pigeon.v1 import dispatcher_pb2, node_pb2, types_pb2
from pigeon.wire import duration

__all__ = ["NoRelay", "NodeCore", "Relay"]

log = logging.getLogger("pigeon.node")

T = TypeVar("T")

STORED = Counter("pigeon_node_messages_stored", "Messages stored by this node", ["kind"])
DELIVERED = Counter("pigeon_node_messages_pushed", "Message copies queued to local streams")
# Resolved once: labels() takes a lock and builds a key on every call.
_STORED_BY_KIND = {kind: STORED.labels(kind.name.lower()) for kind in Kind}

REPLAY_PAGE = 256
MAX_EVENT_BYTES = 1 << 20
FILL_LIMIT = 1024
RECENT_LIMIT = 100_000
SYSTEM_SOURCE = "system"

# Seconds between log lines about a failing store.
STORE_FAILURE_LOG_INTERVAL: Final = 5.0

# Ids one MarkRead may name (each is checked and looked up in the single writer's transaction).
MAX_MARK_READ_IDS: Final = 1000

# Keys are scoped by sender, and a system sender's name (its source) is one a user may have as
# well: a user called "shop" must not be able to take the shop's keys and so suppress its
# messages. A checked key never holds control characters, so no user key can carry this prefix.
_SYSTEM_KEY_PREFIX: Final = "\x1fsystem\x1f"


class Relay(Protocol):
    """Where a node hands what it cannot deliver alone: the dispatcher layer."""

    def relay(self, envelopes: Sequence[dispatcher_pb2.Envelope]) -> None:
        """Send envelopes towards the other nodes (never blocks; batched by the relay)."""

    def user_added(self, user_id: str) -> None:
        """The user's first stream opened on this node."""

    def user_removed(self, user_id: str) -> None:
        """The user's last stream on this node closed."""

    def elsewhere(self, user_id: str) -> bool:
        """Whether another node may hold the user (a user held here: whether to relay)."""

    async def routes_ready(self, user_id: str | None = None) -> None:
        """Return once the dispatchers route this node's current users here."""


class NoRelay:
    """A node on its own: it delivers to its local streams only."""

    def relay(self, envelopes: Sequence[dispatcher_pb2.Envelope]) -> None:
        return None

    def user_added(self, user_id: str) -> None:
        return None

    def user_removed(self, user_id: str) -> None:
        return None

    def elsewhere(self, user_id: str) -> bool:
        return False

    async def routes_ready(self, user_id: str | None = None) -> None:
        return None


class _Unread:
    """Pushes absolute unread counts to a user's local streams after their inbox changed.

    Changes are coalesced: a burst of 100 messages to one user costs one count query, sent in
    the same event as the messages or right after.
    """

    def __init__(self, store: Store, pool: Pool) -> None:
        self._store = store
        self._pool = pool
        self._dirty: dict[str, None] = {}
        self._generation: dict[str, int] = {}
        self._last: dict[str, int] = {}
        # Per user, a broadcast seq that the last count sent surely includes (read before it):
        # a broadcast at or below it is not one more.
        self._covered: dict[str, int] = {}
        # The user whose count is being read now.
        self._counting: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="unread-counts")

    async def stop(self) -> None:
        if self._task is not None:
            # The flag ends the loop even if the cancellation is lost: on 3.11 asyncio.wait_for
            # (inside the MongoDB driver) can swallow one that lands as its wait ends.
            self._stopping = True
            self._wake.set()
            await cancel_and_wait(self._task)

    def mark(self, user_id: str) -> None:
        if self._pool.holds(user_id):
            self._dirty[user_id] = None
            self._changed(user_id)
            self._wake.set()

    def one_more_for_everyone(self, seq: int, counted: Collection[str] = ()) -> None:
        """A broadcast (of that seq) is one more unread message for every user: add it to the
        last count sent where there is one (no store reads for a fan-out), and count the rest.

        Users in counted were sent a count that includes it already (stored in one write), and
        so were users whose stream opened after it was stored (its relay can come later). A
        count that is queued or being read may miss changes before the broadcast that the last
        one sent does not have either: such users are counted again, from after it.
        """
        for user_id in self._pool.users():
            if user_id in counted or seq <= self._covered.get(user_id, 0):
                continue
            last = self._last.get(user_id)
            if last is None or self._pending(user_id):
                self.mark(user_id)
            else:
                self.push(user_id, last + 1)
                self._covered[user_id] = seq

    def push(self, user_id: str, count: int) -> None:
        """A count already known (from a change on this node or another) goes out at once."""
        if not self._pool.holds(user_id):
            return  # nothing kept for users without a stream here
        self.settle(user_id, count)
        for stream in self._pool.streams_of(user_id):
            stream.push((), count)

    def settle(self, user_id: str, count: int) -> None:
        """The count is known and on its way (in the same event as the messages)."""
        self._dirty.pop(user_id, None)
        self._changed(user_id)
        self._last[user_id] = count

    def welcomed(self, user_id: str, count: int, broadcast_head: int) -> None:
        """A new stream was sent the count it read after the broadcast head (so the count has
        every broadcast up to it); one queued or being read is newer."""
        if self._pool.holds(user_id):
            self._covered[user_id] = max(self._covered.get(user_id, 0), broadcast_head)
        if self._pending(user_id):
            return
        self.settle(user_id, count)

    def _pending(self, user_id: str) -> bool:
        """Whether a count of the user's is queued or being read."""
        return user_id in self._dirty or user_id == self._counting

    def forget(self, user_id: str) -> None:
        """The user's last stream here closed."""
        self._last.pop(user_id, None)
        self._covered.pop(user_id, None)
        self._generation.pop(user_id, None)

    def _changed(self, user_id: str) -> None:
        # A count read before this moment may be older than what is (or will be) pushed now.
        self._generation[user_id] = self._generation.get(user_id, 0) + 1

    async def _run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty and not self._stopping:
                user_id = next(iter(self._dirty))
                del self._dirty[user_id]
                if not self._pool.holds(user_id):
                    self._generation.pop(user_id, None)
                    continue
                generation = self._generation.get(user_id, 0)
                self._counting = user_id
                try:
                    count = await self._store.unread_count(user_id)
                except Exception:
                    # Keep counting for everyone else; this user is tried again shortly.
                    log.warning(
                        "unread count of %s not available; retrying", user_id, exc_info=True
                    )
                    self._dirty[user_id] = None
                    await asyncio.sleep(0.5)
                    continue
                finally:
                    self._counting = None
                if self._generation.get(user_id, 0) != generation:
                    continue  # stale: a newer count went out, or a recount is queued
                self._last[user_id] = count
                for stream in self._pool.streams_of(user_id):
                    stream.push((), count)


class _Recent:
    """Which (message id, recipient) pairs this node has pushed lately, to drop relayed
    duplicates (two dispatchers, retries)."""

    def __init__(self, limit: int = RECENT_LIMIT) -> None:
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._limit = limit

    def first_time(self, message_id: str, recipient: str) -> bool:
        key = (message_id, recipient)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return True


class NodeCore:
    """Stores messages and delivers them; replays streams; serves the inbox.

    Args:
        store: the durable store (opened and closed by the caller).
        node_id: this node's id (stamped on relayed envelopes).
        limits: what one request may carry.
        relay: where messages for other nodes go.
        stream_queue_size: messages a stream may have queued before it is cut as too slow.
        heartbeat_interval: seconds between heartbeats on an idle stream.
        batch_max_size: messages per store transaction at most (1 turns group commit off).
        batch_max_wait: seconds a lone write waits for company.
        max_streams_per_user: open streams one user may hold here.
    """

    def __init__(
        self,
        store: Store,
        *,
        node_id: str,
        limits: Limits | None = None,
        relay: Relay | None = None,
        stream_queue_size: int = 1024,
        heartbeat_interval: float = 15.0,
        batch_max_size: int = 256,
        batch_max_wait: float = 0.0,
        max_streams_per_user: int = 32,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.limits = limits or Limits()
        self.relay: Relay = relay or NoRelay()
        self.pool = Pool()
        self.stream_queue_size = stream_queue_size
        self.heartbeat_interval = heartbeat_interval
        self.max_streams_per_user = max_streams_per_user
        self._commit: GroupCommit[NewMessage, Stored] = GroupCommit(
            self._write, max_size=batch_max_size, max_wait=batch_max_wait, answered=self._answered
        )
        # Streams per user from start to end (a stream cut as too slow has left the pool).
        self._open_streams: dict[str, int] = {}
        # Set by drain: new streams get the reconnect hint too.
        self._draining = False
        # Broadcasts of the batch being written, pushed once its publishers are answered.
        self._broadcasts: list[types_pb2.Message] = []
        # Users sent, with a write holding those broadcasts, a count that includes them.
        self._counted: set[str] = set()
        self._unread = _Unread(store, self.pool)
        # Events with no more messages than this fit MAX_EVENT_BYTES whatever their size.
        largest = (
            self.limits.max_body_bytes
            + self.limits.max_title_bytes
            + self.limits.max_metadata_bytes
            + 1024
        )
        self._small_batch = max(1, MAX_EVENT_BYTES // largest)
        self._recent = _Recent()
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NodeCore:
        await self._commit.__aenter__()
        self._unread.start()
        self._ticker = asyncio.create_task(self._heartbeats(), name="heartbeats")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._ticker)
        self._ticker = None
        await self._commit.__aexit__(exc_type, exc, tb)
        await self._unread.stop()

    async def _heartbeats(self) -> None:
        """Ask every stream quiet for a heartbeat interval for a heartbeat (a quarter of the
        interval late at most: clients allow 2.5 intervals)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_interval / 4)
            quiet_since = loop.time() - self.heartbeat_interval
            for stream in self.pool.all():
                if stream.sent_at <= quiet_since:
                    stream.beat()

    # Writing and delivering.

    async def send(self, sender: str, messages: Sequence[Outgoing]) -> list[Stored]:
        """Store messages from a user; returns once they are durable."""
        return await self._submit([_new(m, sender, Kind.USER) for m in messages])

    async def publish(self, messages: Sequence[Outgoing]) -> list[Stored]:
        """Store messages from a system sender (to users or broadcast)."""
        return await self._submit(
            [
                _new(m, m.source or SYSTEM_SOURCE, Kind.BROADCAST if m.broadcast else Kind.SYSTEM)
                for m in messages
            ]
        )

    async def _submit(self, news: list[NewMessage]) -> list[Stored]:
        try:
            return await self._commit.submit(news)
        except StoreError as exc:
            _store_failed(exc)
            raise Unavailable(
                "the message store failed; retry with the same idempotency_key, and the "
                "message is stored once",
                reason="STORE_UNAVAILABLE",
            ) from exc

    async def _write(self, batch: Sequence[NewMessage]) -> list[Stored]:
        # Delivery happens here, in the single writer, so streams see commit order (broadcasts
        # right after their publishers are answered, still ahead of the next write).
        stored = await self.store.append(batch)
        # Broadcasts go first: the counts relayed with the other messages include them, so
        # another node must add them to its last counts before it takes those.
        broadcasts: list[dispatcher_pb2.Envelope] = []
        envelopes: list[dispatcher_pb2.Envelope] = []
        kinds: dict[Kind, int] = {}
        for new, result in zip(batch, stored, strict=True):
            if result.duplicate:
                # A retry of a message already stored. Its first write may have failed after
                # committing (MongoDB: the outcome of a commit can be unknown), and then nobody
                # pushed it: the recipients' streams check the store.
                envelopes.extend(self._check_store(new))
                continue
            kinds[new.kind] = kinds.get(new.kind, 0) + 1
            if new.kind == Kind.BROADCAST:
                message = _wire(new, result.broadcast_seq, "")
                self._broadcasts.append(message)
                broadcasts.append(
                    dispatcher_pb2.Envelope(
                        message=message, broadcast=True, origin_node_id=self.node_id
                    )
                )
                continue
            for recipient in new.recipients:
                message = _wire(new, result.seqs[recipient], recipient)
                unread = result.unread.get(recipient)
                self._push(recipient, message, unread)
                if not self._needs_relay(recipient):
                    continue
                envelope = dispatcher_pb2.Envelope(
                    recipient=recipient, message=message, origin_node_id=self.node_id
                )
                if unread is not None:
                    envelope.unread_count = unread
                envelopes.append(envelope)
        for kind, count in kinds.items():
            _STORED_BY_KIND[kind].inc(count)
        if kinds.get(Kind.BROADCAST):
            # The counts the store gave with this write's messages include its broadcasts.
            self._counted.update(user for result in stored for user in result.unread)
        if broadcasts or envelopes:
            self.relay.relay(broadcasts + envelopes)
        return stored

    def _answered(self) -> None:
        # A broadcast wakes the writer of every stream. Pushed now, those wake-ups would run
        # before the publisher's answer (10,000 streams kept it 1.8 s); pushed in a callback
        # queued behind the answer, they do not delay it.
        if self._broadcasts:
            broadcasts, self._broadcasts = self._broadcasts, []
            counted, self._counted = self._counted, set()
            asyncio.get_running_loop().call_soon(self._push_broadcasts, broadcasts, counted)

    def _push_broadcasts(self, messages: list[types_pb2.Message], counted: set[str]) -> None:
        for message in messages:
            self._push_broadcast(message, counted)

    def _needs_relay(self, user_id: str) -> bool:
        """False for a user held here whom, as every dispatcher confirmed, no other node holds."""
        return not self.pool.holds(user_id) or self.relay.elsewhere(user_id)

    def _push(self, recipient: str, message: types_pb2.Message, unread: int | None) -> None:
        """Queue a message (and the recipient's unread count, when the store said it) to the
        recipient's local streams; without a count, one is read and sent after."""
        if not self._recent.first_time(message.id, recipient):
            return
        # A copy: a stream that overflows leaves the pool during the loop.
        streams = tuple(self.pool.streams_of(recipient))
        if streams:
            for stream in streams:
                stream.push((message,), unread)
            DELIVERED.inc(len(streams))
            if unread is None:
                self._unread.mark(recipient)
            else:
                self._unread.settle(recipient, unread)

    def _push_broadcast(self, message: types_pb2.Message, counted: Collection[str] = ()) -> None:
        if not self._recent.first_time(message.id, ""):
            return
        pushed = 0
        for stream in self.pool.all():
            stream.push((message,), None)
            pushed += 1
        DELIVERED.inc(pushed)
        self._unread.one_more_for_everyone(message.seq, counted)

    def receive(self, envelopes: Sequence[dispatcher_pb2.Envelope]) -> None:
        """Deliver envelopes relayed from other nodes to the local streams they concern."""
        for envelope in envelopes:
            if envelope.resync:
                # The origin dropped envelopes: their messages are in the store.
                if envelope.broadcast:
                    self.resync()
                else:
                    for stream in self.pool.streams_of(envelope.recipient):
                        stream.resync()
            elif envelope.broadcast:
                self._push_broadcast(envelope.message)
            elif envelope.HasField("message"):
                unread = envelope.unread_count if envelope.HasField("unread_count") else None
                self._push(envelope.recipient, envelope.message, unread)
            elif envelope.HasField("unread_count"):
                self._unread.push(envelope.recipient, envelope.unread_count)

    def _check_store(self, new: NewMessage) -> list[dispatcher_pb2.Envelope]:
        """Make the streams of the message's recipients check the store, here at once; returns
        the envelopes that ask other nodes to."""
        if new.kind == Kind.BROADCAST:
            self.resync()
            return [resync_envelope(self.node_id)]
        envelopes = []
        for recipient in new.recipients:
            for stream in self.pool.streams_of(recipient):
                stream.resync()
            if self._needs_relay(recipient):
                envelopes.append(resync_envelope(self.node_id, recipient))
        return envelopes

    def _changed(self, user_id: str, unread: int) -> None:
        """The user's read state changed here: tell their devices, on this node and others."""
        self._unread.push(user_id, unread)
        if self._needs_relay(user_id):
            self.relay.relay(
                [
                    dispatcher_pb2.Envelope(
                        recipient=user_id, unread_count=unread, origin_node_id=self.node_id
                    )
                ]
            )

    # The inbox.

    async def list_messages(
        self,
        user_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        read: ReadFilter = ReadFilter.ALL,
        sender: str = "",
        kind: Kind | None = None,
    ) -> tuple[list[Entry], str]:
        """A page of the inbox, newest first, and the token of the next page ("" at the end)."""
        limit = check_page_size(page_size, self.limits)
        inbox_before, broadcast_before = decode_page_token(page_token)
        inbox: list[Entry] = []
        broadcasts: list[Entry] = []
        # One more than needed tells whether another page exists.
        if kind in (None, Kind.USER, Kind.SYSTEM) and inbox_before != 1:
            inbox = await _read(
                self.store.inbox_before(
                    user_id, inbox_before, limit + 1, read=read, sender=sender, kind=kind
                )
            )
        if kind in (None, Kind.BROADCAST) and broadcast_before != 1:
            broadcasts = await _read(
                self.store.broadcasts_before(
                    user_id, broadcast_before, limit + 1, read=read, sender=sender
                )
            )
        page = _within_bytes(_merge_newest_first(inbox, broadcasts, limit))
        if len(page) == len(inbox) + len(broadcasts):
            return page, ""
        return page, encode_page_token(
            _next_bound([e.seq for e in page if e.kind != Kind.BROADCAST], inbox, inbox_before),
            _next_bound(
                [e.seq for e in page if e.kind == Kind.BROADCAST], broadcasts, broadcast_before
            ),
        )

    async def get_message(self, user_id: str, message_id: str) -> Entry:
        check_id(message_id, "message_id")
        entry = await _read(self.store.get(user_id, message_id))
        if entry is None:
            raise NotFound(f"no message {message_id} in your inbox", reason="MESSAGE_NOT_FOUND")
        return entry

    async def mark_read(
        self,
        user_id: str,
        *,
        ids: Sequence[str] = (),
        up_to_seq: int = 0,
        up_to_broadcast_seq: int = 0,
        everything: bool = False,
    ) -> int:
        chosen = sum(bool(x) for x in (ids, up_to_seq or up_to_broadcast_seq, everything))
        if chosen != 1:
            raise InvalidArgument(
                "set exactly one of message_ids, up_to_seq / up_to_broadcast_seq, or all",
                reason="BAD_MARK_READ",
            )
        if len(ids) > MAX_MARK_READ_IDS:
            raise InvalidArgument(
                f"message_ids has {len(ids)} ids; the limit is {MAX_MARK_READ_IDS}: mark more "
                "with up_to_seq / up_to_broadcast_seq or all",
                reason="TOO_MANY_IDS",
                field="message_ids",
                limit=str(MAX_MARK_READ_IDS),
            )
        for message_id in ids:
            check_id(message_id, "message_ids")
        unread = await _read(
            self.store.mark_read(
                user_id,
                ids=ids,
                # Beyond the newest message means "everything so far"; stores hold 64-bit seqs.
                up_to_seq=min(up_to_seq, MAX_SEQ),
                up_to_broadcast_seq=min(up_to_broadcast_seq, MAX_SEQ),
                everything=everything,
            )
        )
        self._changed(user_id, unread)
        return unread

    async def delete(self, user_id: str, message_id: str) -> int:
        check_id(message_id, "message_id")
        unread = await _read(self.store.delete(user_id, message_id))
        if unread is None:
            raise NotFound(f"no message {message_id} in your inbox", reason="MESSAGE_NOT_FOUND")
        self._changed(user_id, unread)
        return unread

    async def unread_count(self, user_id: str) -> int:
        return await _read(self.store.unread_count(user_id))

    # The stream.

    async def subscribe(
        self,
        user_id: str,
        since_seq: int | None,
        since_broadcast_seq: int | None,
        *,
        session_ends_at: float | None = None,
    ) -> AsyncIterator[node_pb2.SubscribeResponse]:
        """The events of one client stream: welcome and unread count, the replay from the
        cursor, the replay-done marker, then live events and heartbeats until the client leaves
        or the node asks it to reconnect (draining, too slow, or at session_ends_at, Unix
        seconds, when the session it was opened with runs out).

        The stream joins the pool before the store is read, so nothing stored meanwhile is
        missed; what arrives live during the replay is merged by seq, so nothing is sent twice.
        """
        # Counted until they end, not until they leave the pool: a stream cut as too slow stays
        # open while its client does not read the hint.
        open_streams = self._open_streams.get(user_id, 0)
        if open_streams >= self.max_streams_per_user:
            # Each stream costs the node memory; a client that opens them without end (or
            # leaves them unread) must not be able to exhaust it.
            raise ResourceExhausted(
                f"{user_id} already has {open_streams} open streams on this node; the limit is "
                f"{self.max_streams_per_user}: close some first",
                retry_after=5.0,
                reason="TOO_MANY_STREAMS",
            )
        self._open_streams[user_id] = open_streams + 1
        try:
            if since_seq is None or since_broadcast_seq is None:
                # "From now" is now, before the stream joins the pool: a message stored while
                # it opens (on any node) comes after this and is replayed, not taken as seen.
                head_seq, head_broadcast = await _read(self.store.heads(user_id))
                since_seq = head_seq if since_seq is None else since_seq
                if since_broadcast_seq is None:
                    since_broadcast_seq = head_broadcast
        except BaseException:
            self._stream_ended(user_id)
            raise
        stream = Stream(user_id, self.stream_queue_size, self._leave)
        if self.pool.add(stream):
            self.relay.user_added(user_id)
        if self._draining:
            stream.close("draining")  # opened while the node drains: the same hint
        # A stream lasts no longer than its session: then the client goes back to the Gate with
        # its user token, so a user the site no longer signs tokens for is let go.
        expiry = None
        if session_ends_at is not None:
            expiry = asyncio.get_running_loop().call_later(
                max(0.0, session_ends_at - time.time()), stream.close, "session_expired"
            )
        try:
            async for event in self._events(stream, since_seq, since_broadcast_seq):
                yield event
        finally:
            if expiry is not None:
                expiry.cancel()
            self._leave(stream)
            self._stream_ended(user_id)

    def _stream_ended(self, user_id: str) -> None:
        left = self._open_streams.pop(user_id) - 1
        if left:
            self._open_streams[user_id] = left

    def _leave(self, stream: Stream) -> None:
        if self.pool.remove(stream):
            self.relay.user_removed(stream.user_id)
            self._unread.forget(stream.user_id)

    async def _events(
        self, stream: Stream, since_seq: int, since_broadcast_seq: int
    ) -> AsyncIterator[node_pb2.SubscribeResponse]:
        user_id = stream.user_id
        # Read the store only once messages stored from now on are sure to be routed here.
        await self.relay.routes_ready(user_id)
        head_seq, head_broadcast = await _read(self.store.heads(user_id))
        seq = _start(since_seq, head_seq, "since_seq")
        broadcast_seq = _start(since_broadcast_seq, head_broadcast, "since_broadcast_seq")
        unread = await _read(self.store.unread_count(user_id))
        self._unread.welcomed(user_id, unread, head_broadcast)
        yield node_pb2.SubscribeResponse(
            welcome=node_pb2.Welcome(
                user_id=user_id,
                node_id=self.node_id,
                heartbeat_interval=duration(self.heartbeat_interval),
            ),
            unread_count=unread,
            cursor=types_pb2.Cursor(seq=seq, broadcast_seq=broadcast_seq),
        )
        replayed = 0
        # A stream at its head (one opened "from now", mostly) has nothing to replay: no reads.
        streams_to_replay = [
            broadcast
            for broadcast, cursor, head in (
                (False, seq, head_seq),
                (True, broadcast_seq, head_broadcast),
            )
            if cursor < head
        ]
        for broadcast in streams_to_replay:
            while True:
                after = broadcast_seq if broadcast else seq
                read = self.store.broadcasts_after if broadcast else self.store.inbox_after
                page = await _read(read(user_id, after, REPLAY_PAGE))
                if not page:
                    break
                replayed += len(page)
                for chunk in self._chunks([to_proto(e) for e in page]):
                    if broadcast:
                        broadcast_seq = chunk[-1].seq
                    else:
                        seq = chunk[-1].seq
                    yield node_pb2.SubscribeResponse(
                        messages=chunk,
                        cursor=types_pb2.Cursor(seq=seq, broadcast_seq=broadcast_seq),
                    )
                if len(page) < REPLAY_PAGE:
                    break
        yield node_pb2.SubscribeResponse(
            replay_done=node_pb2.ReplayDone(replayed=replayed),
            cursor=types_pb2.Cursor(seq=seq, broadcast_seq=broadcast_seq),
        )
        while True:
            batch = await stream.take()
            if not batch.has_news():  # the ticker asked for a heartbeat
                event = node_pb2.SubscribeResponse()
                event.heartbeat.sent_at.GetCurrentTime()
                yield event
                continue
            inbox = _after(batch.messages, seq, broadcast=False)
            broadcasts = _after(batch.messages, broadcast_seq, broadcast=True)
            head_seq = head_broadcast = 0
            # How far a fill read the store: nothing at or below is left to send (a stretch
            # of deleted messages must not hold the cursor back and be read for ever).
            filled_seq = filled_broadcast = 0
            if batch.resync:
                head_seq, head_broadcast = await _read(self.store.heads(user_id))
            # A message relayed from another node can overtake an older one, or a relay can be
            # lost: fill from the store so the stream stays in seq order with nothing missing.
            if (inbox and inbox[-1].seq - seq != len(inbox)) or head_seq > max(
                seq, inbox[-1].seq if inbox else 0
            ):
                inbox, filled_seq = await self._fill(stream, seq, inbox, head_seq, broadcast=False)
            if (
                broadcasts and broadcasts[-1].seq - broadcast_seq != len(broadcasts)
            ) or head_broadcast > max(broadcast_seq, broadcasts[-1].seq if broadcasts else 0):
                broadcasts, filled_broadcast = await self._fill(
                    stream, broadcast_seq, broadcasts, head_broadcast, broadcast=True
                )
            if filled_seq or filled_broadcast:
                # What came from the store came without a count (a lost relay's, say): the
                # user's devices get one read after it.
                self._unread.mark(user_id)
            chunks = list(self._chunks([*inbox, *broadcasts]))
            for chunk in chunks[:-1]:
                seq, broadcast_seq = _advance(chunk, seq, broadcast_seq)
                yield node_pb2.SubscribeResponse(
                    messages=chunk,
                    cursor=types_pb2.Cursor(seq=seq, broadcast_seq=broadcast_seq),
                )
            last = chunks[-1] if chunks else []
            seq, broadcast_seq = _advance(last, seq, broadcast_seq)
            seq, broadcast_seq = max(seq, filled_seq), max(broadcast_seq, filled_broadcast)
            event = node_pb2.SubscribeResponse(
                messages=last,
                cursor=types_pb2.Cursor(seq=seq, broadcast_seq=broadcast_seq),
            )
            if batch.unread_count is not None:
                event.unread_count = batch.unread_count
            if batch.reconnect:
                event.reconnect.reason = batch.reconnect
                # At once for a new session or a fresh start; a draining node's clients wait a
                # little, so they do not all reach the Gate together.
                event.reconnect.retry_after.CopyFrom(
                    duration(0.5 if batch.reconnect == "draining" else 0.0)
                )
                yield event
                return
            if event.messages or event.HasField("unread_count"):
                yield event

    def _chunks(self, messages: list[types_pb2.Message]) -> Iterator[list[types_pb2.Message]]:
        """Messages in events of at most MAX_EVENT_BYTES: clients refuse larger gRPC messages
        (4 MB by default), and a replay or a backlog can hold many large messages."""
        if len(messages) <= self._small_batch:
            if messages:
                yield messages
            return
        chunk: list[types_pb2.Message] = []
        size = 0
        for message in messages:
            length = message.ByteSize()
            if chunk and size + length > MAX_EVENT_BYTES:
                yield chunk
                chunk, size = [], 0
            chunk.append(message)
            size += length
        if chunk:
            yield chunk

    async def _fill(
        self,
        stream: Stream,
        after: int,
        live: list[types_pb2.Message],
        head: int,
        *,
        broadcast: bool,
    ) -> tuple[list[types_pb2.Message], int]:
        """The messages after the cursor up to the newest of live and head, from the store
        merged with what came live, and that seq (the stretch read). A long stretch is filled
        in parts."""
        top = max(head, live[-1].seq if live else 0)
        if top - after > FILL_LIMIT:
            top = after + FILL_LIMIT
            stream.resync()  # the rest on the next round
        read = self.store.broadcasts_after if broadcast else self.store.inbox_after
        stored = await _read(read(stream.user_id, after, top - after))
        merged = {e.seq: to_proto(e) for e in stored if e.seq <= top}
        for message in live:
            if message.seq <= top:
                merged.setdefault(message.seq, message)
        return [merged[k] for k in sorted(merged)], top

    def resync(self) -> None:
        """Make every local stream check the store: relays may have been lost (a dispatcher
        stream broke, a queue overflowed), and stored messages must still reach the user."""
        for stream in self.pool.all():
            stream.resync()

    async def drain(self, grace: float) -> None:
        """Ask every stream to reconnect elsewhere and wait (bounded) until they are gone."""
        self._draining = True
        for stream in self.pool.all():
            stream.close("draining")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.pool.empty.wait()


async def _read(call: Awaitable[T]) -> T:
    """Await a store call; a store failure becomes UNAVAILABLE (retry later)."""
    try:
        return await call
    except StoreError as exc:
        _store_failed(exc)
        raise Unavailable(
            "the message store is unavailable; retry", reason="STORE_UNAVAILABLE"
        ) from exc


# Store failures go to the log (what and where: not to callers, who may be anyone), at most once
# every few seconds while the store stays down.
_store_failed = SparseLog(
    log, STORE_FAILURE_LOG_INTERVAL, "store call failed (%d since the last report): %s"
)


def _after(
    messages: list[types_pb2.Message], cursor: int, *, broadcast: bool
) -> list[types_pb2.Message]:
    """The messages of one stream newer than the cursor, in seq order, each seq once."""
    if len(messages) == 1:  # the usual live event; a broadcast's fan-out takes this 10,000 times
        (m,) = messages
        if (m.kind == types_pb2.MESSAGE_KIND_BROADCAST) == broadcast and m.seq > cursor:
            return [m]
        return []
    newer = {
        m.seq: m
        for m in messages
        if (m.kind == types_pb2.MESSAGE_KIND_BROADCAST) == broadcast and m.seq > cursor
    }
    return [newer[k] for k in sorted(newer)]


def _advance(messages: list[types_pb2.Message], seq: int, broadcast_seq: int) -> tuple[int, int]:
    """The cursor after messages that follow (seq, broadcast_seq) in order."""
    for message in messages:
        if message.kind == types_pb2.MESSAGE_KIND_BROADCAST:
            broadcast_seq = message.seq
        else:
            seq = message.seq
    return seq, broadcast_seq


def _start(cursor: int, head: int, name: str) -> int:
    """Where a stream starts: the client's cursor, if this store ever reached it."""
    if cursor > head:
        raise InvalidArgument(
            f"{name} {cursor} is ahead of the newest message ({head}); "
            "use a cursor this cluster gave you",
            reason="BAD_CURSOR",
            field=name,
        )
    return cursor


def _merge_newest_first(inbox: list[Entry], broadcasts: list[Entry], limit: int) -> list[Entry]:
    """Up to limit entries of the two streams, newest first.

    Each stream keeps its own seq order (creation times from different nodes need not follow
    seqs), and the page takes a prefix of each, so the next page's bounds skip nothing.
    """
    page: list[Entry] = []
    i = j = 0
    while len(page) < limit and (i < len(inbox) or j < len(broadcasts)):
        take_inbox = j >= len(broadcasts) or (
            i < len(inbox)
            and (inbox[i].created_at_ns, inbox[i].id)
            >= (broadcasts[j].created_at_ns, broadcasts[j].id)
        )
        if take_inbox:
            page.append(inbox[i])
            i += 1
        else:
            page.append(broadcasts[j])
            j += 1
    return page


def _within_bytes(page: list[Entry]) -> list[Entry]:
    """The longest prefix of a page that fits MAX_EVENT_BYTES (at least one entry): page_size
    is a maximum, and clients refuse responses over 4 MB by default."""
    size = 0
    for i, entry in enumerate(page):
        size += 128 + len(entry.body) + len(entry.title)
        size += sum(len(k) + len(v) + 4 for k, v in entry.metadata.items())
        if size > MAX_EVENT_BYTES and i:
            return page[:i]
    return page


def _next_bound(taken: list[int], fetched: list[Entry], before: int | None) -> int:
    """The next page's bound for one stream: below what this page took; 1 when the stream is
    exhausted; 0 (from the newest) when it has not been read yet."""
    if taken:
        return min(taken)
    if not fetched:
        return 1
    return before or 0


def _new(message: Outgoing, sender: str, kind: Kind) -> NewMessage:
    key = message.idempotency_key
    if key and kind != Kind.USER:
        key = _SYSTEM_KEY_PREFIX + key
    return NewMessage(
        id=new_message_id(),
        sender=sender,
        kind=kind,
        recipients=message.to,
        title=message.title,
        body=message.body,
        metadata=message.metadata,
        created_at_ns=time.time_ns(),
        idempotency_key=key,
    )


def _wire(new: NewMessage, seq: int, recipient: str) -> types_pb2.Message:
    """What to_proto makes of the stored message, built straight from what was written."""
    return wire_message(
        id=new.id,
        seq=seq,
        sender=new.sender,
        kind=new.kind,
        title=new.title,
        body=new.body,
        metadata=new.metadata,
        created_at_ns=new.created_at_ns,
        recipient=recipient,
    )
