"""The node's core with the in-memory store: ordering, gap filling, group commit, drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from node.commit import GroupCommit
from node.convert import to_proto
from node.core import NodeCore, NoRelay
from node.store.base import Entry, Kind, NewMessage, Stored, StoreError
from node.store.memory import MemoryStore
from node.store.sqlite import SqliteStore
from node.validate import Limits, Outgoing, check_page_size
from pigeon.errors import InvalidArgument, ResourceExhausted, Unavailable
from pigeon.v1 import dispatcher_pb2, node_pb2

pytestmark = pytest.mark.unit


def outgoing(to: str, body: str) -> Outgoing:
    return Outgoing(to=(to,), title="", body=body, metadata={})


class Reader:
    """Reads a core stream in the background."""

    def __init__(self, events: AsyncIterator[node_pb2.SubscribeResponse]) -> None:
        self.events: list[node_pb2.SubscribeResponse] = []
        self._source = events
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self._source:
            self.events.append(event)

    def seqs(self) -> list[int]:
        return [m.seq for e in self.events for m in e.messages]

    async def until(self, predicate, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def replayed(reader: Reader) -> bool:
    return any(e.HasField("replay_done") for e in reader.events)


async def test_a_message_stored_elsewhere_is_filled_in_before_a_newer_local_one() -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        reader = Reader(core.subscribe("bob", None, None))
        await reader.until(replayed)
        # Another node stores seq 1 for bob; its relay has not arrived yet.
        other = NewMessage("other-1", "carol", Kind.USER, ("bob",), "", "from B", {}, 1)
        await store.append([other])
        await core.send("alice", [outgoing("bob", "from A")])
        await reader.until(lambda r: r.seqs() == [1, 2])
        # The late relay of seq 1 is a duplicate now and is dropped.
        entry = Entry("other-1", 1, "carol", Kind.USER, "", "from B", {}, 1, False, "bob")
        core.receive([dispatcher_pb2.Envelope(recipient="bob", message=to_proto(entry))])
        await core.send("alice", [outgoing("bob", "again")])
        await reader.until(lambda r: r.seqs() == [1, 2, 3])
        await reader.stop()


async def test_replay_then_live_has_no_gap_and_no_duplicate() -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        for i in range(300):
            await core.send("alice", [outgoing("bob", f"old {i}")])
        sending = asyncio.gather(
            *(core.send("alice", [outgoing("bob", f"new {i}")]) for i in range(100))
        )
        reader = Reader(core.subscribe("bob", 0, None))
        await sending
        await reader.until(lambda r: len(r.seqs()) >= 400)
        await asyncio.sleep(0.05)
        assert reader.seqs() == list(range(1, 401))
        await reader.stop()


async def test_concurrent_sends_share_transactions() -> None:
    store = MemoryStore()
    sizes: list[int] = []
    original = store.append

    async def recording(batch: Sequence[NewMessage]):
        sizes.append(len(batch))
        await asyncio.sleep(0.01)  # a write that takes a while, as a real one does
        return await original(batch)

    store.append = recording  # type: ignore[method-assign]
    async with NodeCore(store, node_id="n1", batch_max_size=64) as core:
        await asyncio.gather(*(core.send("alice", [outgoing("bob", str(i))]) for i in range(200)))
    assert sum(sizes) == 200
    assert max(sizes) == 64 and len(sizes) < 10


async def test_group_commit_off_writes_one_by_one() -> None:
    batches: list[int] = []

    async def write(items: Sequence[int]) -> list[int]:
        batches.append(len(items))
        await asyncio.sleep(0)
        return list(items)

    async with GroupCommit(write, max_size=1) as commit:
        results = await asyncio.gather(*(commit.submit([i]) for i in range(20)))
    assert results == [[i] for i in range(20)] and set(batches) == {1}


async def _deaf_to_one_cancellation(seconds: float) -> None:
    """Sleep, letting one cancellation pass unseen: on 3.11 asyncio.wait_for (inside the MongoDB
    driver) can swallow one that lands as its wait ends."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await asyncio.sleep(seconds)


