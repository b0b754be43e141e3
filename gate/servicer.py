"""The Gate's gRPC servicer: Connect, Publish, ListNodes."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge

from gate.placement import rank_nodes
from pigeon.auth import (
    ClusterSecret,
    SessionTokens,
    UserClaims,
    UserTokenVerifier,
    bearer_token,
    check_source,
)
from pigeon.errors import PigeonError, Unauthenticated, Unavailable, from_rpc_error
from pigeon.ratelimit import RateLimiter
from pigeon.server import current_principal
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2
from pigeon.wire import duration

__all__ = ["GateServicer", "track_view_size"]

log = logging.getLogger("pigeon.gate")

CONNECTS = Counter("pigeon_gate_connects", "Gate.Connect calls by result", ["result"])
PLACEMENTS = Counter("pigeon_gate_placements", "Users placed, by node", ["node_id"])
PUBLISHES = Counter("pigeon_gate_publishes", "Gate.Publish calls by result", ["result"])
VIEW_SIZE = Gauge("pigeon_gate_view_nodes", "Serving nodes in the Gate's view")


def track_view_size(nodes: Callable[[], Iterable[types_pb2.NodeInfo]]) -> None:
    """Make ``pigeon_gate_view_nodes`` count the serving nodes of ``nodes()`` at every scrape.

    Read at scrape time, it follows the view with or without traffic; set from Connect and
    Publish, it said 0 on a new Gate and went on counting nodes long gone once calls stopped.
    """
    VIEW_SIZE.set_function(
        lambda: sum(node.state != types_pb2.NODE_STATE_DRAINING for node in nodes())
    )


# Reconnect backoff hints for clients (full jitter between 0 and the current delay).
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0

# The longest the Gate waits for one node's answer to a publish when the caller set no deadline.
NODE_CALL_TIMEOUT_S = 10.0
# A node that fails like this may be down or hung: the next one can take the publish.
_TRY_NEXT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class GateServicer(gate_pb2_grpc.GateServicer):
    """Places users on nodes and forwards system messages to them.

    Args:
        nodes: returns the live nodes (from the etcd watch) at the time of the call.
        dispatchers: returns the live dispatchers.
        user_tokens: verifies the users' app-issued JWTs.
        sessions: issues the session tokens that nodes verify.
        node_channel: returns a (cached) channel to a node address.
        heartbeat_interval: announced to clients, in seconds.
        epsilon: the placement load bound.
        fallbacks: how many fallback nodes a Connect answer lists.
        user_limit: limits each user's Connect calls (the guard's limits know only the
            callers it authenticates, and Connect's caller is known only once its token is).
        etcd_up: whether the view of the cluster is being kept current (for error messages).
        cluster_secret: what the Gate presents to the nodes it forwards publishes to (it has
            checked the caller's API key itself).
    """

    def __init__(
        self,
        *,
        nodes: Callable[[], Sequence[types_pb2.NodeInfo]],
        dispatchers: Callable[[], Sequence[types_pb2.DispatcherInfo]],
        user_tokens: UserTokenVerifier,
        sessions: SessionTokens,
        node_channel: Callable[[str], grpc.aio.Channel],
        heartbeat_interval: float,
        epsilon: float,
        fallbacks: int,
        session_ttl: float,
        cluster_secret: ClusterSecret,
        user_limit: RateLimiter | None = None,
        etcd_up: Callable[[], bool] = lambda: True,
    ) -> None:
        self._etcd_up = etcd_up
        self._node_metadata = (("authorization", f"Bearer {cluster_secret.value}"),)
        self._nodes = nodes
        self._dispatchers = dispatchers
        self._user_tokens = user_tokens
        self._sessions = sessions
        self._node_channel = node_channel
        self._heartbeat = heartbeat_interval
        self._epsilon = epsilon
        self._fallbacks = fallbacks
        self._session_ttl = session_ttl
        self._user_limit = user_limit

    def _ranked(self, user_id: str) -> list[types_pb2.NodeInfo]:
        nodes = self._nodes()
        ranked = rank_nodes(user_id, nodes, epsilon=self._epsilon)
        if not ranked:
            where = "etcd is out of reach" if not self._etcd_up() else "none is registered in etcd"
            raise Unavailable(
                f"no healthy node: {where}, or all are draining",
                reason="NO_HEALTHY_NODE",
            )
        return ranked

    async def Connect(
        self, request: gate_pb2.ConnectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gate_pb2.ConnectResponse:
        token = request.token or bearer_token(context.invocation_metadata())
        try:
            claims = self._user_tokens.verify(token)
            session_ends = self._session_end(claims)
            if self._user_limit is not None:
                self._user_limit.take(claims.user_id)
            ranked = self._ranked(claims.user_id)
        except PigeonError as exc:
            CONNECTS.labels(exc.reason.lower()).inc()
            raise
        chosen = ranked[0]
        expires = Timestamp()
        expires.FromSeconds(session_ends)
        CONNECTS.labels("ok").inc()
        PLACEMENTS.labels(chosen.node_id).inc()
        return gate_pb2.ConnectResponse(
            node_id=chosen.node_id,
            node_address=chosen.address,
            node_http_address=chosen.http_address,
            session_token=self._sessions.issue(
                claims.user_id, chosen.node_id, expires_at=session_ends
            ),
            session_expires_at=expires,
            fallbacks=[
                gate_pb2.NodeAddress(
                    node_id=n.node_id, address=n.address, http_address=n.http_address
                )
                for n in ranked[1 : 1 + self._fallbacks]
            ],
            # The node's own interval, which its streams keep; ours only if it did not say.
            heartbeat_interval=(
                chosen.heartbeat_interval
                if chosen.HasField("heartbeat_interval")
                else duration(self._heartbeat)
            ),
            backoff=gate_pb2.Backoff(
                initial=duration(BACKOFF_INITIAL_S), max=duration(BACKOFF_MAX_S), multiplier=2.0
            ),
            user_id=claims.user_id,
        )

    def _session_end(self, claims: UserClaims) -> int:
        """When the session ends, Unix seconds: after the TTL, but never after the user token.

        A token past its ``exp`` but inside the leeway is refused rather than given a session
        that is over before it starts: the client is told plainly to get a fresh token.
        """
        now = time.time()
        ends = now + self._session_ttl
        if claims.expires_at is not None:
            if claims.expires_at <= now:
                raise Unauthenticated(
                    f"token expired {now - claims.expires_at:.0f} s ago: a session cannot outlast "
                    "its token, so get a fresh one from the site's backend",
                    reason="TOKEN_EXPIRED",
                )
            ends = min(ends, claims.expires_at)
        return math.floor(ends)

    async def Publish(
        self, request: gate_pb2.PublishRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gate_pb2.PublishResponse:
        # The nodes see the Gate's cluster secret, not the caller's key: its scope is checked here.
        allowed = current_principal().sources
        if allowed is not None:
            if request.batch:
                for i, publication in enumerate(request.batch):
                    check_source(allowed, publication.source, field=f"batch[{i}].source")
            else:
                check_source(allowed, request.source)
        # The owner of the first recipient stores it, so that user's streams get it locally.
        ranked = self._ranked(_first_recipient(request))
        forwarded = node_pb2.NodePublishRequest.FromString(request.SerializeToString())
        # The Gate retries on another node when one fails, and a failure can come after the
        # store committed: a key of our own makes those retries store the message once.
        if forwarded.batch:
            for publication in forwarded.batch:
                publication.idempotency_key = publication.idempotency_key or _new_key()
        elif forwarded.to or forwarded.broadcast or forwarded.body:
            forwarded.idempotency_key = forwarded.idempotency_key or _new_key()
        last: PigeonError | None = None
        for i, node in enumerate(ranked):
            stub = node_pb2_grpc.NodeStub(self._node_channel(node.address))
            timeout = _attempt_timeout(context.time_remaining(), len(ranked) - i)
            try:
                reply = await stub.Publish(forwarded, metadata=self._node_metadata, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                last = from_rpc_error(exc)
                if exc.code() not in _TRY_NEXT:
                    PUBLISHES.labels(exc.code().name.lower()).inc()
                    raise last from exc
                log.warning(
                    "publish: node %s failed (%s), trying the next", node.node_id, exc.code().name
                )
                continue
            PUBLISHES.labels("ok").inc()
            return gate_pb2.PublishResponse.FromString(reply.SerializeToString())
        PUBLISHES.labels("unavailable").inc()
        raise Unavailable(
            "no node took the publish; it may be stored all the same, so retry with the same "
            f"idempotency_key; last error: {last}"
        )

    async def ListNodes(
        self, request: gate_pb2.ListNodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gate_pb2.ListNodesResponse:
        now = time.time_ns()
        reply = gate_pb2.ListNodesResponse()
        for node in sorted(self._nodes(), key=lambda n: n.node_id):
            entry = reply.nodes.add()
            entry.CopyFrom(node)
            entry.uptime.FromNanoseconds(max(0, now - node.started_at.ToNanoseconds()))
        for dispatcher in sorted(self._dispatchers(), key=lambda d: d.dispatcher_id):
            entry_d = reply.dispatchers.add()
            entry_d.CopyFrom(dispatcher)
            entry_d.uptime.FromNanoseconds(max(0, now - dispatcher.started_at.ToNanoseconds()))
        return reply


def _attempt_timeout(remaining: float | None, nodes_left: int) -> float:
    """How long one node gets: at most half of what the caller has left while another node
    could still take the publish, so a hung node does not use up the caller's whole deadline."""
    if remaining is None:
        return NODE_CALL_TIMEOUT_S
    return min(NODE_CALL_TIMEOUT_S, remaining / 2 if nodes_left > 1 else remaining)


def _new_key() -> str:
    return f"gate-{uuid.uuid4().hex}"


def _first_recipient(request: gate_pb2.PublishRequest) -> str:
    if request.to:
        return request.to[0]
    for publication in request.batch:
        if publication.to:
            return publication.to[0]
    return ""  # a broadcast: any node will do
