"""Cluster membership in etcd: leased registrations and live prefix views.

A process announces itself with a :class:`Registration` (a key under a lease that it keeps alive;
if the process dies the key disappears when the lease expires). Anyone who needs to know the
members keeps a :class:`PrefixWatch` (a dict of every key under a prefix, kept current by an etcd
watch that resumes where it left off after an outage).

Both are async context managers that own a background task and an etcd client
(:class:`pigeon.etcd_client.EtcdClient`, over TLS and with etcd's user/password auth when given
:class:`EtcdCredentials`), and both survive etcd outages: they retry in the background and never
clear what they know while etcd is away. Credentials that etcd refuses are not an outage: entering
raises :class:`RegistryCredentialsError`, which says which setting to fix.

Example (inside a coroutine)::

    async with Registration(["127.0.0.1:2379"], "/pigeon/nodes/n1", b"{}") as reg:
        async with PrefixWatch(["127.0.0.1:2379"], "/pigeon/nodes/") as watch:
            await watch.wait_for(lambda view: "/pigeon/nodes/n1" in view, timeout=5)
            await reg.update(b'{"load": 3}')
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.rtypes
import aetcd.transactions

from pigeon.etcd_client import EtcdClient, EtcdCredentials, credentials_problem
from pigeon.runtime import cancel_and_wait

__all__ = [
    "EtcdCredentials",
    "PrefixWatch",
    "Registration",
    "RegistryConflictError",
    "RegistryCredentialsError",
    "RegistryUnavailableError",
    "parse_endpoint",
]

logger = logging.getLogger("pigeon.registry")

# How often a task that outlived its cancellation is cancelled again (_cancel).
RECANCEL_S = 1.0

# Channel options for every etcd client we create.
_CHANNEL_OPTIONS: dict[str, Any] = {
    # gRPC backs off reconnects up to 120 s by default; cap it so that we notice etcd's return
    # within about a second however long the outage was.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    # A frozen etcd (or a dead network path) keeps the TCP connection open and the watch stream
    # silent; keepalive pings turn that into a stream error so the watch reports it and retries.
    # 10 s stays above etcd's default --grpc-keepalive-min-time (5 s), which would reject more.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
    # Any unanswered ping (gRPC also sends its own bandwidth probes) otherwise waits 60 s.
    "grpc.http2.ping_timeout_ms": 5_000,
}

OnChange = Callable[[str, bytes | None], None]
"""Called with (key, value) after a key is put, and with (key, None) after it is deleted."""


class RegistryUnavailableError(Exception):
    """etcd could not be reached (or did not answer in time) for an operation that needs it."""


class RegistryCredentialsError(RegistryUnavailableError):
    """etcd refused this process's credentials (TLS certificates, user or password, or the
    user's permissions): a setting to fix, not an outage to wait out."""


def _unavailable(what: str, errors: list[tuple[str, Exception]]) -> RegistryUnavailableError:
    """The error for an operation that failed on every endpoint: a credentials error when each
    failure was etcd refusing our credentials, else etcd unavailable."""
    detail = "; ".join(f"{endpoint}: {_describe(exc)}" for endpoint, exc in errors)
    if errors and all(credentials_problem(exc) is not None for _, exc in errors):
        return RegistryCredentialsError(f"{what}: etcd refused the credentials ({detail})")
    return RegistryUnavailableError(f"{what} ({detail})")


class RegistryConflictError(Exception):
    """The key is held by another live process (two processes given one id)."""


class _LeaseIs(aetcd.transactions.BaseCompare):  # type: ignore[misc]
    """A transaction's comparison of a key's lease (aetcd has none of its own); a missing key
    has lease 0."""

    def build_compare(self, compare: Any) -> None:
        compare.target = aetcd.rpc.Compare.LEASE
        compare.lease = int(self.value)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``http://host:port``, ``[::1]:2379``) into host and port."""
    text = endpoint.strip()
    parts = urlsplit(text if "//" in text else "//" + text)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid etcd endpoint {endpoint!r}: bad port") from exc
    host = parts.hostname
    if not host or port is None:
        raise ValueError(f"invalid etcd endpoint {endpoint!r}: expected host:port")
    # aetcd builds the gRPC target as f"{host}:{port}": an IPv6 address needs its brackets back.
    return (f"[{host}]" if ":" in host else host), port