async def _stops(exit_call: Any) -> bool:
    """Whether an exit finishes (within 5 s), awaited from a task of its own so that giving up
    on it cannot be swallowed with it."""
    closing = asyncio.create_task(exit_call)
    done, _ = await asyncio.wait({closing}, timeout=5)
    if not done:
        closing.cancel()
    return bool(done)


async def test_group_commit_stops_even_if_its_write_loses_the_cancellation() -> None:
    writing = asyncio.Event()

    async def write(items: Sequence[int]) -> list[int]:
        writing.set()
        await _deaf_to_one_cancellation(0.2)
        return list(items)

    commit: GroupCommit[int, int] = GroupCommit(write)
    await commit.__aenter__()
    commit.drain_timeout = 0.01  # the exit cancels the write in flight
    sender = asyncio.create_task(commit.submit([1]))
    await writing.wait()
    assert await _stops(commit.__aexit__(None, None, None)), "the group commit never stopped"
    assert await sender == [1]


async def test_the_core_stops_even_if_an_unread_count_read_loses_the_cancellation() -> None:
    store = MemoryStore()
    reading = asyncio.Event()
    original = store.unread_count

    async def deaf(user: str) -> int:
        reading.set()
        await _deaf_to_one_cancellation(0.2)
        return await original(user)

    core = NodeCore(store, node_id="n1", heartbeat_interval=5)
    await core.__aenter__()
    reader = Reader(core.subscribe("bob", None, None))
    await reader.until(replayed)
    store.unread_count = deaf  # type: ignore[method-assign]
    # A broadcast to a user whose count the node has not sent yet makes it read one.
    core._unread.forget("bob")
    await core.publish([Outgoing(to=(), title="", body="all", metadata={}, broadcast=True)])
    await reading.wait()
    await reader.stop()
    assert await _stops(core.__aexit__(None, None, None)), "the core never stopped"


async def test_a_failed_write_fails_every_sender_in_its_batch_and_nothing_is_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        reader = Reader(core.subscribe("bob", None, None))
        await reader.until(replayed)
        store.fail_writes = True
        results = await asyncio.gather(
            *(core.send("alice", [outgoing("bob", str(i))]) for i in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, Unavailable) for r in results)
        assert "retry with the same idempotency_key" in str(results[0])
        # What failed, and where, is for the log: callers may be anyone.
        assert "injected write failure" not in str(results[0])
        assert "injected write failure" in caplog.text
        store.fail_writes = False
        await core.send("alice", [outgoing("bob", "after")])
        await reader.until(lambda r: r.seqs() == [1])
        await reader.stop()


async def test_drain_ends_every_stream_with_a_reconnect_hint() -> None:
    async with NodeCore(MemoryStore(), node_id="n1", heartbeat_interval=5) as core:
        readers = [Reader(core.subscribe(f"u{i}", None, None)) for i in range(5)]
        for reader in readers:
            await reader.until(replayed)
        started = time.monotonic()
        await core.drain(grace=5)
        assert time.monotonic() - started < 1
        for reader in readers:
            await reader.task
            assert reader.events[-1].reconnect.reason == "draining"
        assert core.pool.connections == 0


async def test_heartbeats_keep_an_idle_stream_alive() -> None:
    async with NodeCore(MemoryStore(), node_id="n1", heartbeat_interval=0.05) as core:
        reader = Reader(core.subscribe("bob", None, None))
        await reader.until(lambda r: sum(e.HasField("heartbeat") for e in r.events) >= 3)
        await reader.stop()
        assert core.pool.connections == 0


async def test_only_quiet_streams_get_heartbeats() -> None:
    async with NodeCore(MemoryStore(), node_id="n1", heartbeat_interval=0.5) as core:
        busy = Reader(core.subscribe("bob", None, None))
        quiet = Reader(core.subscribe("cid", None, None))

        async def chatter() -> None:
            while True:
                await core.send("alice", [outgoing("bob", "tick")])
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(chatter())
        try:
            await quiet.until(lambda r: sum(e.HasField("heartbeat") for e in r.events) >= 2)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        # Messages every 50 ms kept bob's stream from ever being quiet for 0.5 s.
        assert len(busy.seqs()) > 10
        assert not any(e.HasField("heartbeat") for e in busy.events)
        await busy.stop()
        await quiet.stop()


