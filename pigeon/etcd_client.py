"""The etcd client of every Pigeon process: aetcd, over TLS and with etcd's user/password auth.

aetcd 1.0.0 opens only plaintext channels and fetches its auth token once, at connect; etcd drops
a simple token that goes unused for ``--auth-token-ttl`` seconds (and every token when it
restarts), after which each call fails with "invalid auth token". :class:`EtcdClient` extends it
where it is open to extension: its own ``connect`` opens a TLS channel when asked to, and a call
refused for an expired token is retried once after authenticating again (watches too, which etcd
refuses with a cancelled watch instead of an error).

:func:`credentials_problem` turns an error into a sentence saying which setting to fix when the
error is etcd refusing our credentials rather than etcd being away.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc
import grpc.aio

__all__ = ["EtcdClient", "EtcdCredentials", "credentials_problem"]

logger = logging.getLogger("pigeon.registry")

T = TypeVar("T")


@dataclass(frozen=True)
class EtcdCredentials:
    """How to reach etcd: TLS files and etcd user/password, all optional.

    Attributes:
        ca: PEM file of the CA that signed etcd's server certificate. Setting it (or ``cert``)
            turns TLS on; with ``cert`` alone the system's trusted roots are used.
        cert: PEM client certificate for etcd's ``--client-cert-auth``; set with ``key``.
        key: PEM private key of ``cert``.
        user: etcd user name (etcd's ``auth enable``); set with ``password``.
        password: that user's password.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = field(default="", repr=False)

    @property
    def tls(self) -> bool:
        """Whether the channel to etcd uses TLS."""
        return bool(self.ca or self.cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The TLS credentials of a channel to etcd, read from the files now (so a renewed
        certificate is picked up by the next connection)."""
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes() if self.ca else None,
            private_key=Path(self.key).read_bytes() if self.key else None,
            certificate_chain=Path(self.cert).read_bytes() if self.cert else None,
        )


_NO_CREDENTIALS = EtcdCredentials()

# What etcd or gRPC says when it refuses who we are, and what to change. Checked in order.
_PROBLEMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"handshake|certificate|ssl_error", re.IGNORECASE),
        "the TLS handshake with etcd failed: etcd_ca must be the CA that signed etcd's server "
        "certificate (issued for the host in etcd_endpoints), and when etcd runs with "
        "--client-cert-auth, etcd_cert/etcd_key must be a client certificate signed by its "
        "--trusted-ca-file; an etcd without TLS takes no etcd_ca",
    ),
    (
        re.compile(r"authentication failed"),
        "etcd refused etcd_user/etcd_password (authentication failed): check both",
    ),
    (
        re.compile(r"user name is empty|invalid auth token"),
        "etcd requires authentication: set etcd_user and etcd_password, or a client certificate "
        "(etcd_cert/etcd_key) whose common name is an etcd user",
    ),
    (
        re.compile(r"permission denied"),
        "the etcd user lacks permission: grant its role readwrite on the key prefix "
        "(etcdctl role grant-permission ROLE --prefix=true readwrite PREFIX)",
    ),
)


def credentials_problem(exc: BaseException) -> str | None:
    """Explain ``exc`` if it is etcd (or the TLS handshake) refusing our credentials.

    Returns:
        A sentence naming the settings to fix, or None for any other error (etcd away, say).
    """
    seen: set[int] = set()
    error: BaseException | None = exc
    texts: list[str] = []
    while error is not None and id(error) not in seen:  # the message may be on the cause
        seen.add(id(error))
        texts.append(str(error))
        if isinstance(error, grpc.aio.AioRpcError):
            texts.append(error.details() or "")
        error = error.__cause__ or error.__context__
    text = " ".join(texts)
    # An error of ours that already explains itself (its wording would match the patterns).
    for _, problem in _PROBLEMS:
        if problem in text:
            return problem
    for pattern, problem in _PROBLEMS:
        if pattern.search(text):
            return problem
    return None


def _token_expired(exc: BaseException) -> bool:
    # What etcd answers for a token it no longer knows (unused past --auth-token-ttl, or etcd
    # restarted) and for one issued before the users or roles last changed; etcd's own client
    # authenticates again on both.
    if isinstance(exc, aetcd.exceptions.UnauthenticatedError):
        return True
    return "revision of auth store is old" in str(exc)


class WatchRefusedError(aetcd.exceptions.ClientError):  # type: ignore[misc]
    """etcd cancelled a watch as it created it, or later (the reason is the message)."""


class _Watcher(aetcd.watcher.Watcher):  # type: ignore[misc]
    """aetcd's watcher, but a watch that etcd cancels is an error, not a silent watch.

    etcd refuses a watch (an expired token, no read permission) by answering its creation with
    ``created`` and ``canceled`` together; aetcd takes that for a created watch that then never
    delivers anything.
    """

    async def _handle_response(self, response: Any) -> None:
        if response.canceled and not response.compact_revision:
            error = WatchRefusedError(response.cancel_reason or "etcd cancelled the watch")
            async with self._lock:
                if response.created:
                    if self._new_callback is not None:
                        self._new_callback.error = error
                        self._new_callback_ready.notify_all()
                    return
                callback = self._callbacks.pop(response.watch_id, None)
            if callback is not None:
                await self._process_callback(callback, error)
            return
        await super()._handle_response(response)


class EtcdClient(aetcd.Client):  # type: ignore[misc]
    """An aetcd client that speaks TLS and keeps its etcd auth token current.

    Args:
        host: etcd host.
        port: etcd client port.
        credentials: TLS files and user/password; plaintext without auth by default.
        timeout: seconds allowed for each call (always give one: without it a call to a frozen
            etcd never returns).
        options: gRPC channel options.
        metadata: more metadata sent with every call and watch.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        credentials: EtcdCredentials = _NO_CREDENTIALS,
        timeout: float,
        options: dict[str, Any] | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(
            host=host,
            port=port,
            username=credentials.user or None,
            password=credentials.password or None,
            timeout=timeout,
            options=options,
        )
        self._credentials = credentials
        self._extra_metadata = metadata
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self.authentications = 0
        """How many tokens this client has fetched (the first one and each renewal)."""

    async def connect(self) -> None:
        """Open the channel (TLS if configured) and fetch an auth token (if configured)."""
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting: bool = True
        try:
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            channel: grpc.aio.Channel
            if self._credentials.tls:
                channel = grpc.aio.secure_channel(
                    target, self._credentials.channel_credentials(), options=options
                )
            else:
                channel = grpc.aio.insecure_channel(target, options=options)
            self.channel = channel
            self.auth_stub = aetcd.rpc.AuthStub(channel)
            self.kvstub = aetcd.rpc.KVStub(channel)
            self.clusterstub = aetcd.rpc.ClusterStub(channel)
            self.leasestub = aetcd.rpc.LeaseStub(channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(channel)
            try:
                await self._authenticate()
            except BaseException:
                # aetcd would leave the channel open behind a failed connect.
                self._init_channel_attrs()
                await channel.close(None)
                raise
            self._watcher = _Watcher(
                aetcd.rpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False

    async def _authenticate(self) -> None:
        """Fetch a token if a user is configured, and set the metadata of later calls."""
        token: str | None = None
        if self._credentials.user:
            request = aetcd.rpc.AuthenticateRequest(
                name=self._credentials.user, password=self._credentials.password
            )
            try:
                reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                token = str(reply.token)
                self.authentications += 1
            except grpc.aio.AioRpcError as exc:
                # etcd's own client goes on without a token too: auth may be enabled later.
                if "authentication is not enabled" not in (exc.details() or ""):
                    aetcd.exceptions._handle_exception(exc)
                logger.warning(
                    "etcd_user is set but etcd at %s:%s has authentication disabled; "
                    "going on without a token",
                    self._host,
                    self._port,
                )
        self._token = token
        token_metadata = (("token", token),) if token is not None else ()
        self.metadata: tuple[tuple[str, str], ...] = (*token_metadata, *self._extra_metadata)
        if self._watcher is not None:
            self._watcher._metadata = self.metadata

    async def _renew_token(self, stale: str | None) -> None:
        """Authenticate again, unless another call already did since ``stale`` was in use."""
        async with self._auth_lock:
            if self._token != stale:
                return
            logger.info("etcd auth token at %s:%s expired; authenticating again", *self._target)
            await self._authenticate()

    @property
    def _target(self) -> tuple[str, int]:
        return self._host, self._port

    async def _once_more_on_expired_token(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call``; if etcd refused its token as expired, renew the token and run it once
        more (a second refusal is the caller's to see: never a loop)."""
        await self.connect()
        stale = self._token
        try:
            return await call()
        except aetcd.exceptions.ClientError as exc:
            if stale is None or not _token_expired(exc):
                raise
        await self._renew_token(stale)
        return await call()

    # The calls Pigeon makes, each retried once on an expired token.

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        return await self._once_more_on_expired_token(
            lambda: super(EtcdClient, self).get(*args, **kwargs)
        )

    async def get_prefix(self, *args: Any, **kwargs: Any) -> Any:
        return await self._once_more_on_expired_token(
            lambda: super(EtcdClient, self).get_prefix(*args, **kwargs)
        )

    async def put(self, *args: Any, **kwargs: Any) -> Any:
        return await self._once_more_on_expired_token(
            lambda: super(EtcdClient, self).put(*args, **kwargs)
        )

    async def delete(self, *args: Any, **kwargs: Any) -> Any:
        return await self._once_more_on_expired_token(
            lambda: super(EtcdClient, self).delete(*args, **kwargs)
        )

    async def transaction(self, *args: Any, **kwargs: Any) -> Any:
        return await self._once_more_on_expired_token(
            lambda: super(EtcdClient, self).transaction(*args, **kwargs)
        )

    async def lease(self, *args: Any, **kwargs: Any) -> Any:
        return await self._once_more_on_expired_token(
            lambda: super(EtcdClient, self).lease(*args, **kwargs)
        )

    async def revoke_lease(self, *args: Any, **kwargs: Any) -> Any:
        return await self._once_more_on_expired_token(
            lambda: super(EtcdClient, self).revoke_lease(*args, **kwargs)
        )

    async def refresh_lease(self, *args: Any, **kwargs: Any) -> Any:
        return await self._once_more_on_expired_token(
            lambda: super(EtcdClient, self).refresh_lease(*args, **kwargs)
        )

    async def watch(self, *args: Any, **kwargs: Any) -> Any:
        """aetcd's watch, renewing an expired token once. etcd checks the token of the watch
        stream (sent when the stream opened) at each watch it creates, so a renewal also opens
        a new stream; the watches of the old one end, as after any stream failure."""
        await self.connect()
        stale = self._token
        try:
            return await super().watch(*args, **kwargs)
        except WatchRefusedError:
            if stale is None:
                raise
        await self._renew_token(stale)
        old, self._watcher = (
            self._watcher,
            _Watcher(
                aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            ),
        )
        await old.shutdown()
        return await super().watch(*args, **kwargs)
