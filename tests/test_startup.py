"""A service that cannot start says why in one line that names the setting, and exits 2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc.aio
import httpx
import pytest

from pigeon.auth import SessionTokens, mint_user_token
from pigeon.etcd_server import EtcdServer, free_port
from pigeon.membership import decode_dispatcher, encode
from pigeon.registry import PrefixWatch, Registration
from pigeon.v1 import node_pb2, node_pb2_grpc, types_pb2

pytestmark = pytest.mark.integration

SECRETS = {
    "PIGEON_CLUSTER_SECRET": "cluster secret of the test",
    "PIGEON_JWT_SECRET": "jwt secret of the start-up tests, 32+ bytes",
    "PIGEON_API_KEYS": "key of the test",
    # Not a secret: ops listeners on free ports, so two services of a test (or of runs side by
    # side) never clash on the default metrics ports.
    "PIGEON_METRICS_ADDRESS": "127.0.0.1:0",
}


@contextlib.asynccontextmanager
async def serving(service: str, etcd_endpoint: str, *args: str) -> AsyncIterator[None]:
    """`python -m service` against etcd_endpoint, running for the block, stopped after it."""
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", service, "--etcd-endpoints", etcd_endpoint, *args],
        env={"PATH": "/usr/bin:/bin", **SECRETS},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.terminate()
        async with asyncio.timeout(20):
            await process.wait()


def start(
    service: str, *args: str, env: dict[str, str] | None = None, etcd: str = ""
) -> tuple[int, str]:
    """Run `python -m service args` to its end; its exit code and its stderr."""
    # By default nothing answers on the etcd port: the start-up fails before it matters.
    etcd = etcd or f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", service, "--etcd-endpoints", etcd, *args],
        env={"PATH": "/usr/bin:/bin", **(SECRETS if env is None else env)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_an_unknown_variable_is_named_on_one_line() -> None:
    code, stderr = start("gate", env={**SECRETS, "PIGEON_PROT": "7070"})
    assert code == 2
    assert stderr.strip() == (
        "python -m gate: unknown setting PIGEON_PROT (did you mean PIGEON_PORT?)"
    )


def test_a_bad_value_is_named_on_one_line() -> None:
    code, stderr = start("dispatcher", "--port", "seventy")
    assert code == 2
    assert stderr.strip().splitlines() == [
        "python -m dispatcher: bad value for --port: expected an integer, got 'seventy'"
    ]


@pytest.mark.parametrize("service", ["node", "gate", "dispatcher"])
def test_a_missing_secret_names_its_variable_without_a_traceback(service: str) -> None:
    env = {k: v for k, v in SECRETS.items() if k != "PIGEON_CLUSTER_SECRET"}
    code, stderr = start(service, "--port", "0", "--http-port", "0", env=env)
    assert code == 2
    # One line, said before etcd (out of reach here) is asked anything.
    [line] = stderr.strip().splitlines()
    assert "PIGEON_CLUSTER_SECRET" in line


@pytest.mark.parametrize(
    ("flag", "other", "variable"),
    [("--port", "--http-port", "PIGEON_PORT"), ("--http-port", "--port", "PIGEON_HTTP_PORT")],
)
def test_a_taken_port_names_the_setting_to_change(
    taken_port: int, flag: str, other: str, variable: str
) -> None:
    code, stderr = start("gate", flag, str(taken_port), other, "0")
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{taken_port}: the port is taken" in stderr
    assert f"({variable}) to a free port" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("setting", ["--tls-ca", "--tls-cert"])
def test_a_missing_tls_file_is_named_on_one_line(setting: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    args = [setting, str(missing)] + (
        ["--tls-key", str(missing)] if setting == "--tls-cert" else []
    )
    code, stderr = start("gate", *args)
    assert code == 2
    name = setting.removeprefix("--").replace("-", "_")
    assert stderr.strip().splitlines() == [
        f"python -m gate: bad value for {name}: '{missing}': no such file"
    ]


def test_etcd_out_of_reach_ends_the_start_in_one_line() -> None:
    code, stderr = start("dispatcher", "--port", "0", "--http-port", "0")
    assert code == 1
    [line] = [text for text in stderr.splitlines() if "CRITICAL" in text]
    assert "cannot start: cannot register /pigeon/dispatchers/" in line
    assert "Traceback" not in stderr


def test_a_store_that_cannot_open_ends_the_start_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "no-such-folder" / "pigeon.db"
    code, stderr = start("node", "--port", "0", "--http-port", "0", "--sqlite-path", str(path))
    assert code == 1
    [line] = [text for text in stderr.splitlines() if "CRITICAL" in text]
    assert f"cannot start: cannot open SQLite store '{path}'" in line
    assert "Traceback" not in stderr


async def test_a_service_listening_on_every_address_advertises_the_host_name(
    etcd: EtcdServer,
) -> None:
    async with serving(
        "dispatcher", etcd.endpoint, "--host", "0.0.0.0", "--port", "0", "--http-port", "0"
    ):
        async with PrefixWatch([etcd.endpoint], "/pigeon/dispatchers/") as watch:
            await watch.wait_for(lambda view: len(view) == 1, timeout=20)
            [raw] = watch.view.values()
        info = decode_dispatcher(raw)
        assert info is not None
        host, _, port = info.address.rpartition(":")
        # Other machines cannot reach 0.0.0.0: the name of this one is what they are given.
        assert host == socket.gethostname() and int(port) > 0


async def test_a_node_whose_cluster_secret_the_dispatchers_refuse_does_not_start(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    async with serving("dispatcher", etcd.endpoint, "--port", "0", "--http-port", "0"):
        async with PrefixWatch([etcd.endpoint], "/pigeon/dispatchers/") as watch:
            await watch.wait_for(lambda view: len(view) == 1, timeout=20)
        env = {**SECRETS, "PIGEON_CLUSTER_SECRET": "not the cluster's secret"}
        code, stderr = await asyncio.to_thread(
            start, "node", "--port", "0", "--http-port", "0",
            "--sqlite-path", str(tmp_path / "pigeon.db"), env=env, etcd=etcd.endpoint,
        )  # fmt: skip
    assert code == 2
    [line] = [text for text in stderr.splitlines() if "CRITICAL" in text]
    assert "every dispatcher refused this node" in line and "(UNAUTHENTICATED)" in line
    assert "PIGEON_CLUSTER_SECRET must be the same" in line


def test_a_gate_with_no_key_for_user_tokens_refuses_to_start() -> None:
    env = {k: v for k, v in SECRETS.items() if k != "PIGEON_JWT_SECRET"}
    code, stderr = start("gate", "--port", "0", "--http-port", "0", env=env)
    assert code == 2
    [line] = [text for text in stderr.splitlines() if "CRITICAL" in text]
    assert "no key to verify user tokens with: set jwt_secret (PIGEON_JWT_SECRET)" in line
    assert "Traceback" not in stderr


async def test_a_gate_listening_on_every_address_serves_rest(etcd: EtcdServer) -> None:
    http_port = free_port()
    async with serving(
        "gate", etcd.endpoint, "--host", "0.0.0.0", "--port", "0", "--http-port", str(http_port)
    ):
        key = {"Authorization": f"Bearer {SECRETS['PIGEON_API_KEYS']}"}
        async with httpx.AsyncClient() as http:
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                # Its REST gateway calls its own gRPC port.
                with contextlib.suppress(httpx.TransportError):
                    reply = await http.get(f"http://127.0.0.1:{http_port}/v1/nodes", headers=key)
                    if reply.status_code == 200:
                        break
                assert asyncio.get_running_loop().time() < deadline, "no answer from the Gate"
                await asyncio.sleep(0.1)
        assert "nodes" in reply.json()


async def test_a_node_given_the_id_of_a_live_one_is_refused(etcd: EtcdServer) -> None:
    dispatcher = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "dispatcher", "--etcd-endpoints", etcd.endpoint],
        *["--port", "0", "--http-port", "0", "--log-level", "info"],
        env={"PATH": "/usr/bin:/bin", **SECRETS},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with PrefixWatch([etcd.endpoint], "/pigeon/dispatchers/") as watch:
            await watch.wait_for(lambda view: len(view) == 1, timeout=20)
        await _refused_as_a_duplicate(etcd)
    finally:
        dispatcher.terminate()
        async with asyncio.timeout(20):
            _, dispatcher_log = await dispatcher.communicate()
    # It never showed itself to the dispatchers: it would have taken the live one's streams.
    assert b"node-x subscribed" not in dispatcher_log


async def _refused_as_a_duplicate(etcd: EtcdServer) -> None:
    # The live one: its key, kept alive under its lease.
    async with Registration([etcd.endpoint], "/pigeon/nodes/node-x", b"live"):
        process = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "node", "--etcd-endpoints", etcd.endpoint],
            *["--node-id", "node-x", "--port", "0", "--http-port", "0"],
            env={"PATH": "/usr/bin:/bin", **SECRETS},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(60):
                _, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        async with PrefixWatch([etcd.endpoint], "/pigeon/nodes/") as watch:
            assert watch.view == {"/pigeon/nodes/node-x": b"live"}
    assert process.returncode == 2
    [line] = [text for text in stderr.decode().splitlines() if "CRITICAL" in text]
    assert "cannot start: /pigeon/nodes/node-x is held by another live process" in line
    assert "same id" in line


async def test_a_node_with_a_store_of_its_own_is_refused_and_one_joining_later_reported(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    node = [sys.executable, "-m", "node", "--etcd-endpoints", etcd.endpoint]
    node += ["--port", "0", "--http-port", "0", "--load-report-interval", "0.2"]
    first = await asyncio.create_subprocess_exec(
        *node,
        *["--node-id", "node-a", "--sqlite-path", str(tmp_path / "shared.db")],
        env={"PATH": "/usr/bin:/bin", **SECRETS},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert first.stderr is not None
    try:
        async with PrefixWatch([etcd.endpoint], "/pigeon/nodes/") as watch, asyncio.timeout(30):
            while "/pigeon/nodes/node-a" not in watch.view:
                await asyncio.sleep(0.1)
            store_id = json.loads(watch.view["/pigeon/nodes/node-a"])["storeId"]
        # A second node on a file of its own: refused, naming the node it differs from.
        code, stderr = await asyncio.to_thread(
            start, "node", "--node-id", "node-b", "--sqlite-path", str(tmp_path / "own.db"),
            "--port", "0", "--http-port", "0", etcd=etcd.endpoint,
        )  # fmt: skip
        assert code == 2
        [line] = [text for text in stderr.splitlines() if "CRITICAL" in text]
        assert f"node-a (store {store_id}) use another message store" in line
        assert str(tmp_path / "own.db") in line and "must share one store" in line
        # One that registered at the same moment as another (so neither saw the other) is
        # reported by the node that was there.
        other = types_pb2.NodeInfo(node_id="node-c", address="127.0.0.1:1", store_id="elsewhere")
        async with Registration([etcd.endpoint], "/pigeon/nodes/node-c", encode(other)):
            async with asyncio.timeout(20):
                while b"node-c (store elsewhere) use another" not in (
                    line := await first.stderr.readline()
                ):
                    assert line, "the node ended"
    finally:
        first.terminate()
        async with asyncio.timeout(20):
            await first.communicate()


async def test_a_gate_started_while_etcd_is_out_of_reach_serves_once_it_answers(
    tmp_path: Path,
) -> None:
    etcd = EtcdServer(tmp_path / "etcd")
    http_port = free_port()
    try:
        async with (
            serving("gate", etcd.endpoint, "--port", "0", "--http-port", str(http_port)),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http,
        ):

            async def health() -> int:
                deadline = asyncio.get_running_loop().time() + 20
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        return (await http.get("/healthz")).status_code
                    assert asyncio.get_running_loop().time() < deadline, "no answer"
                    await asyncio.sleep(0.1)

            # Up, but not to be sent clients: it knows no node and cannot learn of one.
            assert await health() == 503
            token = mint_user_token(SECRETS["PIGEON_JWT_SECRET"], "bob")
            connect = await http.post("/v1/connect", json={"token": token})
            assert connect.status_code == 503
            assert "no healthy node: etcd is out of reach" in connect.json()["message"]
            await asyncio.to_thread(etcd.start)
            deadline = asyncio.get_running_loop().time() + 20
            while await health() != 200:
                assert asyncio.get_running_loop().time() < deadline, "not serving after etcd"
                await asyncio.sleep(0.1)
    finally:
        etcd.stop()


async def test_a_second_interrupt_while_draining_stops_at_once_without_a_traceback(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "node", "--etcd-endpoints", etcd.endpoint, "--node-id", "n-i"],
        *["--port", str(port), "--http-port", "0", "--grace-period", "60"],
        *["--sqlite-path", str(tmp_path / "pigeon.db")],
        env={"PATH": "/usr/bin:/bin", **SECRETS},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    session = SessionTokens(SECRETS["PIGEON_CLUSTER_SECRET"]).issue("ida", "n-i")
    try:
        async with PrefixWatch([etcd.endpoint], "/pigeon/nodes/") as watch:
            await watch.wait_for(lambda view: len(view) == 1, timeout=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = node_pb2_grpc.NodeStub(channel).Subscribe(
                node_pb2.SubscribeRequest(), metadata=[("authorization", f"Bearer {session}")]
            )
            async with asyncio.timeout(20):
                assert (await stream.read()).HasField("welcome")
                process.send_signal(signal.SIGINT)
                # Told to go elsewhere, the stream stays: the drain would wait its 60 s.
                while not (await stream.read()).HasField("reconnect"):
                    pass
                process.send_signal(signal.SIGINT)
                _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130
    assert b"SIGINT again: stopped at once" in stderr
    assert b"Traceback" not in stderr, stderr.decode()
