"""An in-memory Store for unit tests of the node's core (same contract, no durability)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from node.store.base import Entry, Kind, NewMessage, ReadFilter, Stored, StoreError

__all__ = ["MemoryStore"]

UNREAD, READ, DELETED = 0, 1, 2


@dataclass
class _User:
    inbox: list[tuple[str, int]] = field(default_factory=list)  # (message id, status) by seq-1
    broadcast_read_upto: int = 0
    broadcast_state: dict[int, int] = field(default_factory=dict)


class MemoryStore:
    """Keeps everything in dicts; `fail_writes` makes append raise, for fault tests."""

    def __init__(self) -> None:
        self._messages: dict[str, NewMessage] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._users: dict[str, _User] = {}
        self._broadcasts: list[str] = []
        self._lock = asyncio.Lock()
        self.fail_writes = False
        self._store_id = uuid.uuid4().hex

    @property
    def store_id(self) -> str:
        return self._store_id

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _user(self, user: str) -> _User:
        return self._users.setdefault(user, _User())

    async def append(self, batch: Sequence[NewMessage]) -> list[Stored]:
        if self.fail_writes:
            raise StoreError("injected write failure")
        async with self._lock:
            out: list[Stored] = []
            for new in batch:
                key = (new.sender, new.idempotency_key)
                if new.idempotency_key and key in self._keys:
                    first = self._messages[self._keys[key]]
                    out.append(Stored(first.id, {}, 0, first.created_at_ns, duplicate=True))
                    continue
                if new.idempotency_key:
                    self._keys[key] = new.id
                self._messages[new.id] = new
                if new.kind == Kind.BROADCAST:
                    self._broadcasts.append(new.id)
                    out.append(Stored(new.id, {}, len(self._broadcasts), new.created_at_ns))
                    continue
                seqs = {}
                for recipient in new.recipients:
                    inbox = self._user(recipient).inbox
                    inbox.append((new.id, UNREAD))
                    seqs[recipient] = len(inbox)
                out.append(Stored(new.id, seqs, 0, new.created_at_ns))
            return out

    async def heads(self, user: str) -> tuple[int, int]:
        return len(self._users[user].inbox) if user in self._users else 0, len(self._broadcasts)

    def _inbox_entry(self, user: str, seq: int, status: int) -> Entry:
        message = self._messages[self._user(user).inbox[seq - 1][0]]
        return self._entry(message, seq, status == READ, user)

    def _broadcast_status(self, state: _User, seq: int) -> int:
        if seq in state.broadcast_state:
            return state.broadcast_state[seq]
        return READ if seq <= state.broadcast_read_upto else UNREAD

    @staticmethod
    def _entry(message: NewMessage, seq: int, read: bool, recipient: str) -> Entry:
        return Entry(
            id=message.id,
            seq=seq,
            sender=message.sender,
            kind=message.kind,
            title=message.title,
            body=message.body,
            metadata=dict(message.metadata),
            created_at_ns=message.created_at_ns,
            read=read,
            recipient=recipient,
        )

    async def inbox_after(self, user: str, after_seq: int, limit: int) -> list[Entry]:
        inbox = self._user(user).inbox
        seqs = [s for s in range(after_seq + 1, len(inbox) + 1) if inbox[s - 1][1] != DELETED]
        return [self._inbox_entry(user, s, inbox[s - 1][1]) for s in seqs[:limit]]

    async def broadcasts_after(self, user: str, after_seq: int, limit: int) -> list[Entry]:
        state = self._user(user)
        found = []
        for seq in range(after_seq + 1, len(self._broadcasts) + 1):
            status = self._broadcast_status(state, seq)
            if status != DELETED:
                message = self._messages[self._broadcasts[seq - 1]]
                found.append(self._entry(message, seq, status == READ, ""))
            if len(found) == limit:
                break
        return found

    @staticmethod
    def _wanted(status: int, read: ReadFilter) -> bool:
        if status == DELETED:
            return False
        return read == ReadFilter.ALL or (status == READ) == (read == ReadFilter.READ)

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
        inbox = self._user(user).inbox
        top = len(inbox) if before_seq is None else min(before_seq - 1, len(inbox))
        found = []
        for seq in range(top, 0, -1):
            message_id, status = inbox[seq - 1]
            message = self._messages[message_id]
            if not self._wanted(status, read):
                continue
            if (sender and message.sender != sender) or (kind and message.kind != kind):
                continue
            found.append(self._entry(message, seq, status == READ, user))
            if len(found) == limit:
                break
        return found

    async def broadcasts_before(
        self,
        user: str,
        before_seq: int | None,
        limit: int,
        *,
        read: ReadFilter = ReadFilter.ALL,
        sender: str = "",
    ) -> list[Entry]:
        state = self._user(user)
        top = len(self._broadcasts) if before_seq is None else before_seq - 1
        found = []
        for seq in range(min(top, len(self._broadcasts)), 0, -1):
            status = self._broadcast_status(state, seq)
            message = self._messages[self._broadcasts[seq - 1]]
            if not self._wanted(status, read) or (sender and message.sender != sender):
                continue
            found.append(self._entry(message, seq, status == READ, ""))
            if len(found) == limit:
                break
        return found

    def _locate(self, user: str, message_id: str) -> tuple[str, int] | None:
        """('inbox' | 'broadcast', seq) of a message the user can see."""
        message = self._messages.get(message_id)
        if message is None:
            return None
        if message.kind == Kind.BROADCAST:
            seq = self._broadcasts.index(message_id) + 1
            if self._broadcast_status(self._user(user), seq) == DELETED:
                return None
            return "broadcast", seq
        for seq, (mid, status) in enumerate(self._user(user).inbox, start=1):
            if mid == message_id and status != DELETED:
                return "inbox", seq
        return None

    async def get(self, user: str, message_id: str) -> Entry | None:
        where = self._locate(user, message_id)
        if where is None:
            return None
        stream, seq = where
        if stream == "inbox":
            return self._inbox_entry(user, seq, self._user(user).inbox[seq - 1][1])
        status = self._broadcast_status(self._user(user), seq)
        return self._entry(self._messages[message_id], seq, status == READ, "")

    def _set_inbox(self, state: _User, seq: int, status: int) -> None:
        mid, old = state.inbox[seq - 1]
        if old != DELETED:
            state.inbox[seq - 1] = (mid, status)

    def _set_broadcast(self, state: _User, seq: int, status: int) -> None:
        if self._broadcast_status(state, seq) != DELETED:
            state.broadcast_state[seq] = status

    async def mark_read(
        self,
        user: str,
        *,
        ids: Sequence[str] = (),
        up_to_seq: int = 0,
        up_to_broadcast_seq: int = 0,
        everything: bool = False,
    ) -> int:
        state = self._user(user)
        for message_id in ids:
            where = self._locate(user, message_id)
            if where is not None:
                stream, seq = where
                setter = self._set_inbox if stream == "inbox" else self._set_broadcast
                setter(state, seq, READ)
        inbox_top = len(state.inbox) if everything else min(up_to_seq, len(state.inbox))
        for seq in range(1, inbox_top + 1):
            self._set_inbox(state, seq, READ)
        broadcast_top = len(self._broadcasts) if everything else up_to_broadcast_seq
        if broadcast_top > state.broadcast_read_upto:
            state.broadcast_read_upto = min(broadcast_top, len(self._broadcasts))
        return await self.unread_count(user)

    async def delete(self, user: str, message_id: str) -> int | None:
        where = self._locate(user, message_id)
        if where is None:
            return None
        stream, seq = where
        state = self._user(user)
        if stream == "inbox":
            self._set_inbox(state, seq, DELETED)
        else:
            state.broadcast_state[seq] = DELETED
        return await self.unread_count(user)

    async def unread_count(self, user: str) -> int:
        state = self._user(user)
        inbox = sum(1 for _, status in state.inbox if status == UNREAD)
        broadcasts = sum(
            1
            for seq in range(1, len(self._broadcasts) + 1)
            if self._broadcast_status(state, seq) == UNREAD
        )
        return inbox + broadcasts
