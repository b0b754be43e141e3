"""TLS on every listener: a cluster whose every process speaks TLS, internal calls included."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest

from pigeon.auth import SessionTokens, mint_user_token
from pigeon.local import LocalCluster
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc
from tests.certs import make_certificates
from tests.node_harness import Listener

pytestmark = pytest.mark.integration


async def test_a_cluster_runs_entirely_over_tls(tmp_path: Path) -> None:
    tls = make_certificates(tmp_path / "certs")
    env = {
        "PATH": "/usr/bin",
        "PIGEON_TLS_CERT": str(tls.cert),
        "PIGEON_TLS_KEY": str(tls.key),
        "PIGEON_TLS_CA": str(tls.ca),
    }
    with LocalCluster(tmp_path / "c", nodes=2, gate_port=0, gate_http_port=0, env=env) as cluster:
        credentials = grpc.ssl_channel_credentials(tls.ca.read_bytes())
        a, b = cluster.nodes
        sessions = SessionTokens(cluster.secrets.cluster_secret)

        def as_user(user: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {sessions.issue(user, 'any')}")]

        async with (
            grpc.aio.secure_channel(cluster.gate.address, credentials) as gate_channel,
            grpc.aio.secure_channel(a.address, credentials) as a_channel,
            grpc.aio.secure_channel(b.address, credentials) as b_channel,
        ):
            gate = gate_pb2_grpc.GateStub(gate_channel)
            placed = await gate.Connect(
                gate_pb2.ConnectRequest(token=mint_user_token(cluster.secrets.jwt_secret, "u")),
                timeout=10,
            )
            assert placed.node_address in {a.address, b.address}
            # Across nodes: node A -> dispatcher -> node B, all over TLS.
            listener = Listener(
                node_pb2_grpc.NodeStub(b_channel).Subscribe(
                    node_pb2.SubscribeRequest(), metadata=as_user("bob")
                )
            )
            await listener.wait(lambda lst: any(e.HasField("replay_done") for e in lst.events))
            await node_pb2_grpc.NodeStub(a_channel).Send(
                node_pb2.SendRequest(to=["bob"], body="over tls"), metadata=as_user("alice")
            )
            await listener.wait(lambda lst: [m.body for m in lst.messages] == ["over tls"])
            # The Gate forwards a publish to a node over TLS too.
            await gate.Publish(
                gate_pb2.PublishRequest(to=["bob"], body="published"),
                metadata=[("authorization", f"Bearer {cluster.secrets.api_key}")],
                timeout=10,
            )
            await listener.wait(lambda lst: len(lst.messages) == 2)
            await listener.close()
        # A plaintext client is refused.
        async with grpc.aio.insecure_channel(cluster.gate.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await gate_pb2_grpc.GateStub(plain).Connect(
                    gate_pb2.ConnectRequest(token="x"), timeout=3
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # HTTP is HTTPS.
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(tls.ca))) as http:
            reply = await http.get(f"https://{cluster.gate.http_address}/healthz", timeout=5)
            assert reply.status_code == 200


async def test_without_a_ca_file_internal_calls_verify_against_the_trusted_roots(
    tmp_path: Path,
) -> None:
    tls = make_certificates(tmp_path / "certs")
    env = {
        "PATH": "/usr/bin",
        "PIGEON_TLS_CERT": str(tls.cert),
        "PIGEON_TLS_KEY": str(tls.key),
        # The machine's trusted roots, as gRPC finds them: here the test CA alone.
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(tls.ca),
    }
    with LocalCluster(tmp_path / "c", nodes=1, gate_port=0, gate_http_port=0, env=env) as cluster:
        key = {"authorization": f"Bearer {cluster.secrets.api_key}"}
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(tls.ca))) as http:
            # The Gate's REST gateway calls its own gRPC port, over TLS.
            nodes = await http.get(f"https://{cluster.gate.http_address}/v1/nodes", headers=key)
            assert nodes.status_code == 200, nodes.text
            assert [n["nodeId"] for n in nodes.json()["nodes"]] == [cluster.nodes[0].name]
            # And the Gate forwards a publish to the node over TLS.
            published = await http.post(
                f"https://{cluster.gate.http_address}/v1/publish",
                headers=key,
                json={"to": ["bob"], "body": "over tls"},
            )
            assert published.status_code == 200, published.text