async def test_listing_pages_follow_seq_order_even_when_creation_times_do_not() -> None:
    store = MemoryStore()
    # Two nodes stamp creation times from their own clocks; seqs follow commit order.
    now = time.time_ns()
    stamps = [now - (i % 2) * 10_000_000 + i for i in range(30)]
    await store.append(
        [
            NewMessage(f"m{i:02}", "alice", Kind.USER, ("bob",), "", str(i), {}, stamp)
            for i, stamp in enumerate(stamps)
        ]
    )
    await store.append([NewMessage("b1", "ops", Kind.BROADCAST, (), "", "all", {}, now)])
    async with NodeCore(store, node_id="n1") as core:
        seen, token = [], ""
        while True:
            page, token = await core.list_messages("bob", page_size=7, page_token=token)
            seen.extend(page)
            if not token:
                break
    inbox = [e.seq for e in seen if e.kind == Kind.USER]
    assert inbox == list(range(30, 0, -1))
    assert [e.id for e in seen if e.kind == Kind.BROADCAST] == ["b1"]


async def test_large_backlogs_go_out_in_events_a_client_accepts() -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        body = "x" * 60_000
        for _ in range(3):
            await core.send("alice", [outgoing("bob", body) for _ in range(20)])
        reader = Reader(core.subscribe("bob", 0, None))
        await reader.until(lambda r: len(r.seqs()) == 60)
        events = [e for e in reader.events if e.messages]
        assert len(events) > 1
        assert all(e.ByteSize() <= 1.1 * (1 << 20) for e in events)
        assert reader.seqs() == list(range(1, 61))
        # Each event's cursor is the last seq it carries.
        assert all(e.cursor.seq == e.messages[-1].seq for e in events)
        await reader.stop()


async def test_a_page_of_large_messages_is_cut_to_a_size_clients_accept() -> None:
    async with NodeCore(MemoryStore(), node_id="n1") as core:
        for _ in range(3):
            await core.send("alice", [outgoing("bob", "y" * 60_000) for _ in range(20)])
        seen, token, pages = [], "", 0
        while True:
            page, token = await core.list_messages("bob", page_size=200, page_token=token)
            pages += 1
            assert sum(len(e.body) for e in page) <= 1 << 20
            seen.extend(e.seq for e in page)
            if not token:
                break
    assert pages > 1 and seen == list(range(60, 0, -1))


async def test_a_lost_relay_is_found_in_the_store_on_resync() -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        reader = Reader(core.subscribe("bob", None, None))
        await reader.until(replayed)
        # Stored by another node; its relay never arrives (a dispatcher stream broke).
        await store.append([NewMessage("lost-1", "carol", Kind.USER, ("bob",), "", "x", {}, 1)])
        await store.append([NewMessage("b-1", "ops", Kind.BROADCAST, (), "", "all", {}, 2)])
        core.resync()
        await reader.until(
            lambda r: [m.id for e in r.events for m in e.messages] == ["lost-1", "b-1"]
        )
        await reader.stop()


async def test_a_stale_unread_count_never_overwrites_a_newer_one() -> None:
    store = MemoryStore()
    original = store.unread_count
    slow = asyncio.Event()

    async def slow_count(user: str) -> int:
        count = await original(user)
        if slow.is_set():
            slow.clear()  # only the recount after the send is slow
            await asyncio.sleep(0.2)  # long enough to overlap the mark-read
        return count

    store.unread_count = slow_count  # type: ignore[method-assign]
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        reader = Reader(core.subscribe("bob", None, None))
        await reader.until(replayed)
        slow.set()
        await core.send("alice", [outgoing("bob", "one")])  # a recount starts: it will say 1
        await asyncio.sleep(0.05)
        assert await core.mark_read("bob", everything=True) == 0
        await asyncio.sleep(0.4)
        counts = [e.unread_count for e in reader.events if e.HasField("unread_count")]
        assert counts[-1] == 0, counts
        await reader.stop()


