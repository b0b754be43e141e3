"""A real local cluster (etcd, a dispatcher, the Gate, two nodes as separate processes): every
service answers health and reflection, and refuses calls without the right credentials."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pigeon.auth import mint_user_token
from pigeon.local import LocalCluster
from pigeon.v1 import dispatcher_pb2, dispatcher_pb2_grpc, gate_pb2, gate_pb2_grpc

pytestmark = pytest.mark.integration

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        tmp_path_factory.mktemp("cluster"), gate_port=0, gate_http_port=0, env={"PATH": "/usr/bin"}
    )
    with local:
        yield local


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=20, check=False
    )


def test_every_service_reports_serving(cluster: LocalCluster) -> None:
    for service in cluster.services:
        with grpc.insecure_channel(service.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service.name


@pytest.mark.parametrize(
    ("which", "service"),
    [
        ("gate", "pigeon.v1.Gate"),
        ("node", "pigeon.v1.Node"),
        ("dispatcher", "pigeon.v1.Dispatcher"),
    ],
)
def test_every_service_answers_reflection(cluster: LocalCluster, which: str, service: str) -> None:
    target = {"gate": cluster.gate, "node": cluster.nodes[0], "dispatcher": cluster.dispatchers[0]}
    address = target[which].address
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert service in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    described = grpcurl(address, "describe", service)
    assert described.returncode == 0, described.stderr
    assert "rpc " in described.stdout


def test_health_check_over_grpcurl(cluster: LocalCluster) -> None:
    result = grpcurl(cluster.gate.address, "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_list_nodes_shows_every_registered_member(cluster: LocalCluster) -> None:
    result = grpcurl(
        "-H",
        f"authorization: Bearer {cluster.secrets.api_key}",
        cluster.gate.address,
        "pigeon.v1.Gate/ListNodes",
    )
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    # grpcurl prints the proto field names.
    assert [n["node_id"] for n in listed["nodes"]] == ["node-1", "node-2"]
    assert [n["address"] for n in listed["nodes"]] == [n.address for n in cluster.nodes]
    assert all(n["state"] == "NODE_STATE_SERVING" for n in listed["nodes"])
    assert [d["dispatcher_id"] for d in listed["dispatchers"]] == ["dispatcher-1"]


def test_calls_without_credentials_are_unauthenticated(cluster: LocalCluster) -> None:
    with grpc.insecure_channel(cluster.gate.address) as channel:
        with pytest.raises(grpc.RpcError) as missing:
            gate_pb2_grpc.GateStub(channel).ListNodes(gate_pb2.ListNodesRequest(), timeout=5)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in (missing.value.details() or "")
    with grpc.insecure_channel(cluster.dispatchers[0].address) as channel:
        stub = dispatcher_pb2_grpc.DispatcherStub(channel)
        with pytest.raises(grpc.RpcError) as internal:
            stub.Publish(dispatcher_pb2.DispatcherPublishRequest(), timeout=5)
        assert internal.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "cluster secret" in (internal.value.details() or "")
        with pytest.raises(grpc.RpcError) as wrong:
            stub.Publish(
                dispatcher_pb2.DispatcherPublishRequest(),
                metadata=[("authorization", "Bearer not-the-secret")],
                timeout=5,
            )
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_connect_places_a_user_on_a_live_node(cluster: LocalCluster) -> None:
    token = mint_user_token(cluster.secrets.jwt_secret, "alice")
    with grpc.insecure_channel(cluster.gate.address) as channel:
        stub = gate_pb2_grpc.GateStub(channel)
        first = stub.Connect(gate_pb2.ConnectRequest(token=token), timeout=5)
        again = stub.Connect(gate_pb2.ConnectRequest(token=token), timeout=5)
        expired = mint_user_token(cluster.secrets.jwt_secret, "alice", ttl=-60)
        with pytest.raises(grpc.RpcError) as rejected:
            stub.Connect(gate_pb2.ConnectRequest(token=expired), timeout=5)
    addresses = {n.address for n in cluster.nodes}
    assert first.user_id == "alice"
    assert first.node_address in addresses
    assert first.node_id == again.node_id
    assert [f.address for f in first.fallbacks] == list(addresses - {first.node_address})
    assert first.session_token and first.heartbeat_interval.seconds > 0
    assert rejected.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (rejected.value.details() or "")
