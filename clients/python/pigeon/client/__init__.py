"""The Pigeon Python SDK: a user's live stream and inbox, and a system sender's publisher.

It needs grpcio, protobuf, googleapis-common-protos and grpcio-status, and nothing of Pigeon's
server side. A user connects through the Gate with the JWT the site's backend signed, and gets
every message stored for them, once and in order, across node crashes, drains and network
failures:

.. code-block:: python

    import asyncio
    import os

    from pigeon.client import Message, SystemClient, UserClient

    async def main() -> None:
        gate = os.environ.get("PIGEON_GATE", "127.0.0.1:7070")
        api_key = os.environ["PIGEON_API_KEYS"].split(",")[0]
        async with UserClient(gate, os.environ["BOB_TOKEN"]) as bob:
            async with SystemClient(gate, api_key) as shop:
                await shop.publish(to="bob", body="Your order has shipped", source="shop")
            async for event in bob.events():
                if isinstance(event, Message):
                    print(f"{event.sender}: {event.body} (#{event.seq})")
                    break
            print("unread:", await bob.unread_count())

    asyncio.run(main())

Every failure is a :class:`ClientError` carrying the gRPC code, the server's message and its
reason.
"""

from pigeon.client.backoff import Backoff
from pigeon.client.errors import (
    ClientClosed,
    ClientError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from pigeon.client.system import SystemClient
from pigeon.client.types import (
    Connected,
    Cursor,
    Disconnected,
    Event,
    Message,
    MessageKind,
    Page,
    Publication,
    UnreadCount,
)
from pigeon.client.user import TokenSource, UserClient

# The client distribution's version (clients/python/pyproject.toml); see CHANGELOG.md for which
# servers it talks to.
__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "ClientClosed",
    "ClientError",
    "Connected",
    "Cursor",
    "Disconnected",
    "Event",
    "InvalidArgument",
    "Message",
    "MessageKind",
    "NotFound",
    "Page",
    "PermissionDenied",
    "Publication",
    "ResourceExhausted",
    "SystemClient",
    "TokenSource",
    "Unauthenticated",
    "Unavailable",
    "UnreadCount",
    "UserClient",
]