async def test_a_user_cannot_open_streams_without_end() -> None:
    async with NodeCore(MemoryStore(), node_id="n1", max_streams_per_user=2) as core:
        readers = [Reader(core.subscribe("bob", None, None)) for _ in range(2)]
        for reader in readers:
            await reader.until(replayed)
        with pytest.raises(ResourceExhausted) as caught:
            await anext(core.subscribe("bob", None, None))
        assert "limit is 2" in caught.value.message
        for reader in readers:
            await reader.stop()


async def test_a_broadcast_is_answered_before_any_stream_takes_it() -> None:
    # The publisher's answer must not wait for the fan-out: every stream's writer runs after it.
    async with NodeCore(MemoryStore(), node_id="n1", heartbeat_interval=5) as core:
        readers = [Reader(core.subscribe(f"u{i}", None, None)) for i in range(200)]
        for reader in readers:
            await reader.until(replayed)
        [stored] = await core.publish(
            [Outgoing(to=(), title="", body="all", metadata={}, broadcast=True)]
        )
        assert not [m for r in readers for e in r.events for m in e.messages]
        for reader in readers:
            await reader.until(
                lambda r: [m.id for e in r.events for m in e.messages] == [stored.id]
            )
            await reader.stop()


async def test_a_broadcast_raises_every_unread_count_by_one_without_store_reads() -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        await core.send("alice", [outgoing("bob", "before")])
        readers = {u: Reader(core.subscribe(u, None, None)) for u in ("bob", "carol")}
        for reader in readers.values():
            await reader.until(replayed)
        reads = 0
        original = store.unread_count

        async def counting(user: str) -> int:
            nonlocal reads
            reads += 1
            return await original(user)

        store.unread_count = counting  # type: ignore[method-assign]
        await core.publish([Outgoing(to=(), title="", body="all", metadata={}, broadcast=True)])
        await readers["bob"].until(lambda r: r.events[-1].unread_count == 2)
        await readers["carol"].until(lambda r: r.events[-1].unread_count == 1)
        assert reads == 0
        for reader in readers.values():
            await reader.stop()


def _counts(reader: Reader) -> list[int]:
    return [e.unread_count for e in reader.events if e.HasField("unread_count")]


async def _bob_on(stack: contextlib.AsyncExitStack, store: SqliteStore) -> tuple[NodeCore, Reader]:
    """A core on the (unopened) store, and bob's live stream on it; all closed with stack."""
    await store.open()
    stack.push_async_callback(store.close)
    core = await stack.enter_async_context(NodeCore(store, node_id="n1", heartbeat_interval=5))
    bob = Reader(core.subscribe("bob", None, None))
    stack.push_async_callback(bob.stop)
    await bob.until(replayed)
    return core, bob


async def test_a_broadcast_stored_in_one_write_with_a_message_is_counted_once(
    tmp_path: Path,
) -> None:
    store = SqliteStore(str(tmp_path / "pigeon.db"))
    async with contextlib.AsyncExitStack() as stack:
        core, bob = await _bob_on(stack, store)
        # One write: the count sent with bob's message includes the broadcast already.
        await core.publish(
            [
                Outgoing(to=("bob",), title="", body="for bob", metadata={}),
                Outgoing(to=(), title="", body="all", metadata={}, broadcast=True),
            ]
        )
        # The broadcast and its count come in one event, after the message's.
        await bob.until(lambda r: len(r.seqs()) == 2)
        assert _counts(bob)[-1] == await store.unread_count("bob") == 2


class _CountsLater(SqliteStore):
    """A store that, like the MongoDB one, returns no unread counts with a write; its count
    reads wait for `gate` when one is set."""

    gate: asyncio.Event | None = None

    async def append(self, batch: Sequence[NewMessage]) -> list[Stored]:
        return [dataclasses.replace(s, unread={}) for s in await super().append(batch)]

    async def unread_count(self, user: str) -> int:
        if self.gate is not None:
            await self.gate.wait()
        return await super().unread_count(user)


