"""Talking to a LocalCluster's processes from a test, as a client and as an operator would."""

from __future__ import annotations

import re

import grpc.aio
import httpx

from pigeon.auth import SessionTokens
from pigeon.local import LocalCluster, ServiceProcess
from pigeon.v1 import node_pb2, node_pb2_grpc
from tests.node_harness import Listener


class ClusterClient:
    """Session tokens minted with the cluster secret, channels to nodes, metric scrapes."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.sessions = SessionTokens(cluster.secrets.cluster_secret)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, node: ServiceProcess) -> node_pb2_grpc.NodeStub:
        channel = self._channels.get(node.address)
        if channel is None:
            channel = grpc.aio.insecure_channel(node.address)
            self._channels[node.address] = channel
        return node_pb2_grpc.NodeStub(channel)

    def as_user(self, user: str, node: ServiceProcess) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.sessions.issue(user, node.name)}")]

    def subscribe(self, node: ServiceProcess, user: str, since: int | None = None) -> Listener:
        request = node_pb2.SubscribeRequest()
        if since is not None:
            request.since_seq = since
        return Listener(self.stub(node).Subscribe(request, metadata=self.as_user(user, node)))

    async def send(self, node: ServiceProcess, sender: str, to: list[str], body: str) -> str:
        reply = await self.stub(node).Send(
            node_pb2.SendRequest(to=to, body=body),
            metadata=self.as_user(sender, node),
            timeout=10,
        )
        return reply.message_id

    async def publish(self, node: ServiceProcess, **fields: object) -> list[str]:
        reply = await self.stub(node).Publish(
            node_pb2.NodePublishRequest(**fields),  # type: ignore[arg-type]
            metadata=[("authorization", f"Bearer {self.cluster.secrets.api_key}")],
            timeout=10,
        )
        return list(reply.message_ids)

    @staticmethod
    def metric(service: ServiceProcess, name: str) -> float:
        """The sum of a Prometheus counter or gauge over its labels, from its ops listener."""
        reply = httpx.get(service.metrics_url, timeout=5)
        # A page that is not the metrics would read as zero for every name.
        reply.raise_for_status()
        text = reply.text
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.M)
        return sum(float(v) for v in pattern.findall(text))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
