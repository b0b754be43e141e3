"""The gRPC server every Pigeon service runs: health, reflection, a guard on every handler
(authentication, rate limits, request size bounds and decoding, errors mapped to statuses), server
options for stream bursts and idle connections, TLS, and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge

from pigeon.auth import bearer_token
from pigeon.errors import (
    Internal,
    InvalidArgument,
    PermissionDenied,
    PigeonError,
    ResourceExhausted,
    Unauthenticated,
    abort,
)
from pigeon.ratelimit import (
    LARGE_REQUEST_BYTES,
    LargeRequests,
    Network,
    RateLimiter,
    client_address,
)
from pigeon.sparselog import SparseLog

__all__ = [
    "PUBLIC",
    "Authenticator",
    "GrpcServer",
    "Principal",
    "Service",
    "TlsFiles",
    "count_connections",
    "current_principal",
    "request_limit",
    "server_options",
]

log = logging.getLogger("pigeon.server")

# Seconds a stopping server may take beyond its grace period before it is left behind.
STOP_MARGIN = 5.0

RPCS = Counter(
    "pigeon_grpc_requests", "gRPC calls handled, by method and status code", ["method", "code"]
)
MALFORMED = Counter(
    "pigeon_grpc_malformed_requests",
    "Requests refused before decoding or as undecodable",
    ["reason"],
)
AUTH_FAILURES = Counter(
    "pigeon_auth_failures",
    "Calls refused for their credentials, by how they were answered",
    ["answer"],
)
CONNECTIONS = Gauge("pigeon_open_connections", "Open client connections, by listener", ["listener"])

# Seconds between two log lines about undecodable requests (anyone can send them).
MALFORMED_LOG_INTERVAL = 10.0
_malformed_logged = SparseLog(
    log, MALFORMED_LOG_INTERVAL, "refused %d undecodable requests since the last report (%s)"
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user (session token), a system sender or operator (API key), or another
    Pigeon process (cluster secret)."""

    kind: Literal["user", "system", "cluster", "anonymous"]
    id: str
    # When the credential stops being accepted (Unix seconds; None: it does not expire). A
    # stream opened with it ends then.
    expires_at: float | None = None
    # The sources a system caller's API key may publish as (None: any); see pigeon.auth.ApiKeys.
    sources: frozenset[str] | None = None


Authenticator = Callable[[str | None], Principal]
"""Takes the bearer token of a call (None when absent) and returns the caller, or raises a
PigeonError (UNAUTHENTICATED, PERMISSION_DENIED)."""


def _public(_token: str | None) -> Principal:
    return Principal("anonymous", "")


PUBLIC: Authenticator = _public
"""The authenticator of calls that need no credentials (Gate.Connect reads its token itself)."""

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("pigeon_principal")


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled."""
    return _principal.get()


@dataclass(frozen=True, slots=True)
class Service:
    """A servicer to serve: its full proto name and the generated function that adds it."""

    name: str
    add: Callable[[grpc.aio.Server], None]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of the server's certificate chain and private key."""

    cert: str
    key: str

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())]
        )


# The largest request a server takes (gRPC's default, said once: the REST gateway's body limit
# follows it, or a body it accepted would come back RESOURCE_EXHAUSTED, a 429).
MAX_REQUEST_BYTES = 4 * 1024 * 1024

# What each Pigeon method can ever accept, so a request past it is refused before it is decoded.
# Messages travel in Send and Publish (a batch of them) and between nodes; the other requests
# carry ids, cursors and a token. Methods of other services take up to MAX_REQUEST_BYTES.
REQUEST_BYTES: Mapping[str, int] = {
    "/pigeon.v1.Gate/": 64 * 1024,
    # A user's JWT, with no credential checked yet: the verifier takes tokens of 8 KiB at most.
    "/pigeon.v1.Gate/Connect": 16 * 1024,
    "/pigeon.v1.Gate/Publish": MAX_REQUEST_BYTES,
    "/pigeon.v1.Node/": 64 * 1024,
    # 1,000 message ids of up to 128 characters.
    "/pigeon.v1.Node/MarkRead": 256 * 1024,
    "/pigeon.v1.Node/Send": MAX_REQUEST_BYTES,
    "/pigeon.v1.Node/Publish": MAX_REQUEST_BYTES,
    "/pigeon.v1.Dispatcher/": MAX_REQUEST_BYTES,
}

