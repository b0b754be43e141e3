"""The attack rows' worker roles: attackers against a Pigeon cluster, and the victim, another
user whose calls are timed before and during an attack.

Attackers send pre-serialized requests (raw bytes through a method with no serializer, a JSON body
built once) so that what they cost the machine is the wire and the service's answer, not building
a 4 MB message on every call. Each answer is counted by its status: the gRPC code, or `HTTP nnn`
for REST, followed by the reason Pigeon sent (`INVALID_ARGUMENT TOO_MANY_RECIPIENTS`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import httpx

from bench.roles import COMMAND_TIMEOUT, Creds, bearer
from bench.workers import Control
from pigeon.auth import mint_user_token
from pigeon.client.errors import from_rpc_error
from pigeon.v1 import gate_pb2, node_pb2

__all__ = ["ATTACK_ROLES", "big_send_json", "big_send_request", "huge_token"]

GATE_CONNECT = "/pigeon.v1.Gate/Connect"
GATE_PUBLISH = "/pigeon.v1.Gate/Publish"
NODE_SEND = "/pigeon.v1.Node/Send"
OPEN_TIMEOUT = 30.0

Call = Callable[[], Awaitable[str]]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def huge_token(size: int, where: str) -> str:
    """A JWT-shaped `header.payload.signature` of about `size` characters with a fake signature.

    Both parts are base64url JSON objects, so a decoder gets as far as it can; the bulk is a
    `pad` entry of the payload, or of the header (`where="header"`).
    """
    now = int(time.time())
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    payload: dict[str, Any] = {"sub": "attacker", "iat": now, "exp": now + 3600}
    # base64 makes 4 characters of 3 bytes.
    (header if where == "header" else payload)["pad"] = "A" * (size * 3 // 4)
    parts = [json.dumps(part, separators=(",", ":")).encode() for part in (header, payload)]
    return ".".join([*(_b64(part) for part in parts), _b64(os.urandom(32))])


def _recipients(count: int) -> list[str]:
    return [f"u{i:06d}" for i in range(count)]


def big_send_request(recipients: int) -> bytes:
    """A serialized Node.Send of one message to `recipients` users (9 bytes each on the wire)."""
    request = node_pb2.SendRequest(to=_recipients(recipients), body="x")
    return request.SerializeToString()


def big_send_json(recipients: int) -> bytes:
    """The same Send as a REST body (10 bytes a recipient)."""
    body = {"to": _recipients(recipients), "body": "x"}
    return json.dumps(body, separators=(",", ":")).encode()


def _channel(address: str) -> grpc.aio.Channel:
    # Each attacker or held connection is its own HTTP/2 connection, as separate clients are.
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _raw(channel: grpc.aio.Channel, method: str) -> Any:
    """A unary method that takes the serialized request as bytes and returns bytes."""
    return channel.unary_unary(method, None, None)


def _grpc_call(method: Any, request: bytes, metadata: Any, timeout: float) -> Call:
    async def call() -> str:
        try:
            await method(request, metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            reason = from_rpc_error(exc).reason
            return code if reason == code else f"{code} {reason}"
        return "OK"

    return call


def _rest_call(client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]) -> Call:
    async def call() -> str:
        try:
            response = await client.post(path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if response.status_code == 200:
            return "OK"
        reason = ""
        with contextlib.suppress(ValueError, AttributeError, TypeError, IndexError):
            reason = response.json()["details"][0]["reason"]
        return f"HTTP {response.status_code}" + (f" {reason}" if reason else "")

    return call


async def _sleep_until(wall_ns: int) -> None:
    delay = (wall_ns - time.time_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


UNANSWERED = "unanswered at the end"
"""How a call still in flight when its attack ended is counted."""


async def _closed_loop(call: Call, start_ns: int, end_ns: int, codes: Counter[str]) -> None:
    """Call again as soon as each answer is in, from start_ns; a call in flight at end_ns is
    cancelled and counted as UNANSWERED."""
    await _sleep_until(start_ns)
    try:
        async with asyncio.timeout(max(0.0, (end_ns - time.time_ns()) / 1e9)):
            while True:
                codes[await call()] += 1
    except TimeoutError:
        codes[UNANSWERED] += 1


# --- the victim ----------------------------------------------------------------------------


class _Victim:
    """One user's sequential calls, at most one per `interval`."""

    def __init__(self, spec: dict[str, Any], creds: Creds, timeout: float) -> None:
        self.name: str = spec["name"]
        self._spec = spec
        self._creds = creds
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._http: httpx.AsyncClient | None = None
        self.call: Call

    async def open(self) -> None:
        spec, creds, timeout = self._spec, self._creds, self._timeout
        kind = spec["kind"]
        if kind == "connect":
            self._channel = _channel(spec["address"])
            connect = gate_pb2.ConnectRequest(token=creds.user_token(spec["user"]))
            self.call = _grpc_call(
                _raw(self._channel, GATE_CONNECT), connect.SerializeToString(), (), timeout
            )
        elif kind == "send_grpc":
            self._channel = _channel(spec["address"])
            request = node_pb2.SendRequest(to=[spec["peer"]], body="hello")
            metadata = bearer(creds.session(spec["user"], spec["node"]))
            self.call = _grpc_call(
                _raw(self._channel, NODE_SEND), request.SerializeToString(), metadata, timeout
            )
        elif kind == "send_rest":
            self._http = httpx.AsyncClient(base_url=f"http://{spec['address']}", timeout=timeout)
            token = creds.session(spec["user"], spec["node"])
            body = json.dumps({"to": [spec["peer"]], "body": "hello"}).encode()
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            self.call = _rest_call(self._http, "/v1/messages", body, headers)
        else:
            raise ValueError(f"unknown victim kind {kind!r}")
        # The connection is made and the path is warm before anything is timed.
        code = await self.call()
        if code != "OK":
            raise RuntimeError(f"victim {self.name}: the first call was answered {code}")

    async def measure(self, from_ns: int, to_ns: int, interval: float) -> dict[str, Any]:
        """Calls started in [from_ns, to_ns): their latency (ns) and how they were answered."""
        latencies = array("q")
        codes: Counter[str] = Counter()
        await _sleep_until(from_ns)
        while (started := time.time_ns()) < to_ns:
            codes[await self.call()] += 1
            latencies.append(time.time_ns() - started)
            await _sleep_until(started + int(interval * 1e9))
        return {"latencies": latencies.tobytes(), "codes": dict(codes)}

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
        if self._http is not None:
            await self._http.aclose()


