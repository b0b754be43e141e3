"""The ceiling: the smallest grpc.aio relay that does what Pigeon's delivery path does on the wire.

It speaks the same pigeon.v1 messages, so the load generator drives it exactly as it drives a
node: `Node.Send` (one message or a batch) puts each message on the recipient's streams,
`Node.Subscribe` is the server stream, `Node.Publish` with `broadcast` goes to every stream, and
`Gate.Connect` answers with this relay's own address. Nothing else: no authentication (the bearer
token is taken as the user id), no storage, no seq, no unread counts, no dispatcher. Each stream
flushes everything queued for it as one event, as a node does (ARCHITECTURE.md §8), so the ratio
Pigeon / ceiling measures what Pigeon's logic and storage cost, not a batching difference.

Run as `python -m bench.relay`; it prints `PORT <n>` once it listens on 127.0.0.1 (port 0: the
kernel picks), and stops on SIGTERM, SIGINT or end of its standard input.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from pigeon.runtime import freeze_heap, run
from pigeon.server import server_options
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

__all__ = ["RelayGate", "RelayNode", "main"]

Context = grpc.aio.ServicerContext[Any, Any]


def _user(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            return text.removeprefix("Bearer ")
    return ""


class _Subscriber:
    __slots__ = ("messages", "wake")

    def __init__(self) -> None:
        self.messages: list[types_pb2.Message] = []
        self.wake = asyncio.Event()

    def push(self, message: types_pb2.Message) -> None:
        self.messages.append(message)
        self.wake.set()


class RelayNode(node_pb2_grpc.NodeServicer):
    """Send → the recipients' streams; Publish(broadcast) → every stream."""

    def __init__(self) -> None:
        self._by_user: dict[str, list[_Subscriber]] = {}

    async def Subscribe(
        self, request: node_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[node_pb2.SubscribeResponse]:
        user = _user(context)
        subscriber = _Subscriber()
        self._by_user.setdefault(user, []).append(subscriber)
        try:
            # The load generator waits for replay_done before it counts a stream as live.
            yield node_pb2.SubscribeResponse(
                welcome=node_pb2.Welcome(user_id=user), replay_done=node_pb2.ReplayDone()
            )
            while True:
                await subscriber.wake.wait()
                subscriber.wake.clear()
                messages, subscriber.messages = subscriber.messages, []
                yield node_pb2.SubscribeResponse(messages=messages)
        finally:
            streams = self._by_user.get(user, [])
            if subscriber in streams:
                streams.remove(subscriber)
            if not streams:
                self._by_user.pop(user, None)

    async def Send(self, request: node_pb2.SendRequest, context: Context) -> node_pb2.SendResponse:
        sender = _user(context)
        for draft in request.batch or (request,):
            for recipient in draft.to:
                message = types_pb2.Message(
                    sender=sender, body=draft.body, metadata=draft.metadata, recipient=recipient
                )
                for subscriber in self._by_user.get(recipient, ()):
                    subscriber.push(message)
        return node_pb2.SendResponse()

    async def Publish(
        self, request: node_pb2.NodePublishRequest, context: Context
    ) -> node_pb2.NodePublishResponse:
        for item in request.batch or (request,):
            message = types_pb2.Message(
                sender=item.source or "system",
                kind=types_pb2.MESSAGE_KIND_BROADCAST,
                body=item.body,
                metadata=item.metadata,
            )
            for streams in list(self._by_user.values()):
                for subscriber in streams:
                    subscriber.push(message)
        return node_pb2.NodePublishResponse()


class RelayGate(gate_pb2_grpc.GateServicer):
    """Connect → this relay's address, with the token handed back as the session."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def Connect(
        self, request: gate_pb2.ConnectRequest, context: Context
    ) -> gate_pb2.ConnectResponse:
        return gate_pb2.ConnectResponse(
            node_id="relay",
            node_address=self.address,
            session_token=request.token,
            user_id=request.token,
        )


async def _serve() -> int:
    # The same server options as Pigeon's services (bursts of 10,000 new streams).
    server = grpc.aio.server(options=server_options())
    # Only the RPCs the load uses; the others answer UNIMPLEMENTED.
    node = RelayNode()  # type: ignore[abstract]
    node_pb2_grpc.add_NodeServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    gate = RelayGate(f"127.0.0.1:{port}")  # type: ignore[abstract]
    gate_pb2_grpc.add_GateServicer_to_server(gate, server)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    # The harness holds our stdin open: when it dies, however it dies, we see end-of-file.
    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 1024):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    # The same start-up tuning as a Pigeon service (ARCHITECTURE.md §8).
    freeze_heap()
    print(f"PORT {port}", flush=True)
    await stop.wait()
    await server.stop(1)
    return 0


def main() -> int:
    """`python -m bench.relay`."""
    return run(_serve)


if __name__ == "__main__":
    sys.exit(main())