# How long a connection may stay without a call before the server closes it (clients reconnect
# on their next call), and how long a new one has to finish its handshake.
IDLE_CONNECTION_S = 120.0
HANDSHAKE_S = 10.0
# Connections one listener takes at once (beyond it, new ones are refused until some close).
MAX_CONNECTIONS = 20000


def request_limit(method: str) -> int:
    """The largest request ``method`` (``/pkg.Service/Method``) takes, in bytes."""
    found = REQUEST_BYTES.get(method)
    if found is None:
        found = REQUEST_BYTES.get(method[: method.rfind("/") + 1], MAX_REQUEST_BYTES)
    return found


def server_options(
    *, idle_timeout: float = IDLE_CONNECTION_S, max_connections: int = MAX_CONNECTIONS
) -> list[tuple[str, Any]]:
    """Channel arguments for a server that takes bursts of thousands of new streams and closes
    connections that carry nothing."""
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        # A connection with no call in flight for this long gets GOAWAY; a stream is a call, so
        # subscribers are never idle.
        ("grpc.max_connection_idle_ms", int(idle_timeout * 1000)),
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_S * 1000)),
        ("grpc.max_allowed_incoming_connections", max_connections),
        # The defaults cancel most of a burst of 10,000 new streams.
        ("grpc.server.max_pending_requests", 20000),
        ("grpc.server.max_pending_requests_hard_limit", 20000),
        # Find dead peers of long-lived streams; accept client pings on idle streams.
        ("grpc.keepalive_time_ms", 30000),
        ("grpc.keepalive_timeout_ms", 10000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


def authenticator_for(policy: Mapping[str, Authenticator], method: str) -> Authenticator | None:
    """The authenticator for a method: by full method name, else by its service prefix."""
    found = policy.get(method)
    if found is None:
        found = policy.get(method[: method.rfind("/") + 1])
    return found


@dataclass(frozen=True, slots=True)
class _Policy:
    """What the guard applies to every call of a server."""

    auth: Mapping[str, Authenticator]
    limits: Mapping[str, RateLimiter]
    # Failed authentications per client address; None: not limited.
    failures: RateLimiter | None = None
    # Proxies whose X-Forwarded-For names the client (the REST gateway calls from loopback).
    trusted: Sequence[Network] = ()
    large: LargeRequests = field(default_factory=LargeRequests)


class _Guard:
    """Stands in for the grpc.aio server while a service's add function (a generated
    ``add_*Servicer_to_server``) runs, and registers each of its handlers wrapped once:
    authentication (and rate limits) first, then the request's size bound and its decoding, then
    the handler, with errors mapped to statuses after.

    Wrapping at registration rather than in a server interceptor spares every call the
    interceptor chain and a new handler (~100 µs of a ~450 µs unary call). Pigeon methods without
    an entry in the policy are refused, so a new RPC is closed until someone decides who may call
    it. Health and reflection are registered on the server directly and stay open.
    """

    def __init__(self, server: grpc.aio.Server, policy: _Policy) -> None:
        self._server = server
        self._policy = policy
        self.registered: list[str] = []
        self._generic: list[grpc.GenericRpcHandler[Any, Any]] = []

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        # Generated stubs give the same handlers by name next (add_registered_method_handlers);
        # a hand-made service gives only these.
        self._generic.extend(handlers)

    def finish(self, service: str) -> None:
        """After the service's add function: register what it gave only as generic handlers."""
        if self.registered:
            return
        if not self._generic:
            raise TypeError(f"{service}: its add function registered no handlers")
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedGeneric(h, self._policy) for h in self._generic)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {
            name: _wrap(handler, f"/{service}/{name}", self._policy)
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        # Newer than the type stubs: lets grpc find the handler without asking each generic one.
        self._server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]
        self.registered.append(service)


