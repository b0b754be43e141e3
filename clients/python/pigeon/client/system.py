"""The client of a site's backend: publish system messages and broadcasts, list the cluster."""

from __future__ import annotations

import asyncio
import contextlib
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
from pigeon.client.errors import ClientClosed, Unavailable, from_rpc_error
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
    message twice. A caller that retries a publish itself (after :class:`Unavailable`, say: the
    message may have been stored) must give its own ``idempotency_key`` and use it again.
    Rate limits (:class:`ResourceExhausted`, with ``retry_after``) are left to the caller.

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
        secure: Use TLS (with the system's trusted roots unless ``root_certificates`` is given).
        root_certificates: PEM root certificates for TLS; giving them turns TLS on.
        timeout: Seconds each attempt may take (never past ``retry_timeout``).
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
        self._closing = asyncio.Event()  # ends a wait between retries at once

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
        """Close the channels; a call waiting to retry ends with ClientClosed. Safe to call
        twice."""
        self._closed = True
        self._closing.set()
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
            PermissionDenied: The API key may not do this.
            ResourceExhausted: The key's rate limit, or a request over the size limit.
            Unavailable: The cluster could not be reached within ``retry_timeout``.
            ClientClosed: The client was closed meanwhile.
        """
        request = gate_pb2.PublishRequest(
            to=_users(to),
            body=body,
            title=title,
            metadata=dict(metadata or {}),
            broadcast=broadcast,
            source=source,
            idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
        reply = await self._call(
            lambda stub, timeout: stub.Publish(request, metadata=self._metadata, timeout=timeout)
        )
        return reply.message_id

    async def publish_batch(self, publications: Sequence[Publication]) -> list[str]:
        """Publish several messages in one call (far cheaper than one call each).

        Args:
            publications: The messages (at least one, at most the cluster's ``batch_max_size``,
                256 by default, and 4 MiB in all); each gets an idempotency key unless it has
                one.

        Returns:
            The message ids, in order.

        Raises:
            ValueError: ``publications`` is empty.
            Everything :meth:`publish` raises.
        """
        if not publications:
            raise ValueError("publish_batch needs at least one Publication")
        request = gate_pb2.PublishRequest(
            batch=[
                types_pb2.Publication(
                    to=_users(p.to),
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
            lambda stub, timeout: stub.Publish(request, metadata=self._metadata, timeout=timeout)
        )
        return list(reply.message_ids)

    async def list_nodes(self) -> gate_pb2.ListNodesResponse:
        """Every live node and dispatcher with its addresses, version, uptime and load."""
        request = gate_pb2.ListNodesRequest()
        return await self._call(
            lambda stub, timeout: stub.ListNodes(request, metadata=self._metadata, timeout=timeout)
        )

    async def _call(self, call: Callable[[GateAsyncStub, float], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self._retry_timeout
        attempt = 0
        while True:
            # Each pass: a close() during the wait before a retry ends it here, with no channel
            # opened after the close.
            if self._closed:
                raise ClientClosed("the client is closed")
            address = self._gates[self._gate_index % len(self._gates)]
            timeout = max(0.001, min(self._timeout, deadline - time.monotonic()))
            try:
                return await call(gate_pb2_grpc.GateStub(self._channels.get(address)), timeout)
            except grpc.aio.AioRpcError as exc:
                # CANCELLED while this client is open: the Gate stopped mid-call (gRPC cancels
                # the calls left at the end of its grace period); the publish may be stored.
                stopped = exc.code() == grpc.StatusCode.CANCELLED and not self._closed
                if exc.code() not in _RETRYABLE and not stopped:
                    raise from_rpc_error(exc) from exc
                delay = self._backoff.delay(attempt)
                if time.monotonic() + delay > deadline:
                    if stopped:
                        raise Unavailable(f"the Gate at {address} stopped during the call") from exc
                    raise from_rpc_error(exc) from exc
                log.info("Gate %s: %s; retrying in %.2f s", address, exc.code(), delay)
                self._gate_index += 1
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closing.wait()


def _users(to: str | Sequence[str]) -> list[str]:
    """One user id or several: a lone string is one user, not its letters."""
    return [to] if isinstance(to, str) else list(to)
