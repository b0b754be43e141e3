"""The Node's gRPC servicer: protobuf in, core call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc.aio

from node.convert import to_proto
from node.core import NodeCore
from node.store.base import Kind, ReadFilter
from node.validate import Limits, Outgoing, check_batch, check_outgoing
from pigeon.auth import check_source
from pigeon.errors import InvalidArgument
from pigeon.server import current_principal
from pigeon.v1 import node_pb2, node_pb2_grpc, types_pb2

__all__ = ["NodeServicer"]

Context = grpc.aio.ServicerContext[Any, Any]


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Node RPCs for the authenticated caller (see pigeon.server's guard)."""

    def __init__(self, core: NodeCore) -> None:
        self._core = core

    async def Subscribe(
        self, request: node_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[node_pb2.SubscribeResponse]:
        since = request.since_seq if request.HasField("since_seq") else None
        since_broadcast = (
            request.since_broadcast_seq if request.HasField("since_broadcast_seq") else None
        )
        caller = current_principal()
        async for event in self._core.subscribe(
            caller.id, since, since_broadcast, session_ends_at=caller.expires_at
        ):
            yield event

    async def Send(self, request: node_pb2.SendRequest, context: Context) -> node_pb2.SendResponse:
        sender = current_principal().id
        stored = await self._core.send(
            sender, messages_of(self._core.limits, request, sender=sender)
        )
        reply = node_pb2.SendResponse(message_id=stored[0].id, message_ids=[s.id for s in stored])
        reply.created_at.FromNanoseconds(stored[0].created_at_ns)
        return reply

    async def Publish(
        self, request: node_pb2.NodePublishRequest, context: Context
    ) -> node_pb2.NodePublishResponse:
        messages = messages_of(self._core.limits, request)
        # A Gate (cluster secret) checked its caller's scope; an API key called us directly.
        allowed = current_principal().sources
        if allowed is not None:
            many = len(request.batch) > 0
            for i, message in enumerate(messages):
                check_source(
                    allowed, message.source, field=f"batch[{i}].source" if many else "source"
                )
        stored = await self._core.publish(messages)
        reply = node_pb2.NodePublishResponse(
            message_id=stored[0].id, message_ids=[s.id for s in stored]
        )
        reply.created_at.FromNanoseconds(stored[0].created_at_ns)
        return reply

    async def ListMessages(
        self, request: node_pb2.ListMessagesRequest, context: Context
    ) -> node_pb2.ListMessagesResponse:
        entries, token = await self._core.list_messages(
            current_principal().id,
            page_size=request.page_size,
            page_token=request.page_token,
            read=ReadFilter(_known(request.read_filter, _READ, "read_filter")),
            sender=request.sender,
            kind=Kind(_known(request.kind, _KINDS, "kind")) if request.kind else None,
        )
        return node_pb2.ListMessagesResponse(
            messages=[to_proto(e) for e in entries], next_page_token=token
        )

    async def GetMessage(
        self, request: node_pb2.GetMessageRequest, context: Context
    ) -> node_pb2.GetMessageResponse:
        entry = await self._core.get_message(current_principal().id, request.message_id)
        return node_pb2.GetMessageResponse(message=to_proto(entry))

    async def MarkRead(
        self, request: node_pb2.MarkReadRequest, context: Context
    ) -> node_pb2.MarkReadResponse:
        unread = await self._core.mark_read(
            current_principal().id,
            ids=list(request.message_ids),
            up_to_seq=request.up_to_seq,
            up_to_broadcast_seq=request.up_to_broadcast_seq,
            everything=request.all,
        )
        return node_pb2.MarkReadResponse(unread_count=unread)

    async def DeleteMessage(
        self, request: node_pb2.DeleteMessageRequest, context: Context
    ) -> node_pb2.DeleteMessageResponse:
        unread = await self._core.delete(current_principal().id, request.message_id)
        return node_pb2.DeleteMessageResponse(unread_count=unread)

    async def GetUnreadCount(
        self, request: node_pb2.GetUnreadCountRequest, context: Context
    ) -> node_pb2.GetUnreadCountResponse:
        return node_pb2.GetUnreadCountResponse(
            unread_count=await self._core.unread_count(current_principal().id)
        )


_READ = {f.value: node_pb2.ReadFilter.DESCRIPTOR.values_by_number[f.value].name for f in ReadFilter}
_KINDS = {k.value: types_pb2.MessageKind.DESCRIPTOR.values_by_number[k.value].name for k in Kind}


def _known(value: int, names: Mapping[int, str], field: str) -> int:
    """An enum value this node knows; another (a newer client's) gets INVALID_ARGUMENT."""
    if value not in names:
        raise InvalidArgument(
            f"{field} must be one of {', '.join(names.values())}, got {value}",
            reason="BAD_ENUM",
            field=field,
        )
    return value


def messages_of(
    limits: Limits,
    request: node_pb2.SendRequest | node_pb2.NodePublishRequest,
    *,
    sender: str = "",
) -> list[Outgoing]:
    """The validated messages of a Send or Publish request: its own fields or its batch."""
    single = any(field.name != "batch" for field, _ in request.ListFields())
    check_batch(single, request.batch, limits.max_batch)
    items: Sequence[Any] = request.batch or [request]
    if sender:
        # One user's call stores a copy per recipient: the whole batch counts against the limit,
        # or one request of 256 drafts to 1,000 users each would hold every writer for seconds.
        copies = sum(len(set(m.to)) for m in items)
        if copies > limits.max_recipients:
            raise InvalidArgument(
                f"this Send has {copies} recipients in all (its messages together); the limit "
                f"is {limits.max_recipients}: split it, or publish to many with an API key",
                reason="TOO_MANY_RECIPIENTS",
                field="batch" if request.batch else "to",
                limit=str(limits.max_recipients),
            )
    many = bool(request.batch)
    # Drafts (from users) have neither field; asked once, not per message.
    fields = items[0].DESCRIPTOR.fields_by_name if items else {}
    system = "broadcast" in fields and "source" in fields
    return [
        check_outgoing(
            limits,
            to=m.to,
            title=m.title,
            body=m.body,
            metadata=m.metadata,
            idempotency_key=m.idempotency_key,
            broadcast=m.broadcast if system else False,
            source=m.source if system else "",
            sender=sender,
            where=f"batch[{i}]." if many else "",
        )
        for i, m in enumerate(items)
    ]