# etcd answers a call carrying this with "no leader" (UNAVAILABLE) when the member it reaches has
# lost its leader, and ends such watch streams after a few election timeouts without one. Without
# it, a member cut off from the rest of the cluster keeps a watch open and silent for ever, and the
# client never moves to an endpoint that sees the changes.
_REQUIRE_LEADER: Final = ("hasleader", "true")


class _Connection:
    """One etcd client at a time over a list of endpoints, rotating on failure."""

    def __init__(
        self, endpoints: list[str], timeout: float, credentials: EtcdCredentials | None
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self._endpoints = [parse_endpoint(e) for e in endpoints]
        self._index = 0
        self._timeout = timeout
        self._credentials = credentials or EtcdCredentials()
        self._client: Any = None

    @property
    def endpoint(self) -> str:
        host, port = self._endpoints[self._index]
        return f"{host}:{port}"

    @property
    def count(self) -> int:
        return len(self._endpoints)

    def client(self) -> Any:
        """Return the current client, creating it on the running loop if needed."""
        if self._client is None:
            host, port = self._endpoints[self._index]
            # Without timeout= a call to a frozen etcd never returns.
            self._client = EtcdClient(
                host,
                port,
                credentials=self._credentials,
                timeout=self._timeout,
                options=_CHANNEL_OPTIONS,
                metadata=(_REQUIRE_LEADER,),
            )
        return self._client

    async def failed(self) -> None:
        """Move to the next endpoint after a failure (if there is more than one)."""
        if len(self._endpoints) > 1:
            await self.close()
            self._index = (self._index + 1) % len(self._endpoints)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await asyncio.wait_for(client.close(), self._timeout)
        except Exception as exc:  # closing a client to a dead etcd may fail; fine
            logger.debug("closing etcd client for %s failed: %r", self.endpoint, exc)


def _lease_not_found(exc: BaseException) -> bool:
    # aetcd maps NOT_FOUND to a bare ClientError; the etcd message is the only marker.
    return "lease not found" in str(exc)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    problem = credentials_problem(exc)
    return text if problem is None or problem in text else f"{text} ({problem})"


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a refresh or watch task and wait for its end, cancelling it again every
    RECANCEL_S: on Python 3.11 aetcd's asyncio.wait_for (in its watch iterator and its watch
    set-up) swallows a cancellation that lands as its wait ends, and the task went on retrying
    for ever, so leaving a registration or a watch hung. These tasks clean up nothing after a
    cancellation, so a second one cuts nothing short."""
    if task is None or task.done():
        return
    while True:
        task.cancel()
        done, _ = await asyncio.wait((task,), timeout=RECANCEL_S)
        if done:
            break
        logger.debug("%s outlived its cancellation; cancelling it again", task.get_name())
    await cancel_and_wait(task)  # its own CancelledError ends here; a failure is raised


class Registration:
    """A key in etcd that exists while this process is alive, under a lease it keeps alive.

    On enter it grants a lease of ``ttl`` seconds and puts ``key`` = ``value`` under it. A
    background task refreshes the lease every ``ttl / 3`` seconds. While etcd is unreachable it
    keeps retrying (logging a warning); if the lease was lost meanwhile (it expired during the
    outage, or someone revoked it), it grants a new lease and puts the key again with the current
    value. If the process dies, the key disappears when the lease expires.

    On exit it stops the task, withdraws the key (bounded by a timeout; errors are logged, since
    the lease expires by itself anyway) and closes the client.

    Args:
        endpoints: etcd client endpoints, ``host:port``; the next one is tried after a failure.
        key: the key to register, e.g. ``/pigeon/nodes/n1``.
        value: the initial value.
        ttl: the lease's time to live in seconds (etcd may round it up to its minimum).
        timeout: seconds allowed for each etcd call.
        fail_fast: if true, entering raises :class:`RegistryUnavailableError` when etcd cannot be
            reached; if false, entering succeeds and the key is registered once etcd answers.
            Either way, credentials that etcd refuses on every endpoint raise
            :class:`RegistryCredentialsError`.
        credentials: TLS files and etcd user/password; plaintext without auth if None.
    """

    def __init__(
        self,
        endpoints: list[str],
        key: str | bytes,
        value: bytes,
        *,
        ttl: int = 5,
        timeout: float = 2.0,
        fail_fast: bool = True,
        credentials: EtcdCredentials | None = None,
    ) -> None:
        if ttl < 1:
            raise ValueError(f"ttl must be at least 1 second, got {ttl}")
        self._conn = _Connection(endpoints, timeout, credentials)
        self._key = key.encode() if isinstance(key, str) else key
        self._value = value
        self._ttl = ttl
        self._timeout = timeout
        self._fail_fast = fail_fast
        self._lease_id: int | None = None
        self._dirty = False  # the value changed but could not be written yet
        self._withdrawn = False
        self._lock = asyncio.Lock()  # serialises lease and put calls on the client
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        """The registered key."""
        return self._key.decode()

    @property
    def value(self) -> bytes:
        """The current value (what etcd holds, or will hold once it is reachable again)."""
        return self._value

    @property
    def lease_id(self) -> int | None:
        """The id of the lease the key is under, or None while not registered."""
        return self._lease_id

    @property
    def withdrawn(self) -> bool:
        """Whether withdraw was called (the key is gone or goes with its lease)."""
        return self._withdrawn

    @property
    def registered(self) -> bool:
        """Whether the key is registered under a lease we believe is alive."""
        return self._lease_id is not None and not self._withdrawn

    async def __aenter__(self) -> Self:
        errors: list[tuple[str, Exception]] = []
        for _ in range(self._conn.count):
            try:
                await self._register_waiting_out_a_holder()
                break
            except RegistryConflictError:
                await self._conn.close()
                raise
            except Exception as exc:
                errors.append((self._conn.endpoint, exc))
                await self._conn.failed()
        else:
            error = _unavailable(f"cannot register {self.key} in etcd", errors)
            if self._fail_fast or isinstance(error, RegistryCredentialsError):
                await self._conn.close()
                raise error from errors[-1][1]
            logger.warning("%s; will retry", error)
        self._task = asyncio.get_running_loop().create_task(
            self._keepalive(), name=f"registration {self.key}"
        )
        return self

    async def _register_waiting_out_a_holder(self) -> None:
        """Register; if another process holds the key, wait a lease's life for it to go (a
        crashed predecessor's key goes with its lease), then give up."""
        deadline = asyncio.get_running_loop().time() + self._ttl + 2 * self._timeout
        while True:
            try:
                async with self._lock:
                    await self._register()
                return
            except RegistryConflictError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.5)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await _cancel(self._task)
            try:
                # Two calls at most (lock wait behind an update, then revoke).
                await asyncio.wait_for(self.withdraw(), 2 * self._timeout)
            except Exception as err:  # the lease expires by itself within ttl
                logger.warning(
                    "could not withdraw %s (it expires within %ss): %s",
                    self.key,
                    self._ttl,
                    _describe(err),
                )
        finally:
            await self._conn.close()

    async def update(self, value: bytes) -> bool:
        """Change the registered value, keeping it under the same lease.

        The value is remembered first, so if etcd is unreachable now it is written when the
        registration is refreshed or re-created.

        Args:
            value: the new value.

        Returns:
            True if etcd has the new value now; False if it will be written later.

        Raises:
            RuntimeError: the registration was withdrawn.
        """
        if self._withdrawn:
            raise RuntimeError(f"registration {self.key} was withdrawn")
        self._value = value
        self._dirty = True
        async with self._lock:
            if not self._dirty:  # written by the keepalive task while we waited for the lock
                return True
            if self._lease_id is None:
                self._wake.set()
                return False
            try:
                await self._put(self._lease_id)
            except Exception as exc:  # retried by the keepalive task
                logger.warning("could not update %s, will retry: %s", self.key, _describe(exc))
                # The lease may be gone: let the keepalive task find out now, not in ttl/3.
                self._wake.set()
                return False
            return True

    async def withdraw(self) -> None:
        """Remove the key now and stop keeping it alive (used when draining).

        The key is removed by revoking its lease, so a key that another process has since taken
        over under its own lease is left alone. Calling it again after success does nothing.

        Raises:
            RegistryUnavailableError: etcd could not be reached. Refreshing has stopped anyway,
                so the key disappears when the lease expires; calling again retries the revoke.
        """
        self._withdrawn = True
        # Never cancel ourselves: __aexit__ cancels the task before calling this.
        if self._task is not asyncio.current_task():
            await _cancel(self._task)
        async with self._lock:
            if self._lease_id is None:
                return
            try:
                await self._conn.client().revoke_lease(self._lease_id)
            except Exception as exc:
                # Not found: it expired (say, during an outage) or was revoked; the key is gone.
                if not _lease_not_found(exc):
                    await self._conn.failed()
                    raise RegistryUnavailableError(
                        f"cannot withdraw {self.key} from etcd at {self._conn.endpoint}: "
                        f"{_describe(exc)}"
                    ) from exc
            logger.info("withdrew %s", self.key)
            self._lease_id = None

    async def _register(self) -> None:
        """Grant a new lease and put the key under it. Call with the lock held."""
        self._lease_id = None
        lease = await self._conn.client().lease(self._ttl)
        lease_id = int(lease.id)
        # etcd may raise a small ttl to its minimum; refresh on what was granted.
        self._ttl = max(self._ttl, int(lease.ttl))
        try:
            await self._put(lease_id)
        except RegistryConflictError:
            with contextlib.suppress(Exception):
                await self._conn.client().revoke_lease(lease_id)
            raise
        self._lease_id = lease_id
        logger.info("registered %s under lease %x (ttl %ss)", self.key, lease_id, self._ttl)

    async def _put(self, lease_id: int) -> None:
        """Put the key under our lease if it is ours or absent; never over another process's
        (two processes given one id would otherwise take turns, and the one that stops would
        take the other's key with it)."""
        value = self._value
        client = self._conn.client()
        t = client.transactions
        ours, replies = await client.transaction(
            compare=[_LeaseIs(self._key) == lease_id],
            success=[t.put(self._key, value, lease_id)],
            failure=[
                aetcd.transactions.Txn(
                    compare=[t.create(self._key) == 0],
                    success=[t.put(self._key, value, lease_id)],
                    failure=[t.get(self._key)],
                )
            ],
        )
        if not ours and not replies[0].response_txn.succeeded:
            [holder] = replies[0].response_txn.responses[0].response_range.kvs
            raise RegistryConflictError(
                f"{self.key} is held by another live process (lease {holder.lease:x}, value "
                f"{holder.value[:200]!r}): two processes were given the same id"
            )
        if value is self._value:
            self._dirty = False

    async def _check_held(self) -> None:
        """Put the key back if it is gone while our lease lives (another process with our id
        took it over and then left). Call with the lock held."""
        assert self._lease_id is not None
        client = self._conn.client()
        held, _ = await client.transaction(
            compare=[_LeaseIs(self._key) == self._lease_id], success=[], failure=[]
        )
        if not held:
            await self._put(self._lease_id)
            logger.warning("%s was taken over by another process; registered it again", self.key)

    async def _refresh(self) -> None:
        """Refresh the lease, re-registering if it was lost. Call with the lock held."""
        if self._lease_id is None:
            await self._register()
            return
        reply = await self._conn.client().refresh_lease(self._lease_id)
        # etcd answers a keepalive for an unknown (expired or revoked) lease with TTL 0.
        if reply is None or int(reply.TTL) <= 0:
            logger.warning("lease of %s was lost; registering it again", self.key)
            await self._register()
        elif self._dirty:
            await self._put(self._lease_id)
        else:
            await self._check_held()

    async def _keepalive(self) -> None:
        interval = self._ttl / 3
        delay = interval if self._lease_id is not None else 0.0
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with self._lock:
                    await self._refresh()
            except RegistryConflictError as exc:
                # Not etcd's fault: another process holds the key; claimed again once it leaves.
                logger.error("%s; retrying", exc)
                delay = interval
                continue
            except Exception as exc:  # the keepalive must outlive any outage
                if not failing:
                    logger.warning(
                        "cannot refresh %s in etcd at %s, retrying: %s",
                        self.key,
                        self._conn.endpoint,
                        _describe(exc),
                    )
                else:
                    logger.debug("refresh of %s failed again: %s", self.key, _describe(exc))
                failing = True
                async with self._lock:  # update() may be using the client
                    await self._conn.failed()
                # Retry sooner than the refresh interval so the lease is saved if at all possible.
                delay = min(interval, 0.5)
                continue
            if failing:
                logger.info(
                    "etcd at %s is reachable again; %s refreshed", self._conn.endpoint, self.key
                )
                failing = False
            interval = self._ttl / 3
            delay = interval


