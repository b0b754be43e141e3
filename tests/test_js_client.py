"""The Node.js client (clients/js) against a real cluster: a message from Python arrives in
JavaScript, one from JavaScript arrives in Python, and the JavaScript listener rides out the
crash of its node."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pigeon.auth import mint_user_token
from pigeon.client import Message, UserClient
from pigeon.errors import ResourceExhausted
from pigeon.etcd_server import free_port
from pigeon.local import LocalCluster
from tests.test_client import fake_cluster, hanging_node_and_fallback, welcome

pytestmark = pytest.mark.integration

JS = Path(__file__).resolve().parent.parent / "clients" / "js"
CLI = JS / "bin" / "pigeon-js.js"
NODE = shutil.which("node")


@pytest.fixture(scope="module")
def node_modules() -> None:
    """Install the pinned dependencies from package-lock.json once, if not installed yet."""
    if NODE is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed for the JavaScript client")
    if not (JS / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS,
            check=True,
            timeout=300,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, node_modules: None) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        tmp_path_factory.mktemp("js"), gate_port=0, gate_http_port=0, env={"PATH": "/usr/bin"}
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class JsProcess:
    """`pigeon-js` run as a subprocess, its JSON lines read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, object]] = []

    @classmethod
    async def start(cls, *args: str, node_options: str = "") -> JsProcess:
        assert NODE is not None
        process = await asyncio.create_subprocess_exec(
            NODE,
            *node_options.split(),
            str(CLI),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def line(self, timeout: float = 15.0) -> dict[str, object]:
        assert self.process.stdout is not None and self.process.stderr is not None
        async with asyncio.timeout(timeout):
            line = await self.process.stdout.readline()
            if not line:
                error = (await self.process.stderr.read()).decode()
                raise AssertionError(f"pigeon-js ended: {self.lines} {error}")
        event: dict[str, object] = json.loads(line)
        self.lines.append(event)
        return event

    async def expect(self, kind: str, timeout: float = 15.0) -> dict[str, object]:
        async with asyncio.timeout(timeout):
            while (event := await self.line())["type"] != kind:
                pass
        return event

    async def finish(self, timeout: float = 15.0) -> int:
        async with asyncio.timeout(timeout):
            return await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


@pytest.fixture
async def python_user(cluster: LocalCluster) -> AsyncIterator[UserClient]:
    async with UserClient(
        cluster.gate.address, mint_user_token(cluster.secrets.jwt_secret, "py")
    ) as client:
        yield client


async def run_to_end(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """Run a command in clients/js to its end; its exit code, stdout and stderr. Past the
    timeout its whole process group is killed (whatever it started too)."""
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=JS,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def readme_blocks(language: str) -> list[str]:
    """The fenced blocks of clients/js/README.md in a language, as printed."""
    return re.findall(rf"```{language}\n(.*?)```", (JS / "README.md").read_text(), re.DOTALL)


async def test_the_readme_example_and_command_lines_run_as_printed(cluster: LocalCluster) -> None:
    """Only the Gate's address differs from the README (the test cluster's ports are free
    ones)."""
    assert NODE is not None
    gate = cluster.gate.address
    secret = cluster.secrets.jwt_secret
    [example] = readme_blocks("js")
    # Next to src/, as the README says; a name of its own, removed after.
    script = JS / f"readme-example-{uuid.uuid4().hex}.js"
    script.write_text(example.replace("127.0.0.1:7070", gate))
    try:
        code, out, err = await run_to_end(
            [NODE, script.name],
            {"PATH": "/usr/bin:/bin", "PIGEON_TOKEN": mint_user_token(secret, "alice")},
            timeout=30,
        )
    finally:
        script.unlink()
    assert code == 0, err
    sent = out.splitlines()[-1]
    assert sent.startswith("sent ")
    async with UserClient(gate, mint_user_token(secret, "bob")) as bob:
        page = await bob.list_messages()
    assert [(m.id, m.sender, m.body) for m in page.messages] == [
        (sent.removeprefix("sent "), "alice", "Lunch at noon?")
    ]

    commands = readme_blocks("sh")[-1].replace("127.0.0.1:7070", gate)
    code, out, err = await run_to_end(
        ["bash", "-c", commands],
        {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PIGEON_JWT_SECRET": secret},
        timeout=60,
    )
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    [reply] = [e for e in events if "message_id" in e]
    messages = [(e["seq"], e["id"], e["body"]) for e in events if e.get("type") == "message"]
    assert messages == [
        (1, sent.removeprefix("sent "), "Lunch at noon?"),
        (2, reply["message_id"], "hi from JS"),
    ]


async def test_messages_cross_between_python_and_javascript(
    cluster: LocalCluster, python_user: UserClient
) -> None:
    gate = cluster.gate.address
    js_token = mint_user_token(cluster.secrets.jwt_secret, "js")
    listener = await JsProcess.start("listen", "--gate", gate, "--token", js_token, "--count", "2")
    try:
        connected = await listener.expect("connected")
        assert connected["userId"] == "js" and connected["reconnected"] is False
        first = await python_user.send("js", "from python", title="hi")
        message = await listener.expect("message")
        assert (message["id"], message["body"], message["sender"]) == (first, "from python", "py")
        assert message["seq"] == 1 and message["kind"] == "MESSAGE_KIND_USER"

        # The node holding the JavaScript stream crashes; the client resumes elsewhere.
        crashed = next(n for n in cluster.nodes if n.name == connected["nodeId"])
        crashed.kill()
        second = await python_user.send("js", "after the crash")
        message = await listener.expect("message")
        assert (message["id"], message["seq"]) == (second, 2)
        assert await listener.finish() == 0
        assert any(e["type"] == "disconnected" for e in listener.lines)
        reconnected = [e for e in listener.lines if e["type"] == "connected"][-1]
        assert reconnected["reconnected"] is True and reconnected["nodeId"] != crashed.name
    finally:
        listener.kill()

    events = python_user.events()
    sender = await JsProcess.start("send", "--gate", gate, "--token", js_token, "py", "from js")
    try:
        sent = await sender.line()
        assert await sender.finish() == 0
    finally:
        sender.kill()
    async with asyncio.timeout(15):
        async for event in events:
            if isinstance(event, Message):
                break
    assert isinstance(event, Message)
    assert (event.id, event.body, event.sender) == (sent["message_id"], "from js", "js")


async def test_a_node_that_welcomes_then_fails_every_time_is_retried_with_growing_backoff(
    node_modules: None, tmp_path: Path
) -> None:
    async def failing(request: object) -> AsyncIterator[object]:
        yield welcome()
        raise RuntimeError("the store failed during the replay")

    # Each pause at its bound: the fake Gate's backoff is 20 ms, doubling, at most 100 ms.
    at_bound = tmp_path / "random-at-bound.cjs"
    at_bound.write_text("Math.random = () => 1;\n")
    async with fake_cluster(failing) as (gate, _):
        listener = await JsProcess.start(
            "listen", "--gate", gate.address, "--token", "jwt", node_options=f"--require {at_bound}"
        )
        try:
            pauses = [(await listener.expect("disconnected"))["retry_in_ms"] for _ in range(4)]
        finally:
            listener.kill()
            await listener.process.wait()
    assert pauses == [40, 80, 100, 100]


async def run_js(
    tmp_path: Path, source: str, env: dict[str, str], timeout: float = 30
) -> tuple[int, str, str]:
    """Run a JavaScript module that imports the client as `PIGEON_JS`; exit code, stdout,
    stderr."""
    assert NODE is not None
    script = tmp_path / "script.mjs"
    script.write_text(source.replace("PIGEON_JS", (JS / "src" / "index.js").as_uri()))
    return await run_to_end([NODE, str(script)], {"PATH": "/usr/bin:/bin", **env}, timeout)


async def test_listen_ends_after_count_messages_even_when_one_event_carries_more(
    cluster: LocalCluster, python_user: UserClient
) -> None:
    user = f"js-{uuid.uuid4().hex[:8]}"
    for i in range(4):
        await python_user.send(user, f"m{i}")
    token = mint_user_token(cluster.secrets.jwt_secret, user)
    # The replay hands all four over in one event; the listener stops after two.
    args = ["listen", "--gate", cluster.gate.address, "--token", token, "--since", "0"]
    assert NODE is not None
    code, out, err = await run_to_end(
        [NODE, str(CLI), *args, "--count", "2"], {"PATH": "/usr/bin:/bin"}, timeout=30
    )
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["body"] for e in events if e["type"] == "message"] == ["m0", "m1"]


async def test_a_listener_that_throws_does_not_stop_delivery(
    cluster: LocalCluster, python_user: UserClient, tmp_path: Path
) -> None:
    user = f"js-{uuid.uuid4().hex[:8]}"
    for i in range(4):
        await python_user.send(user, f"m{i}")
    source = """
        import { UserClient } from 'PIGEON_JS';
        const client = new UserClient({
          gate: process.env.GATE, token: process.env.TOKEN, cursor: { seq: 0 },
        });
        const seen = [];
        // A throwing listener ahead of the others, on every event connect() relies on too.
        client.on('connected', () => { throw new Error('a bug in the application'); });
        client.on('message', () => { throw new Error('a bug in the application'); });
        client.on('message', (m) => {
          seen.push(m.body);
          if (seen.length === 4) {
            client.close();
            console.log(JSON.stringify({ seen, cursor: client.cursor }));
          }
        });
        await client.connect();
    """
    env = {"GATE": cluster.gate.address, "TOKEN": mint_user_token(cluster.secrets.jwt_secret, user)}
    # Exits by itself once closed: nothing of the client's keeps it running.
    code, out, err = await run_js(tmp_path, source, env)
    assert code == 0, err
    assert json.loads(out) == {
        "seen": ["m0", "m1", "m2", "m3"],
        "cursor": {"seq": 4, "broadcast_seq": 0},
    }
    assert "a 'message' listener threw" in err and "a 'connected' listener threw" in err


async def test_close_ends_a_backoff_wait_at_once(node_modules: None, tmp_path: Path) -> None:
    source = """
        import { UserClient } from 'PIGEON_JS';
        Math.random = () => 1;  // each backoff wait at its bound: 0.5, 1, 2 s...
        const client = new UserClient({
          gate: process.env.GATE, token: 'jwt', connectTimeoutMs: 2000,
        });
        // The Gate refuses every connection; connect() gives up after 2 s, in a 2 s wait.
        const error = await client.connect().catch((e) => e);
        setImmediate(() => console.log(JSON.stringify({
          code: error.code,
          timers: process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length,
        })));
    """
    code, out, err = await run_js(tmp_path, source, {"GATE": f"127.0.0.1:{free_port()}"})
    assert code == 0, err
    assert json.loads(out) == {"code": 14, "timers": 0}


async def test_a_node_that_hangs_leaves_time_for_the_fallback(
    node_modules: None, tmp_path: Path
) -> None:
    async with hanging_node_and_fallback() as (gate_address, node_address, node, hanging):
        source = """
            import { UserClient } from 'PIGEON_JS';
            const client = new UserClient({
              gate: process.env.GATE, token: 'jwt', connectTimeoutMs: 4000,
            });
            client.on('connected', (e) => console.log(JSON.stringify(e)));
            await client.connect();
            client.close();
        """
        code, out, err = await run_js(tmp_path, source, {"GATE": gate_address})
    assert code == 0, err
    assert json.loads(out)["address"] == node_address
    assert len(hanging.subscribes) == 1 and len(node.subscribes) == 1


async def test_errors_carry_the_wait_the_server_asks_for(
    node_modules: None, tmp_path: Path
) -> None:
    async with fake_cluster() as (gate, _):
        gate.refuse = ResourceExhausted("slow down", retry_after=2.5, reason="RATE_LIMITED")
        source = """
            import { UserClient, PigeonError } from 'PIGEON_JS';
            const client = new UserClient({ gate: process.env.GATE, token: 'jwt' });
            const error = await new Promise((resolve) => {
              client.gate().Connect({ token: 'jwt' }, (e) => resolve(PigeonError.from(e)));
            });
            client.close();
            const { code, reason, retryAfterMs } = error;
            console.log(JSON.stringify({ code, reason, retryAfterMs }));
        """
        code, out, err = await run_js(tmp_path, source, {"GATE": gate.address})
    assert code == 0, err
    assert json.loads(out) == {"code": 8, "reason": "RATE_LIMITED", "retryAfterMs": 2500}
