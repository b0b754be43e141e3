"""grpcurl against a real cluster: every service answers reflection and health, and the README's
ops lines run as printed (one bash session, only the Gate's address changed; the secrets come from
the environment, as `pigeon up` prints them)."""

# ruff: noqa: E501  (OPS is the README's block verbatim, long lines included)

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pigeon.auth import mint_user_token
from pigeon.client import SystemClient, UserClient
from pigeon.local import LocalCluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GRPCURL = str(BIN / "grpcurl")

# The README's "Operations with grpcurl" block, exactly; the test changes the GATE line only.
OPS = r"""GATE=127.0.0.1:7070
# Every service answers reflection and health: list, describe, check.
grpcurl -plaintext $GATE list
grpcurl -plaintext $GATE describe pigeon.v1.Node
grpcurl -plaintext -d '{"service": "pigeon.v1.Gate"}' $GATE grpc.health.v1.Health/Check
# The cluster as the Gate sees it (ops: an API key, as `pigeon up` prints it).
grpcurl -plaintext -H "authorization: Bearer ${PIGEON_API_KEYS%%,*}" $GATE pigeon.v1.Gate/ListNodes
# Connect as alice: the Gate picks her node and gives a session token for it.
ALICE_JWT=$(pigeon token alice)
CONNECT=$(grpcurl -plaintext -d "{\"token\": \"$ALICE_JWT\"}" $GATE pigeon.v1.Gate/Connect)
NODE=$(jq -r .node_address <<<"$CONNECT")
AS_ALICE="authorization: Bearer $(jq -r .session_token <<<"$CONNECT")"
# As alice: send, count unread, and watch her stream for 3 s (replayed from the start, then live).
grpcurl -plaintext -H "$AS_ALICE" -d '{"to": ["bob"], "body": "hi"}' $NODE pigeon.v1.Node/Send
grpcurl -plaintext -H "$AS_ALICE" $NODE pigeon.v1.Node/GetUnreadCount
grpcurl -plaintext -H "$AS_ALICE" -max-time 3 -d '{"since_seq": 0, "since_broadcast_seq": 0}' $NODE pigeon.v1.Node/Subscribe
"""
MARK = "@@pigeon-test@@"

# What each command line prints, and its exit code: grpcurl exits 64 + the gRPC code on errors,
# and the Subscribe line ends on its -max-time with DEADLINE_EXCEEDED (4).
EXPECTED: list[tuple[int, list[str]]] = [
    (0, []),
    (0, ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "pigeon.v1.Gate"]),
    (0, ["pigeon.v1.Node is a service", "rpc Subscribe", "returns ( stream .pigeon.v1.Subscribe"]),
    (0, ['"status": "SERVING"']),
    (0, ['"node_id": "node-1"', '"node_id": "node-2"', '"dispatcher_id": "dispatcher-1"']),
    (0, []),
    (0, []),
    (0, []),
    (0, []),
    (0, ['"message_id"']),
    (0, ['"unread_count": "2"']),
    (64 + 4, ['"welcome"', '"user_id": "alice"', "hello alice", "hello everyone", '"replay_done"']),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        tmp_path_factory.mktemp("grpcurl"), gate_port=0, gate_http_port=0, env={"PATH": "/usr/bin"}
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_every_service_answers_reflection_and_health(cluster: LocalCluster) -> None:
    services = {"pigeon.v1.Gate": [cluster.gate], "pigeon.v1.Node": cluster.nodes}
    services["pigeon.v1.Dispatcher"] = cluster.dispatchers
    for name, processes in services.items():
        for process in processes:
            listed = subprocess.run(
                [GRPCURL, "-plaintext", process.address, "list"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert listed.returncode == 0, listed.stderr
            assert name in listed.stdout.split()
            health = subprocess.run(
                [
                    GRPCURL,
                    "-plaintext",
                    "-d",
                    json.dumps({"service": name}),
                    process.address,
                    "grpc.health.v1.Health/Check",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert json.loads(health.stdout) == {"status": "SERVING"}, health.stderr


@pytest.mark.skipif(shutil.which("jq") is None, reason="the README's lines use jq")
def test_the_readme_ops_lines_run_as_printed(cluster: LocalCluster, tmp_path: Path) -> None:
    async def mail_alice() -> None:
        token = mint_user_token(cluster.secrets.jwt_secret, "bob")
        async with UserClient(cluster.gate.address, token) as bob:
            await bob.send("alice", "hello alice")
        async with SystemClient(cluster.gate.address, cluster.secrets.api_key) as system:
            await system.publish(body="hello everyone", broadcast=True)

    asyncio.run(mail_alice())
    lines = commands(OPS)
    assert lines[0].startswith("GATE=")
    lines[0] = f"GATE={cluster.gate.address}"
    assert len(lines) == len(EXPECTED)
    # One bash session, as a user pastes the block; a marker with the exit code after each line.
    script = "".join(f'{line}\necho "{MARK} $?"\n' for line in lines)
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        # Several keys, as a cluster's settings often list: the lines use the first.
        "PIGEON_API_KEYS": f"{cluster.secrets.api_key},another-key",
        "PIGEON_JWT_SECRET": cluster.secrets.jwt_secret,
    }
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    outputs = result.stdout.split(MARK)
    for index, (line, (code, texts)) in enumerate(zip(lines, EXPECTED, strict=True)):
        # Each chunk after the first starts with the exit code of the line before it.
        output = outputs[index].split("\n", 1)[1] if index else outputs[0]
        exit_code = int(outputs[index + 1].split()[0])
        assert exit_code == code, f"{line}\n{output}"
        for text in texts:
            assert text in output, f"{line}\n{output}"


def test_the_readme_shows_these_ops_lines() -> None:
    readme = (ROOT / "README.md").read_text()
    assert OPS in readme, "the README's grpcurl block must be tests/test_grpcurl.py's OPS"
