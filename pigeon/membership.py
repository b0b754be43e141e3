"""How nodes and dispatchers describe themselves in etcd, and how that is read back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from pigeon.config import CommonConfig
from pigeon.registry import EtcdCredentials, PrefixWatch, Registration
from pigeon.runtime import cancel_and_wait
from pigeon.v1 import types_pb2

__all__ = [
    "ClusterView",
    "decode_dispatcher",
    "decode_node",
    "dispatcher_key",
    "encode",
    "etcd_credentials",
    "node_key",
    "now_timestamp",
    "registered",
]


def node_key(prefix: str, node_id: str) -> str:
    """The etcd key of a node: <prefix>nodes/<id>."""
    return f"{prefix}nodes/{node_id}"


def dispatcher_key(prefix: str, dispatcher_id: str) -> str:
    """The etcd key of a dispatcher: <prefix>dispatchers/<id>."""
    return f"{prefix}dispatchers/{dispatcher_id}"


def encode(info: Message) -> bytes:
    """JSON, so `etcdctl get --prefix /pigeon/` is readable by people."""
    return json_format.MessageToJson(info, indent=None).encode()


def decode_node(raw: bytes) -> types_pb2.NodeInfo | None:
    """The NodeInfo in an etcd value, or None if the value is not one (written by someone else)."""
    try:
        return json_format.Parse(raw, types_pb2.NodeInfo(), ignore_unknown_fields=True)
    except json_format.ParseError:
        return None


def decode_dispatcher(raw: bytes) -> types_pb2.DispatcherInfo | None:
    """The DispatcherInfo in an etcd value, or None if the value is not one."""
    try:
        return json_format.Parse(raw, types_pb2.DispatcherInfo(), ignore_unknown_fields=True)
    except json_format.ParseError:
        return None


def etcd_credentials(config: CommonConfig) -> EtcdCredentials:
    """The TLS files and etcd user/password of a process's etcd clients, from its settings."""
    return EtcdCredentials(
        ca=config.etcd_ca,
        cert=config.etcd_cert,
        key=config.etcd_key,
        user=config.etcd_user,
        password=config.etcd_password,
    )


def now_timestamp() -> Timestamp:
    """The current time as a protobuf Timestamp."""
    stamp = Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


class ClusterView:
    """The live nodes and dispatchers, decoded once per change from a prefix watch of etcd.

    Use as an async context manager; ``nodes`` and ``dispatchers`` are dicts by id, current as of
    the last etcd event (and kept while etcd is unreachable). ``on_node_left`` is called with the
    id of a node whose key went away (it stopped, or its lease ran out), ``on_node_joined`` with
    that of a node whose key appeared. ``credentials`` are the etcd client's TLS files and
    user/password (:func:`etcd_credentials` makes them from a process's settings).
    """

    def __init__(
        self,
        endpoints: list[str],
        prefix: str,
        *,
        timeout: float = 2.0,
        on_node_left: Callable[[str], None] | None = None,
        on_node_joined: Callable[[str], None] | None = None,
        credentials: EtcdCredentials | None = None,
    ) -> None:
        self._prefix = prefix
        self._on_node_left = on_node_left
        self._on_node_joined = on_node_joined
        self.nodes: dict[str, types_pb2.NodeInfo] = {}
        self.dispatchers: dict[str, types_pb2.DispatcherInfo] = {}
        self.watch = PrefixWatch(
            endpoints, prefix, timeout=timeout, on_change=self._changed, credentials=credentials
        )

    def _changed(self, key: str, value: bytes | None) -> None:
        kind, _, member_id = key[len(self._prefix) :].partition("/")
        if kind == "nodes":
            node = decode_node(value) if value is not None else None
            if node is None:
                if self.nodes.pop(member_id, None) is not None and self._on_node_left is not None:
                    self._on_node_left(member_id)
            else:
                joined = member_id not in self.nodes
                self.nodes[member_id] = node
                if joined and self._on_node_joined is not None:
                    self._on_node_joined(member_id)
        elif kind == "dispatchers":
            dispatcher = decode_dispatcher(value) if value is not None else None
            if dispatcher is None:
                self.dispatchers.pop(member_id, None)
            else:
                self.dispatchers[member_id] = dispatcher

    async def __aenter__(self) -> ClusterView:
        await self.watch.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.watch.__aexit__(exc_type, exc, tb)


@contextlib.asynccontextmanager
async def registered(
    config: CommonConfig,
    key: str,
    info: Message,
    refresh: Callable[[], bool],
    interval: float,
) -> AsyncIterator[Registration]:
    """Keep `info` registered under `key` for the life of the block.

    Every `interval` seconds `refresh` updates `info` in place (load figures) and says whether it
    changed; a changed value is written to etcd, so Gates and ops see current load.
    """
    async with Registration(
        config.etcd_endpoints,
        key,
        encode(info),
        ttl=config.lease_ttl,
        timeout=config.etcd_timeout,
        credentials=etcd_credentials(config),
    ) as registration:

        async def keep_current() -> None:
            # A withdrawn registration (a draining node) has nothing left to update.
            while not registration.withdrawn:
                await asyncio.sleep(interval)
                if refresh() and not registration.withdrawn:
                    await registration.update(encode(info))

        task = asyncio.create_task(keep_current(), name=f"refresh {key}")
        try:
            yield registration
        finally:
            await cancel_and_wait(task)
