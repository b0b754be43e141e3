"""What every service process does the same way: serve gRPC and HTTP, register in etcd, stop on
a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from starlette.routing import BaseRoute

from pigeon.config import CommonConfig
from pigeon.http import HttpServer, base_routes
from pigeon.ratelimit import RateLimiter
from pigeon.runtime import freeze_heap, rescan_heap, stop_signals
from pigeon.server import Authenticator, GrpcServer, Service, TlsFiles

__all__ = [
    "ChannelCache",
    "Listeners",
    "channel_factory",
    "listen",
    "tls_files",
    "wait_for_stop",
]

log = logging.getLogger("pigeon.service")


@dataclass
class Listeners:
    """The started servers of a process and the addresses others reach them at."""

    grpc: GrpcServer
    http: HttpServer
    address: str
    http_address: str


INTERNAL_CHANNEL_OPTIONS = [
    # A peer that vanished without closing (a partition, a frozen host) is found within ~15 s,
    # so long-lived streams between services do not hang on a dead connection.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect promptly once a restarted peer is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def channel_factory(config: CommonConfig) -> Callable[[str], grpc.aio.Channel]:
    """How this process opens channels to other Pigeon processes: TLS verified against tls_ca
    when it is set, plaintext otherwise."""
    credentials = (
        grpc.ssl_channel_credentials(Path(config.tls_ca).read_bytes()) if config.tls_ca else None
    )

    def make(address: str) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=INTERNAL_CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(address, credentials, options=INTERNAL_CHANNEL_OPTIONS)

    return make


class ChannelCache:
    """One channel per peer address, reused across calls; closed when the peer is gone."""

    def __init__(self, make: Callable[[str], grpc.aio.Channel]) -> None:
        self._make = make
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._make(address)
        return channel

    async def keep_only(self, addresses: Iterable[str]) -> None:
        """Close the channels to every address not in `addresses` (peers that left)."""
        wanted = set(addresses)
        for address in [a for a in self._channels if a not in wanted]:
            await self._channels.pop(address).close(None)

    async def close(self) -> None:
        await self.keep_only(())


def tls_files(config: CommonConfig) -> TlsFiles | None:
    """The listener TLS files, if configured."""
    return TlsFiles(config.tls_cert, config.tls_key) if config.tls_cert else None


@contextlib.asynccontextmanager
async def listen(
    config: CommonConfig,
    services: Sequence[Service],
    auth: Mapping[str, Authenticator],
    routes: Sequence[BaseRoute] = (),
) -> AsyncIterator[Listeners]:
    """Start the gRPC server and the HTTP server (health, metrics and the given routes).

    Health says NOT_SERVING until the caller's set_serving(True): when it is registered and can
    be placed on.
    """
    host = config.advertise_host or config.host
    async with GrpcServer(
        services,
        host=config.host,
        port=config.port,
        auth=auth,
        tls=tls_files(config),
        grace=config.grace_period,
        limits={
            "user": RateLimiter(config.user_rate, config.user_burst, "user"),
            "system": RateLimiter(config.key_rate, config.key_burst, "key"),
        },
        serving=False,
    ) as grpc_server:
        http_routes = [*base_routes(lambda: grpc_server.serving), *routes]
        async with HttpServer(
            http_routes,
            host=config.host,
            port=config.http_port,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
        ) as http_server:
            try:
                yield Listeners(
                    grpc_server,
                    http_server,
                    f"{host}:{grpc_server.port}",
                    f"{host}:{http_server.port}",
                )
            finally:
                grpc_server.serving = False


async def wait_for_stop() -> None:
    """Return on the first SIGINT or SIGTERM; start-up is over, so freeze the heap first."""
    stop = asyncio.Event()
    freeze_heap()
    rescans = asyncio.create_task(rescan_heap(), name="heap-rescans")
    try:
        with stop_signals(stop.set):
            await stop.wait()
    finally:
        rescans.cancel()
    log.info("stop signal received")
