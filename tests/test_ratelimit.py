"""Per-user and per-key rate limits: RESOURCE_EXHAUSTED with the delay to wait."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import grpc.aio
import pytest
from grpc_status import rpc_status

from node.store.memory import MemoryStore
from pigeon.errors import ResourceExhausted, rich_status
from pigeon.ratelimit import (
    LARGE_REQUEST_BYTES,
    LargeRequests,
    RateLimiter,
    client_address,
    parse_networks,
)
from pigeon.v1 import node_pb2
from tests.node_harness import running_node


@pytest.mark.unit
def test_a_bucket_allows_its_burst_then_says_how_long_to_wait() -> None:
    limiter = RateLimiter(rate=10, burst=3, kind="user")
    for _ in range(3):
        limiter.take("alice")
    with pytest.raises(ResourceExhausted) as caught:
        limiter.take("alice")
    assert 0 < caught.value.retry_after <= 0.1
    assert "retry after" in caught.value.message
    # Another caller has a bucket of their own.
    limiter.take("bob")


@pytest.mark.unit
def test_a_zero_rate_means_no_limit() -> None:
    limiter = RateLimiter(rate=0, burst=1, kind="key")
    for _ in range(1000):
        limiter.take("k")


@pytest.mark.integration
async def test_a_user_over_the_limit_gets_resource_exhausted_and_others_do_not() -> None:
    limits = {
        "user": RateLimiter(rate=1, burst=5, kind="user"),
        "system": RateLimiter(rate=1, burst=2, kind="key"),
    }
    async with running_node(MemoryStore(), limits=limits) as node:
        stub = node.stub()
        request = node_pb2.GetUnreadCountRequest()
        for _ in range(5):
            await stub.GetUnreadCount(request, metadata=node.as_user("greedy"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUnreadCount(request, metadata=node.as_user("greedy"))
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after" in (error.details() or "")
        status = await rpc_status.aio.from_call(
            stub.GetUnreadCount(request, metadata=node.as_user("greedy"))
        )
        assert status is not None
        kinds = {detail.type_url.rsplit(".", 1)[-1] for detail in status.details}
        assert {"ErrorInfo", "RetryInfo"} <= kinds
        # Someone else is served as usual.
        await stub.GetUnreadCount(request, metadata=node.as_user("polite"))
        publish = node_pb2.NodePublishRequest(to=["x"], body="hi")
        for _ in range(2):
            await stub.Publish(publish, metadata=node.as_system())
        with pytest.raises(grpc.aio.AioRpcError) as by_key:
            await stub.Publish(publish, metadata=node.as_system())
        assert by_key.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.unit
def test_a_refusal_just_short_of_a_token_still_names_a_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr("pigeon.ratelimit.time", SimpleNamespace(monotonic=lambda: now[0]))
    limiter = RateLimiter(rate=1, burst=1, kind="user")
    limiter.take("alice")
    # A tenth of a microsecond from the next token: a wait that rounded to 0 before.
    now[0] += 0.9999999
    with pytest.raises(ResourceExhausted) as caught:
        limiter.take("alice")
    assert caught.value.retry_after == 0.001
    assert "retry after" in caught.value.message
    kinds = {d.type_url.rsplit(".", 1)[-1] for d in rich_status(caught.value).details}
    assert kinds == {"ErrorInfo", "RetryInfo"}
    # Rounded up, never down: a caller who waits as told finds a token.
    now[0] += caught.value.retry_after
    limiter.take("alice")
    now[0] += 0.0004
    with pytest.raises(ResourceExhausted) as again:
        limiter.take("alice")
    assert again.value.retry_after == 1.0


# --- client addresses and large requests (unit) ---------------------------------------------


def test_the_client_address_is_taken_from_x_forwarded_for_only_through_trusted_proxies() -> None:
    trusted = parse_networks(["127.0.0.1", "10.0.0.0/8"])
    assert client_address("ipv4:127.0.0.1:5000", ["203.0.113.1"], trusted) == "203.0.113.1"
    # Each hop is believed only while the one that appended it is trusted.
    hops = ["198.51.100.1, 203.0.113.1, 10.1.2.3"]
    assert client_address("ipv4:127.0.0.1:5000", hops, trusted) == "203.0.113.1"
    assert client_address("ipv4:192.0.2.5:5000", ["203.0.113.1"], trusted) == "192.0.2.5"
    assert client_address("ipv6:[::1]:5000", ["203.0.113.1"], trusted) == "::1"
    assert client_address("198.51.100.7", [], trusted) == "198.51.100.7"


def test_a_caller_has_at_most_two_large_requests_in_flight() -> None:
    large = LargeRequests()
    big = LARGE_REQUEST_BYTES + 1
    with large.admit("user:a", big), large.admit("user:a", big):
        with pytest.raises(ResourceExhausted) as caught, large.admit("user:a", big):
            pass
        assert caught.value.reason == "TOO_MANY_LARGE_REQUESTS"
        with large.admit("user:b", big), large.admit("user:a", 100):
            pass
    with large.admit("user:a", big):
        pass
    assert LargeRequests.cost(4 * 1024 * 1024) == 256 and LargeRequests.cost(10) == 1
