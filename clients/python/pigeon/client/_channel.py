"""Channels to the Gate and the nodes: options, TLS, and a cache per address."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

__all__ = ["Channels", "gate_list"]

_OPTIONS: list[tuple[str, Any]] = [
    # The SDK paces its own reconnects (with the Gate's backoff hints). gRPC's channel backoff
    # (up to 120 s by default) would otherwise keep failing calls fast long after a restarted
    # Gate or node is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Find a dead peer under an idle unary channel; the servers accept pings every 5 s.
    ("grpc.keepalive_time_ms", 20000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def gate_list(gate_address: str | Sequence[str]) -> list[str]:
    """One Gate address or several (the Gate is stateless: any of them will do)."""
    addresses = [gate_address] if isinstance(gate_address, str) else list(gate_address)
    if not addresses or not all(addresses):
        raise ValueError("gate_address must be a host:port or a non-empty list of them")
    return addresses


class Channels:
    """One channel per address, kept until :meth:`close`."""

    def __init__(self, *, secure: bool, root_certificates: bytes | None) -> None:
        # Root certificates are asked for TLS: given alone, they turn it on.
        use_tls = secure or root_certificates is not None
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates=root_certificates) if use_tls else None
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self, address: str) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A channel belongs to the loop it was made on: a client used again from another
            # one (a second asyncio.run) gets new channels; the old ones went with their loop.
            self._channels, self._loop = {}, loop
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, options=_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)
