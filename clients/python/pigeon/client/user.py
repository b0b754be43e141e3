"""The user's client: one stream held through the Gate, resumed after any failure, and the inbox.

How it stays correct across failures:

- It keeps a cursor per stream (inbox seq, broadcast seq) of what it has accepted, and every
  (re)subscribe asks the node to replay from it, so a break anywhere loses nothing.
- It drops any message at or below the cursor (push is at-least-once: replays, relays from two
  dispatchers), so the application sees each message once, in seq order per stream.
- A live message that skips a seq means something was missed; the client resubscribes from its
  cursor and the node fills the hole from the store. Replayed messages may skip seqs: those are
  messages the user deleted.
- Any end of the stream (node crash, drain, slow-consumer cut, network error, silence for 2.5
  heartbeat intervals, an expiring session) sends it back to the Gate, with exponential backoff
  and full jitter after failures, and through the fallback nodes when the chosen one cannot be
  reached.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeVar

import grpc
import grpc.aio

from pigeon.client._channel import Channels, gate_list
from pigeon.client.backoff import Backoff
from pigeon.client.errors import ClientClosed, ClientError, Unavailable, from_rpc_error
from pigeon.client.types import (
    Connected,
    Cursor,
    Disconnected,
    Event,
    Message,
    MessageKind,
    Page,
    UnreadCount,
)
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from pigeon.v1.node_pb2_grpc import NodeAsyncStub

__all__ = ["TokenSource", "UserClient"]

log = logging.getLogger("pigeon.client")

T = TypeVar("T")

TokenSource = str | Callable[[], str | Awaitable[str]]
"""A user JWT, or a function (sync or async) that returns a fresh one each time it is called."""

Metadata = tuple[tuple[str, str], ...]

# Codes after which trying again cannot help: the client stops and reports them.
_PERMANENT = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
    }
)
# The contract: "a client that hears nothing for about two intervals should reconnect"; half an
# interval more absorbs a heartbeat that a busy node sends late.
_HEARTBEAT_SLACK = 2.5
_DEFAULT_HEARTBEAT = 15.0
_CLOSE_TIMEOUT = 5.0

_READ_FILTERS = {
    "all": node_pb2.READ_FILTER_UNSPECIFIED,
    "unread": node_pb2.READ_FILTER_UNREAD,
    "read": node_pb2.READ_FILTER_READ,
}


class _End:
    """Put on the event queue after the last event."""


_END = _End()


@dataclass(frozen=True)
class _Session:
    """The node holding the stream, and the credential for calls to it."""

    generation: int
    node_id: str
    address: str
    metadata: Metadata


@dataclass(frozen=True)
class _Outcome:
    """How one subscribe attempt ended."""

    reason: str
    established: bool = False
    unreachable: bool = False
    retry_after: float | None = None
    error: ClientError | None = None


class UserClient:
    """A user's connection to Pigeon: live events, sending, and the inbox.

    Use it as an async context manager. Entering connects through the Gate and returns once the
    stream is open: from then on every message stored for the user is delivered, through any
    failure, once and in order. Read events with :meth:`events`, or pass callbacks.

    Example:
        .. code-block:: python

            import asyncio
            import os

            from pigeon.client import Message, UnreadCount, UserClient

            async def main() -> None:
                gate = os.environ.get("PIGEON_GATE", "127.0.0.1:7070")
                async with (
                    UserClient(gate, os.environ["BOB_TOKEN"]) as bob,
                    UserClient(gate, os.environ["ALICE_TOKEN"]) as alice,
                ):
                    await alice.send("bob", "Lunch at noon?", title="Lunch")
                    async for event in bob.events():
                        if isinstance(event, UnreadCount):
                            print("unread:", event.count)
                        elif isinstance(event, Message):
                            print(f"{event.sender}: {event.body}")
                            await bob.mark_read(event.id)
                            break

            asyncio.run(main())

    With callbacks instead of :meth:`events` (sync or async functions, called in order). They run
    in the client's stream task: a callback that awaits a call of the client (``mark_read``,
    ``send``) while the stream reconnects holds up the reconnect, and the call waits out its
    timeout; start such calls in a task of your own (``asyncio.create_task``):

    .. code-block:: python

        async with UserClient(gate, token, on_message=show, on_unread=set_badge) as client:
            await client.wait_closed()  # runs until the client fails or is closed

    Args:
        gate_address: ``host:port`` of a Gate, or a list of Gates to rotate through.
        token: The user's JWT from the site's backend, or a function returning a fresh one
            (called on every reconnect, so a long-lived client outlives its tokens; when it
            raises, the client tries again with backoff, as when no Gate answers).
        secure: Use TLS (with the system's root certificates unless ``root_certificates``).
        root_certificates: PEM root certificates for TLS.
        cursor: Resume from a cursor saved from an earlier session (:attr:`cursor`); by default
            the client starts with what is stored from now on.
        on_message: Called with each :class:`Message`. Giving any callback turns :meth:`events`
            off.
        on_unread: Called with each new unread count.
        on_connection: Called with each :class:`Connected` and :class:`Disconnected`.
        connect_timeout: Seconds that entering (or :meth:`connect`) may take; the nodes the Gate
            names (its choice, then the fallbacks) each get an equal share of it to answer a
            subscribe, so one that hangs leaves time to try the next.
        timeout: Seconds each call (send, inbox, Gate) may take.
        max_buffered: Events held for :meth:`events` before the client stops reading the stream;
            the node then ends the stream as a slow consumer and the client resumes from the
            store, so a slow application loses nothing. An application that reads no events at
            all should pass ``receive=False``.
        receive: False for a client that only sends and reads the inbox: it holds a session
            through the Gate (renewed before it expires) but no stream, and has no events.
        backoff: Reconnect delays until the Gate sends its own.
    """

    def __init__(
        self,
        gate_address: str | Sequence[str],
        token: TokenSource,
        *,
        secure: bool = False,
        root_certificates: bytes | None = None,
        cursor: Cursor | None = None,
        on_message: Callable[[Message], Awaitable[None] | None] | None = None,
        on_unread: Callable[[int], Awaitable[None] | None] | None = None,
        on_connection: Callable[[Connected | Disconnected], Awaitable[None] | None] | None = None,
        connect_timeout: float = 10.0,
        timeout: float = 10.0,
        max_buffered: int = 1024,
        receive: bool = True,
        backoff: Backoff | None = None,
    ) -> None:
        self._gates = gate_list(gate_address)
        self._gate_index = 0
        self._token = token
        self._channels = Channels(secure=secure, root_certificates=root_certificates)
        # What the client has accepted (resubscribe and duplicate checks use it) and what the
        # application has been handed (the public cursor, safe to persist).
        self._seq = cursor.seq if cursor else None
        self._broadcast_seq = cursor.broadcast_seq if cursor else None
        self._delivered = cursor or Cursor()
        self._on_message = on_message
        self._on_unread = on_unread
        self._on_connection = on_connection
        self._callbacks = any(c is not None for c in (on_message, on_unread, on_connection))
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._backoff = backoff or Backoff()
        self._queue: asyncio.Queue[Event | _End] = asyncio.Queue(max(1, max_buffered))
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self._last_error: ClientError | None = None
        self._session: _Session | None = None
        self._generation = 0
        self._session_changed = asyncio.Event()
        self._call: (
            grpc.aio.UnaryStreamCall[node_pb2.SubscribeRequest, node_pb2.SubscribeResponse] | None
        ) = None
        self._interrupt_reason: str | None = None
        # Whether the current (or last) stream got past its replay.
        self._past_replay = False
        self._receive = receive
        # Wakes a client without a stream (receive=False) when its session must be renewed.
        self._renew = asyncio.Event()
        self._user_id = ""
        self._unread: int | None = None

    # Life cycle.

    async def __aenter__(self) -> UserClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect through the Gate and open the stream (what entering the context does).

        Raises:
            Unauthenticated: The Gate refused the token.
            Unavailable: No Gate or node could be reached within ``connect_timeout``.
            ClientError: Any other refusal.
        """
        if self._task is not None or self._closed:
            raise RuntimeError("a UserClient connects once; create a new one to connect again")
        self._task = asyncio.create_task(self._run(), name="pigeon-user-client")
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._next_session(0)
        except TimeoutError:
            await self.close()
            detail = f": {self._last_error}" if self._last_error else ""
            raise Unavailable(
                f"could not connect through the Gate at {', '.join(self._gates)} within "
                f"{self._connect_timeout:g} s{detail}"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the stream and the channels; :meth:`events` ends. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        # From a callback, close() runs inside the stream task: it cannot wait for that.
        inside = task is not None and task is asyncio.current_task()
        if task is not None and not inside:
            task.cancel()
            # wait() rather than awaiting the task: its CancelledError is not ours to swallow
            # if the caller of close() is being cancelled too.
            await asyncio.wait([task], timeout=_CLOSE_TIMEOUT)
            if not task.done():
                log.warning("the client's stream task did not stop in %g s", _CLOSE_TIMEOUT)
        await self._channels.close()
        # Whoever still iterates events() stops; what was queued and not read is dropped.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)
        self._session_changed.set()
        # Inside: the task ends by itself, its stream's call ended with the channels (and
        # _emit hands nothing more to the callbacks).

    async def wait_closed(self) -> None:
        """Wait until the client is closed or stops on an error it cannot recover from.

        Raises:
            ClientError: What stopped the client (an expired token the Gate refuses, say).
        """
        if self._task is not None:
            # Runs for as long as the client does, by design; wrap it in a timeout to bound it.
            await asyncio.wait([self._task])
        if self._failure is not None:
            raise self._failure

    # State.

    @property
    def user_id(self) -> str:
        """The user id the Gate read from the token."""
        return self._user_id

    @property
    def node_id(self) -> str | None:
        """The node holding the stream now; None while reconnecting."""
        return self._session.node_id if self._session else None

    @property
    def connected(self) -> bool:
        """Whether a stream is open now."""
        return self._session is not None

    @property
    def cursor(self) -> Cursor:
        """The position after the last message handed to the application; persist it and pass
        it back as ``cursor=`` to resume there later."""
        return self._delivered

    @property
    def unread(self) -> int | None:
        """The last unread count the node pushed; None before the first."""
        return self._unread

    # Events.

    async def events(self) -> AsyncIterator[Event]:
        """Yield the stream's events as they come: each :class:`Message` once, in seq order per
        stream; :class:`UnreadCount` when the count changes; :class:`Connected` and
        :class:`Disconnected` around reconnects.

        The iteration ends when the client is closed.

        Raises:
            RuntimeError: The client was created with callbacks.
            ClientError: The client stopped on an error it cannot recover from (after the events
                received before it).
        """
        if self._callbacks:
            raise RuntimeError("this client delivers to its callbacks; events() is not available")
        if not self._receive:
            raise RuntimeError("this client was created with receive=False: it has no events")
        if self._task is None:
            raise ClientClosed("connect first: use `async with UserClient(...) as client`")
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                # Leave the marker for any other iterator.
                self._queue.put_nowait(item)
                if self._failure is not None:
                    raise self._failure
                return
            self._mark_delivered(item)
            yield item

    # Sending and the inbox.

    async def send(
        self,
        to: str | Sequence[str],
        body: str,
        *,
        title: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Send a message to one user or several; returns once it is stored.

        Args:
            to: A user id or a list of them.
            body: The content.
            title: A short headline.
            metadata: Free-form string attributes.
            idempotency_key: Sending again with the same key stores nothing new and returns the
                first message's id. The client makes one up when it is not given, so its own
                retry after a reconnect cannot store the message twice.

        Returns:
            The message id.

        Raises:
            InvalidArgument: A bad recipient, an empty body, a limit passed.
            Unavailable: No node could take it.
        """
        request = node_pb2.SendRequest(
            to=[to] if isinstance(to, str) else list(to),
            body=body,
            title=title,
            metadata=dict(metadata or {}),
            idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
        reply = await self._unary(
            lambda stub, md: stub.Send(request, metadata=md, timeout=self._timeout)
        )
        return reply.message_id

    async def list_messages(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        read_filter: Literal["all", "unread", "read"] = "all",
        sender: str = "",
        kind: MessageKind | None = None,
    ) -> Page:
        """One page of the inbox, newest first, broadcasts included.

        Args:
            page_size: Messages per page; 0 means the node's default (50).
            page_token: ``next_page_token`` of the previous page; empty for the newest.
            read_filter: ``"all"``, ``"unread"`` or ``"read"``.
            sender: Only messages from this user id or system source.
            kind: Only messages of this kind.

        Returns:
            The page and the token of the next one.
        """
        request = node_pb2.ListMessagesRequest(
            page_size=page_size,
            page_token=page_token,
            read_filter=_READ_FILTERS[read_filter],
            sender=sender,
            kind=kind.to_proto() if kind else types_pb2.MESSAGE_KIND_UNSPECIFIED,
        )
        reply = await self._unary(
            lambda stub, md: stub.ListMessages(request, metadata=md, timeout=self._timeout)
        )
        return Page([Message.from_proto(m) for m in reply.messages], reply.next_page_token)

    async def get_message(self, message_id: str) -> Message:
        """One message of the inbox.

        Raises:
            NotFound: No such message in this user's inbox (or it was deleted).
        """
        request = node_pb2.GetMessageRequest(message_id=message_id)
        reply = await self._unary(
            lambda stub, md: stub.GetMessage(request, metadata=md, timeout=self._timeout)
        )
        return Message.from_proto(reply.message)

    async def mark_read(
        self,
        ids: str | Sequence[str] = (),
        *,
        up_to_seq: int = 0,
        up_to_broadcast_seq: int = 0,
        all: bool = False,
    ) -> int:
        """Mark messages read: some ids, everything up to a seq, or all. Give exactly one.

        Args:
            ids: A message id or a list of them.
            up_to_seq: Every inbox message up to this seq.
            up_to_broadcast_seq: Every broadcast up to this seq (may go with ``up_to_seq``).
            all: Everything.

        Returns:
            The unread count afterwards (also pushed to every device of the user).
        """
        request = node_pb2.MarkReadRequest(
            message_ids=[ids] if isinstance(ids, str) else list(ids),
            up_to_seq=up_to_seq,
            up_to_broadcast_seq=up_to_broadcast_seq,
            all=all,
        )
        reply = await self._unary(
            lambda stub, md: stub.MarkRead(request, metadata=md, timeout=self._timeout)
        )
        return reply.unread_count

    async def delete(self, message_id: str) -> int:
        """Delete a message from the inbox; returns the unread count afterwards.

        Raises:
            NotFound: No such message (also when a retry finds the first attempt deleted it).
        """
        request = node_pb2.DeleteMessageRequest(message_id=message_id)
        reply = await self._unary(
            lambda stub, md: stub.DeleteMessage(request, metadata=md, timeout=self._timeout)
        )
        return reply.unread_count

    async def unread_count(self) -> int:
        """The user's unread count, asked of the node now."""
        request = node_pb2.GetUnreadCountRequest()
        reply = await self._unary(
            lambda stub, md: stub.GetUnreadCount(request, metadata=md, timeout=self._timeout)
        )
        return reply.unread_count

    # Calls to the node.

    async def _unary(self, call: Callable[[NodeAsyncStub, Metadata], Awaitable[T]]) -> T:
        """Make a call on the node holding the stream. On UNAVAILABLE (the node went away) or
        UNAUTHENTICATED (the session expired) reconnect through the Gate and try once more."""
        for attempt in range(2):
            session = await self._current_session()
            stub = node_pb2_grpc.NodeStub(self._channels.get(session.address))
            try:
                return await call(stub, session.metadata)
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
                if attempt == 0 and retry:
                    log.info("call to %s failed (%s); reconnecting", session.node_id, exc.code())
                    self._interrupt(session.generation, "request_failed")
                    continue
                raise from_rpc_error(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _current_session(self) -> _Session:
        if self._session is not None:
            return self._session
        try:
            async with asyncio.timeout(self._timeout):
                return await self._next_session(self._generation)
        except TimeoutError:
            detail = f": {self._last_error}" if self._last_error else ""
            raise Unavailable(f"not connected to any node{detail}") from None

    async def _next_session(self, after: int) -> _Session:
        """Wait for a session newer than generation ``after``."""
        while True:
            if self._failure is not None:
                raise self._failure
            if self._closed or (self._task is not None and self._task.done()):
                raise ClientClosed("the client is closed")
            if self._session is not None and self._session.generation > after:
                return self._session
            self._session_changed.clear()
            await self._session_changed.wait()

    def _interrupt(self, generation: int, reason: str) -> None:
        """End the stream of that session so the run loop reconnects (no-op if it already
        ended)."""
        if self._session is None or self._session.generation != generation:
            return
        self._session = None
        self._renew.set()
        if self._call is not None:
            self._interrupt_reason = reason
            self._call.cancel()

    # The run loop.

    async def _run(self) -> None:
        failures = 0
        try:
            while not self._closed:  # closed from a callback, the task ends here
                try:
                    reply = await self._gate_connect()
                except ClientError as err:
                    self._last_error = err
                    if err.code in _PERMANENT:
                        raise
                    delay = self._backoff.delay(failures)
                    failures += 1
                    log.info("Gate unavailable (%s); retrying in %.2f s", err, delay)
                    await asyncio.sleep(delay)
                    continue
                if not self._receive:
                    failures = 0
                    await self._hold(reply)
                    continue
                outcome = _Outcome("no_node", unreachable=True)
                targets = [(reply.node_id, reply.node_address)]
                targets += [(f.node_id, f.address) for f in reply.fallbacks]
                share = self._connect_timeout / len(targets)
                for node_id, address in targets:
                    outcome = await self._stream(reply, node_id, address, share)
                    if not outcome.unreachable:
                        break
                    log.info("node %s at %s unreachable (%s)", node_id, address, outcome.error)
                if outcome.error is not None:
                    self._last_error = outcome.error
                    # A node refusing the session (expired, say) is asked about at the Gate again.
                    fatal = _PERMANENT - {grpc.StatusCode.UNAUTHENTICATED}
                    if not outcome.established and outcome.error.code in fatal:
                        raise outcome.error
                # Not on the welcome alone: a node that welcomes and then fails every time
                # (a store error in the replay) must see the client back off.
                failures = 0 if self._past_replay else failures + 1
                pause = outcome.retry_after
                if pause is None:
                    pause = self._backoff.delay(failures)
                if self._closed:
                    return
                if outcome.established:
                    log.info("stream ended (%s); reconnecting in %.2f s", outcome.reason, pause)
                    await self._emit(Disconnected(outcome.reason, pause, outcome.error))
                await asyncio.sleep(pause)
        except Exception as exc:
            self._failure = exc
            self._session = None
            self._session_changed.set()
            # After everything received before the failure; events() raises it then.
            if not self._callbacks:
                await self._queue.put(_END)

    async def _gate_connect(self) -> gate_pb2.ConnectResponse:
        try:
            token = self._token() if callable(self._token) else self._token
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:
            # Often the same outage that broke the stream (the site's backend unreachable):
            # retried with backoff like an unreachable Gate, not the end of the client.
            raise Unavailable(f"the token function failed: {exc!r}") from exc
        address = self._gates[self._gate_index % len(self._gates)]
        stub = gate_pb2_grpc.GateStub(self._channels.get(address))
        try:
            reply = await stub.Connect(gate_pb2.ConnectRequest(token=token), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            # The next attempt goes to the next Gate, if there are several.
            self._gate_index += 1
            raise from_rpc_error(exc) from exc
        if reply.HasField("backoff"):
            self._backoff = Backoff.from_proto(reply.backoff, self._backoff)
        self._user_id = reply.user_id
        return reply

    async def _hold(self, reply: gate_pb2.ConnectResponse) -> None:
        """Without a stream: make the Gate's answer the session until it must be renewed."""
        self._generation += 1
        metadata: Metadata = (("authorization", f"Bearer {reply.session_token}"),)
        session = _Session(self._generation, reply.node_id, reply.node_address, metadata)
        self._renew.clear()
        self._session = session
        self._session_changed.set()
        refresh = self._schedule_refresh(reply, session.generation)
        try:
            await self._renew.wait()
        finally:
            if refresh is not None:
                refresh.cancel()
            if self._session is session:
                self._session = None

    async def _stream(
        self, reply: gate_pb2.ConnectResponse, node_id: str, address: str, answer_within: float
    ) -> _Outcome:
        """Subscribe on one node and deliver until the stream ends; say how it ended."""
        request = node_pb2.SubscribeRequest()
        if self._seq is not None:
            request.since_seq = self._seq
        if self._broadcast_seq is not None:
            request.since_broadcast_seq = self._broadcast_seq
        metadata: Metadata = (("authorization", f"Bearer {reply.session_token}"),)
        stub = node_pb2_grpc.NodeStub(self._channels.get(address))
        call = stub.Subscribe(request, metadata=metadata)
        self._call, self._interrupt_reason = call, None
        self._past_replay = False
        refresh: asyncio.TimerHandle | None = None
        session: _Session | None = None
        try:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that lands as the read completes, and close() would then wait forever.
                async with asyncio.timeout(answer_within):
                    first = await call.read()
            except TimeoutError:
                return _Outcome(
                    "connect_timeout",
                    unreachable=True,
                    error=Unavailable(f"node {node_id} did not answer in time"),
                )
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                return _Outcome("connect_failed", unreachable=err.code not in _PERMANENT, error=err)
            if not isinstance(first, node_pb2.SubscribeResponse) or not first.HasField("welcome"):
                return _Outcome(
                    "connect_failed",
                    unreachable=True,
                    error=Unavailable(f"node {node_id} ended the stream before its welcome"),
                )
            # Open: from here on every end is a reconnect the application is told about.
            welcome = first.welcome
            if self._seq is None:
                self._seq = first.cursor.seq
            if self._broadcast_seq is None:
                self._broadcast_seq = first.cursor.broadcast_seq
            self._generation += 1
            session = _Session(self._generation, welcome.node_id or node_id, address, metadata)
            self._session = session
            self._session_changed.set()
            refresh = self._schedule_refresh(reply, session.generation)
            heartbeat = welcome.heartbeat_interval.ToNanoseconds() / 1e9
            if heartbeat <= 0:
                heartbeat = reply.heartbeat_interval.ToNanoseconds() / 1e9 or _DEFAULT_HEARTBEAT
            await self._emit(
                Connected(
                    node_id=session.node_id,
                    node_address=address,
                    user_id=welcome.user_id or reply.user_id,
                    reconnected=self._generation > 1,
                    cursor=Cursor(self._seq, self._broadcast_seq),
                )
            )
            return await self._deliver(call, first, heartbeat * _HEARTBEAT_SLACK)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._interrupt_reason is None or (task is not None and task.cancelling()):
                raise
            return _Outcome(self._interrupt_reason, established=session is not None, retry_after=0)
        finally:
            if refresh is not None:
                refresh.cancel()
            self._call = None
            if self._session is session:
                self._session = None
            call.cancel()

    async def _deliver(
        self,
        call: grpc.aio.UnaryStreamCall[node_pb2.SubscribeRequest, node_pb2.SubscribeResponse],
        first: node_pb2.SubscribeResponse,
        silence: float,
    ) -> _Outcome:
        live = False
        event = first
        while True:
            gap = await self._accept(event, live)
            self._past_replay = self._past_replay or event.HasField("replay_done")
            if gap:
                return _Outcome("gap", established=True, retry_after=0)
            live = live or event.HasField("replay_done")
            if event.HasField("reconnect"):
                wait = event.reconnect.retry_after.ToNanoseconds() / 1e9
                # Spread the clients of a draining node over up to twice the hint.
                return _Outcome(
                    event.reconnect.reason or "reconnect",
                    established=True,
                    retry_after=wait + random.uniform(0, wait),
                )
            try:
                # Waiting on the stream only: time spent blocked on a full event queue is the
                # application being slow, not the node being silent.
                async with asyncio.timeout(silence):
                    received = await call.read()
            except TimeoutError:
                return _Outcome(
                    "heartbeat_timeout",
                    established=True,
                    error=Unavailable(f"no heartbeat for {silence:g} s"),
                )
            except grpc.aio.AioRpcError as exc:
                return _Outcome("connection_lost", established=True, error=from_rpc_error(exc))
            if not isinstance(received, node_pb2.SubscribeResponse):
                return _Outcome(
                    "connection_lost",
                    established=True,
                    error=Unavailable("the node ended the stream"),
                )
            event = received

    async def _accept(self, event: node_pb2.SubscribeResponse, live: bool) -> bool:
        """Hand an event's news to the application; True if a live message skipped a seq."""
        for proto in event.messages:
            broadcast = proto.kind == types_pb2.MESSAGE_KIND_BROADCAST
            last = self._broadcast_seq if broadcast else self._seq
            if last is not None and proto.seq <= last:
                continue  # a duplicate: at-least-once push, replay overlap, two relays
            if live and last is not None and proto.seq != last + 1:
                log.info(
                    "gap after seq %d (got %d); resubscribing from the cursor", last, proto.seq
                )
                return True
            if broadcast:
                self._broadcast_seq = proto.seq
            else:
                self._seq = proto.seq
            await self._emit(Message.from_proto(proto))
        if event.HasField("unread_count") and event.unread_count != self._unread:
            self._unread = event.unread_count
            await self._emit(UnreadCount(event.unread_count))
        return False

    def _schedule_refresh(
        self, reply: gate_pb2.ConnectResponse, generation: int
    ) -> asyncio.TimerHandle | None:
        """Reconnect a little before the session token expires (a fifth of its life, at most a
        minute, early)."""
        if not reply.HasField("session_expires_at"):
            return None
        ttl = reply.session_expires_at.ToNanoseconds() / 1e9 - time.time()
        if ttl <= 0:
            # The clocks disagree by more than the session's life. Reconnecting now would loop;
            # an expired session shows up as UNAUTHENTICATED on a call, which reconnects then.
            log.warning("session already expired by this machine's clock; check the clocks")
            return None
        delay = ttl - min(60.0, ttl / 5)
        return asyncio.get_running_loop().call_later(
            delay, self._interrupt, generation, "session_refresh"
        )

    # Handing events to the application.

    async def _emit(self, event: Event) -> None:
        if self._closed:
            return  # closed from a callback: the rest of the event is not handed out
        if not self._callbacks:
            await self._queue.put(event)
            return
        if isinstance(event, Message):
            result = self._call_back(self._on_message, event)
        elif isinstance(event, UnreadCount):
            result = self._call_back(self._on_unread, event.count)
        else:
            result = self._call_back(self._on_connection, event)
        if result is not None:
            try:
                await result
            except Exception:
                log.exception("the callback for %s failed", type(event).__name__)
        self._mark_delivered(event)

    @staticmethod
    def _call_back(
        callback: Callable[[T], Awaitable[None] | None] | None, value: T
    ) -> Awaitable[None] | None:
        if callback is None:
            return None
        try:
            result = callback(value)
        except Exception:
            # A bug in the application's callback must not stop delivery to it.
            log.exception("callback %r failed", callback)
            return None
        return result if inspect.isawaitable(result) else None

    def _mark_delivered(self, event: Event) -> None:
        """Move the public cursor past what the application has now been handed."""
        delivered = self._delivered
        if isinstance(event, Message):
            if event.kind is MessageKind.BROADCAST:
                self._delivered = Cursor(delivered.seq, event.seq)
            else:
                self._delivered = Cursor(event.seq, delivered.broadcast_seq)
        elif isinstance(event, Connected):
            # A client that started "from now" has a position once the stream opened.
            seq = delivered.seq if delivered.seq is not None else event.cursor.seq
            broadcast_seq = delivered.broadcast_seq
            if broadcast_seq is None:
                broadcast_seq = event.cursor.broadcast_seq
            self._delivered = Cursor(seq, broadcast_seq)
