"""An in-process node on a real gRPC server (port 0), for tests that drive it as clients do."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc.aio

from node.app import publishers
from node.core import NodeCore
from node.servicer import NodeServicer
from node.store.base import Store
from pigeon.auth import ApiKeys, ClusterSecret, SessionTokens
from pigeon.ratelimit import RateLimiter
from pigeon.server import GrpcServer, Principal, Service
from pigeon.v1 import node_pb2, node_pb2_grpc

CLUSTER_SECRET = "test-cluster-secret-0123456789abcdef"
API_KEY = "test-api-key-0123456789"
NODE = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name


@dataclass
class RunningNode:
    core: NodeCore
    address: str
    sessions: SessionTokens = field(default_factory=lambda: SessionTokens(CLUSTER_SECRET))
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(self) -> node_pb2_grpc.NodeStub:
        channel = grpc.aio.insecure_channel(self.address)
        self.channels.append(channel)
        return node_pb2_grpc.NodeStub(channel)

    def as_user(self, user: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.sessions.issue(user, self.core.node_id)}")]

    @staticmethod
    def as_system() -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {API_KEY}")]


@contextlib.asynccontextmanager
async def running_node(
    store: Store,
    *,
    limits: Mapping[str, RateLimiter] | None = None,
    session_leeway: float = 10.0,
    **core_options: Any,
) -> AsyncIterator[RunningNode]:
    """A NodeCore on `store` behind the real servicer, guard and gRPC server."""
    sessions = SessionTokens(CLUSTER_SECRET, leeway=session_leeway)
    keys = ApiKeys([API_KEY])

    def user(token: str | None) -> Principal:
        claims = sessions.verify(token)
        return Principal("user", claims.user_id, sessions.usable_until(claims))

    publisher = publishers(keys, ClusterSecret(CLUSTER_SECRET))

    async with NodeCore(store, node_id="node-test", **core_options) as core:
        servicer = NodeServicer(core)
        service = Service(NODE, lambda s: node_pb2_grpc.add_NodeServicer_to_server(servicer, s))
        async with GrpcServer(
            [service],
            auth={f"/{NODE}/Publish": publisher, f"/{NODE}/": user},
            grace=1,
            limits=limits,
        ) as server:
            running = RunningNode(core, f"127.0.0.1:{server.port}", sessions)
            try:
                yield running
            finally:
                for channel in running.channels:
                    await channel.close(None)


class Listener:
    """A client stream read in the background: its events, and waits on what it has seen."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.events: list[node_pb2.SubscribeResponse] = []
        self._changed = asyncio.Event()
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.call:
                self.events.append(event)
                self._changed.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self._changed.set()

    @property
    def messages(self) -> list[Any]:
        return [m for e in self.events for m in e.messages]

    @property
    def unread(self) -> int | None:
        counts = [e.unread_count for e in self.events if e.HasField("unread_count")]
        return counts[-1] if counts else None

    async def wait(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                if self.task.done() and not predicate(self):
                    raise AssertionError(f"stream ended: {self.error}; events: {self.events}")
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
