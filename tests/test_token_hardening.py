"""Issue 20, items 5, 7 and 8 against a real Gate, node and etcd, over gRPC and REST.

A session ends with the user token it came from; user ids, recipients and sources with invisible
or look-alike characters are refused; JWT claims must be numbers, within a maximum lifetime, and
given once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import grpc
import grpc.aio
import httpx
import jwt
import pytest

from pigeon.auth import SessionTokens, mint_user_token
from pigeon.errors import from_rpc_error
from pigeon.local import LocalCluster
from pigeon.v1 import gate_pb2, gate_pb2_grpc, node_pb2, node_pb2_grpc
from tests.node_harness import Listener

pytestmark = pytest.mark.integration

# The node's default: a session token is accepted this long after its exp (clock skew).
NODE_LEEWAY_S = 10.0
WAIT = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        tmp_path_factory.mktemp("hardening"),
        nodes=1,
        gate_port=0,
        gate_http_port=0,
        env={"PATH": "/usr/bin"},
    )
    with local:
        yield local


def bearer(credential: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {credential}")]


def header(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(secret: str | bytes, payload_json: str, header_json: str = "") -> str:
    """An HS256 token over JSON text as given (duplicate keys and all), as PyJWT cannot make."""
    key = secret.encode() if isinstance(secret, str) else secret
    header_part = b64((header_json or '{"alg": "HS256", "typ": "JWT"}').encode())
    signing_input = f"{header_part}.{b64(payload_json.encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """The status code, reason and message a gRPC call is refused with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = from_rpc_error(caught.value)
    return caught.value.code(), error.reason, error.message


