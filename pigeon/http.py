"""The HTTP servers beside each service's gRPC server: the public one (health; REST mounts here)
and the ops one (metrics, health)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

import uvicorn
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from pigeon.errors import NotFound, rich_status
from pigeon.ratelimit import parse_networks
from pigeon.server import CONNECTIONS, count_connections

__all__ = ["HEADER_TIMEOUT", "WRITE_TIMEOUT", "HttpServer", "base_routes", "ops_routes"]

log = logging.getLogger("pigeon.http")

WRITE_TIMEOUT = 30.0
"""Seconds a client may leave sent data unacknowledged before its connection is dropped."""

HEADER_TIMEOUT = 15.0
"""Seconds a new connection has to send its first request's headers."""


def _healthz(is_healthy: Callable[[], bool]) -> Route:
    async def healthz(_: Request) -> Response:
        healthy = is_healthy()
        return JSONResponse(
            {"status": "serving" if healthy else "not_serving"}, status_code=200 if healthy else 503
        )

    return Route("/healthz", healthz)


async def _metrics(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _metrics_elsewhere(_: Request) -> Response:
    # Metrics show failure reasons, placements and counts: they are for the operator's scraper
    # on the ops listener only.
    error = NotFound(
        "metrics are not served on the public HTTP port: scrape /metrics on the ops listener"
        " (setting metrics_address, PIGEON_METRICS_ADDRESS; loopback by default)",
        reason="NO_ROUTE",
    )
    return JSONResponse(json_format.MessageToDict(rich_status(error)), status_code=404)


def base_routes(is_healthy: Callable[[], bool]) -> list[BaseRoute]:
    """The public port's own routes: /healthz (200 while serving, 503 otherwise), and /metrics
    answered with 404 (metrics are on the ops listener, :func:`ops_routes`)."""
    return [_healthz(is_healthy), Route("/metrics", _metrics_elsewhere)]


def ops_routes(is_healthy: Callable[[], bool]) -> list[BaseRoute]:
    """The ops listener's routes: /healthz as on the public port, and Prometheus /metrics."""
    return [_healthz(is_healthy), Route("/metrics", _metrics)]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The service owns SIGINT/SIGTERM: it must stop gRPC too, and uvicorn would re-raise them.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn exits the process when it cannot bind (after logging the system's reason); a
        # SystemExit raised in a task would leave the loop at once, past every clean-up.
        try:
            await super().startup(sockets)
        except SystemExit:
            self.should_exit = True


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, dropping a client that stops taking what it is sent.

    Neither uvicorn nor asyncio bounds a write: a client that stops reading (a frozen tab, a
    stuck proxy) keeps acknowledging the kernel's zero-window probes, so its connection, an event
    stream's gRPC call and megabytes of socket buffer would stay for good. TCP_USER_TIMEOUT
    (tcp(7)) makes the kernel reset such a connection, and it covers what an application-level
    bound on ``send`` cannot: data already handed to the kernel after the last write. The reset
    reaches uvicorn as a lost connection, so the app sees a disconnect and ends the response
    (and any call behind it) as when a client leaves.
    """

    write_timeout = WRITE_TIMEOUT
    header_timeout = HEADER_TIMEOUT
    _request_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._await_request()
        sock = transport.get_extra_info("socket")
        # Linux only; elsewhere a stalled client is held until it leaves.
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            milliseconds = max(1, round(self.write_timeout * 1000))
            with contextlib.suppress(OSError):  # not TCP (a Unix socket)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)

    def _await_request(self) -> None:
        """Bound the wait for the next request's headers. uvicorn bounds neither the first
        request's nor, once any byte comes, a next one's: a client that opens connections and
        trickles its headers would hold them (and their file descriptors) for good."""
        if self._request_due is not None:
            self._request_due.cancel()
        self._request_due = asyncio.get_running_loop().call_later(
            self.header_timeout, self._request_late, self.cycle
        )

    def _request_late(self, previous: object) -> None:
        if self.cycle is previous and not self.transport.is_closing():
            log.info(
                "HTTP client %s:%d sent no whole request in %gs: connection closed",
                *(self.client or ("?", 0)),
                self.header_timeout,
            )
            self.transport.close()

    def on_response_complete(self) -> None:
        # Armed on the cycle just completed, before uvicorn starts a pipelined next one.
        if not self.transport.is_closing():
            self._await_request()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._request_due is not None:
            self._request_due.cancel()
        if isinstance(exc, TimeoutError):
            host, port = self.client or ("?", 0)
            log.warning(
                "HTTP client %s:%d took nothing of what it was sent for %gs: connection dropped",
                host,
                port,
                self.write_timeout,
            )
        super().connection_lost(exc)


class HttpServer:
    """uvicorn serving a Starlette app on the running loop, as an async context manager."""

    def __init__(
        self,
        routes: Sequence[BaseRoute],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: str = "",
        tls_key: str = "",
        start_timeout: float = 10.0,
        max_connections: int | None = None,
        trusted_proxies: Sequence[str] = ("127.0.0.1", "::1"),
        listener: str = "http",
    ) -> None:
        self.app = Starlette(routes=list(routes))
        # Read here rather than at import, so a test can shorten it.
        protocol = type(
            "_Protocol",
            (_Protocol,),
            {"write_timeout": WRITE_TIMEOUT, "header_timeout": HEADER_TIMEOUT},
        )
        config = uvicorn.Config(
            self.app,
            http=protocol,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
            timeout_graceful_shutdown=2,
            # Past this many connections (or requests in flight) uvicorn answers 503 at once.
            limit_concurrency=max_connections,
            # The client's address (per-address limits) from X-Forwarded-For, believed only when
            # a trusted proxy set it.
            proxy_headers=True,
            forwarded_allow_ips=[str(n) for n in parse_networks(trusted_proxies)],
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self._start_timeout = start_timeout
        # Names the listener in pigeon_open_connections.
        self._listener = listener
        self.port = 0

    async def __aenter__(self) -> HttpServer:
        self._task = asyncio.create_task(self._server.serve())
        async with asyncio.timeout(self._start_timeout):
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    config = self._server.config
                    raise OSError(f"cannot listen on {config.host}:{config.port}")
                await asyncio.sleep(0.01)
        sockets = [s for server in self._server.servers for s in server.sockets]
        self.port = sockets[0].getsockname()[1]
        port = self.port
        CONNECTIONS.labels(self._listener).set_function(lambda: count_connections(port))
        log.info("HTTP listening on port %d", self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=5)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self._task = None