async def test_a_broadcast_during_a_count_read_is_not_lost(tmp_path: Path) -> None:
    store = _CountsLater(str(tmp_path / "pigeon.db"))
    async with contextlib.AsyncExitStack() as stack:
        core, bob = await _bob_on(stack, store)
        store.gate = asyncio.Event()
        await core.send("alice", [outgoing("bob", "to count")])  # bob's count is read...
        await bob.until(lambda r: len(r.seqs()) == 1)
        # ...and a broadcast comes before the read returns: 1 + 1 unread, not 0 + 1.
        await core.publish([Outgoing(to=(), title="", body="all", metadata={}, broadcast=True)])
        await bob.until(lambda r: len(r.seqs()) == 2)
        store.gate.set()
        await bob.until(lambda r: _counts(r)[-1] == 2)
        assert _counts(bob)[-1] == await store.unread_count("bob") == 2


async def test_a_stream_far_behind_gets_past_a_stretch_of_deleted_messages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("node.core.FILL_LIMIT", 3)
    store = SqliteStore(str(tmp_path / "pigeon.db"))
    async with contextlib.AsyncExitStack() as stack:
        core, bob = await _bob_on(stack, store)
        # Stored elsewhere, never relayed here; bob deleted the first three on another device.
        others = [
            NewMessage(f"other-{i}", "carol", Kind.USER, ("bob",), "", f"o{i}", {}, i)
            for i in range(1, 6)
        ]
        await store.append(others)
        for message in others[:3]:
            await store.delete("bob", message.id)
        # The next message shows the gap; the first stretch read holds nothing to send.
        await core.send("alice", [outgoing("bob", "live")])
        await bob.until(lambda r: r.seqs() == [4, 5, 6])


async def test_a_stream_opened_while_the_node_drains_is_told_to_reconnect() -> None:
    async with NodeCore(MemoryStore(), node_id="n1", heartbeat_interval=5) as core:
        # A client that stopped reading keeps the drain waiting.
        stuck = core.subscribe("stu", None, None)
        async for event in stuck:
            if event.HasField("replay_done"):
                break
        draining = asyncio.create_task(core.drain(30))
        late = Reader(core.subscribe("lou", None, None))
        await late.until(lambda r: r.task.done())
        assert [e.reconnect.reason for e in late.events if e.HasField("reconnect")] == ["draining"]
        draining.cancel()
        await asyncio.gather(draining, return_exceptions=True)
        await stuck.aclose()


async def test_streams_cut_as_too_slow_count_against_the_limit_until_they_end() -> None:
    async with NodeCore(
        MemoryStore(), node_id="n1", max_streams_per_user=2, stream_queue_size=2
    ) as core:
        # A client that stops reading, then is sent more than its queue holds: cut.
        stalled = core.subscribe("bob", None, None)
        async for event in stalled:
            if event.HasField("replay_done"):
                break
        await core.send("alice", [outgoing("bob", f"m{i}") for i in range(5)])
        assert not tuple(core.pool.streams_of("bob"))
        # Its hint is unread, so it is still open: one more stream fits, not two.
        second = Reader(core.subscribe("bob", None, None))
        await second.until(replayed)
        with pytest.raises(ResourceExhausted):
            await anext(core.subscribe("bob", None, None))
        await stalled.aclose()
        third = Reader(core.subscribe("bob", None, None))
        await third.until(replayed)
        await second.stop()
        await third.stop()


class _CommitsThenFails(SqliteStore):
    """A store whose next write commits and then reports a failure, as a MongoDB commit whose
    answer is lost."""

    lose_answer = False

    async def append(self, batch: Sequence[NewMessage]) -> list[Stored]:
        stored = await super().append(batch)
        if self.lose_answer:
            self.lose_answer = False
            raise StoreError("connection closed after the commit was sent")
        return stored


async def test_a_retry_of_a_write_whose_answer_was_lost_reaches_the_streams(
    tmp_path: Path,
) -> None:
    store = _CommitsThenFails(str(tmp_path / "pigeon.db"))
    async with contextlib.AsyncExitStack() as stack:
        core, bob = await _bob_on(stack, store)
        store.lose_answer = True
        message = Outgoing(to=("bob",), title="", body="once", metadata={}, idempotency_key="k1")
        with pytest.raises(Unavailable):
            await core.send("alice", [message])
        # Stored, but nobody pushed it. The sender retries with the same key: a duplicate.
        [again] = await core.send("alice", [message])
        assert again.duplicate
        await bob.until(lambda r: r.seqs() == [1])