def http_reason(reply: httpx.Response) -> str:
    [info] = [d for d in reply.json()["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    return str(info["reason"])


def session_exp(session_token: str) -> int:
    return int(jwt.decode(session_token, options={"verify_signature": False})["exp"])


# --- item 5: a session ends no later than the user token -----------------------------------------


async def test_a_session_and_its_streams_end_when_the_user_token_does(
    cluster: LocalCluster,
    gate: gate_pb2_grpc.GateStub,
    gate_http: httpx.AsyncClient,
    node: node_pb2_grpc.NodeStub,
    node_http: httpx.AsyncClient,
) -> None:
    user_token = mint_user_token(cluster.secrets.jwt_secret, "brief", ttl=3)
    token_exp = int(jwt.decode(user_token, options={"verify_signature": False})["exp"])

    placed = await gate.Connect(gate_pb2.ConnectRequest(token=user_token), timeout=WAIT)
    assert placed.session_expires_at.seconds <= token_exp
    assert session_exp(placed.session_token) <= token_exp

    reply = await gate_http.post("/v1/connect", json={"token": user_token})
    assert reply.status_code == 200, reply.text
    rest_placed = reply.json()
    ends = datetime.fromisoformat(rest_placed["sessionExpiresAt"].replace("Z", "+00:00"))
    assert ends.timestamp() <= token_exp
    assert session_exp(rest_placed["sessionToken"]) <= token_exp

    # Streams opened with those sessions end then (give or take the node's clock-skew leeway),
    # not a session_ttl (15 minutes) later.
    deadline = token_exp + NODE_LEEWAY_S + 5 - time.time()
    listener = Listener(
        node.Subscribe(node_pb2.SubscribeRequest(), metadata=bearer(placed.session_token))
    )

    async def rest_stream_ends() -> list[str]:
        headers = {**header(rest_placed["sessionToken"]), "Accept": "application/x-ndjson"}
        async with node_http.stream("GET", "/v1/stream", headers=headers, timeout=None) as got:
            assert got.status_code == 200
            return [line async for line in got.aiter_lines()]

    rest_stream = asyncio.create_task(rest_stream_ends())
    try:
        await listener.wait(
            lambda lst: any(
                e.HasField("reconnect") and e.reconnect.reason == "session_expired"
                for e in lst.events
            ),
            timeout=deadline,
        )
        async with asyncio.timeout(max(1.0, token_exp + NODE_LEEWAY_S + 5 - time.time())):
            lines = await rest_stream
        assert any("session_expired" in line for line in lines), lines
    finally:
        rest_stream.cancel()
        await listener.close()


async def test_a_user_token_expired_within_the_leeway_gets_no_session(
    cluster: LocalCluster, gate: gate_pb2_grpc.GateStub, gate_http: httpx.AsyncClient
) -> None:
    # Eight seconds past exp: inside the Gate's 10 s leeway, so the token itself verifies.
    late = mint_user_token(cluster.secrets.jwt_secret, "late", ttl=-8)
    code, reason, message = await refused(
        gate.Connect(gate_pb2.ConnectRequest(token=late), timeout=WAIT)
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")
    assert "fresh" in message
    reply = await gate_http.post("/v1/connect", json={"token": late})
    assert reply.status_code == 401 and http_reason(reply) == "TOKEN_EXPIRED"


# --- item 7: invisible and look-alike characters in names -----------------------------------------

INVISIBLE = [
    "ali\u200bce",  # zero-width space: shown as "alice"
    "al\u0085ice",  # next line (a C1 control)
    "al\u2028ice",  # line separator
    "ecila\u202e",  # right-to-left override
    "ali\u00a0ce",  # no-break space
    " alice",
    "alice ",
]


@pytest.mark.parametrize("user", INVISIBLE)
async def test_a_user_token_whose_sub_hides_characters_is_refused(
    cluster: LocalCluster, gate: gate_pb2_grpc.GateStub, gate_http: httpx.AsyncClient, user: str
) -> None:
    token = mint_user_token(cluster.secrets.jwt_secret, user)
    code, reason, _ = await refused(gate.Connect(gate_pb2.ConnectRequest(token=token)))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_BAD_SUBJECT")
    reply = await gate_http.post("/v1/connect", json={"token": token})
    assert reply.status_code == 401 and http_reason(reply) == "TOKEN_BAD_SUBJECT"


async def test_a_plain_space_inside_a_user_id_is_still_fine(
    cluster: LocalCluster, gate: gate_pb2_grpc.GateStub
) -> None:
    token = mint_user_token(cluster.secrets.jwt_secret, "mary ann")
    placed = await gate.Connect(gate_pb2.ConnectRequest(token=token), timeout=WAIT)
    assert placed.user_id == "mary ann"


@pytest.mark.parametrize("name", INVISIBLE)
async def test_recipients_and_sources_that_hide_characters_are_invalid(
    cluster: LocalCluster,
    gate: gate_pb2_grpc.GateStub,
    gate_http: httpx.AsyncClient,
    node: node_pb2_grpc.NodeStub,
    node_http: httpx.AsyncClient,
    name: str,
) -> None:
    ops = cluster.secrets.api_key
    for request in (
        gate_pb2.PublishRequest(to=[name], body="hi"),
        gate_pb2.PublishRequest(to=["bob"], body="hi", source=name),
    ):
        code, reason, message = await refused(gate.Publish(request, metadata=bearer(ops)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_ID"), message
    for body in ({"to": [name], "body": "hi"}, {"to": ["bob"], "body": "hi", "source": name}):
        reply = await gate_http.post("/v1/publish", json=body, headers=header(ops))
        assert reply.status_code == 400 and http_reason(reply) == "BAD_ID", reply.text
    # A user's Send to such a recipient, on the node.
    session = SessionTokens(cluster.secrets.cluster_secret).issue("bob", cluster.nodes[0].name)
    code, reason, _ = await refused(
        node.Send(node_pb2.SendRequest(to=[name], body="hi"), metadata=bearer(session))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_ID")
    reply = await node_http.post(
        "/v1/messages", json={"to": [name], "body": "hi"}, headers=header(session)
    )
    assert reply.status_code == 400 and http_reason(reply) == "BAD_ID", reply.text


# --- item 8: JWT claims --------------------------------------------------------------------------


def bad_user_tokens(secret: str) -> dict[str, tuple[str, str]]:
    now = int(time.time())
    return {
        "exp as a string": (
            signed(secret, json.dumps({"sub": "alice", "exp": str(now + 600)})),
            "TOKEN_MALFORMED",
        ),
        "exp of 1e30": (signed(secret, '{"sub": "alice", "exp": 1e30}'), "TOKEN_MALFORMED"),
        "iat as a string": (
            signed(secret, json.dumps({"sub": "alice", "exp": now + 600, "iat": str(now)})),
            "TOKEN_MALFORMED",
        ),
        "sub given twice": (
            signed(secret, f'{{"sub": "alice", "sub": "mallory", "exp": {now + 600}}}'),
            "TOKEN_MALFORMED",
        ),
        "alg given twice": (
            signed(
                secret,
                json.dumps({"sub": "alice", "exp": now + 600}),
                '{"alg": "HS256", "alg": "HS256"}',
            ),
            "TOKEN_MALFORMED",
        ),
        "two days with iat": (
            mint_user_token(secret, "alice", ttl=2 * 86400),
            "TOKEN_LIFETIME_TOO_LONG",
        ),
        "two days without iat": (
            signed(secret, json.dumps({"sub": "alice", "exp": now + 2 * 86400})),
            "TOKEN_LIFETIME_TOO_LONG",
        ),
        "9 KB": (
            mint_user_token(secret, "alice", extra={"pad": "x" * 9000}),
            "TOKEN_TOO_LARGE",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "exp as a string",
        "exp of 1e30",
        "iat as a string",
        "sub given twice",
        "alg given twice",
        "two days with iat",
        "two days without iat",
        "9 KB",
    ],
)
async def test_user_tokens_with_loose_claims_are_refused(
    cluster: LocalCluster, gate: gate_pb2_grpc.GateStub, gate_http: httpx.AsyncClient, case: str
) -> None:
    token, wanted = bad_user_tokens(cluster.secrets.jwt_secret)[case]
    code, reason, message = await refused(gate.Connect(gate_pb2.ConnectRequest(token=token)))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, wanted), message
    reply = await gate_http.post("/v1/connect", json={"token": token})
    assert reply.status_code == 401 and http_reason(reply) == wanted, reply.text


async def test_a_day_long_user_token_is_still_accepted(
    cluster: LocalCluster, gate: gate_pb2_grpc.GateStub
) -> None:
    token = mint_user_token(cluster.secrets.jwt_secret, "daylong", ttl=86400)
    assert (await gate.Connect(gate_pb2.ConnectRequest(token=token), timeout=WAIT)).session_token


async def test_a_session_token_with_a_string_exp_is_refused_by_the_node(
    cluster: LocalCluster, node: node_pb2_grpc.NodeStub, node_http: httpx.AsyncClient
) -> None:
    sessions = SessionTokens(cluster.secrets.cluster_secret)
    claims = {
        "sub": "alice",
        "node": cluster.nodes[0].name,
        "exp": str(int(time.time()) + 600),
        "aud": "pigeon-session",
        "iss": "pigeon-gate",
    }
    forged = jwt.encode(claims, sessions._key, algorithm="HS256")
    code, reason, _ = await refused(
        node.GetUnreadCount(node_pb2.GetUnreadCountRequest(), metadata=bearer(forged))
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED")
    reply = await node_http.get("/v1/unread", headers=header(forged))
    assert reply.status_code == 401 and http_reason(reply) == "TOKEN_MALFORMED"
