"""The Store protocol: what a node needs from durable storage, and the records it trades in.

Two streams hold messages. Each user has an inbox stream whose seq is gapless and strictly
increasing, assigned by the store atomically even when several node processes write for the same
user at once. Broadcasts live once in the broadcast stream (fan-out on read) with a seq of their
own; each user's read and delete state for them is kept beside it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "Entry",
    "Kind",
    "NewMessage",
    "ReadFilter",
    "Store",
    "StoreError",
    "Stored",
]


class StoreError(Exception):
    """The store failed (unreachable, write refused). Nothing of the failed call is stored."""


class Kind(enum.IntEnum):
    """The kind of a message; the values are those of pigeon.v1.MessageKind."""

    USER = 1
    SYSTEM = 2
    BROADCAST = 3


class ReadFilter(enum.IntEnum):
    """Which messages a listing returns; the values are those of pigeon.v1.ReadFilter."""

    ALL = 0
    UNREAD = 1
    READ = 2


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store.

    Attributes:
        id: the message id, chosen by the caller (unique in the cluster).
        sender: a user id, or a system source name.
        kind: user, system or broadcast.
        recipients: the users whose inbox gets it (distinct); empty for a broadcast.
        created_at_ns: the creation time, nanoseconds since the epoch.
        idempotency_key: if not empty, a second message from the same sender with the same key
            is not stored again: the store answers with the first one.
    """

    id: str
    sender: str
    kind: Kind
    recipients: tuple[str, ...]
    title: str
    body: str
    metadata: Mapping[str, str]
    created_at_ns: int
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class Stored:
    """What the store made of a NewMessage.

    Attributes:
        id: the stored message's id (the first message's id when this was a duplicate).
        seqs: recipient → the message's seq in that recipient's inbox.
        broadcast_seq: the seq in the broadcast stream (0 unless a broadcast).
        created_at_ns: the stored creation time (the first message's, for a duplicate).
        duplicate: true if the idempotency key matched an earlier message; nothing new was
            stored and there is nothing new to deliver.
        unread: recipient → their unread count once the whole write is stored, every
            broadcast of the write included (filled by stores that can tell within the same
            transaction; empty otherwise).
    """

    id: str
    seqs: Mapping[str, int]
    broadcast_seq: int
    created_at_ns: int
    duplicate: bool = False
    unread: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Entry:
    """A message as one user sees it: from their inbox or from the broadcast stream."""

    id: str
    seq: int
    sender: str
    kind: Kind
    title: str
    body: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    created_at_ns: int = 0
    read: bool = False
    recipient: str = ""


class Store(Protocol):
    """Durable storage of messages, inboxes and read state.

    Every method either completes or raises StoreError with nothing half-done.
    """

    @property
    def store_id(self) -> str:
        """An id made once, when the store was created (known after `open`): nodes compare it
        to find out whether they share one store."""

    async def open(self) -> None:
        """Connect and create the schema and indexes if missing."""

    async def close(self) -> None:
        """Release connections; pending calls finish first."""

    async def append(self, batch: Sequence[NewMessage]) -> list[Stored]:
        """Store a batch durably in one transaction (or one bulk write), assigning seqs.

        Returns one Stored per NewMessage, in order. Within a batch, messages to one recipient
        get increasing seqs in batch order.
        """

    async def heads(self, user: str) -> tuple[int, int]:
        """The user's last inbox seq and the last broadcast seq (0 when empty)."""

    async def inbox_after(self, user: str, after_seq: int, limit: int) -> list[Entry]:
        """Inbox entries with seq > after_seq, oldest first, deleted ones left out."""

    async def broadcasts_after(self, user: str, after_seq: int, limit: int) -> list[Entry]:
        """Broadcasts with seq > after_seq, oldest first, with the user's read state, without
        those the user deleted."""

    async def inbox_before(
        self,
        user: str,
        before_seq: int | None,
        limit: int,
        *,
        read: ReadFilter = ReadFilter.ALL,
        sender: str = "",
        kind: Kind | None = None,
    ) -> list[Entry]:
        """Inbox entries with seq < before_seq (None: from the newest), newest first."""

    async def broadcasts_before(
        self,
        user: str,
        before_seq: int | None,
        limit: int,
        *,
        read: ReadFilter = ReadFilter.ALL,
        sender: str = "",
    ) -> list[Entry]:
        """Broadcasts with seq < before_seq (None: from the newest), newest first, as the user
        sees them (their read state; deleted ones left out)."""

    async def get(self, user: str, message_id: str) -> Entry | None:
        """One message of the user's inbox or of the broadcast stream, unless deleted by them."""

    async def mark_read(
        self,
        user: str,
        *,
        ids: Sequence[str] = (),
        up_to_seq: int = 0,
        up_to_broadcast_seq: int = 0,
        everything: bool = False,
    ) -> int:
        """Mark messages read; returns the user's unread count afterwards. Unknown ids are
        ignored."""

    async def delete(self, user: str, message_id: str) -> int | None:
        """Delete a message from the user's view; returns the unread count afterwards, or None
        if the user has no such message."""

    async def unread_count(self, user: str) -> int:
        """Unread messages of the user, broadcasts included."""