async def victim(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Other users' calls, timed in windows the harness names.

    Params: target, victims (each: name, kind connect | send_grpc | send_rest, address, user,
    and for sends node and peer, the recipient), interval (seconds between call starts, at
    least), call_timeout. Commands: measure (from_ns, to_ns), answered with `measured`
    (victims: name → latencies, codes); stop.
    """
    creds = Creds(p["target"])
    victims = [_Victim(spec, creds, p["call_timeout"]) for spec in p["victims"]]
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            await asyncio.gather(*(v.open() for v in victims))
        ctl.send("ready")
        while True:
            command = await ctl.recv(("measure", "stop"), COMMAND_TIMEOUT)
            if command["op"] == "stop":
                return {}
            found = await asyncio.gather(
                *(v.measure(command["from_ns"], command["to_ns"], p["interval"]) for v in victims)
            )
            ctl.send("measured", victims={v.name: f for v, f in zip(victims, found, strict=True)})
    finally:
        for v in victims:
            await v.close()


# --- attackers -----------------------------------------------------------------------------


async def attack(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop attackers (`attackers` of them in this process, one connection each).

    Params: target, kind, attackers, and by kind: huge_token (gate, token_bytes, where),
    big_send_grpc (node, node_name, users, recipients), big_send_rest (http, node_name, users,
    recipients), failed_auth (gate, and per attacker: connects, rate, publishes), hold (gate,
    node, http, connections of each). Command: go (start_ns, end_ns); hold also takes count
    and stop (see `_hold`).
    """
    kind = p["kind"]
    if kind == "hold":
        return await _hold(ctl, p)
    if kind == "failed_auth":
        return await _failed_auth(ctl, p)
    creds = Creds(p["target"])
    timeout = p.get("call_timeout", 60.0)
    channels: list[grpc.aio.Channel] = []
    clients: list[httpx.AsyncClient] = []
    calls: list[Call] = []
    try:
        if kind == "huge_token":
            request = gate_pb2.ConnectRequest(token=huge_token(p["token_bytes"], p["where"]))
            data = request.SerializeToString()
            for _ in range(p["attackers"]):
                channels.append(_channel(p["gate"]))
                calls.append(_grpc_call(_raw(channels[-1], GATE_CONNECT), data, (), timeout))
        elif kind == "big_send_grpc":
            data = big_send_request(p["recipients"])
            for user in p["users"]:
                channels.append(_channel(p["node"]))
                metadata = bearer(creds.session(user, p["node_name"]))
                calls.append(_grpc_call(_raw(channels[-1], NODE_SEND), data, metadata, timeout))
        elif kind == "big_send_rest":
            data = big_send_json(p["recipients"])
            for user in p["users"]:
                clients.append(httpx.AsyncClient(base_url=f"http://{p['http']}", timeout=timeout))
                headers = {
                    "authorization": f"Bearer {creds.session(user, p['node_name'])}",
                    "content-type": "application/json",
                }
                calls.append(_rest_call(clients[-1], "/v1/messages", data, headers))
        else:
            raise ValueError(f"unknown attack kind {kind!r}")
        async with asyncio.timeout(OPEN_TIMEOUT):
            for channel in channels:
                await channel.channel_ready()
        ctl.send("ready", request_bytes=len(data))
        go = await ctl.recv("go", COMMAND_TIMEOUT)
        codes: Counter[str] = Counter()
        await asyncio.gather(*(_closed_loop(c, go["start_ns"], go["end_ns"], codes) for c in calls))
        return {"codes": dict(codes), "request_bytes": len(data)}
    finally:
        for channel in channels:
            await channel.close(None)
        for client in clients:
            await client.aclose()


async def _failed_auth(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Attacker i: `connects[i]` Gate.Connects with no or a bad token at `rate` per second (open
    loop: each leaves when due, whatever the answers do), and meanwhile `publishes[i]`
    Gate.Publish calls with a wrong API key, one after another as fast as they are answered.
    What is not answered by end_ns is counted as UNANSWERED."""
    timeout = p.get("call_timeout", 30.0)
    wrong = mint_user_token("not-the-cluster-secret-" + "x" * 16, "intruder", ttl=3600)
    # No token, not a JWT, a JWT signed with another secret: in turn.
    tokens = [
        gate_pb2.ConnectRequest(token=t).SerializeToString() for t in ("", "not-a-jwt", wrong)
    ]
    publish = gate_pb2.PublishRequest(to=["someone"], body="x").SerializeToString()
    metadata = bearer("wrong-api-key-" + os.urandom(8).hex())
    channels = [_channel(p["gate"]) for _ in range(p["attackers"])]
    connect_codes: Counter[str] = Counter()
    publish_codes: Counter[str] = Counter()
    max_lag = 0
    publish_spans: list[tuple[int, int]] = []
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            for channel in channels:
                await channel.channel_ready()
        ctl.send("ready")
        go = await ctl.recv("go", COMMAND_TIMEOUT)
        start, end = go["start_ns"], go["end_ns"]

        async def connects(channel: grpc.aio.Channel, count: int) -> None:
            nonlocal max_lag
            method = _raw(channel, GATE_CONNECT)
            period = int(1e9 / p["rate"])

            async def one(i: int) -> None:
                call = _grpc_call(method, tokens[i % len(tokens)], (), timeout)
                code = UNANSWERED
                try:
                    code = await call()
                finally:
                    connect_codes[code] += 1

            pending = []
            for i in range(count):
                due = start + i * period
                await _sleep_until(due)
                max_lag = max(max_lag, time.time_ns() - due)
                pending.append(asyncio.ensure_future(one(i)))
            await asyncio.gather(*pending)

        async def publishes(channel: grpc.aio.Channel, count: int) -> None:
            call = _grpc_call(_raw(channel, GATE_PUBLISH), publish, metadata, timeout)
            await _sleep_until(start)
            began = time.time_ns()
            for sent in range(count):
                try:
                    code = await call()
                except asyncio.CancelledError:
                    publish_codes[UNANSWERED] += count - sent
                    raise
                publish_codes[code] += 1
            publish_spans.append((began, time.time_ns()))

        pairs = list(zip(channels, p["connects"], p["publishes"], strict=True))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout((end - time.time_ns()) / 1e9):
                await asyncio.gather(
                    *(connects(c, n) for c, n, _ in pairs), *(publishes(c, n) for c, _, n in pairs)
                )
        return {
            "connect_codes": dict(connect_codes),
            "publish_codes": dict(publish_codes),
            "publish_spans": publish_spans,
            "max_lag_ns": max_lag,
        }
    finally:
        for channel in channels:
            await channel.close(None)


class _Held:
    """Idle connections of one kind, and when (seconds after they were all open) each closed."""

    def __init__(self) -> None:
        self.channels: list[grpc.aio.Channel] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.closed: dict[int, float] = {}
        self.failed = 0

    def total(self) -> int:
        return len(self.channels) + len(self.writers)

    def figures(self) -> dict[str, Any]:
        times = sorted(self.closed.values())
        return {
            "open": self.total() - len(times),
            "closed": len(times),
            "first_closed_s": round(times[0], 2) if times else None,
            "last_closed_s": round(times[-1], 2) if times else None,
        }


async def _watch_tcp(
    reader: asyncio.StreamReader, held: _Held, index: int, since: list[float]
) -> None:
    with contextlib.suppress(OSError):
        while await reader.read(4096):
            pass
    held.closed[index] = time.monotonic() - since[0]


async def _watch_channels(held: _Held, since: list[float]) -> None:
    """A channel whose connection the server closed leaves READY (for IDLE, with no call to
    make it reconnect)."""
    while True:
        for index, channel in enumerate(held.channels):
            if index not in held.closed and (
                channel.get_state(try_to_connect=False) != grpc.ChannelConnectivity.READY
            ):
                held.closed[index] = time.monotonic() - since[0]
        await asyncio.sleep(0.25)


async def _hold(ctl: Control, p: dict[str, Any]) -> dict[str, Any]:
    """Hold idle connections: `connections` gRPC channels each to the Gate and to the node
    (HTTP/2 handshake done, no call, no credential) and as many TCP connections to the node's
    HTTP port (nothing sent). On go: open them, answer `opened`; on count: answer `counted`
    (by kind: still open, closed, first and last closed, in seconds after all were open); on
    stop: close them."""
    count = p["connections"]
    held = {"gate_grpc": _Held(), "node_grpc": _Held(), "node_http": _Held()}
    watchers: list[asyncio.Task[None]] = []
    # When every connection was open: the closing times count from there.
    since = [time.monotonic()]

    async def ready(channel: grpc.aio.Channel) -> bool:
        try:
            await asyncio.wait_for(channel.channel_ready(), OPEN_TIMEOUT)
        except TimeoutError:
            return False
        return True

    try:
        ctl.send("ready")
        await ctl.recv("go", COMMAND_TIMEOUT)
        for name, address in (("gate_grpc", p["gate"]), ("node_grpc", p["node"])):
            channels = [_channel(address) for _ in range(count)]
            opened = await asyncio.gather(*(ready(c) for c in channels))
            held[name].channels = [c for c, ok in zip(channels, opened, strict=True) if ok]
            held[name].failed = opened.count(False)
            for channel, ok in zip(channels, opened, strict=True):
                if not ok:
                    await channel.close(None)
        tcp = held["node_http"]
        host, port = p["http"].rsplit(":", 1)
        for _ in range(count):
            try:
                async with asyncio.timeout(OPEN_TIMEOUT):
                    reader, writer = await asyncio.open_connection(host, int(port))
            except (OSError, TimeoutError):
                tcp.failed += 1
                continue
            tcp.writers.append(writer)
            watchers.append(
                asyncio.create_task(_watch_tcp(reader, tcp, len(tcp.writers) - 1, since))
            )
        since[0] = time.monotonic()
        for name in ("gate_grpc", "node_grpc"):
            watchers.append(asyncio.create_task(_watch_channels(held[name], since)))
        ctl.send(
            "opened",
            open={name: h.total() for name, h in held.items()},
            failed={name: h.failed for name, h in held.items()},
        )
        while (await ctl.recv(("count", "stop"), COMMAND_TIMEOUT))["op"] == "count":
            ctl.send("counted", held={name: h.figures() for name, h in held.items()})
        return {}
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        for h in held.values():
            for writer in h.writers:
                writer.close()
            for channel in h.channels:
                await channel.close(None)


ATTACK_ROLES: dict[str, Callable[[Control, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "victim": victim,
    "attack": attack,
}
"""The attack rows' roles, by name (bench.workers runs them beside bench.roles.ROLES)."""
