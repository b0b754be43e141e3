"""Between the store's records and the wire's messages."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from node.store.base import Entry, Kind
from pigeon.v1 import dispatcher_pb2, types_pb2

__all__ = ["new_message_id", "resync_envelope", "to_proto", "wire_message"]

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
    return wire_message(
        id=entry.id,
        seq=entry.seq,
        sender=entry.sender,
        kind=entry.kind,
        title=entry.title,
        body=entry.body,
        metadata=entry.metadata,
        created_at_ns=entry.created_at_ns,
        read=entry.read,
        recipient=entry.recipient,
    )


def wire_message(
    *,
    id: str,
    seq: int,
    sender: str,
    kind: Kind,
    title: str,
    body: str,
    metadata: Mapping[str, str],
    created_at_ns: int,
    recipient: str,
    read: bool = False,
) -> types_pb2.Message:
    """A wire message from its parts (from the store, or from what was just written)."""
    built = types_pb2.Message(
        id=id,
        seq=seq,
        sender=sender,
        kind=int(kind),  # type: ignore[arg-type]
        title=title,
        body=body,
        read=read,
        recipient=recipient,
    )
    # Item by item: the constructor fills a map through a slow Python-level update().
    fields = built.metadata
    for key, value in metadata.items():
        fields[key] = value
    built.created_at.FromNanoseconds(created_at_ns)
    return built


def resync_envelope(origin_node_id: str, recipient: str = "") -> dispatcher_pb2.Envelope:
    """An envelope that carries no message and makes the recipient's streams on other nodes
    (every stream, for no recipient) check the store: what the origin could not relay is there.
    """
    return dispatcher_pb2.Envelope(
        recipient=recipient, broadcast=not recipient, resync=True, origin_node_id=origin_node_id
    )