class _GuardedGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose handlers are wrapped like registered ones (once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], policy: _Policy) -> None:
        self._inner = inner
        self._policy = policy
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = (handler, _wrap(handler, method, self._policy))
            self._wrapped[method] = known
        return known[1]


def _refuse(_token: str | None) -> Principal:
    raise Unauthenticated("this method takes no callers on this service")


_NO_PLACE = contextlib.nullcontext()


def _identity(raw: bytes) -> bytes:
    return raw


def _forwarded_for(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    return [
        value if isinstance(value, str) else value.decode("latin-1")
        for key, value in context.invocation_metadata() or ()
        if key == "x-forwarded-for"
    ]


def _decoder(method: str, parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """A request decoder that bounds the request's size first and answers INVALID_ARGUMENT for
    bytes that are not the method's message (grpc's own answer is UNKNOWN, with the exception's
    name, and a traceback in the log)."""
    limit = request_limit(method)
    decode = parse or _identity

    def decoder(raw: bytes) -> Any:
        if len(raw) > limit:
            MALFORMED.labels("too_large").inc()
            raise InvalidArgument(
                f"the request is {len(raw)} bytes; {method} takes at most {limit}",
                reason="REQUEST_TOO_LARGE",
                limit=str(limit),
            )
        try:
            return decode(raw)
        except Exception as exc:
            MALFORMED.labels("undecodable").inc()
            _malformed_logged(method)
            raise InvalidArgument(
                f"the request is not a valid message for {method}", reason="MALFORMED_REQUEST"
            ) from exc

    return decoder


def _wrap(handler: Any, method: str, policy: _Policy) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of the handler whose behaviour authenticates (and rate-limits) first, then bounds
    and decodes the request, and converts errors.

    A unary request reaches the wrapper as bytes and is decoded only once its caller is
    authenticated and charged for its size.
    """
    authenticate = authenticator_for(policy.auth, method) or _refuse
    decode = _decoder(method, handler.request_deserializer)

    async def refuse(context: grpc.aio.ServicerContext[Any, Any], exc: PigeonError) -> NoReturn:
        if policy.failures is not None and isinstance(exc, (Unauthenticated, PermissionDenied)):
            address = client_address(context.peer(), _forwarded_for(context), policy.trusted)
            try:
                policy.failures.take(address)
                AUTH_FAILURES.labels("refused").inc()
            except ResourceExhausted as throttled:
                AUTH_FAILURES.labels("throttled").inc()
                exc = throttled
        RPCS.labels(method, exc.code.name).inc()
        await abort(context, exc)

    async def enter(context: grpc.aio.ServicerContext[Any, Any], size: int = 0) -> Principal:
        try:
            principal = authenticate(bearer_token(context.invocation_metadata()))
        except PigeonError as exc:
            await refuse(context, exc)
        try:
            limiter = policy.limits.get(principal.kind)
            if limiter is not None:
                limiter.take(principal.id, LargeRequests.cost(size))
        except PigeonError as exc:
            RPCS.labels(method, exc.code.name).inc()
            await abort(context, exc)
        _principal.set(principal)
        return principal

    async def fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
        if isinstance(exc, PigeonError):
            await refuse(context, exc)
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error in %s (incident %s)", method, incident)
        RPCS.labels(method, "INTERNAL").inc()
        await abort(context, Internal(f"internal error (incident {incident})"))

    def ended(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The call was cancelled under the handler: its caller left, or its deadline passed
        (most streams end so)."""
        remaining = context.time_remaining()
        code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        RPCS.labels(method, code).inc()

    succeeded = RPCS.labels(method, "OK")
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            principal = await enter(context, len(raw))
            try:
                # Most requests are small: they skip the per-caller count altogether.
                place = (
                    policy.large.admit(f"{principal.kind}:{principal.id}", len(raw))
                    if len(raw) > LARGE_REQUEST_BYTES
                    else _NO_PLACE
                )
                with place:
                    response = await inner_uu(decode(raw), context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                ended(context)
                raise
            except Exception as exc:
                await fail(context, exc)
            succeeded.inc()
            return response

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, response_serializer=handler.response_serializer
        )

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, enter, fail, ended, succeeded, decode),
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, enter, fail, ended, succeeded, None),
            request_deserializer=decode,
            response_serializer=handler.response_serializer,
        )
    raise TypeError(f"{method}: client-streaming RPCs are not used by Pigeon")


