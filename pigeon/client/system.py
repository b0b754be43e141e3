"""The client of a site's backend: publish system messages and broadcasts, list the cluster."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc
import grpc.aio

from pigeon.client._channel import Channels, gate_list
from pigeon.client.backoff import Backoff
from pigeon.client.errors import ClientClosed, from_rpc_error
from pigeon.client.types import Publication
from pigeon.v1 import gate_pb2, gate_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from pigeon.v1.gate_pb2_grpc import GateAsyncStub

__all__ = ["SystemClient"]

log = logging.getLogger("pigeon.client")

T = TypeVar("T")

# Worth another try, at the same or the next Gate. DEADLINE_EXCEEDED too: the publish may have
# been stored, and the idempotency key makes the retry store nothing new.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class SystemClient:
    """Publishes messages as a system sender (an API key), through the Gate.

    Every publish carries an idempotency key (made up when the caller gives none), so the
    retries it makes on UNAVAILABLE, with exponential backoff and full jitter, never store a
    message twice.

    Example:
        .. code-block:: python

            import asyncio
            import os

            from pigeon.client import Publication, SystemClient

            async def main() -> None:
                gate = os.environ.get("PIGEON_GATE", "127.0.0.1:7070")
                api_key = os.environ["PIGEON_API_KEYS"].split(",")[0]
                async with SystemClient(gate, api_key) as system:
                    message_id = await system.publish(
                        to=["bob"], body="Your order has shipped", source="shop"
                    )
                    print("published", message_id)
                    await system.publish(broadcast=True, body="Maintenance at 02:00 UTC")
                    ids = await system.publish_batch(
                        [Publication(to=[user], body=f"Hello {user}") for user in ("bob", "carol")]
                    )
                    print(len(ids), "more")
                    cluster = await system.list_nodes()
                    for node in cluster.nodes:
                        print(node.node_id, node.address, node.connections)

            asyncio.run(main())

    Args:
        gate_address: ``host:port`` of a Gate, or a list of Gates to rotate through.
        api_key: One of the cluster's API keys (``PIGEON_API_KEYS``).
        secure: Use TLS.
        root_certificates: PEM root certificates for TLS.
        timeout: Seconds each attempt may take.
        retry_timeout: Seconds to keep retrying an unavailable cluster before giving up.
        backoff: Delays between retries.
    """

    def __init__(
        self,
        gate_address: str | Sequence[str],
        api_key: str,
        *,
        secure: bool = False,
        root_certificates: bytes | None = None,
        timeout: float = 10.0,
        retry_timeout: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self._gates = gate_list(gate_address)
        self._gate_index = 0
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._channels = Channels(secure=secure, root_certificates=root_certificates)
        self._timeout = timeout
        self._retry_timeout = retry_timeout
        self._backoff = backoff or Backoff(initial=0.1, max=5.0, multiplier=2.0)
        self._closed = False

    async def __aenter__(self) -> SystemClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels. Safe to call twice."""
        self._closed = True
        await self._channels.close()

    async def publish(
        self,
        to: str | Sequence[str] = (),
        body: str = "",
        *,
        title: str = "",
        metadata: Mapping[str, str] | None = None,
        broadcast: bool = False,
        source: str = "",
        idempotency_key: str | None = None,
    ) -> str:
        """Publish one message to some users, or to everyone; returns once it is stored.

        Args:
            to: A user id or a list of them; leave empty with ``broadcast=True``.
            body: The content.
            title: A short headline.
            metadata: Free-form string attributes.
            broadcast: Send to every user.
            source: The sending system's name, shown as the sender (default ``"system"``).
            idempotency_key: Publishing again with the same key (and source) stores nothing new.
                Made up when not given, so the client's own retries are safe.

        Returns:
            The message id.

        Raises:
            InvalidArgument: A bad recipient, an empty body, a limit passed.
            Unauthenticated: The API key is not valid.
            Unavailable: The cluster could not be reached within ``retry_timeout``.
        """
        request = gate_pb2.PublishRequest(
            to=[to] if isinstance(to, str) else list(to),
            body=body,
            title=title,
            metadata=dict(metadata or {}),
            broadcast=broadcast,
            source=source,
            idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
        reply = await self._call(
            lambda stub: stub.Publish(request, metadata=self._metadata, timeout=self._timeout)
        )
        return reply.message_id

    async def publish_batch(self, publications: Sequence[Publication]) -> list[str]:
        """Publish several messages in one call (far cheaper than one call each).

        Args:
            publications: The messages; each gets an idempotency key unless it has one.

        Returns:
            The message ids, in order.
        """
        request = gate_pb2.PublishRequest(
            batch=[
                types_pb2.Publication(
                    to=list(p.to),
                    body=p.body,
                    title=p.title,
                    metadata=dict(p.metadata),
                    broadcast=p.broadcast,
                    source=p.source,
                    idempotency_key=p.idempotency_key or uuid.uuid4().hex,
                )
                for p in publications
            ]
        )
        reply = await self._call(
            lambda stub: stub.Publish(request, metadata=self._metadata, timeout=self._timeout)
        )
        return list(reply.message_ids)

    async def list_nodes(self) -> gate_pb2.ListNodesResponse:
        """Every live node and dispatcher with its addresses, version, uptime and load."""
        request = gate_pb2.ListNodesRequest()
        return await self._call(
            lambda stub: stub.ListNodes(request, metadata=self._metadata, timeout=self._timeout)
        )

    async def _call(self, call: Callable[[GateAsyncStub], Awaitable[T]]) -> T:
        if self._closed:
            raise ClientClosed("the client is closed")
        deadline = time.monotonic() + self._retry_timeout
        attempt = 0
        while True:
            address = self._gates[self._gate_index % len(self._gates)]
            try:
                return await call(gate_pb2_grpc.GateStub(self._channels.get(address)))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise from_rpc_error(exc) from exc
                delay = self._backoff.delay(attempt)
                if time.monotonic() + delay > deadline:
                    raise from_rpc_error(exc) from exc
                log.info("Gate %s: %s; retrying in %.2f s", address, exc.code(), delay)
                self._gate_index += 1
                attempt += 1
                await asyncio.sleep(delay)
