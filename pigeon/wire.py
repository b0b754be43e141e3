"""Helpers for protobuf messages the services put on the wire."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

__all__ = ["duration", "prefix_within"]

_M = TypeVar("_M", bound=Message)

# What a repeated message field adds per element besides the element: its tag and length.
_FIELD_OVERHEAD = 8


def duration(seconds: float) -> Duration:
    """The protobuf Duration of a number of seconds."""
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def prefix_within(messages: list[_M], max_bytes: int, count: int | None = None) -> list[_M]:
    """The longest prefix of messages (at most count of them) that fits in max_bytes as a
    repeated field, and at least one message: one larger than max_bytes goes on its own.

    Args:
        messages: The messages, in the order they go.
        max_bytes: The most the prefix may take on the wire.
        count: The most messages the prefix may hold (no limit if None).

    Returns:
        The prefix (a new list).
    """
    size = 0
    taken = messages[:count]
    for i, message in enumerate(taken):
        size += message.ByteSize() + _FIELD_OVERHEAD
        if size > max_bytes and i:
            return taken[:i]
    return taken
