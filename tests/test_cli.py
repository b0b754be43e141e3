"""The `pigeon` command line as a user runs it: against a `pigeon up` cluster in the current folder,
each command a subprocess, checked by what it prints and how it exits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from pigeon.auth import mint_user_token
from pigeon.cli import main
from pigeon.client import UserClient
from pigeon.etcd_server import free_port

pytestmark = pytest.mark.integration

PIGEON = str(Path(sys.executable).parent / "pigeon")
BASE_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")},
    "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
}


class Lines:
    """A subprocess stream read line by line in a thread, with waits that time out."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"stream ended; lines so far: {self.seen}")
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no matching line in {timeout} s; lines so far: {self.seen}")

    def all(self, timeout: float = 15.0) -> list[str]:
        """Every line, once the stream has ended."""
        with contextlib.suppress(AssertionError):
            self.expect(lambda line: False, timeout)
        return self.seen


@dataclass
class Up:
    """A `pigeon up` cluster in a folder: run commands there as a user would."""

    cwd: Path
    process: subprocess.Popen[str]

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
        completed = subprocess.run(
            [PIGEON, *args],
            cwd=cwd or self.cwd,
            env={**BASE_ENV, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        return Result(completed.returncode, completed.stdout, completed.stderr)

    def seed(self, sender: str, to: str, bodies: list[str]) -> list[str]:
        """Send messages with the SDK (in this process: only the commands under test are run as
        subprocesses, each costs a process start)."""
        gate = json.loads((self.cwd / ".pigeon" / "cluster.json").read_text())["gate"]
        secret = json.loads((self.cwd / ".pigeon" / "secrets.json").read_text())["jwt_secret"]

        async def send() -> list[str]:
            token = mint_user_token(secret, sender)
            async with UserClient(gate, token, receive=False) as client:
                return [await client.send(to, body) for body in bodies]

        return asyncio.run(send())

    def start(self, *args: str) -> tuple[subprocess.Popen[str], Lines, Lines]:
        process = subprocess.Popen(
            [PIGEON, *args],
            cwd=self.cwd,
            env=BASE_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None and process.stderr is not None
        return process, Lines(process.stdout), Lines(process.stderr)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def ok(self) -> str:
        assert self.code == 0, f"exit {self.code}: {self.err}"
        return self.out


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """`pigeon up` on free ports with its data in ./.pigeon, as `make run` does."""
    cwd = tmp_path_factory.mktemp("cli")
    process = subprocess.Popen(
        [PIGEON, "up", "--gate-port", str(free_port()), "--gate-http-port", str(free_port())],
        cwd=cwd,
        env=BASE_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        Lines(process.stdout).expect(lambda line: "Ctrl-C stops everything" in line, timeout=60)
        yield Up(cwd, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize(
    "command",
    [
        ["send"],
        ["publish"],
        ["listen"],
        ["inbox"],
        ["inbox", "list"],
        ["inbox", "show"],
        ["inbox", "read"],
        ["inbox", "delete"],
        ["inbox", "unread"],
        ["nodes"],
        ["token"],
        ["up"],
    ],
    ids=" ".join,
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # In process: the same parser the console script runs, without a process start per command.
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: pigeon {' '.join(command)}")


def test_pigeon_help_lists_every_command() -> None:
    top = subprocess.run([PIGEON, "--help"], capture_output=True, text=True, timeout=30)
    assert top.returncode == 0
    for name in ("up", "token", "send", "publish", "listen", "inbox", "nodes"):
        assert f"    {name} " in top.stdout


def test_send_publish_and_listen_as_json(up: Up) -> None:
    listener, out, _ = up.start("listen", "--as", "bob", "--json", "--count", "2")
    try:
        connected = json.loads(out.expect(lambda line: '"connected"' in line))
        assert connected["user_id"] == "bob" and connected["reconnected"] is False
        sent = up.run(
            "send", "--as", "alice", "bob", "Lunch at noon?", "--title", "Lunch", "--meta", "at=12"
        ).ok()
        published = up.run("publish", "bob", "Your order shipped", "--source", "shop").ok()
        assert listener.wait(15) == 0
    finally:
        listener.kill()
    events = [json.loads(line) for line in out.all()]
    messages = [e for e in events if e["type"] == "message"]
    assert [(m["sender"], m["body"], m["stream"], m["seq"]) for m in messages] == [
        ("alice", "Lunch at noon?", "inbox", 1),
        ("shop", "Your order shipped", "inbox", 2),
    ]
    assert messages[0]["id"] == sent.strip() and messages[0]["title"] == "Lunch"
    assert messages[0]["metadata"] == {"at": "12"} and messages[0]["kind"] == "user"
    assert messages[1]["id"] == published.strip() and messages[1]["kind"] == "system"
    assert {"type": "unread", "count": 1} in events


def test_listen_prints_lines_and_stops_cleanly_on_ctrl_c(up: Up) -> None:
    listener, out, err = up.start("listen", "--as", "erin")
    try:
        err.expect(lambda line: "connected to node-" in line and "as erin" in line)
        up.seed("alice", "erin", ["hi erin"])
        line = out.expect(lambda line: "hi erin" in line)
        assert " inbox#1 alice: hi erin" in line and "\x1b[" not in line
        listener.send_signal(signal.SIGINT)
        assert listener.wait(15) == 0
    finally:
        listener.kill()
    assert "Traceback" not in "\n".join(err.all())


def test_listen_ends_with_0_however_often_ctrl_c_comes_while_it_stops(up: Up) -> None:
    # `timeout -s INT` signals the process and then its process group: two SIGINTs, the second
    # possibly while the first one's clean-up runs.
    listener, _out, err = up.start("listen", "--as", "gina")
    try:
        err.expect(lambda line: "connected to node-" in line and "as gina" in line)
        deadline = time.monotonic() + 15
        while listener.poll() is None and time.monotonic() < deadline:
            listener.send_signal(signal.SIGINT)
            time.sleep(0.002)
        assert listener.wait(1) == 0
    finally:
        listener.kill()
    assert "Traceback" not in "\n".join(err.all())


def test_the_inbox_commands(up: Up) -> None:
    ids = up.seed("alice", "frank", ["note 0", "note 1", "note 2"])
    table = up.run("inbox", "--as", "frank").ok()
    assert table.splitlines()[0].split() == ["ID", "STREAM", "FROM", "WHEN", "MESSAGE"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ids[::-1]
    assert table.count("●") == 3

    listed = json.loads(up.run("inbox", "list", "--as", "frank", "--unread", "--json").ok())
    assert [m["body"] for m in listed["messages"]] == ["note 2", "note 1", "note 0"]
    shown = up.run("inbox", "show", "--as", "frank", ids[0]).ok()
    assert "from:" in shown and "alice" in shown and shown.rstrip().endswith("note 0")

    assert up.run("inbox", "read", "--as", "frank", ids[0]).ok() == "unread: 2\n"
    assert up.run("inbox", "--as", "frank", "read", "--up-to", "2").ok() == "unread: 1\n"
    assert up.run("inbox", "delete", "--as", "frank", ids[2]).ok() == "unread: 0\n"
    assert json.loads(up.run("inbox", "unread", "--as", "frank", "--json").ok()) == {
        "unread_count": 0
    }
    gone = up.run("inbox", "show", "--as", "frank", ids[2])
    assert gone.code == 1 and "MESSAGE_NOT_FOUND" in gone.err


def test_nodes_shows_the_cluster(up: Up) -> None:
    table = up.run("nodes").ok()
    rows = [line.split() for line in table.splitlines() if line]
    assert rows[0][:3] == ["NODE", "STATE", "ADDRESS"]
    assert [r[0] for r in rows[1:3]] == ["node-1", "node-2"]
    assert all(r[1] == "serving" for r in rows[1:3])
    assert rows[3][0] == "DISPATCHER" and rows[4][:1] == ["dispatcher-1"]
    cluster = json.loads(up.run("nodes", "--json").ok())
    assert [n["node_id"] for n in cluster["nodes"]] == ["node-1", "node-2"]
    # Both nodes share one store, and the table shows the start of its id.
    [store_id] = {n["store_id"] for n in cluster["nodes"]}
    assert rows[0][-1] == "STORE" and rows[1][-1] == rows[2][-1] == store_id[:8]


def test_tokens_keys_and_the_gate_come_from_flags_or_the_environment(
    up: Up, tmp_path: Path
) -> None:
    gate = json.loads((up.cwd / ".pigeon" / "cluster.json").read_text())["gate"]
    secrets = json.loads((up.cwd / ".pigeon" / "secrets.json").read_text())
    token = up.run("token", "grace").ok().strip()
    # Elsewhere, without the `pigeon up` folder: everything from the environment...
    env = {"PIGEON_GATE": gate, "PIGEON_TOKEN": token, "PIGEON_API_KEYS": secrets["api_key"]}
    assert up.run("inbox", "unread", env=env, cwd=tmp_path).ok() == "unread: 0\n"
    assert "node-1" in up.run("nodes", env=env, cwd=tmp_path).ok()
    # ...or from flags.
    flags = ["--gate", gate, "--api-key", secrets["api_key"]]
    assert up.run("publish", "grace", "hi", *flags, cwd=tmp_path).code == 0
    assert up.run("inbox", "unread", "--gate", gate, "--token", token, cwd=tmp_path).ok() == (
        "unread: 1\n"
    )
    # The body can come from stdin.
    piped = subprocess.run(
        [PIGEON, "send", "--as", "alice", "grace", "-"],
        input="from a pipe\n",
        cwd=up.cwd,
        env=BASE_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert piped.returncode == 0
    shown = up.run("inbox", "show", "--as", "grace", piped.stdout.strip()).ok()
    assert "from a pipe" in shown


def test_errors_are_one_line_with_an_exit_code(up: Up, tmp_path: Path) -> None:
    unreachable = up.run(
        "send", "--gate", f"127.0.0.1:{free_port()}", "--as", "a", "b", "hi", "--timeout", "1"
    )
    bad_token = up.run("send", "--token", "not-a-jwt", "bob", "hi")
    usage = up.run("send", "bob")
    refused = up.run("send", "--as", "alice", "bob", "")
    no_secret = up.run("send", "--as", "alice", "bob", "hi", cwd=tmp_path)
    bad_key = up.run("nodes", "--api-key", "wrong")
    both = up.run("publish", "--broadcast", "bob", "hi")
    assert (unreachable.code, bad_token.code, usage.code, refused.code) == (3, 4, 2, 1)
    assert (no_secret.code, bad_key.code, both.code) == (2, 4, 2)
    assert "cannot reach the cluster" in unreachable.err
    assert "TOKEN_MALFORMED" in bad_token.err
    assert "EMPTY_BODY" in refused.err
    assert "--as alice needs the cluster's JWT secret" in no_secret.err
    for result in (unreachable, bad_token, refused, no_secret, bad_key, both):
        assert result.err.count("\n") == 1 and "Traceback" not in result.err
        assert result.out == ""


def test_colours_only_on_a_terminal_and_never_with_no_color(up: Up) -> None:
    def on_a_terminal(env: dict[str, str]) -> str:
        leader, follower = pty.openpty()
        try:
            process = subprocess.run(
                [PIGEON, "nodes"],
                cwd=up.cwd,
                env={**BASE_ENV, "TERM": "xterm", **env},
                stdout=follower,
                stderr=subprocess.PIPE,
                timeout=30,
            )
            assert process.returncode == 0
            os.close(follower)
            follower = -1
            chunks = []
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the terminal's other end is closed
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode()
        finally:
            os.close(leader)
            if follower >= 0:
                os.close(follower)

    assert "\x1b[1m" in on_a_terminal({})
    assert "\x1b[" not in on_a_terminal({"NO_COLOR": "1"})
    assert "\x1b[" not in up.run("nodes").ok()


def test_broadcasts_reach_everyone_and_replay_from_a_seq(up: Up) -> None:
    # Last in the module: a broadcast lands in every user's inbox.
    message_id = up.run("publish", "--broadcast", "Maintenance at 02:00").ok().strip()
    replayed = up.run("listen", "--as", "heidi", "--since-broadcast", "0", "--count", "1", "--json")
    messages = [json.loads(line) for line in replayed.ok().splitlines()]
    [broadcast] = [m for m in messages if m["type"] == "message"]
    assert broadcast["id"] == message_id and broadcast["stream"] == "broadcast"
    assert broadcast["sender"] == "system" and broadcast["recipient"] == ""


def test_listen_stops_on_ctrl_c_while_it_is_still_connecting(up: Up) -> None:
    # A Gate that accepts the connection and never answers: the listener is connecting.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        gate = f"127.0.0.1:{hung.getsockname()[1]}"
        listener, _out, err = up.start("listen", "--gate", gate, "--as", "ivy", "--timeout", "60")
        try:
            hung.settimeout(30)
            connection, _ = hung.accept()
            listener.send_signal(signal.SIGINT)
            assert listener.wait(10) == 0
            connection.close()
        finally:
            listener.kill()
    assert "Traceback" not in "\n".join(err.all())


@pytest.mark.parametrize(
    "args",
    [
        ["inbox", "--limit", "-1"],
        ["inbox", "--limit", "0"],
        ["inbox", "read", "--up-to", "-5"],
        ["listen", "--since", "-1"],
        ["listen", "--count", "-1"],
        ["send", "bob", "hi", "--timeout", "0"],
        ["listen", "--max-time", "-2"],
        ["token", "bob", "--ttl", "nan"],
        ["up", "--nodes", "0"],
        ["up", "--gate-port", "70000"],
    ],
)
def test_numbers_out_of_range_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    # As a user: the client commands with a user, so only the number is wrong.
    user = ["--as", "x"] if args[0] in ("inbox", "listen", "send") else []
    result = subprocess.run(
        [PIGEON, *args, *user],
        cwd=tmp_path,
        env=BASE_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "error: argument" in result.stderr and "expected" in result.stderr
    assert "Traceback" not in result.stderr


def test_env_prints_this_clusters_gate_over_an_exported_one(up: Up) -> None:
    gate = json.loads((up.cwd / ".pigeon" / "cluster.json").read_text())["gate"]
    printed = up.run("env", env={"PIGEON_GATE": "127.0.0.1:9"}).ok()
    assert f"export PIGEON_GATE={gate}" in printed.splitlines()


def test_the_next_page_hint_runs_as_printed(up: Up) -> None:
    up.seed("alice", "jack", ["first", "second", "third"])
    first = up.run("inbox", "--as", "jack", "--limit", "2").ok()
    hint = first.splitlines()[-1]
    assert hint.startswith("more: pigeon inbox list --as jack --limit 2 --page-token ")
    command = shlex.split(hint.removeprefix("more: "))
    rest = up.run(*command[1:]).ok()
    assert "first" in rest and "second" not in rest and "third" not in rest
    assert "more:" not in rest


def test_a_second_up_in_the_same_folder_refuses_at_once(up: Up) -> None:
    started = time.monotonic()
    second = up.run("up", "--gate-port", "0", "--gate-http-port", "0")
    assert second.code == 1
    gate = json.loads((up.cwd / ".pigeon" / "cluster.json").read_text())["gate"]
    assert f"a cluster is already running from .pigeon/ (its Gate: {gate})" in second.err
    assert time.monotonic() - started < 20