class PrefixWatch:
    """A live view of every key under a prefix in etcd.

    On enter it loads the keys under ``prefix`` and starts a task that watches for changes from
    the revision it loaded. After a watch failure (etcd down or restarted) it retries every
    ``retry_interval`` seconds: it loads the keys again (reporting what changed meanwhile) and
    watches from the revision of that read, so no change is missed, and etcd coming back with other
    data cannot leave stale keys behind. If etcd cannot be reached on
    enter, enter still succeeds with an empty view that fills once etcd answers.

    While etcd is unreachable the view keeps its last content: serving from a slightly stale view
    beats forgetting every member.

    Attributes:
        view: key (the full key, as str) → value. Updated in place; do not modify it.
        connected: whether the watch is currently established.
        loaded: set once the keys have been read from etcd at least once.
        revision: the last etcd revision reflected in :attr:`view` (0 before the first load).

    Args:
        endpoints: etcd client endpoints, ``host:port``; the next one is tried after a failure.
        prefix: the key prefix to watch, e.g. ``/pigeon/nodes/``.
        timeout: seconds allowed for each etcd call.
        retry_interval: seconds between attempts while etcd is unreachable.
        on_change: called with (key, value) for each put and (key, None) for each delete,
            including those found when loading the keys again. It runs on the watch task: keep
            it short and do not block; exceptions are logged and ignored.
        credentials: TLS files and etcd user/password; plaintext without auth if None.
    """

    def __init__(
        self,
        endpoints: list[str],
        prefix: str,
        *,
        timeout: float = 2.0,
        retry_interval: float = 0.5,
        on_change: OnChange | None = None,
        credentials: EtcdCredentials | None = None,
    ) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty")
        self._conn = _Connection(endpoints, timeout, credentials)
        self._prefix = prefix.encode()
        self._retry_interval = retry_interval
        self._on_change = on_change
        self.view: dict[str, bytes] = {}
        self.connected = False
        # Set once the keys were read from etcd at least once (the view means something).
        self.loaded = asyncio.Event()
        self.revision = 0
        self._needs_load = True
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def prefix(self) -> str:
        """The watched prefix."""
        return self._prefix.decode()

    async def __aenter__(self) -> Self:
        errors: list[tuple[str, Exception]] = []
        for _ in range(self._conn.count):
            try:
                await self._load()
                break
            except Exception as exc:
                errors.append((self._conn.endpoint, exc))
                await self._conn.failed()
        else:
            error = _unavailable(f"cannot watch {self.prefix} in etcd", errors)
            if isinstance(error, RegistryCredentialsError):
                # Refused credentials do not heal by waiting: refuse to start, saying why.
                await self._conn.close()
                raise error from errors[-1][1]
            # Start empty rather than fail: a Gate restarted during an outage must come up.
            logger.warning(
                "etcd unreachable, watching %s with an empty view until it answers (%s)",
                self.prefix,
                error,
            )
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"watch {self.prefix}"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await _cancel(self._task)
        finally:
            self.connected = False
            await self._conn.close()

    async def wait_for(
        self,
        predicate: Callable[[dict[str, bytes]], bool],
        timeout: float,  # noqa: ASYNC109 - each condition gets its own deadline
    ) -> None:
        """Wait until ``predicate(view)`` is true.

        Args:
            predicate: checked now and after every change to the view.
            timeout: seconds to wait at most.

        Raises:
            TimeoutError: the predicate was still false after ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.view):
                    # Taken after the check; nothing can change the view in between.
                    changed = self._changed
                    await changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"the view of {self.prefix} did not reach the expected state within {timeout}s "
                f"(connected={self.connected}, keys={sorted(self.view)})"
            ) from None

    async def _load(self) -> None:
        """Replace the view with a fresh range read, reporting the differences."""
        result = await self._conn.client().get_prefix(self._prefix)
        fresh = {self._decode(kv.key): bytes(kv.value) for kv in result}
        for key in [k for k in self.view if k not in fresh]:
            del self.view[key]
            self._notify(key, None)
        for key, value in fresh.items():
            if self.view.get(key) != value:
                self.view[key] = value
                self._notify(key, value)
        self.revision = int(result.header.revision)
        self._needs_load = False
        self.loaded.set()
        self._signal()

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                # After a failure too: etcd may have come back with other data (a replaced
                # data dir, a restored backup) whose revisions say nothing of ours, so keys that
                # vanished with the old data would never be reported deleted. One range read.
                if self._needs_load or failing:
                    await self._load()
                watch = await self._conn.client().watch_prefix(
                    self._prefix, start_revision=self.revision + 1
                )
                self.connected = True
                if failing:
                    logger.info("watch on %s resumed from revision %d", self.prefix, self.revision)
                    failing = False
                async for event in watch:
                    self._apply(event)
                # aetcd ends the iterator quietly only when the watch is cancelled.
                raise ConnectionError("watch stream ended")
            except aetcd.exceptions.RevisionCompactedError as exc:
                logger.info(
                    "watch on %s: revision %d was compacted (%s); loading the keys again",
                    self.prefix,
                    self.revision + 1,
                    exc,
                )
                self._needs_load = True
            except Exception as exc:  # the watch must outlive any outage
                self.connected = False
                if not failing:
                    logger.warning(
                        "watch on %s at %s failed, retrying every %ss: %s",
                        self.prefix,
                        self._conn.endpoint,
                        self._retry_interval,
                        _describe(exc),
                    )
                else:
                    logger.debug("watch on %s failed again: %s", self.prefix, _describe(exc))
                failing = True
                await self._conn.failed()
                await asyncio.sleep(self._retry_interval)

    def _apply(self, event: Any) -> None:
        key = self._decode(event.kv.key)
        value: bytes | None = None
        if event.kind == aetcd.rtypes.EventKind.PUT:
            value = self.view[key] = bytes(event.kv.value)
        else:
            self.view.pop(key, None)
        self.revision = max(self.revision, int(event.kv.mod_revision))
        self._notify(key, value)
        self._signal()

    def _notify(self, key: str, value: bytes | None) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(key, value)
        except Exception:
            logger.exception("on_change callback for %s failed", key)

    def _signal(self) -> None:
        # Wake every current waiter; later waiters wait on a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()

    @staticmethod
    def _decode(key: bytes) -> str:
        # surrogateescape keeps a non-UTF-8 key distinct and reversible instead of failing.
        return bytes(key).decode("utf-8", "surrogateescape")
