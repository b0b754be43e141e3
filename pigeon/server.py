"""The gRPC server every Pigeon service runs: health, reflection, an auth and error guard on
every handler, server options for stream bursts, TLS, and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter

from pigeon.auth import bearer_token
from pigeon.errors import Internal, PigeonError, Unauthenticated, abort
from pigeon.ratelimit import RateLimiter

__all__ = [
    "PUBLIC",
    "Authenticator",
    "GrpcServer",
    "Principal",
    "Service",
    "TlsFiles",
    "current_principal",
    "server_options",
]

log = logging.getLogger("pigeon.server")

# Seconds a stopping server may take beyond its grace period before it is left behind.
STOP_MARGIN = 5.0

RPCS = Counter(
    "pigeon_grpc_requests", "gRPC calls handled, by method and status code", ["method", "code"]
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


def server_options() -> list[tuple[str, Any]]:
    """Channel arguments for a server that takes bursts of thousands of new streams."""
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
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


class _Guard:
    """Stands in for the grpc.aio server while a service's add function (a generated
    ``add_*Servicer_to_server``) runs, and registers each of its handlers wrapped once:
    authentication (and rate limits) first, errors mapped to statuses after.

    Wrapping at registration rather than in a server interceptor spares every call the
    interceptor chain and a new handler (~100 µs of a ~450 µs unary call). Pigeon methods without
    an entry in the policy are refused, so a new RPC is closed until someone decides who may call
    it. Health and reflection are registered on the server directly and stay open.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        policy: Mapping[str, Authenticator],
        limits: Mapping[str, RateLimiter],
    ) -> None:
        self._server = server
        self._policy = policy
        self._limits = limits
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
            tuple(_GuardedGeneric(h, self._policy, self._limits) for h in self._generic)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {}
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            authenticate = authenticator_for(self._policy, method) or _refuse
            wrapped[name] = _wrap(handler, method, authenticate, self._limits)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        # Newer than the type stubs: lets grpc find the handler without asking each generic one.
        self._server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]
        self.registered.append(service)


class _GuardedGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose handlers are wrapped like registered ones (once per method)."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler[Any, Any],
        policy: Mapping[str, Authenticator],
        limits: Mapping[str, RateLimiter],
    ) -> None:
        self._inner = inner
        self._policy = policy
        self._limits = limits
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
            authenticate = authenticator_for(self._policy, method) or _refuse
            known = (handler, _wrap(handler, method, authenticate, self._limits))
            self._wrapped[method] = known
        return known[1]


def _refuse(_token: str | None) -> Principal:
    raise Unauthenticated("this method takes no callers on this service")


def _wrap(
    handler: Any,
    method: str,
    authenticate: Authenticator,
    limits: Mapping[str, RateLimiter],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of the handler whose behaviour authenticates (and rate-limits) first and converts
    errors."""

    async def enter(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            principal = authenticate(bearer_token(context.invocation_metadata()))
            limiter = limits.get(principal.kind)
            if limiter is not None:
                limiter.take(principal.id)
        except PigeonError as exc:
            RPCS.labels(method, exc.code.name).inc()
            await abort(context, exc)
        _principal.set(principal)

    async def fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
        if isinstance(exc, PigeonError):
            RPCS.labels(method, exc.code.name).inc()
            await abort(context, exc)
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

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await enter(context)
            try:
                response = await inner_uu(request, context)
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
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, enter, fail, ended, succeeded),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, enter, fail, ended, succeeded),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    raise TypeError(f"{method}: client-streaming RPCs are not used by Pigeon")


def _streaming(
    inner: Callable[..., Any],
    enter: Callable[[grpc.aio.ServicerContext[Any, Any]], Any],
    fail: Callable[[grpc.aio.ServicerContext[Any, Any], Exception], Any],
    ended: Callable[[grpc.aio.ServicerContext[Any, Any]], None],
    succeeded: Any,
) -> Callable[..., AsyncIterator[Any]]:
    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await enter(context)
        try:
            result = inner(request, context)
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
    ) -> None:
        self._services = list(services)
        # A service that must finish starting (register in etcd) first passes False and calls
        # set_serving(True) when it is ready, so "healthy" means "placeable".
        self.serving = serving
        self._limits = dict(limits or {})
        self._host = host
        self._requested_port = port
        self._auth = dict(auth or {})
        self._tls = tls
        self._grace = grace
        self._server: grpc.aio.Server | None = None
        self.health = HealthServicer()
        self.port = 0

    async def __aenter__(self) -> GrpcServer:
        server = grpc.aio.server(options=server_options())
        for service in self._services:
            guard = _Guard(server, self._auth, self._limits)
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
