"""One contract, every store: SQLite, MongoDB (over the wire, on secantusdb) and the in-memory
fake must behave the same."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from node.store.base import Kind, NewMessage, ReadFilter, Store

pytestmark = pytest.mark.integration

_ids = itertools.count(1)


def msg(
    to: tuple[str, ...] = ("bob",),
    *,
    sender: str = "alice",
    kind: Kind = Kind.USER,
    body: str = "hi",
    key: str = "",
    metadata: dict[str, str] | None = None,
) -> NewMessage:
    return NewMessage(
        id=f"m{next(_ids):08d}",
        sender=sender,
        kind=kind,
        recipients=() if kind == Kind.BROADCAST else to,
        title="t",
        body=body,
        metadata=metadata or {},
        created_at_ns=time.time_ns(),
        idempotency_key=key,
    )


def broadcast(body: str = "all") -> NewMessage:
    return msg(sender="ops", kind=Kind.BROADCAST, body=body)


async def test_seqs_are_gapless_per_recipient_across_batches(store: Store) -> None:
    first = await store.append([msg(("bob", "carol")), msg(("bob",))])
    second = await store.append([msg(("carol",)), msg(("bob",))])
    assert [s.seqs for s in first] == [{"bob": 1, "carol": 1}, {"bob": 2}]
    assert [s.seqs for s in second] == [{"carol": 2}, {"bob": 3}]
    assert await store.heads("bob") == (3, 0)
    assert await store.heads("nobody") == (0, 0)


async def test_stored_message_reads_back_whole(store: Store) -> None:
    new = msg(("bob",), metadata={"link": "/x", "k": "v"}, body="hello there")
    [stored] = await store.append([new])
    assert stored.id == new.id and not stored.duplicate
    entry = await store.get("bob", new.id)
    assert entry is not None
    assert (entry.id, entry.seq, entry.sender, entry.kind) == (new.id, 1, "alice", Kind.USER)
    assert (entry.title, entry.body, dict(entry.metadata)) == ("t", "hello there", new.metadata)
    assert entry.created_at_ns == new.created_at_ns
    assert entry.recipient == "bob" and entry.read is False
    # Not in anyone else's inbox.
    assert await store.get("carol", new.id) is None


async def test_idempotency_key_stores_once_per_sender(store: Store) -> None:
    [a] = await store.append([msg(key="k1")])
    [b] = await store.append([msg(key="k1")])
    [c] = await store.append([msg(key="k1", sender="dave")])
    assert b.duplicate and b.id == a.id and b.created_at_ns == a.created_at_ns
    assert not c.duplicate and c.id != a.id
    assert await store.heads("bob") == (2, 0)
    # A duplicate within one batch is caught too.
    d, e = await store.append([msg(key="k2"), msg(key="k2")])
    assert not d.duplicate and e.duplicate and e.id == d.id
    assert await store.heads("bob") == (3, 0)


async def test_replay_after_cursor_is_ordered_and_skips_deleted(store: Store) -> None:
    stored = await store.append([msg(body=f"n{i}") for i in range(5)])
    await store.delete("bob", stored[2].id)
    after = await store.inbox_after("bob", 1, 10)
    assert [e.seq for e in after] == [2, 4, 5]
    assert [e.body for e in await store.inbox_after("bob", 0, 2)] == ["n0", "n1"]


async def test_unread_count_follows_read_and_delete(store: Store) -> None:
    stored = await store.append([msg() for _ in range(4)])
    assert await store.unread_count("bob") == 4
    assert await store.mark_read("bob", ids=[stored[0].id, "unknown"]) == 3
    # Marking again changes nothing.
    assert await store.mark_read("bob", ids=[stored[0].id]) == 3
    assert await store.delete("bob", stored[1].id) == 2
    # Deleting a read message leaves the count alone.
    assert await store.delete("bob", stored[0].id) == 2
    assert await store.delete("bob", stored[0].id) is None
    assert await store.mark_read("bob", up_to_seq=3) == 1
    assert await store.mark_read("bob", everything=True) == 0
    assert await store.unread_count("bob") == 0
    assert await store.delete("carol", stored[3].id) is None


async def test_listing_pages_newest_first_with_filters(store: Store) -> None:
    await store.append([msg(body=f"a{i}") for i in range(3)])
    await store.append([msg(sender="billing", kind=Kind.SYSTEM, body=f"s{i}") for i in range(2)])
    page = await store.inbox_before("bob", None, 2)
    assert [e.body for e in page] == ["s1", "s0"]
    page = await store.inbox_before("bob", page[-1].seq, 2)
    assert [e.body for e in page] == ["a2", "a1"]
    page = await store.inbox_before("bob", page[-1].seq, 2)
    assert [e.body for e in page] == ["a0"]
    assert await store.inbox_before("bob", 1, 2) == []
    system = await store.inbox_before("bob", None, 10, kind=Kind.SYSTEM)
    assert [e.body for e in system] == ["s1", "s0"]
    from_billing = await store.inbox_before("bob", None, 10, sender="billing")
    assert [e.sender for e in from_billing] == ["billing", "billing"]
    await store.mark_read("bob", up_to_seq=2)
    unread = await store.inbox_before("bob", None, 10, read=ReadFilter.UNREAD)
    assert [e.seq for e in unread] == [5, 4, 3]
    read = await store.inbox_before("bob", None, 10, read=ReadFilter.READ)
    assert [(e.seq, e.read) for e in read] == [(2, True), (1, True)]


async def test_a_count_returned_with_a_write_includes_every_broadcast_of_it(store: Store) -> None:
    to_bob, _ = await store.append([msg(("bob",)), broadcast("later in the write")])
    # Stores that cannot tell in the same transaction return no count; the node counts then.
    assert to_bob.unread in ({}, {"bob": 2})
    assert await store.unread_count("bob") == 2


async def test_a_user_who_only_ever_got_broadcasts_can_delete_one(store: Store) -> None:
    stored = await store.append([broadcast("b1"), broadcast("b2")])
    # Nothing sent to dave, nothing read by him: deleting is his first act.
    assert await store.delete("dave", stored[0].id) == 1
    assert await store.unread_count("dave") == 1
    assert [e.body for e in await store.broadcasts_after("dave", 0, 10)] == ["b2"]


async def test_broadcasts_fan_out_on_read_with_per_user_state(store: Store) -> None:
    stored = await store.append([broadcast("b1"), broadcast("b2"), broadcast("b3")])
    assert [s.broadcast_seq for s in stored] == [1, 2, 3]
    assert all(s.seqs == {} for s in stored)
    assert await store.heads("anyone") == (0, 3)
    assert await store.unread_count("bob") == 3
    assert await store.unread_count("carol") == 3
    assert await store.mark_read("bob", ids=[stored[1].id]) == 2
    assert await store.delete("bob", stored[0].id) == 1
    # Carol's view is her own.
    assert await store.unread_count("carol") == 3
    bob_view = await store.broadcasts_after("bob", 0, 10)
    assert [(e.body, e.read, e.kind) for e in bob_view] == [
        ("b2", True, Kind.BROADCAST),
        ("b3", False, Kind.BROADCAST),
    ]
    assert [e.body for e in await store.broadcasts_before("bob", None, 10)] == ["b3", "b2"]
    unread = await store.broadcasts_before("bob", None, 10, read=ReadFilter.UNREAD)
    assert [e.body for e in unread] == ["b3"]
    entry = await store.get("bob", stored[2].id)
    assert entry is not None and entry.seq == 3 and entry.kind == Kind.BROADCAST
    assert await store.get("bob", stored[0].id) is None
    assert await store.mark_read("carol", up_to_broadcast_seq=2) == 1
    assert await store.mark_read("bob", everything=True) == 0
    # A later broadcast is unread for everyone again.
    await store.append([broadcast("b4")])
    assert await store.unread_count("bob") == 1
    assert await store.unread_count("carol") == 2


async def test_unread_count_sums_inbox_and_broadcasts(store: Store) -> None:
    await store.append([msg(), broadcast()])
    assert await store.unread_count("bob") == 2
    assert await store.mark_read("bob", everything=True) == 0


async def test_concurrent_appends_to_one_recipient_stay_gapless(store: Store) -> None:
    async def writer(n: int) -> None:
        for _ in range(n):
            await store.append([msg(("zed",))])

    await asyncio.gather(*(writer(10) for _ in range(5)))
    entries = await store.inbox_after("zed", 0, 100)
    assert [e.seq for e in entries] == list(range(1, 51))
