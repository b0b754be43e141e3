"""The Dispatcher's gRPC servicer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from prometheus_client import Counter

from dispatcher.routing import NodeLink, Router
from pigeon.errors import InvalidArgument
from pigeon.runtime import cancel_and_wait
from pigeon.v1 import dispatcher_pb2, dispatcher_pb2_grpc

__all__ = ["DispatcherServicer"]

log = logging.getLogger("pigeon.dispatcher")

RECEIVED = Counter(
    "pigeon_dispatcher_envelopes_received",
    "Envelopes published by nodes, on their Subscribe streams or in Publish calls",
    ["via"],
)
RECEIVED_ON_STREAMS = RECEIVED.labels("stream")
RECEIVED_IN_CALLS = RECEIVED.labels("call")

Context = grpc.aio.ServicerContext[Any, Any]


class DispatcherServicer(dispatcher_pb2_grpc.DispatcherServicer):
    """Relays envelopes between nodes (pigeon.server's guard checks the cluster secret)."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def Subscribe(
        self,
        request_iterator: AsyncIterator[dispatcher_pb2.DispatcherSubscribeRequest],
        context: Context,
    ) -> AsyncIterator[dispatcher_pb2.DispatcherSubscribeResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if not first.node_id:
            raise InvalidArgument(
                "the first message of Subscribe must carry node_id", field="node_id"
            )
        link = self._router.attach(first.node_id)
        self._router.report(link, first.report, first.report_version)
        log.info("node %s subscribed with %d users", link.node_id, len(link.users))
        reader = asyncio.create_task(self._read(request_iterator, link))
        try:
            while True:
                reply = await link.take()
                if reply is None:
                    break
                yield reply
        finally:
            await cancel_and_wait(reader)
            self._router.detach(link)
            reason = "fell behind" if link.overflowed else "left"
            log.info("node %s %s", link.node_id, reason)

    async def _read(
        self,
        requests: AsyncIterator[dispatcher_pb2.DispatcherSubscribeRequest],
        link: NodeLink,
    ) -> None:
        try:
            async for request in requests:
                if request.HasField("report"):
                    self._router.report(link, request.report, request.report_version)
                if request.publish_seq:
                    RECEIVED_ON_STREAMS.inc(len(request.envelopes))
                    self._router.route(request.envelopes)
                    link.acknowledge_published(request.publish_seq)
                if request.applied_shared_version:
                    self._router.shared_applied(link, request.applied_shared_version)
        except grpc.aio.AioRpcError:
            pass
        finally:
            # The node closed its side (or the call broke): end the stream.
            link.close()

    async def Publish(
        self, request: dispatcher_pb2.DispatcherPublishRequest, context: Context
    ) -> dispatcher_pb2.DispatcherPublishResponse:
        # Nodes publish on their Subscribe streams; this call stays for tools and grpcurl users
        # who hand envelopes to a dispatcher by hand.
        RECEIVED_IN_CALLS.inc(len(request.envelopes))
        self._router.route(request.envelopes)
        return dispatcher_pb2.DispatcherPublishResponse(accepted=len(request.envelopes))
