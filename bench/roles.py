"""What a load-generator worker does, one role at a time, against Pigeon or the ceiling relay.

Every role talks to its target with raw grpc.aio stubs of pigeon.v1, so the same code drives a
Pigeon cluster and the relay; only the credentials differ (`Creds`). Times that cross processes
are wall-clock nanoseconds (`time.time_ns()`): every process is on this one machine, so they
share the clock.

Messages sent by the load carry their send time in `metadata["t"]`; receivers subtract it from
their arrival time for latency. The broadcast of the fan-out scenario carries `metadata["fanout"]`.
The soak's messages also carry their number in the run, `metadata["n"]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from bench.workers import Control
from pigeon.auth import SessionTokens, mint_user_token
from pigeon.runtime import cancel_and_wait
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

__all__ = ["ROLES", "Channels", "Creds"]

# A role waits this long at most for the harness's next command; the harness always answers much
# sooner, so reaching it means the harness is gone.
COMMAND_TIMEOUT = 900.0
CHANNEL_TIMEOUT = 15.0


class Creds:
    """Bearer tokens for a target: real Pigeon tokens, or the bare user id for the relay (which
    takes the token as the user and checks nothing)."""

    def __init__(self, target: dict[str, str]) -> None:
        self.kind = target["kind"]
        self._target = target
        self._sessions = (
            SessionTokens(target["cluster_secret"], ttl=3600) if self.kind == "pigeon" else None
        )

    def session(self, user: str, node: str) -> str:
        """What Gate.Connect would have handed `user` for `node`."""
        return self._sessions.issue(user, node) if self._sessions else user

    def user_token(self, user: str) -> str:
        """What the site's backend hands `user` for Gate.Connect."""
        if self.kind == "pigeon":
            return mint_user_token(self._target["jwt_secret"], user, ttl=3600)
        return user

    def system(self) -> str:
        return self._target.get("api_key", "") or "system"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Channels:
    """A few channels (each its own HTTP/2 connection) per address, handed out round-robin."""

    def __init__(self, per_address: int = 1) -> None:
        self._per_address = max(1, per_address)
        self._by_address: dict[str, list[grpc.aio.Channel]] = {}
        self._turn = 0

    def _open(self, address: str) -> list[grpc.aio.Channel]:
        channels = self._by_address.get(address)
        if channels is None:
            channels = [
                grpc.aio.insecure_channel(
                    address,
                    # Without a local subchannel pool, channels to one address share one
                    # connection.
                    options=[
                        ("grpc.use_local_subchannel_pool", 1),
                        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ],
                )
                for _ in range(self._per_address)
            ]
            self._by_address[address] = channels
        return channels

    def get(self, address: str) -> grpc.aio.Channel:
        channels = self._open(address)
        self._turn += 1
        return channels[self._turn % len(channels)]

    async def ready(self, address: str, within: float = CHANNEL_TIMEOUT) -> None:
        async with asyncio.timeout(within):
            for channel in self._open(address):
                await channel.channel_ready()

    async def close(self) -> None:
        for channels in self._by_address.values():
            for channel in channels:
                await channel.close(None)
        self._by_address.clear()