def test_the_default_page_size_is_never_over_the_limit() -> None:
    assert check_page_size(0, Limits()) == 50
    assert check_page_size(0, Limits(max_page_size=10)) == 10
    assert check_page_size(10, Limits(max_page_size=10)) == 10
    with pytest.raises(InvalidArgument):
        check_page_size(11, Limits(max_page_size=10))


async def test_a_user_named_like_a_system_source_cannot_take_its_idempotency_keys() -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        # Users "system" and "shop" send first, with the keys the backend will use.
        await core.send("system", [Outgoing(("mallory",), "", "mine", {}, "order-42")])
        await core.send("shop", [Outgoing(("mallory",), "", "mine", {}, "order-43")])
        published = await core.publish(
            [
                Outgoing(("bob",), "", "shipped", {}, "order-42"),
                Outgoing(("bob",), "", "paid", {}, "order-43", source="shop"),
            ]
        )
        assert [p.duplicate for p in published] == [False, False]
        inbox = await store.inbox_after("bob", 0, 10)
        assert [(e.sender, e.body) for e in inbox] == [("system", "shipped"), ("shop", "paid")]
        # The backend's own retry is still stored once.
        [again] = await core.publish([Outgoing(("bob",), "", "shipped", {}, "order-42")])
        assert again.duplicate and again.id == published[0].id


class _SlowRoutes(NoRelay):
    """Dispatchers that take a while to confirm a new stream's routes."""

    async def routes_ready(self, user_id: str | None = None) -> None:
        await asyncio.sleep(0.3)


async def test_a_stream_opened_from_now_gets_what_is_stored_while_it_opens() -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5, relay=_SlowRoutes()) as core:
        await core.send("alice", [outgoing("bob", "before")])
        reader = Reader(core.subscribe("bob", None, None))
        async with asyncio.timeout(5):
            while not core.pool.holds("bob"):
                await asyncio.sleep(0.005)
        # Stored (and pushed) while the stream waits for its routes.
        await core.send("alice", [outgoing("bob", "while opening")])
        await core.send("alice", [outgoing("bob", "after")])
        await reader.until(lambda r: r.seqs() == [2, 3])
        assert reader.events[0].cursor.seq == 1  # "from now": the one before is not replayed
        await reader.stop()


async def test_a_message_filled_in_from_the_store_comes_with_a_fresh_unread_count() -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        bob = Reader(core.subscribe("bob", 0, 0))
        await bob.until(replayed)
        # Stored by another node whose relay was lost; it asks the streams to check the store.
        await store.append([NewMessage("other-1", "carol", Kind.USER, ("bob",), "", "x", {}, 1)])
        core.receive([dispatcher_pb2.Envelope(recipient="bob", resync=True, origin_node_id="n2")])
        await bob.until(lambda r: r.seqs() == [1] and _counts(r)[-1:] == [1])
        await bob.stop()


async def test_a_broadcast_whose_relay_comes_after_a_stream_opened_is_counted_once() -> None:
    store = MemoryStore()
    async with NodeCore(store, node_id="n1", heartbeat_interval=5) as core:
        # Another node stored a message and a broadcast; the broadcast's relay is on its way.
        await store.append([NewMessage("m-1", "alice", Kind.USER, ("bob",), "", "hi", {}, 1)])
        await store.append([NewMessage("b-1", "ops", Kind.BROADCAST, (), "", "all", {}, 2)])
        bob = Reader(core.subscribe("bob", 0, 0))
        await bob.until(replayed)
        assert _counts(bob) == [2]
        entry = await store.get("bob", "b-1")
        assert entry is not None
        core.receive(
            [dispatcher_pb2.Envelope(broadcast=True, message=to_proto(entry), origin_node_id="n2")]
        )
        # A later broadcast is one more, and counted.
        await store.append([NewMessage("b-2", "ops", Kind.BROADCAST, (), "", "", {}, 3)])
        entry = await store.get("bob", "b-2")
        assert entry is not None
        core.receive(
            [dispatcher_pb2.Envelope(broadcast=True, message=to_proto(entry), origin_node_id="n2")]
        )
        await bob.until(lambda r: _counts(r)[-1] == 3)
        assert _counts(bob) == [2, 3] and await store.unread_count("bob") == 3
        await bob.stop()
