"""The node as its clients see it, over real gRPC, on SQLite and on MongoDB (secantusdb)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from node.store.base import Store
from pigeon.auth import SessionTokens, mint_user_token
from pigeon.v1 import node_pb2, types_pb2
from tests.node_harness import CLUSTER_SECRET, Listener, RunningNode, running_node

pytestmark = pytest.mark.integration


@pytest.fixture
async def node(durable_store: Store) -> AsyncIterator[RunningNode]:
    async with running_node(durable_store, heartbeat_interval=5.0, stream_queue_size=64) as running:
        yield running


async def send(node: RunningNode, sender: str, to: list[str], body: str, **fields) -> str:
    reply = await node.stub().Send(
        node_pb2.SendRequest(to=to, body=body, **fields), metadata=node.as_user(sender), timeout=10
    )
    return reply.message_id


def subscribe(node: RunningNode, user: str, since: int | None = None, **kw) -> Listener:
    request = node_pb2.SubscribeRequest(**kw)
    if since is not None:
        request.since_seq = since
    return Listener(node.stub().Subscribe(request, metadata=node.as_user(user)))


def replay_done(listener: Listener) -> bool:
    return any(e.HasField("replay_done") for e in listener.events)


async def test_offline_user_gets_message_on_connect_with_its_seq(node: RunningNode) -> None:
    first = await send(node, "alice", ["bob"], "one")
    second = await send(node, "alice", ["bob"], "two", title="hello", metadata={"k": "v"})
    bob = subscribe(node, "bob", since=0)
    await bob.wait(replay_done)
    assert [(m.id, m.seq, m.body) for m in bob.messages] == [(first, 1, "one"), (second, 2, "two")]
    message = bob.messages[1]
    assert (message.sender, message.kind, message.title) == (
        "alice",
        types_pb2.MESSAGE_KIND_USER,
        "hello",
    )
    assert dict(message.metadata) == {"k": "v"} and message.recipient == "bob"
    assert message.created_at.seconds > 0
    welcome = bob.events[0]
    assert welcome.welcome.user_id == "bob" and welcome.unread_count == 2
    assert bob.events[-1].cursor.seq == 2
    await bob.close()


async def test_every_device_of_a_user_receives_live(node: RunningNode) -> None:
    phone, laptop = subscribe(node, "bob"), subscribe(node, "bob")
    await phone.wait(replay_done)
    await laptop.wait(replay_done)
    message_id = await send(node, "alice", ["bob", "carol"], "to both devices")
    for device in (phone, laptop):
        await device.wait(lambda d: any(m.id == message_id for m in d.messages))
        await device.wait(lambda d: d.unread == 1)
        assert [m.seq for m in device.messages] == [1]
    await phone.close()
    await laptop.close()


async def test_reconnect_with_cursor_gets_exactly_what_it_missed(node: RunningNode) -> None:
    for i in range(3):
        await send(node, "alice", ["bob"], f"early {i}")
    # Messages keep arriving while the replay runs.
    sender = asyncio.gather(*(send(node, "alice", ["bob"], f"during {i}") for i in range(20)))
    bob = subscribe(node, "bob", since=1)
    await sender
    await bob.wait(lambda b: len(b.messages) >= 22)
    await asyncio.sleep(0.2)  # anything extra would show up now
    seqs = [m.seq for m in bob.messages]
    assert seqs == list(range(2, 24)), seqs
    await bob.close()


async def test_first_connect_without_cursor_starts_live(node: RunningNode) -> None:
    await send(node, "alice", ["bob"], "old")
    bob = subscribe(node, "bob")
    await bob.wait(replay_done)
    assert bob.messages == [] and bob.events[0].cursor.seq == 1 and bob.unread == 1
    await send(node, "alice", ["bob"], "new")
    await bob.wait(lambda b: len(b.messages) == 1)
    assert bob.messages[0].seq == 2
    await bob.close()


async def test_unread_count_follows_read_and_delete_on_another_device(node: RunningNode) -> None:
    ids = [await send(node, "alice", ["bob"], f"m{i}") for i in range(3)]
    watcher = subscribe(node, "bob")
    await watcher.wait(lambda w: w.unread == 3)
    stub, me = node.stub(), node.as_user("bob")
    read = await stub.MarkRead(node_pb2.MarkReadRequest(message_ids=[ids[0]]), metadata=me)
    assert read.unread_count == 2
    await watcher.wait(lambda w: w.unread == 2)
    deleted = await stub.DeleteMessage(
        node_pb2.DeleteMessageRequest(message_id=ids[1]), metadata=me
    )
    assert deleted.unread_count == 1
    await watcher.wait(lambda w: w.unread == 1)
    everything = await stub.MarkRead(node_pb2.MarkReadRequest(all=True), metadata=me)
    assert everything.unread_count == 0
    await watcher.wait(lambda w: w.unread == 0)
    count = await stub.GetUnreadCount(node_pb2.GetUnreadCountRequest(), metadata=me)
    assert count.unread_count == 0
    await watcher.close()


async def test_inbox_listing_pages_and_filters(node: RunningNode) -> None:
    for i in range(5):
        await send(node, "alice", ["bob"], f"a{i}")
    await send(node, "carol", ["bob"], "c0")
    await node.stub().Publish(
        node_pb2.NodePublishRequest(to=["bob"], body="bill", source="billing"),
        metadata=node.as_system(),
    )
    await node.stub().Publish(
        node_pb2.NodePublishRequest(broadcast=True, body="maintenance"), metadata=node.as_system()
    )
    stub, me = node.stub(), node.as_user("bob")
    seen, token = [], ""
    while True:
        page = await stub.ListMessages(
            node_pb2.ListMessagesRequest(page_size=3, page_token=token), metadata=me
        )
        seen.extend(m.body for m in page.messages)
        token = page.next_page_token
        if not token:
            break
    assert seen == ["maintenance", "bill", "c0", "a4", "a3", "a2", "a1", "a0"]
    carol = await stub.ListMessages(node_pb2.ListMessagesRequest(sender="carol"), metadata=me)
    assert [m.body for m in carol.messages] == ["c0"]
    system = await stub.ListMessages(
        node_pb2.ListMessagesRequest(kind=types_pb2.MESSAGE_KIND_SYSTEM), metadata=me
    )
    assert [m.body for m in system.messages] == ["bill"]
    await stub.MarkRead(node_pb2.MarkReadRequest(up_to_seq=5), metadata=me)
    unread = await stub.ListMessages(
        node_pb2.ListMessagesRequest(read_filter=node_pb2.READ_FILTER_UNREAD), metadata=me
    )
    assert [m.body for m in unread.messages] == ["maintenance", "bill", "c0"]
    # A value this node does not know (a newer client's) is refused, not taken as "all".
    for request, field in (
        (node_pb2.ListMessagesRequest(read_filter=7), "read_filter"),  # type: ignore[arg-type]
        (node_pb2.ListMessagesRequest(kind=9), "kind"),  # type: ignore[arg-type]
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListMessages(request, metadata=me)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (refused.value.details() or "")
    one = await stub.GetMessage(
        node_pb2.GetMessageRequest(message_id=unread.messages[1].id), metadata=me
    )
    assert one.message.sender == "billing" and one.message.kind == types_pb2.MESSAGE_KIND_SYSTEM


async def test_retried_send_with_idempotency_key_is_stored_once(node: RunningNode) -> None:
    first = await send(node, "alice", ["bob"], "once", idempotency_key="order-42")
    again = await send(node, "alice", ["bob"], "once", idempotency_key="order-42")
    assert again == first
    listing = await node.stub().ListMessages(
        node_pb2.ListMessagesRequest(), metadata=node.as_user("bob")
    )
    assert [m.id for m in listing.messages] == [first]


async def test_a_batch_send_returns_one_id_per_message(node: RunningNode) -> None:
    reply = await node.stub().Send(
        node_pb2.SendRequest(batch=[types_pb2.Draft(to=["bob"], body=f"b{i}") for i in range(4)]),
        metadata=node.as_user("alice"),
    )
    assert len(set(reply.message_ids)) == 4 and reply.message_id == reply.message_ids[0]


async def test_a_stalled_consumer_is_cut_without_delaying_others(node: RunningNode) -> None:
    # The slow client never reads: its call is opened and left alone, so once the transport's
    # buffers are full the node's writes to it block.
    slow_call = node.stub().Subscribe(node_pb2.SubscribeRequest(), metadata=node.as_user("slow"))
    fast = subscribe(node, "fast")
    await fast.wait(replay_done)
    async with asyncio.timeout(5):
        while not node.core.pool.holds("slow"):
            await asyncio.sleep(0.01)
    sent = 0
    while node.core.pool.holds("slow"):
        assert sent < 20_000, "the stalled stream was never cut"
        await node.stub().Publish(
            node_pb2.NodePublishRequest(
                batch=[
                    types_pb2.Publication(to=["slow", "fast"], body="x" * 8000) for _ in range(50)
                ]
            ),
            metadata=node.as_system(),
        )
        sent += 50
        # The fast client keeps up the whole time.
        try:
            await fast.wait(lambda f, n=sent: len(f.messages) == n)
        except TimeoutError:
            raise AssertionError((len(fast.messages), sent, fast.events[-1])) from None
    # The slow client finds the stream ended once it reads: with a reconnect hint, or cut.
    slow = Listener(slow_call)
    await slow.wait(lambda s: s.task.done(), timeout=20)
    hinted = [e.reconnect.reason for e in slow.events if e.HasField("reconnect")]
    assert hinted == ["slow_consumer"] or slow.error is not None
    assert len(slow.messages) < sent
    await fast.close()


async def test_closed_streams_leave_the_pool(node: RunningNode) -> None:
    devices = [subscribe(node, "bob") for _ in range(3)]
    for device in devices:
        await device.wait(replay_done)
    assert node.core.pool.connections == 3
    for device in devices:
        await device.close()
    async with asyncio.timeout(5):
        await node.core.pool.empty.wait()
    assert not node.core.pool.holds("bob")


async def expect_error(call, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert text in (caught.value.details() or "")


async def test_bad_requests_get_clear_errors(node: RunningNode) -> None:
    stub, me = node.stub(), node.as_user("alice")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (node_pb2.SendRequest(to=[], body="x"), "at least one recipient"),
        (node_pb2.SendRequest(to=["alice"], body="x"), "yourself"),
        (node_pb2.SendRequest(to=["bob"], body=""), "body must not be empty"),
        (node_pb2.SendRequest(to=["bob"], body="x" * 70000), "body is 70000 bytes"),
        (node_pb2.SendRequest(to=["bob"], body="x", metadata={"k": "v" * 9000}), "metadata"),
        (node_pb2.SendRequest(to=[f"u{i}" for i in range(1001)], body="x"), "1001 recipients"),
        (node_pb2.SendRequest(to=[""], body="x"), "to must not be empty"),
        # Each draft under the limit, but the copies of the whole call over it.
        (
            node_pb2.SendRequest(
                batch=[{"to": [f"u{i}" for i in range(600)], "body": "x"}] * 2  # type: ignore[list-item]
            ),
            "1200 recipients in all",
        ),
    ]
    for request, text in cases:
        await expect_error(stub.Send(request, metadata=me), invalid, text)
    await expect_error(
        stub.GetMessage(node_pb2.GetMessageRequest(message_id="nope"), metadata=me),
        grpc.StatusCode.NOT_FOUND,
        "no message nope",
    )
    await expect_error(
        stub.DeleteMessage(node_pb2.DeleteMessageRequest(message_id="nope"), metadata=me),
        grpc.StatusCode.NOT_FOUND,
        "no message nope",
    )
    await expect_error(
        stub.ListMessages(node_pb2.ListMessagesRequest(page_size=500), metadata=me),
        invalid,
        "page_size 500 is over the limit",
    )
    await expect_error(
        stub.ListMessages(node_pb2.ListMessagesRequest(page_token="garbage!"), metadata=me),
        invalid,
        "page_token",
    )
    await expect_error(
        stub.MarkRead(node_pb2.MarkReadRequest(), metadata=me), invalid, "set exactly one"
    )
    many = node_pb2.MarkReadRequest(message_ids=[f"m{i}" for i in range(1001)])
    await expect_error(stub.MarkRead(many, metadata=me), invalid, "message_ids has 1001 ids")
    events = stub.Subscribe(node_pb2.SubscribeRequest(since_seq=99), metadata=me)
    await expect_error(events.read(), invalid, "since_seq 99 is ahead")
    # Identity errors.
    await expect_error(
        stub.Send(node_pb2.SendRequest(to=["bob"], body="x")),
        grpc.StatusCode.UNAUTHENTICATED,
        "missing",
    )
    await expect_error(
        stub.Publish(node_pb2.NodePublishRequest(to=["bob"], body="x"), metadata=me),
        grpc.StatusCode.PERMISSION_DENIED,
        "not an API key",
    )
    forged = SessionTokens("not-the-cluster-secret-0123456789abcdef").issue("alice", "n")
    await expect_error(
        stub.GetUnreadCount(
            node_pb2.GetUnreadCountRequest(), metadata=[("authorization", f"Bearer {forged}")]
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "signature",
    )
    user_jwt = mint_user_token("not-the-cluster-secret-0123456789abcdef", "alice")
    await expect_error(
        stub.GetUnreadCount(
            node_pb2.GetUnreadCountRequest(), metadata=[("authorization", f"Bearer {user_jwt}")]
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "",
    )
    # The node still serves.
    assert await send(node, "alice", ["bob"], "still here")


async def test_a_user_cannot_touch_another_users_message(node: RunningNode) -> None:
    message_id = await send(node, "alice", ["bob"], "private")
    stub, mallory = node.stub(), node.as_user("mallory")
    await expect_error(
        stub.GetMessage(node_pb2.GetMessageRequest(message_id=message_id), metadata=mallory),
        grpc.StatusCode.NOT_FOUND,
        "no message",
    )
    await expect_error(
        stub.DeleteMessage(node_pb2.DeleteMessageRequest(message_id=message_id), metadata=mallory),
        grpc.StatusCode.NOT_FOUND,
        "no message",
    )
    still = await stub.GetMessage(
        node_pb2.GetMessageRequest(message_id=message_id), metadata=node.as_user("bob")
    )
    assert still.message.body == "private" and not still.message.read


async def test_a_stream_ends_when_its_session_runs_out(durable_store: Store) -> None:
    async with running_node(durable_store, session_leeway=0) as node:
        # A session of two seconds (one to two: the expiry is in whole seconds), from the Gate's
        # key; then the client must come back through the Gate with its user token.
        token = SessionTokens(CLUSTER_SECRET, ttl=2).issue("bob", node.core.node_id)
        started = asyncio.get_running_loop().time()
        bob = Listener(
            node.stub().Subscribe(
                node_pb2.SubscribeRequest(), metadata=[("authorization", f"Bearer {token}")]
            )
        )
        await bob.wait(lambda lst: any(e.HasField("reconnect") for e in lst.events), timeout=10)
        [hint] = [e.reconnect for e in bob.events if e.HasField("reconnect")]
        assert hint.reason == "session_expired" and hint.retry_after.ToNanoseconds() == 0
        assert asyncio.get_running_loop().time() - started < 6
        await asyncio.wait_for(bob.task, 5)  # and the stream ends
        # A stream on a fresh session goes on past that time.
        alice = subscribe(node, "alice")
        await alice.wait(replay_done)
        await asyncio.sleep(1.5)
        assert not alice.task.done()
        await alice.close()
