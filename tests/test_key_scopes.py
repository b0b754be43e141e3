"""Issue 20, item 12: API keys scoped to sources, against a real Gate, node and etcd, over gRPC
and REST. A scoped key publishes as its sources alone; an unscoped key (an operator's) as any."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest

from pigeon.etcd_server import free_port
from pigeon.local import LocalCluster
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2
from tests.test_token_hardening import WAIT, bearer, header, http_reason, refused

pytestmark = pytest.mark.integration

OPS_KEY = "an operator key scoped to nothing"
SHOP_KEY = "the shop backend's key"
# The id pigeon.auth.ApiKeys derives, spelled out so that this file runs on code without it.
SHOP_KEY_ID = "key-" + hashlib.sha256(b"pigeon api key id:" + SHOP_KEY.encode()).hexdigest()[:8]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    env = {
        "PATH": "/usr/bin",
        "PIGEON_API_KEYS": f"{OPS_KEY},{SHOP_KEY}",
        "PIGEON_API_KEY_SOURCES": f"{SHOP_KEY_ID}=shop|billing",
    }
    local = LocalCluster(
        tmp_path_factory.mktemp("scopes"), nodes=1, gate_port=0, gate_http_port=0, env=env
    )
    with local:
        yield local


async def test_a_scoped_key_publishes_as_its_sources_alone_through_the_gate(
    cluster: LocalCluster, gate: gate_pb2_grpc.GateStub, gate_http: httpx.AsyncClient
) -> None:
    shop = bearer(SHOP_KEY)
    ok = await gate.Publish(
        gate_pb2.PublishRequest(to=["bob"], body="shipped", source="shop"),
        metadata=shop,
        timeout=WAIT,
    )
    assert ok.message_id
    for request, field in (
        (gate_pb2.PublishRequest(to=["bob"], body="x", source="crm"), "source"),
        (gate_pb2.PublishRequest(to=["bob"], body="x"), "source"),
        (gate_pb2.PublishRequest(broadcast=True, body="x", source="crm"), "source"),
        (
            gate_pb2.PublishRequest(
                batch=[
                    types_pb2.Publication(to=["bob"], body="1", source="billing"),
                    types_pb2.Publication(to=["bob"], body="2", source="crm"),
                ]
            ),
            "batch[1].source",
        ),
    ):
        code, reason, message = await refused(gate.Publish(request, metadata=shop, timeout=WAIT))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "SOURCE_NOT_ALLOWED")
        assert field in message or "crm" in message, message
    _, _, message = await refused(
        gate.Publish(gate_pb2.PublishRequest(to=["bob"], body="x", source="crm"), metadata=shop)
    )
    assert "'crm'" in message and "billing, shop" in message

    reply = await gate_http.post(
        "/v1/publish", json={"to": ["bob"], "body": "x", "source": "crm"}, headers=header(SHOP_KEY)
    )
    assert reply.status_code == 403 and http_reason(reply) == "SOURCE_NOT_ALLOWED", reply.text
    assert "crm" in reply.json()["message"]
    reply = await gate_http.post(
        "/v1/publish",
        json={"to": ["bob"], "body": "x", "source": "billing"},
        headers=header(SHOP_KEY),
    )
    assert reply.status_code == 200, reply.text

    # An unscoped key (an operator's) publishes as any source, as before.
    ops = await gate.Publish(
        gate_pb2.PublishRequest(to=["bob"], body="x", source="crm"),
        metadata=bearer(OPS_KEY),
        timeout=WAIT,
    )
    assert ops.message_id


async def test_a_scoped_key_calling_a_node_directly_is_held_to_its_sources(
    node: node_pb2_grpc.NodeStub, node_http: httpx.AsyncClient
) -> None:
    shop = bearer(SHOP_KEY)
    request = node_pb2.NodePublishRequest(to=["bob"], body="x", source="crm")
    code, reason, message = await refused(node.Publish(request, metadata=shop, timeout=WAIT))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "SOURCE_NOT_ALLOWED")
    assert "'crm'" in message
    fine = node_pb2.NodePublishRequest(to=["bob"], body="x", source="shop")
    assert (await node.Publish(fine, metadata=shop, timeout=WAIT)).message_id
    reply = await node_http.post(
        "/v1/publish", json={"to": ["bob"], "body": "x"}, headers=header(SHOP_KEY)
    )
    assert reply.status_code == 403 and http_reason(reply) == "SOURCE_NOT_ALLOWED", reply.text
    reply = await node_http.post(
        "/v1/publish", json={"to": ["bob"], "body": "x", "source": "crm"}, headers=header(OPS_KEY)
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("service", ["gate", "node"])
def test_a_scope_for_an_unknown_key_stops_the_start(service: str, tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PIGEON_CLUSTER_SECRET": "cluster secret of the test",
        "PIGEON_JWT_SECRET": "jwt secret of the scope tests, 32+ bytes",
        "PIGEON_API_KEYS": SHOP_KEY,
        "PIGEON_API_KEY_SOURCES": "key-00000000=shop",
        "PIGEON_SQLITE_PATH": str(tmp_path / "pigeon.db"),
    }
    etcd = f"127.0.0.1:{free_port()}"  # nothing answers there: the start fails before it matters
    if service == "gate":
        del env["PIGEON_SQLITE_PATH"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            service,
            "--etcd-endpoints",
            etcd,
            "--port",
            "0",
            "--http-port",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "api_key_sources names key-00000000" in result.stderr
    assert SHOP_KEY_ID in result.stderr  # the ids it could have named
    assert SHOP_KEY not in result.stderr and "Traceback" not in result.stderr