def _streaming(
    inner: Callable[..., Any],
    enter: Callable[[grpc.aio.ServicerContext[Any, Any], int], Any],
    fail: Callable[[grpc.aio.ServicerContext[Any, Any], Exception], Any],
    ended: Callable[[grpc.aio.ServicerContext[Any, Any]], None],
    succeeded: Any,
    decode: Callable[[bytes], Any] | None,
) -> Callable[..., AsyncIterator[Any]]:
    """The wrapper of a server-streaming handler; ``decode`` decodes a unary request (None for a
    streamed one, which grpc decodes with the guard's decoder as the handler reads it)."""

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await enter(context, len(request) if decode is not None else 0)
        try:
            result = inner(decode(request) if decode is not None else request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            ended(context)
            raise
        except Exception as exc:
            await fail(context, exc)
        succeeded.inc()

    return streaming


class GrpcServer:
    """A started grpc.aio server with health, reflection and Pigeon's guard on its handlers.

    Use as ``async with GrpcServer(...) as server:``; ``server.port`` is the bound port (pass 0 to
    get a free one). On exit the health service reports NOT_SERVING, then the server stops with a
    bounded grace period for calls in flight.
    """

    def __init__(
        self,
        services: Sequence[Service],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        auth: Mapping[str, Authenticator] | None = None,
        tls: TlsFiles | None = None,
        grace: float = 5.0,
        limits: Mapping[str, RateLimiter] | None = None,
        serving: bool = True,
        failures: RateLimiter | None = None,
        trusted_proxies: Sequence[Network] = (),
        idle_timeout: float = IDLE_CONNECTION_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._services = list(services)
        # A service that must finish starting (register in etcd) first passes False and calls
        # set_serving(True) when it is ready, so "healthy" means "placeable".
        self.serving = serving
        self._policy = _Policy(
            auth=dict(auth or {}),
            limits=dict(limits or {}),
            failures=failures,
            trusted=tuple(trusted_proxies),
        )
        self._options = server_options(idle_timeout=idle_timeout, max_connections=max_connections)
        self._host = host
        self._requested_port = port
        self._tls = tls
        self._grace = grace
        self._server: grpc.aio.Server | None = None
        self.health = HealthServicer()
        self.port = 0

    async def __aenter__(self) -> GrpcServer:
        server = grpc.aio.server(options=self._options)
        for service in self._services:
            guard = _Guard(server, self._policy)
            service.add(guard)  # type: ignore[arg-type]
            guard.finish(service.name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [s.name for s in self._services]
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        address = f"{self._host}:{self._requested_port}"
        try:
            if self._tls is not None:
                self.port = server.add_secure_port(address, self._tls.credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:
            # grpc says only "Failed to bind" (older versions return port 0 instead).
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self._server = server
        port = self.port
        CONNECTIONS.labels("grpc").set_function(lambda: count_connections(port))
        await self.set_serving(self.serving)
        log.info("gRPC listening on %s:%d (%s)", self._host, self.port, ", ".join(names))
        return self

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the whole server and each service."""
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *(s.name for s in self._services)]:
            await self.health.set(name, status)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        # grpc's stop cancels what is left after the grace period and then waits, with no bound,
        # for the core to report the shutdown done; a process that stops must not hang on it.
        try:
            async with asyncio.timeout((self._grace or 0) + STOP_MARGIN):
                await self.health.enter_graceful_shutdown()
                await server.stop(self._grace)
        except TimeoutError:
            log.warning(
                "the gRPC server did not finish stopping within %.0f s of its grace period",
                STOP_MARGIN,
            )


_TCP_ESTABLISHED = "01"


def count_connections(port: int) -> int:
    """Established TCP connections to a local port of this process's network namespace (Linux;
    0 where /proc is not there)."""
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split(None, 4)
            if fields[3] == _TCP_ESTABLISHED and int(fields[1].rpartition(":")[2], 16) == port:
                count += 1
    return count
