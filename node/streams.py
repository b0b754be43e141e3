"""The node's connection pool: every open Subscribe stream, by user, each with a bounded queue
that its writer flushes as one event."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from pigeon.v1 import types_pb2

__all__ = ["Batch", "Pool", "Stream"]

STREAMS = Gauge("pigeon_node_streams", "Open client streams on this node")
USERS = Gauge("pigeon_node_users", "Distinct users with an open stream on this node")
DROPPED = Counter("pigeon_node_slow_consumers", "Streams ended because they fell behind")

_stream_ids = itertools.count(1)


@dataclass
class Batch:
    """What a stream's writer takes in one go: everything queued since its last event."""

    messages: list[types_pb2.Message] = field(default_factory=list)
    unread_count: int | None = None
    reconnect: str = ""
    # Something may have been stored for the user without reaching this stream (a relay was
    # lost): compare the store's head with the cursor and fill in.
    resync: bool = False
    # Nothing went out for a heartbeat interval: send a heartbeat if there is nothing else.
    heartbeat: bool = False

    def has_news(self) -> bool:
        """Anything to send or do besides a heartbeat."""
        return (
            bool(self.messages)
            or self.unread_count is not None
            or bool(self.reconnect)
            or self.resync
        )


class Stream:
    """One client stream: a bounded outgoing queue and a wake-up for its writer.

    Producers never wait on a stream. A stream whose queue passes its limit is marked for a
    reconnect (slow consumer) and takes no more messages: the client resumes from the store, so
    nothing is lost and the node neither slows down nor grows.
    """

    __slots__ = ("_batch", "_wake", "id", "limit", "on_overflow", "sent_at", "user_id")

    def __init__(
        self, user_id: str, limit: int, on_overflow: Callable[[Stream], None] | None = None
    ) -> None:
        self.id = next(_stream_ids)
        self.user_id = user_id
        self.limit = limit
        self._batch = Batch()
        # Called once when the stream falls behind. Its writer may be stuck in a write that waits
        # for the client to read, so the pool must let go of it now, not when the writer returns.
        self.on_overflow = on_overflow
        self._wake = asyncio.Event()
        # When the writer last took an event (loop time): the heartbeat ticker reads it.
        self.sent_at = asyncio.get_running_loop().time()

    @property
    def overflowed(self) -> bool:
        return self._batch.reconnect == "slow_consumer"

    def push(self, messages: Iterable[types_pb2.Message], unread_count: int | None) -> None:
        """Queue messages and/or an unread count; the writer sends them in one event."""
        batch = self._batch
        if batch.reconnect:
            return
        batch.messages.extend(messages)
        if unread_count is not None:
            batch.unread_count = unread_count
        if len(batch.messages) > self.limit:
            batch.messages.clear()
            batch.unread_count = None
            batch.reconnect = "slow_consumer"
            DROPPED.inc()
            if self.on_overflow is not None:
                self.on_overflow(self)
        self._wake.set()

    def resync(self) -> None:
        """Ask the writer to check the store for messages that never arrived live."""
        self._batch.resync = True
        self._wake.set()

    def close(self, reason: str) -> None:
        """Ask the writer to send a reconnect hint and end the stream."""
        if not self._batch.reconnect:
            self._batch.reconnect = reason
        self._wake.set()

    def beat(self) -> None:
        """Ask the writer for a heartbeat (the node's ticker found the stream quiet)."""
        self._batch.heartbeat = True
        self._wake.set()

    async def take(self) -> Batch:
        """Everything queued, once there is any (a heartbeat request counts).

        No timer per wait: one ticker per node asks quiet streams for heartbeats. A timeout here
        cost every stream event a timer set and cancelled, and with 10,000 streams a broadcast
        left 20,000 new timer objects for the collector.
        """
        if not self._has_work():
            self._wake.clear()
            await self._wake.wait()
        batch, self._batch = self._batch, Batch(reconnect=self._batch.reconnect)
        self.sent_at = asyncio.get_running_loop().time()
        return batch

    def _has_work(self) -> bool:
        return self._batch.heartbeat or self._batch.has_news()


class Pool:
    """user id → open streams on this node (all of a user's devices and tabs)."""

    def __init__(self) -> None:
        self._by_user: dict[str, dict[int, Stream]] = {}
        self._count = 0
        self.empty = asyncio.Event()
        self.empty.set()

    def add(self, stream: Stream) -> bool:
        """Register a stream; True if it is the user's first on this node."""
        streams = self._by_user.setdefault(stream.user_id, {})
        first = not streams
        streams[stream.id] = stream
        self._count += 1
        self.empty.clear()
        STREAMS.set(self._count)
        USERS.set(len(self._by_user))
        return first

    def remove(self, stream: Stream) -> bool:
        """Unregister a stream; True if it was the user's last on this node."""
        streams = self._by_user.get(stream.user_id)
        if streams is None or streams.pop(stream.id, None) is None:
            return False
        self._count -= 1
        if not self._count:
            self.empty.set()
        last = not streams
        if last:
            del self._by_user[stream.user_id]
        STREAMS.set(self._count)
        USERS.set(len(self._by_user))
        return last

    def streams_of(self, user_id: str) -> Iterable[Stream]:
        streams = self._by_user.get(user_id)
        return streams.values() if streams else ()

    def holds(self, user_id: str) -> bool:
        return user_id in self._by_user

    def users(self) -> Iterator[str]:
        return iter(list(self._by_user))

    def all(self) -> list[Stream]:
        # A list made before the caller pushes: an overflowing stream leaves the pool meanwhile.
        return [s for streams in self._by_user.values() for s in streams.values()]

    @property
    def connections(self) -> int:
        return self._count

    @property
    def user_count(self) -> int:
        return len(self._by_user)
