"""What the SDK hands the application: messages, stream events, cursors, inbox pages."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pigeon.client.errors import ClientError
from pigeon.v1 import types_pb2

__all__ = [
    "Connected",
    "Cursor",
    "Disconnected",
    "Event",
    "Message",
    "MessageKind",
    "Page",
    "Publication",
    "UnreadCount",
]


class MessageKind(enum.StrEnum):
    """Who sent a message, and so which stream it lives in."""

    USER = "user"
    """From a user; in the recipient's inbox stream."""
    SYSTEM = "system"
    """From a system sender (API key) to a list of users; in the inbox stream."""
    BROADCAST = "broadcast"
    """From a system sender to everyone; in the broadcast stream."""

    @classmethod
    def from_proto(cls, kind: types_pb2.MessageKind.ValueType) -> MessageKind:
        """The kind of a ``pigeon.v1.MessageKind`` value (unknown values count as user)."""
        return _KINDS.get(kind, MessageKind.USER)

    def to_proto(self) -> types_pb2.MessageKind.ValueType:
        """The ``pigeon.v1.MessageKind`` value."""
        return _PROTO_KINDS[self]


_KINDS = {
    types_pb2.MESSAGE_KIND_USER: MessageKind.USER,
    types_pb2.MESSAGE_KIND_SYSTEM: MessageKind.SYSTEM,
    types_pb2.MESSAGE_KIND_BROADCAST: MessageKind.BROADCAST,
}
_PROTO_KINDS = {kind: value for value, kind in _KINDS.items()}


@dataclass(frozen=True, slots=True)
class Message:
    """One message as its recipient sees it.

    Attributes:
        id: Unique in the cluster; the same for every recipient of one send.
        seq: Position in its stream (``stream``): gapless and increasing per stream.
        sender: A user id, or the system source name (``"billing"``) for system messages.
        kind: User, system or broadcast.
        title: A short headline; may be empty.
        body: The content.
        metadata: The sender's free-form string attributes.
        created_at: When it was stored (UTC).
        read: Whether the recipient has marked it read.
        recipient: The user this copy belongs to; empty for broadcasts.
        proto: The ``pigeon.v1.Message`` it was made from.
    """

    id: str
    seq: int
    sender: str
    kind: MessageKind
    title: str
    body: str
    metadata: Mapping[str, str]
    created_at: datetime
    read: bool
    recipient: str
    proto: types_pb2.Message = field(repr=False, compare=False)

    @property
    def stream(self) -> str:
        """``"broadcast"`` for broadcasts, ``"inbox"`` otherwise: where ``seq`` counts."""
        return "broadcast" if self.kind is MessageKind.BROADCAST else "inbox"

    @classmethod
    def from_proto(cls, message: types_pb2.Message) -> Message:
        """Wrap a ``pigeon.v1.Message``."""
        return cls(
            id=message.id,
            seq=message.seq,
            sender=message.sender,
            kind=MessageKind.from_proto(message.kind),
            title=message.title,
            body=message.body,
            metadata=dict(message.metadata),
            created_at=datetime.fromtimestamp(message.created_at.ToNanoseconds() / 1e9, UTC),
            read=message.read,
            recipient=message.recipient,
            proto=message,
        )


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in a user's two streams: the last inbox seq and the last broadcast seq the
    application has. ``None`` means "from now on" (no replay) for that stream.

    Persist :attr:`UserClient.cursor <pigeon.client.UserClient.cursor>` and pass it back as
    ``UserClient(..., cursor=...)`` to resume a later session where this one stopped;
    ``Cursor(0, 0)`` replays everything.
    """

    seq: int | None = None
    broadcast_seq: int | None = None


@dataclass(frozen=True, slots=True)
class UnreadCount:
    """The user's unread count changed (or is first known); an absolute number."""

    count: int


@dataclass(frozen=True, slots=True)
class Connected:
    """The client holds a stream on a node: everything stored for the user from now on (and
    anything after the cursor) will be delivered.

    Attributes:
        node_id: The node holding the stream.
        node_address: Its gRPC address.
        user_id: The user, from the token.
        reconnected: False on the first connection, True after any reconnect.
        cursor: Where the stream resumed from.
    """

    node_id: str
    node_address: str
    user_id: str
    reconnected: bool
    cursor: Cursor


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The stream ended; the client reconnects by itself and resumes from its cursor.

    Attributes:
        reason: ``"draining"`` or ``"slow_consumer"`` (the node asked), ``"connection_lost"``,
            ``"heartbeat_timeout"``, ``"session_refresh"``, ``"request_failed"`` (a call failed and
            the client reconnects to retry it) or ``"gap"`` (a message was missing: resubscribe).
        retry_in: Seconds until the next attempt.
        error: The error that ended the stream, if one did.
    """

    reason: str
    retry_in: float
    error: ClientError | None = None


Event = Message | UnreadCount | Connected | Disconnected
"""What :meth:`UserClient.events <pigeon.client.UserClient.events>` yields."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of the inbox, newest first.

    Attributes:
        messages: The messages of the page.
        next_page_token: Pass to ``list_messages(page_token=...)`` for the next (older) page;
            empty when there is none.
    """

    messages: list[Message]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Publication:
    """One message of :meth:`SystemClient.publish_batch
    <pigeon.client.SystemClient.publish_batch>`.

    Attributes:
        to: Recipient user ids; leave empty and set ``broadcast`` to reach everyone.
        body: The content; must not be empty.
        title: A short headline.
        metadata: Free-form string attributes.
        broadcast: Send to every user instead of a list.
        source: The sending system's name, shown as the sender (default ``"system"``).
        idempotency_key: Makes retries safe; the SDK generates one when empty.
    """

    to: Sequence[str] = ()
    body: str = ""
    title: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    broadcast: bool = False
    source: str = ""
    idempotency_key: str = ""
