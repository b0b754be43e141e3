"""Between the store's records and the wire's messages."""

from __future__ import annotations

import os
import time

from node.store.base import Entry
from pigeon.v1 import types_pb2

__all__ = ["new_message_id", "to_proto"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Two characters per 10 bits: half the Python steps of one character per 5.
_PAIRS = [_CROCKFORD[i >> 5] + _CROCKFORD[i & 31] for i in range(1024)]
_PAIR_SHIFTS = tuple(range(115, 4, -10))


def new_message_id() -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, so ids sort by creation time."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    # 26 characters of 5 bits: the top 3 bits, 12 pairs, the lowest 5 bits.
    return (
        _CROCKFORD[value >> 125]
        + "".join([_PAIRS[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])
        + _CROCKFORD[value & 31]
    )


def to_proto(entry: Entry) -> types_pb2.Message:
    """The wire form of a message as one recipient sees it."""
    message = types_pb2.Message(
        id=entry.id,
        seq=entry.seq,
        sender=entry.sender,
        kind=int(entry.kind),  # type: ignore[arg-type]
        title=entry.title,
        body=entry.body,
        metadata=entry.metadata,
        read=entry.read,
        recipient=entry.recipient,
    )
    message.created_at.FromNanoseconds(entry.created_at_ns)
    return message
