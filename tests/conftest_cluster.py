"""Clients of a test module's ``cluster`` fixture (a LocalCluster): gRPC stubs of its Gate and
first node, and HTTP clients of their REST ports."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import httpx
import pytest

from pigeon.local import LocalCluster
from pigeon.v1 import gate_pb2_grpc, node_pb2_grpc

WAIT = 10.0


@pytest.fixture
async def gate(cluster: LocalCluster) -> AsyncIterator[gate_pb2_grpc.GateStub]:
    async with grpc.aio.insecure_channel(cluster.gate.address) as channel:
        yield gate_pb2_grpc.GateStub(channel)


@pytest.fixture
async def node(cluster: LocalCluster) -> AsyncIterator[node_pb2_grpc.NodeStub]:
    async with grpc.aio.insecure_channel(cluster.nodes[0].address) as channel:
        yield node_pb2_grpc.NodeStub(channel)


@pytest.fixture
async def gate_http(cluster: LocalCluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://{cluster.gate.http_address}", timeout=WAIT
    ) as http:
        yield http


@pytest.fixture
async def node_http(cluster: LocalCluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://{cluster.nodes[0].http_address}", timeout=WAIT
    ) as http:
        yield http
