"""What every service process does the same way: serve gRPC and HTTP, register in etcd, stop on
a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from starlette.routing import BaseRoute

from pigeon.config import CommonConfig, load_config
from pigeon.errors import ConfigError
from pigeon.http import HttpServer, base_routes, ops_routes
from pigeon.ratelimit import RateLimiter, parse_networks
from pigeon.registry import RegistryConflictError, RegistryUnavailableError
from pigeon.runtime import configure_logging, freeze_heap, rescan_heap, run, stop_signals
from pigeon.server import Authenticator, GrpcServer, Service, TlsFiles

__all__ = [
    "ChannelCache",
    "Listeners",
    "channel_factory",
    "listen",
    "run_service",
    "tls_files",
    "wait_for_stop",
]

log = logging.getLogger("pigeon.service")

_S = TypeVar("_S", GrpcServer, HttpServer)
# Whether the service got past its start-up (to waiting for a stop signal).
_started = False
_C = TypeVar("_C", bound=CommonConfig)


def run_service(
    config_type: type[_C],
    serve: Callable[[_C], Coroutine[Any, Any, int]],
    argv: Sequence[str] | None,
    *,
    prog: str,
    fatal: tuple[type[Exception], ...] = (),
) -> int:
    """The whole of `python -m <service>`: its settings, logging, then the service until a stop
    signal; returns the exit code.

    A bad setting, or a port that cannot be had, ends it with one line that names the setting
    and exit code 2 (as a bad command line does), not a traceback. etcd out of reach, a file
    that cannot be read and the `fatal` errors (the store's, say) end it with one line and exit
    code 1.
    """
    try:
        config = load_config(config_type, argv, prog=prog)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    unmet: tuple[type[Exception], ...] = (RegistryUnavailableError, OSError, *fatal)
    try:
        return run(lambda: serve(config))
    except (ConfigError, RegistryConflictError) as exc:
        log.critical("cannot start: %s", exc)
        return 2
    except unmet as exc:
        # What the service needs is not there (etcd, the store, a file): one line that says
        # which, not a traceback.
        log.critical("%s: %s", "stopped" if _started else "cannot start", exc)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C before the service took over its signals (during start-up).
        log.warning("interrupted: stopped at once")
        return 130


@dataclass
class Listeners:
    """The started servers of a process and the addresses others reach them at."""

    grpc: GrpcServer
    http: HttpServer
    address: str
    http_address: str
    # Where this process reaches its own gRPC port (its REST gateway does).
    self_address: str
    # The ops listener (Prometheus /metrics, /healthz) and its host:port; None and "" when off.
    metrics: HttpServer | None = None
    metrics_address: str = ""


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
    """How this process opens channels to other Pigeon processes (its own REST gateway too):
    TLS verified against tls_ca when it is set, else TLS verified against the system's trusted
    roots when this process listens with TLS (its peers then do too), else plaintext."""
    credentials = None
    if config.tls_ca:
        credentials = grpc.ssl_channel_credentials(Path(config.tls_ca).read_bytes())
    elif config.tls_cert:
        credentials = grpc.ssl_channel_credentials()

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


def failure_limiter(config: CommonConfig) -> RateLimiter:
    """The limit on failed authentications per client address."""
    return RateLimiter(
        config.auth_failure_rate,
        config.auth_failure_burst,
        "address",
        message=(
            f"too many failed authentications from this address (over {config.auth_failure_rate:g}"
            "/s); check the credential, and retry after the delay"
        ),
        reason="TOO_MANY_AUTH_FAILURES",
    )


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
    """Start the gRPC server, the HTTP server (health and the given routes) and the ops listener
    (metrics and health, at metrics_address unless it is empty).

    Health says NOT_SERVING until the caller's set_serving(True): when it is registered and can
    be placed on.
    """
    host = _bracketed(config.advertised_host)
    # Its own port: with TLS by the advertised name (the one its certificate has); otherwise
    # straight over loopback when it listens on every address.
    own = host if config.tls_cert else _bracketed(_WILDCARDS.get(config.host, config.host))
    failures = failure_limiter(config)
    async with contextlib.AsyncExitStack() as stack:
        grpc_server = await _bound(
            stack,
            GrpcServer(
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
                failures=failures,
                trusted_proxies=parse_networks(config.trusted_proxies),
                idle_timeout=config.idle_timeout,
                max_connections=config.max_connections,
            ),
            "port",
        )
        http_routes = [*base_routes(lambda: grpc_server.serving), *routes]
        http_server = await _bound(
            stack,
            HttpServer(
                http_routes,
                host=config.host,
                port=config.http_port,
                tls_cert=config.tls_cert,
                tls_key=config.tls_key,
                max_connections=config.max_connections,
                trusted_proxies=config.trusted_proxies,
            ),
            "http_port",
        )
        metrics_server, metrics_address = None, ""
        if config.metrics_address:
            metrics_host, _, metrics_port = config.metrics_address.rpartition(":")
            metrics_server = await _bound(
                stack,
                HttpServer(
                    ops_routes(lambda: grpc_server.serving),
                    host=metrics_host.strip("[]"),
                    port=int(metrics_port),
                    tls_cert=config.tls_cert,
                    tls_key=config.tls_key,
                    listener="ops",
                ),
                "metrics_address",
            )
            metrics_address = f"{_bracketed(metrics_host)}:{metrics_server.port}"
            log.info("metrics (ops HTTP) listening on %s", metrics_address)
        try:
            yield Listeners(
                grpc_server,
                http_server,
                f"{host}:{grpc_server.port}",
                f"{host}:{http_server.port}",
                f"{own}:{grpc_server.port}",
                metrics_server,
                metrics_address,
            )
        finally:
            grpc_server.serving = False


_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def _bracketed(host: str) -> str:
    """A host as it goes before ":port" (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def _bound(stack: contextlib.AsyncExitStack, server: _S, setting: str) -> _S:
    """Start a listener; a port it cannot have is a setting to change, named as such."""
    try:
        return await stack.enter_async_context(server)
    except OSError as exc:
        variable = f"PIGEON_{setting.upper()}"
        fix = "to a free port, or 0 for any"
        if setting == "metrics_address":
            fix = "to host:port with a free port (0 for any), or to empty to turn metrics off"
        raise ConfigError(
            f"{exc}: the port is taken, or the host is not an address of this machine; set"
            f" {setting} ({variable}) {fix}",
            key=setting,
        ) from exc


async def wait_for_stop() -> None:
    """Return on the first SIGINT or SIGTERM; start-up is over, so freeze the heap first."""
    global _started
    _started = True
    stop = asyncio.Event()
    freeze_heap()
    rescans = asyncio.create_task(rescan_heap(), name="heap-rescans")
    try:
        with stop_signals(stop.set):
            await stop.wait()
    finally:
        rescans.cancel()
    log.info("stop signal received")
    # A second signal while the service drains: stop now, as asked. Exiting at once, past the
    # interpreter's clean-up (gRPC's threads may still run; a KeyboardInterrupt raised among
    # them could end in a traceback or a crash).
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop_now, sig)


def _stop_now(sig: signal.Signals) -> None:
    log.warning("%s again: stopped at once, without waiting for the drain", sig.name)
    logging.shutdown()
    os._exit(128 + sig)