async def _sleep_until(wall_ns: int) -> None:
    delay = (wall_ns - time.time_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


def _code(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, TimeoutError):
        return "TIMEOUT"
    return type(exc).__name__


# --- streams -------------------------------------------------------------------------------


class _Streams:
    """The state of many Subscribe streams read in one process."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.ready = 0
        self.failed = 0
        self.all_ready = asyncio.Event()
        if not count:
            self.all_ready.set()
        # The counting window: by arrival time, or (by_send) by the message's send time.
        self.window = (1 << 62, 0)
        self.by_send = False
        self.total = 0
        self.counted = 0
        # Events (stream frames) that arrived in the window, whatever they carried.
        self.events = 0
        self.latencies = array("q")
        # From the time the Send call that carried the message was due ("c"), where stamped.
        self.from_call = array("q")
        self.cuts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.ended = 0
        self.fanout: dict[int, int] = {}
        self.fanout_done = asyncio.Event()
        # The first unread count each stream got with or after the fan-out message.
        self.unread_after: dict[int, int] = {}
        self.unread_done = asyncio.Event()

    def _settled(self) -> None:
        if self.ready + self.failed >= self.count:
            self.all_ready.set()

    async def read(self, index: int, call: Any) -> None:
        ready = False
        try:
            async for event in call:
                now = time.time_ns()
                if self.window[0] <= now <= self.window[1]:
                    self.events += 1
                if not ready and event.HasField("replay_done"):
                    ready = True
                    self.ready += 1
                    self._settled()
                if event.messages:
                    self._count(index, event.messages, now)
                if (
                    event.HasField("unread_count")
                    and index in self.fanout
                    and index not in self.unread_after
                ):
                    self.unread_after[index] = now
                    if len(self.unread_after) >= self.ready:
                        self.unread_done.set()
                if event.HasField("reconnect"):
                    self.cuts[event.reconnect.reason] += 1
            self.ended += 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.errors[exc.code().name] += 1
        finally:
            if not ready:
                self.failed += 1
                self._settled()

    def _count(self, index: int, messages: Any, now: int) -> None:
        low, high = self.window
        for message in messages:
            metadata = message.metadata
            sent = metadata.get("t")
            if sent is not None:
                self.total += 1
                sent_ns = int(sent)
                if low <= (sent_ns if self.by_send else now) <= high:
                    self.counted += 1
                    self.latencies.append(now - sent_ns)
                    called = metadata.get("c")
                    if called is not None:
                        self.from_call.append(now - int(called))
            elif "fanout" in metadata and index not in self.fanout:
                self.fanout[index] = now
                if len(self.fanout) >= self.ready:
                    self.fanout_done.set()


async def receive(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Hold Subscribe streams, count the load's messages in a window, wait for a fan-out.

    Params: target, streams ([address, user, node] each), channels (per address),
    ready_timeout. Commands: window (from_ns, to_ns, by_send), fanout (timeout), stop.
    """
    creds = Creds(p["target"])
    channels = Channels(p.get("channels", 1))
    streams = p["streams"]
    state = _Streams(len(streams))
    calls: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    try:
        for index, (address, user, node) in enumerate(streams):
            stub = node_pb2_grpc.NodeStub(channels.get(address))
            call = stub.Subscribe(
                node_pb2.SubscribeRequest(), metadata=bearer(creds.session(user, node))
            )
            calls.append(call)
            tasks.append(asyncio.create_task(state.read(index, call)))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(p.get("ready_timeout", 60)):
                await state.all_ready.wait()
        ctl.send(
            "ready",
            ready=state.ready,
            failed=len(streams) - state.ready,
            errors=dict(state.errors),
            seconds=time.monotonic() - started,
        )
        while True:
            command = await ctl.recv(("window", "fanout", "stop"), COMMAND_TIMEOUT)
            if command["op"] == "window":
                state.by_send = command.get("by_send", False)
                state.window = (command["from_ns"], command["to_ns"])
            elif command["op"] == "fanout":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(command["timeout"]):
                        await state.fanout_done.wait()
                times = list(state.fanout.values())
                # A node follows a broadcast with each stream's new unread count.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(command.get("unread_timeout", 0)):
                        await state.unread_done.wait()
                unread = list(state.unread_after.values())
                ctl.send(
                    "fanout",
                    got=len(times),
                    first_ns=min(times, default=0),
                    last_ns=max(times, default=0),
                    unread_got=len(unread),
                    unread_last_ns=max(unread, default=0),
                )
            else:
                break
        return {
            "total": state.total,
            "counted": state.counted,
            "events": state.events,
            "latencies": state.latencies.tobytes(),
            "from_call": state.from_call.tobytes(),
            "cuts": dict(state.cuts),
            "errors": dict(state.errors),
            "ended": state.ended,
        }
    finally:
        for call in calls:
            call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channels.close()


# --- sending -------------------------------------------------------------------------------


def _request(
    recipients: list[str], first: int, batch: int, body: str, sent: str
) -> node_pb2.SendRequest:
    count = len(recipients)
    if batch == 1:
        return node_pb2.SendRequest(to=[recipients[first % count]], body=body, metadata={"t": sent})
    return node_pb2.SendRequest(
        batch=[
            types_pb2.Draft(to=[recipients[(first + i) % count]], body=body, metadata={"t": sent})
            for i in range(batch)
        ]
    )


async def send(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop senders: each sends a batch, waits for the answer, sends the next.

    Params: target, address, node, senders (user ids, one concurrent caller each), recipients,
    batch (messages per call), body (bytes), channels. Command: go (start_ns, from_ns, to_ns):
    send from start_ns to to_ns; count what is acknowledged in [from_ns, to_ns].
    """
    creds = Creds(p["target"])
    channels = Channels(p.get("channels", 1))
    address = p["address"]
    recipients = p["recipients"]
    batch = p["batch"]
    body = "x" * p["body"]
    timeout = p.get("call_timeout", 30.0)
    try:
        await channels.ready(address)
        senders = [(user, bearer(creds.session(user, p["node"]))) for user in p["senders"]]
        ctl.send("ready")
        go = await ctl.recv("go", COMMAND_TIMEOUT)
        low, high = go["from_ns"], go["to_ns"]
        acked = 0
        calls = 0
        errors: Counter[str] = Counter()
        latencies = array("q")

        async def sender(number: int, metadata: Any) -> None:
            # Calls still in flight when the window closes are cancelled: what they would
            # acknowledge falls outside the window anyway.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout((high - time.time_ns()) / 1e9 + 0.05):
                    await calling(number, metadata)

        async def calling(number: int, metadata: Any) -> None:
            nonlocal acked, calls
            stub = node_pb2_grpc.NodeStub(channels.get(address))
            position = number * batch
            await _sleep_until(go["start_ns"])
            while time.time_ns() < high:
                sent = time.time_ns()
                request = _request(recipients, position, batch, body, str(sent))
                position += batch
                try:
                    await stub.Send(request, metadata=metadata, timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    await asyncio.sleep(0.05)
                    continue
                done = time.time_ns()
                calls += 1
                if low <= done <= high:
                    acked += batch
                    latencies.append(done - sent)

        await asyncio.gather(*(sender(i, md) for i, (_, md) in enumerate(senders)))
        return {
            "acked": acked,
            "calls": calls,
            "errors": dict(errors),
            "latencies": latencies.tobytes(),
        }
    finally:
        await channels.close()


async def send_at_rate(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Open-loop load at a fixed rate of messages, whatever the answers do.

    Each message's "t" is its scheduled time, so a stall anywhere (here included) shows up as
    latency instead of silently lowering the rate (no coordinated omission). With `batch` > 1
    the sender batches like a high-volume client: a call leaves when the last of its `batch`
    messages is due, so the earlier ones wait in the client and that wait counts as latency.
    Each message also carries the time its call was due ("c"): latency from there leaves the
    batching wait out and still counts a late sender.

    Params: target, address, node, senders, recipients, rate (messages/s), batch, body, drain.
    Command: go (start_ns, duration_ns). Counts are in messages.
    """
    creds = Creds(p["target"])
    channels = Channels(p.get("channels", 1))
    address = p["address"]
    recipients = p["recipients"]
    body = "x" * p["body"]
    batch = p.get("batch", 1)
    try:
        await channels.ready(address)
        senders = [bearer(creds.session(user, p["node"])) for user in p["senders"]]
        stub = node_pb2_grpc.NodeStub(channels.get(address))
        ctl.send("ready")
        go = await ctl.recv("go", COMMAND_TIMEOUT)
        start, end = go["start_ns"], go["start_ns"] + go["duration_ns"]
        interval = 1e9 / p["rate"]
        errors: Counter[str] = Counter()
        ok = 0
        lag = 0
        pending: set[asyncio.Task[None]] = set()

        async def one(metadata: Any, request: node_pb2.SendRequest, count: int) -> None:
            nonlocal ok
            try:
                await stub.Send(request, metadata=metadata, timeout=30)
                ok += count
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += count

        def draft(number: int, called: str) -> types_pb2.Draft:
            due = start + int(number * interval)
            recipient = recipients[number % len(recipients)]
            return types_pb2.Draft(to=[recipient], body=body, metadata={"t": str(due), "c": called})

        number = 0
        calls = 0
        while start + int(number * interval) < end:
            last_due = start + int((number + batch - 1) * interval)
            await _sleep_until(last_due)
            lag = max(lag, time.time_ns() - last_due)
            called = str(last_due)
            if batch == 1:
                single = draft(number, called)
                request = node_pb2.SendRequest(
                    to=single.to, body=single.body, metadata=single.metadata
                )
            else:
                request = node_pb2.SendRequest(
                    batch=[draft(number + i, called) for i in range(batch)]
                )
            task = asyncio.create_task(one(senders[calls % len(senders)], request, batch))
            pending.add(task)
            task.add_done_callback(pending.discard)
            number += batch
            calls += 1
        if pending:
            await asyncio.wait(pending, timeout=p.get("drain", 60.0))
            for task in list(pending):
                task.cancel()
        return {"sent": number, "ok": ok, "errors": dict(errors), "max_lag_ns": lag}
    finally:
        await channels.close()


async def publish(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """One broadcast Publish (the fan-out). Params: target, address, body. Command: go."""
    creds = Creds(p["target"])
    channels = Channels(1)
    try:
        await channels.ready(p["address"])
        stub = node_pb2_grpc.NodeStub(channels.get(p["address"]))
        ctl.send("ready")
        await ctl.recv("go", COMMAND_TIMEOUT)
        started = time.time_ns()
        await stub.Publish(
            node_pb2.NodePublishRequest(
                broadcast=True, body="x" * p["body"], metadata={"fanout": "1"}, source="bench"
            ),
            metadata=bearer(creds.system()),
            timeout=60,
        )
        return {"started_ns": started, "acked_ns": time.time_ns()}
    finally:
        await channels.close()


# --- connecting ------------------------------------------------------------------------------


async def storm(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Clients that all arrive at once: Gate.Connect, then Subscribe on the node it names, until
    the stream is live (replay done). They stay connected until `stop`.

    Params: target, gate, users, channels, timeout. Commands: go (start_ns), then stop. Sends
    `result` once every client is live or has failed (or the timeout passed).
    """
    creds = Creds(p["target"])
    gate_channels = Channels(p.get("channels", 1))
    node_channels = Channels(p.get("channels", 1))
    users = p["users"]
    timeout = p.get("timeout", 120.0)
    tasks: list[asyncio.Task[None]] = []
    calls: list[Any] = []
    try:
        await gate_channels.ready(p["gate"])
        tokens = [creds.user_token(user) for user in users]
        ctl.send("ready")
        go = await ctl.recv("go", COMMAND_TIMEOUT)
        done_ns: list[int] = []
        failures: Counter[str] = Counter()
        settled = asyncio.Event()

        def settle() -> None:
            if len(done_ns) + sum(failures.values()) >= len(users):
                settled.set()

        async def client(token: str) -> None:
            live = False
            try:
                gate = gate_pb2_grpc.GateStub(gate_channels.get(p["gate"]))
                reply = await gate.Connect(gate_pb2.ConnectRequest(token=token), timeout=timeout)
                node = node_pb2_grpc.NodeStub(node_channels.get(reply.node_address))
                call = node.Subscribe(
                    node_pb2.SubscribeRequest(), metadata=bearer(reply.session_token)
                )
                calls.append(call)
                async for event in call:
                    if not live and event.HasField("replay_done"):
                        live = True
                        done_ns.append(time.time_ns())
                        settle()
                if not live:
                    failures["ENDED"] += 1
            except grpc.aio.AioRpcError as exc:
                if not live and exc.code() != grpc.StatusCode.CANCELLED:
                    failures[exc.code().name] += 1
            finally:
                settle()

        await _sleep_until(go["start_ns"])
        tasks = [asyncio.create_task(client(token)) for token in tokens]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await settled.wait()
        missing = len(users) - len(done_ns) - sum(failures.values())
        if missing:
            failures["TIMEOUT"] += missing
        ctl.send(
            "result",
            ok=len(done_ns),
            failures=dict(failures),
            last_ns=max(done_ns, default=0),
            done_ns=array("q", done_ns).tobytes(),
        )
        await ctl.recv("stop", COMMAND_TIMEOUT)
        return {}
    finally:
        for call in calls:
            call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await node_channels.close()
        await gate_channels.close()


async def connect(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop Gate.Connect callers: `clients` concurrent callers share `len(users)` calls.

    Params: target, gate, users (one call each), clients, channels. Command: go (start_ns).
    """
    creds = Creds(p["target"])
    channels = Channels(p.get("channels", 1))
    try:
        await channels.ready(p["gate"])
        tokens = [creds.user_token(user) for user in p["users"]]
        ctl.send("ready")
        go = await ctl.recv("go", COMMAND_TIMEOUT)
        latencies = array("q")
        errors: Counter[str] = Counter()
        next_call = 0
        ends: list[int] = []

        async def client() -> None:
            nonlocal next_call
            stub = gate_pb2_grpc.GateStub(channels.get(p["gate"]))
            await _sleep_until(go["start_ns"])
            while next_call < len(tokens):
                token = tokens[next_call]
                next_call += 1
                started = time.perf_counter_ns()
                try:
                    await stub.Connect(gate_pb2.ConnectRequest(token=token), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                latencies.append(time.perf_counter_ns() - started)
            ends.append(time.time_ns())

        await asyncio.gather(*(client() for _ in range(p["clients"])))
        return {
            "ok": len(latencies),
            "errors": dict(errors),
            "latencies": latencies.tobytes(),
            "end_ns": max(ends, default=0),
        }
    finally:
        await channels.close()


# --- soak ----------------------------------------------------------------------------------


def _soak_key(message_id: str, user: int) -> str:
    """What the soak checks: one message (by id) delivered to one user (by its number)."""
    return f"{message_id}:{user}"


def _minute(due_ns: int, start_ns: int, minutes: int) -> int:
    """The minute of the run a message was due in, 0-based."""
    return min(max(0, (due_ns - start_ns) // 60_000_000_000), minutes - 1)


class _SoakClient:
    """One soak user: its token for the Gate, its inbox cursor, where it was first placed."""

    __slots__ = ("address", "connected", "node", "number", "seq", "token")

    def __init__(self, number: int, token: str) -> None:
        self.number = number
        self.token = token
        self.seq: int | None = None
        self.node = ""
        self.address = ""
        self.connected = False


class _SoakInbox:
    """What the soak clients of one worker were delivered, and how their streams fared."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.connected = 0
        self.all_connected = asyncio.Event()
        if not clients:
            self.all_connected.set()
        # Streams past their replay now.
        self.live = 0
        self.start_ns = 0
        self.minutes = 1
        # Key (_soak_key) of every message delivered -> its number in the run ("n"; -1 if none).
        self.delivered: dict[str, int] = {}
        # The same message delivered twice past the cursor: a duplicate the application sees.
        self.duplicates = 0
        # Pushes at or below the cursor, dropped as the real client drops them (at-least-once).
        self.repeats = 0
        # Live messages that skipped a seq; each sends the client back through the Gate.
        self.gaps = 0
        # Why streams ended (each end is a reconnect).
        self.ends: Counter[str] = Counter()
        self.per_minute = [0]
        self.latencies = [array("q")]
        # What the harness still waits for after the load (settle), once it has said.
        self.outstanding: set[str] | None = None
        self.settled = asyncio.Event()

    def begin(self, start_ns: int, minutes: int) -> None:
        self.start_ns = start_ns
        self.minutes = max(1, minutes)
        self.per_minute = [0] * self.minutes
        self.latencies = [array("q") for _ in range(self.minutes)]
        self.ends.clear()

    def accept(self, user: int, message: types_pb2.Message, now: int) -> None:
        key = _soak_key(message.id, user)
        if key in self.delivered:
            self.duplicates += 1
            return
        metadata = message.metadata
        number = metadata.get("n")
        self.delivered[key] = int(number) if number is not None else -1
        sent = metadata.get("t")
        if sent is not None and self.start_ns:
            due = int(sent)
            minute = _minute(due, self.start_ns, self.minutes)
            self.per_minute[minute] += 1
            self.latencies[minute].append(now - due)
        if self.outstanding is not None:
            self.outstanding.discard(key)
            if not self.outstanding:
                self.settled.set()

    def connect(self, client: _SoakClient, node: str, address: str) -> None:
        client.connected = True
        client.node = node
        client.address = address
        self.connected += 1
        if self.connected >= self.clients:
            self.all_connected.set()


async def _soak_follow(
    client: _SoakClient,
    inbox: _SoakInbox,
    call: Any,
    event: node_pb2.SubscribeResponse,
    silence: float,
    where: tuple[str, str],
) -> tuple[str, bool, float | None]:
    """Read one stream as the real client does (pigeon.client.user): drop what is at or below
    the cursor, leave on a live gap, on a reconnect event, on silence or on an error."""
    live = False
    try:
        while True:
            now = time.time_ns()
            for message in event.messages:
                if message.kind == types_pb2.MESSAGE_KIND_BROADCAST:
                    continue
                if client.seq is not None and message.seq <= client.seq:
                    inbox.repeats += 1
                    continue
                if live and client.seq is not None and message.seq != client.seq + 1:
                    inbox.gaps += 1
                    return "gap", True, 0.0
                client.seq = message.seq
                inbox.accept(client.number, message, now)
            if not live and event.HasField("replay_done"):
                live = True
                inbox.live += 1
                if not client.connected:
                    inbox.connect(client, *where)
            if event.HasField("reconnect"):
                wait = event.reconnect.retry_after.ToNanoseconds() / 1e9
                return f"reconnect {event.reconnect.reason}", live, wait
            try:
                async with asyncio.timeout(silence):
                    received = await call.read()
            except TimeoutError:
                return "heartbeat timeout", live, 0.0
            except grpc.aio.AioRpcError as exc:
                return f"stream {exc.code().name}", live, None
            if not isinstance(received, node_pb2.SubscribeResponse):
                return "stream ended", live, None
            event = received
    finally:
        if live:
            inbox.live -= 1


@dataclass(frozen=True)
class _SoakLinks:
    """How a worker's soak clients reach the cluster."""

    gate: gate_pb2_grpc.GateAsyncStub
    nodes: Channels
    # Connects at once: thousands of clients connecting together would only time each other out.
    connecting: asyncio.Semaphore
    call_timeout: float


async def _soak_session(
    client: _SoakClient, inbox: _SoakInbox, links: _SoakLinks
) -> tuple[str, bool, float | None]:
    """One connection of a client: Gate.Connect, Subscribe from its cursor, the stream until it
    ends. Returns why it ended, whether it went live, and how long the node asked to wait."""
    call: Any = None
    timeout = links.call_timeout
    try:
        async with links.connecting:
            try:
                reply = await links.gate.Connect(
                    gate_pb2.ConnectRequest(token=client.token), timeout=timeout
                )
            except grpc.aio.AioRpcError as exc:
                return f"gate {exc.code().name}", False, None
            request = node_pb2.SubscribeRequest()
            if client.seq is not None:
                request.since_seq = client.seq
            stub = node_pb2_grpc.NodeStub(links.nodes.get(reply.node_address))
            call = stub.Subscribe(request, metadata=bearer(reply.session_token))
            try:
                async with asyncio.timeout(timeout):
                    first = await call.read()
            except TimeoutError:
                return "subscribe TIMEOUT", False, None
            except grpc.aio.AioRpcError as exc:
                return f"subscribe {exc.code().name}", False, None
        if not isinstance(first, node_pb2.SubscribeResponse) or not first.HasField("welcome"):
            return "subscribe ended", False, None
        if client.seq is None:
            client.seq = first.cursor.seq
        heartbeat = first.welcome.heartbeat_interval.ToNanoseconds() / 1e9
        heartbeat = heartbeat or reply.heartbeat_interval.ToNanoseconds() / 1e9 or 15.0
        where = (reply.node_id, reply.node_address)
        return await _soak_follow(client, inbox, call, first, heartbeat * 2.5, where)
    finally:
        if call is not None:
            call.cancel()


async def _soak_client(client: _SoakClient, inbox: _SoakInbox, links: _SoakLinks) -> None:
    """A client for as long as the role runs: every end of its stream is a reconnect."""
    failures = 0
    while True:
        reason, live, wait = await _soak_session(client, inbox, links)
        inbox.ends[reason] += 1
        failures = 0 if live else failures + 1
        if wait is None:
            # Exponential backoff with full jitter, as the real client does after failures.
            wait = random.uniform(0, min(5.0, 0.1 * 2**failures))
        await asyncio.sleep(wait)


async def soak_receive(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Soak clients connected as a real client connects: Gate.Connect, Subscribe on the node it
    names, and again through the Gate from the cursor after any end of the stream (a gap in the
    seqs included). Records every message delivered, by send minute, with its latency.

    Params: target, gate, prefix, users (user numbers), channels (per node), concurrency
    (connects at once), call_timeout, token_ttl, ready_timeout. Commands: go (start_ns,
    minutes); stats (answered with `stats`) until settle (expected: the keys of the messages
    acknowledged for these users, newline-separated; timeout), which waits until every one of
    them is here (or the timeout passes) and ends the role with the report.
    """
    target = p["target"]
    prefix = p["prefix"]
    gate_channels = Channels(1)
    node_channels = Channels(p.get("channels", 4))
    inbox = _SoakInbox(len(p["users"]))
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    try:
        await gate_channels.ready(p["gate"])
        links = _SoakLinks(
            gate=gate_pb2_grpc.GateStub(gate_channels.get(p["gate"])),
            nodes=node_channels,
            connecting=asyncio.Semaphore(p.get("concurrency", 100)),
            call_timeout=p.get("call_timeout", 30.0),
        )
        ttl = p.get("token_ttl", 3600)
        clients = [
            _SoakClient(n, mint_user_token(target["jwt_secret"], f"{prefix}{n}", ttl=ttl))
            for n in p["users"]
        ]
        tasks = [asyncio.create_task(_soak_client(client, inbox, links)) for client in clients]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(p.get("ready_timeout", 120.0)):
                await inbox.all_connected.wait()
        ctl.send(
            "ready",
            connected=inbox.connected,
            failed=len(clients) - inbox.connected,
            errors=dict(inbox.ends),
            seconds=time.monotonic() - started,
            placement=[[c.number, c.address, c.node] for c in clients if c.connected],
        )
        go = await ctl.recv("go", COMMAND_TIMEOUT)
        inbox.begin(go["start_ns"], go["minutes"])
        while True:
            command = await ctl.recv(("stats", "settle"), COMMAND_TIMEOUT)
            if command["op"] == "settle":
                break
            ctl.send(
                "stats",
                delivered=len(inbox.delivered),
                live=inbox.live,
                reconnects=sum(inbox.ends.values()),
                gaps=inbox.gaps,
            )
        expected = set(filter(None, command["expected"].split("\n")))
        waited = time.monotonic()
        inbox.outstanding = expected.difference(inbox.delivered)
        if inbox.outstanding:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(command["timeout"]):
                    await inbox.settled.wait()
        settle_s = time.monotonic() - waited
        missing = sorted(inbox.outstanding)
        unexpected = {k: n for k, n in inbox.delivered.items() if k not in expected}
        return {
            "delivered": len(inbox.delivered),
            "per_minute": inbox.per_minute,
            "latencies": [samples.tobytes() for samples in inbox.latencies],
            "duplicates": inbox.duplicates,
            "repeats": inbox.repeats,
            "gaps": inbox.gaps,
            "reconnects": dict(inbox.ends),
            "live": inbox.live,
            "missing": len(missing),
            "missing_sample": missing[:20],
            "unexpected": len(unexpected),
            "unexpected_sample": sorted(unexpected)[:20],
            "unexpected_numbers": sorted(unexpected.values())[:10_000],
            "settle_s": settle_s,
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await node_channels.close()
        await gate_channels.close()


class _SoakSends:
    """What one soak sender worker sent, per send minute."""

    def __init__(self, minutes: int, groups: int) -> None:
        self.sent = [0] * minutes
        self.acked = [0] * minutes
        self.failed: list[Counter[str]] = [Counter() for _ in range(minutes)]
        # The keys of the acknowledged messages, by the receiver worker holding the recipient.
        self.keys: list[list[str]] = [[] for _ in range(groups)]
        self.failed_numbers: list[int] = []
        # Messages whose sender and recipient were placed on the same node.
        self.same_node = 0
        self.in_flight = 0
        self.max_lag_ns = 0

    def stats(self) -> dict[str, Any]:
        return {
            "sent": sum(self.sent),
            "acked": sum(self.acked),
            "failed": sum(sum(c.values()) for c in self.failed),
            "in_flight": self.in_flight,
            "max_lag_ms": self.max_lag_ns / 1e6,
        }


async def soak_send(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Open-loop Send calls at a fixed rate of messages, from a random soak client to other
    random ones: `batch` messages per call (each to its own recipient), the call leaving when
    its last message is due, so the earlier ones wait in the client and that wait counts as
    latency. Each call goes to the node the sender was placed on, so the load is both
    same-node and cross-node. Each message's "t" is its scheduled time (no coordinated
    omission) and "n" its number in the run. Records the key of every acknowledged message.

    Params: target, prefix, clients ([number, node address, node id] each), rate (messages/s of
    the whole run), batch, part and parts (this worker sends messages part, part + parts, ...),
    groups (user n is held by receiver worker n % groups), body, channels, call_timeout,
    token_ttl, seed. Commands: go (start_ns, duration_ns); stats (answered with `stats`) until
    finish, which waits for the calls in flight (at most call_timeout) and ends the role.
    """
    sessions = SessionTokens(p["target"]["cluster_secret"], ttl=p.get("token_ttl", 3600))
    channels = Channels(p.get("channels", 2))
    prefix = p["prefix"]
    clients = p["clients"]
    body = "x" * p["body"]
    timeout = p.get("call_timeout", 30.0)
    part, parts, groups = p["part"], p["parts"], p["groups"]
    load: asyncio.Task[None] | None = None
    try:
        addresses = sorted({address for _, address, _ in clients})
        stubs: dict[str, list[node_pb2_grpc.NodeAsyncStub]] = {}
        for address in addresses:
            await channels.ready(address)
            stubs[address] = [
                node_pb2_grpc.NodeStub(channels.get(address)) for _ in range(p.get("channels", 2))
            ]
        # A session for each client on its node, as the Gate gives one (minted here: the
        # receivers' sessions are theirs, and may be renewed).
        senders = [
            (stubs[address], bearer(sessions.issue(f"{prefix}{number}", node)))
            for number, address, node in clients
        ]
        ctl.send("ready")
        go = await ctl.recv("go", COMMAND_TIMEOUT)
        start, end = go["start_ns"], go["start_ns"] + go["duration_ns"]
        minutes = max(1, math.ceil(go["duration_ns"] / 60e9))
        state = _SoakSends(minutes, groups)
        rng = random.Random(p.get("seed", 0) * 1_000_003 + part)
        pending: set[asyncio.Task[None]] = set()

        async def one(
            stub: node_pb2_grpc.NodeAsyncStub,
            metadata: tuple[tuple[str, str], ...],
            request: node_pb2.SendRequest,
            messages: list[tuple[int, int, int]],
        ) -> None:
            """`messages`: (recipient, minute, number) of each message of the request."""
            state.in_flight += 1
            try:
                reply = await stub.Send(request, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                for _, minute, number in messages:
                    state.failed[minute][exc.code().name] += 1
                    state.failed_numbers.append(number)
                return
            except asyncio.CancelledError:
                for _, minute, number in messages:
                    state.failed[minute]["UNANSWERED"] += 1
                    state.failed_numbers.append(number)
                raise
            finally:
                state.in_flight -= 1
            ids = reply.message_ids or [reply.message_id]
            for message_id, (recipient, minute, _) in zip(ids, messages, strict=True):
                state.keys[recipient % groups].append(_soak_key(message_id, recipient))
                state.acked[minute] += 1

        async def offer() -> None:
            count = len(clients)
            batch = max(1, p.get("batch", 1))
            number = part
            interval = 1e9 / p["rate"]
            while start + int(number * interval) < end:
                numbers = [number + i * parts for i in range(batch)]
                numbers = [n for n in numbers if start + int(n * interval) < end]
                due = start + int(numbers[-1] * interval)
                # sleep(0) when late: the calls already started must get to run.
                await asyncio.sleep(max(0.0, (due - time.time_ns()) / 1e9))
                state.max_lag_ns = max(state.max_lag_ns, time.time_ns() - due)
                sender = rng.randrange(count)
                drafts = []
                messages = []
                for n in numbers:
                    other = rng.randrange(count - 1)
                    recipient, _, recipient_node = clients[other + (other >= sender)]
                    state.same_node += recipient_node == clients[sender][2]
                    message_due = start + int(n * interval)
                    minute = _minute(message_due, start, minutes)
                    drafts.append(
                        types_pb2.Draft(
                            to=[f"{prefix}{recipient}"],
                            body=body,
                            metadata={"t": str(message_due), "n": str(n)},
                        )
                    )
                    messages.append((recipient, minute, n))
                    state.sent[minute] += 1
                node_stubs, metadata = senders[sender]
                request = (
                    node_pb2.SendRequest(
                        to=drafts[0].to, body=drafts[0].body, metadata=drafts[0].metadata
                    )
                    if len(drafts) == 1
                    else node_pb2.SendRequest(batch=drafts)
                )
                stub = node_stubs[number % len(node_stubs)]
                task = asyncio.create_task(one(stub, metadata, request, messages))
                pending.add(task)
                task.add_done_callback(pending.discard)
                number = numbers[-1] + parts
            if pending:
                await asyncio.wait(set(pending), timeout=timeout + 5)
            for task in list(pending):
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        load = asyncio.create_task(offer())
        while True:
            command = await ctl.recv(("stats", "finish"), COMMAND_TIMEOUT)
            if command["op"] == "finish":
                break
            ctl.send("stats", **state.stats())
        # The load ends by itself: its last call is due before `end` and waited for at most
        # `timeout` + 5 s; the margin covers a starved process.
        async with asyncio.timeout(max(0.0, (end - time.time_ns()) / 1e9) + timeout + 30):
            await load
        return {
            "sent": state.sent,
            "acked": state.acked,
            "failed": [dict(c) for c in state.failed],
            "keys": ["\n".join(keys) for keys in state.keys],
            "failed_numbers": state.failed_numbers,
            "same_node": state.same_node,
            "max_lag_ns": state.max_lag_ns,
        }
    finally:
        if load is not None and not load.done():
            await cancel_and_wait(load)
        await channels.close()


Role = Callable[[Control, dict[str, Any]], Awaitable[dict[str, Any]]]

ROLES: dict[str, Role] = {
    "receive": receive,
    "send": send,
    "send_at_rate": send_at_rate,
    "publish": publish,
    "storm": storm,
    "connect": connect,
    "soak_receive": soak_receive,
    "soak_send": soak_send,
}
