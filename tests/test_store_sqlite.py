"""What only the SQLite store has to prove: several processes on one file, durability across a
reopen, all-or-nothing writes, and counters that stay exact. The behaviour every store shares is
in test_store_contract.py."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from node.store.base import Kind, NewMessage, ReadFilter, StoreError
from node.store.sqlite import SqliteStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

_ids = itertools.count(1)


def msg(
    to: tuple[str, ...] = ("bob",),
    *,
    sender: str = "alice",
    kind: Kind = Kind.USER,
    body: str = "hi",
    key: str = "",
) -> NewMessage:
    return NewMessage(
        id=f"s{next(_ids):08d}",
        sender=sender,
        kind=kind,
        recipients=() if kind == Kind.BROADCAST else to,
        title="t",
        body=body,
        metadata={"n": body},
        created_at_ns=time.time_ns(),
        idempotency_key=key,
    )


def broadcast(body: str = "all") -> NewMessage:
    return msg(sender="ops", kind=Kind.BROADCAST, body=body)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "pigeon.db")


@pytest.fixture
async def store(db_path: str):
    store = SqliteStore(db_path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# A node process in miniature: opens the store, says "ready", waits for "go" on stdin so that
# both writers start together, appends its batches to one recipient and prints the seqs it got.
# The idempotency keys make each transaction read before it writes, the case where a writer
# that did not take the lock up front would fail instead of waiting.
WRITER = """
import asyncio, json, sys, time
from node.store.base import Kind, NewMessage
from node.store.sqlite import SqliteStore

async def main(path, tag, batches, size):
    store = SqliteStore(path)
    await store.open()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    seqs = []
    try:
        for b in range(batches):
            batch = [
                NewMessage(
                    f"{tag}-{b}-{i}", tag, Kind.USER, ("zed",), "t", "x", {}, time.time_ns(),
                    idempotency_key=f"{b}-{i}",
                )
                for i in range(size)
            ]
            seqs.extend(stored.seqs["zed"] for stored in await store.append(batch))
    finally:
        await store.close()
    print(json.dumps(seqs), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def test_two_processes_appending_to_one_recipient_get_gapless_seqs(db_path: str) -> None:
    batches, size = 100, 5
    # Both open a file that does not exist yet, so schema creation races too.
    writers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            db_path,
            tag,
            str(batches),
            str(size),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for tag in ("p1", "p2")
    ]
    try:
        for proc in writers:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line != b"ready\n":
                assert proc.stderr is not None
                pytest.fail(f"writer did not start: {line!r} {await proc.stderr.read()!r}")
        for proc in writers:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        outputs = [await asyncio.wait_for(proc.communicate(), 60) for proc in writers]
    finally:
        for proc in writers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (_, err) in zip(writers, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    got = [json.loads(out) for out, _ in outputs]
    total = 2 * batches * size
    # Each process saw its own seqs rise, and together they cover 1..N exactly once.
    assert all(seqs == sorted(seqs) for seqs in got)
    assert sorted(got[0] + got[1]) == list(range(1, total + 1))

    store = SqliteStore(db_path)
    await store.open()
    try:
        assert await store.heads("zed") == (total, 0)
        assert await store.unread_count("zed") == total
        entries = await store.inbox_after("zed", 0, total + 10)
        assert [e.seq for e in entries] == list(range(1, total + 1))
        assert {e.sender for e in entries} == {"p1", "p2"}
    finally:
        await store.close()


async def test_everything_survives_close_and_reopen(db_path: str) -> None:
    first = SqliteStore(db_path)
    await first.open()
    inbox = await first.append([msg(body=f"n{i}", key=f"k{i}") for i in range(4)])
    casts = await first.append([broadcast("b1"), broadcast("b2")])
    await first.mark_read("bob", ids=[inbox[0].id, casts[0].id])
    await first.delete("bob", inbox[1].id)
    await first.close()

    second = SqliteStore(db_path)
    await second.open()
    try:
        assert await second.heads("bob") == (4, 2)
        # Unread: n2, n3 and b2.
        assert await second.unread_count("bob") == 3
        entry = await second.get("bob", inbox[0].id)
        assert entry is not None
        assert (entry.body, entry.read, dict(entry.metadata)) == ("n0", True, {"n": "n0"})
        assert await second.get("bob", inbox[1].id) is None
        assert [e.body for e in await second.inbox_after("bob", 0, 10)] == ["n0", "n2", "n3"]
        assert [(e.body, e.read) for e in await second.broadcasts_after("bob", 0, 10)] == [
            ("b1", True),
            ("b2", False),
        ]
        # The idempotency keys and the seq counter carried over too.
        [again, fresh] = await second.append([msg(key="k2"), msg()])
        assert again.duplicate and again.id == inbox[2].id
        assert fresh.seqs == {"bob": 5}
        # So did the store's id, which another file does not share.
        other = SqliteStore(db_path + "-other")
        await other.open()
        await other.close()
        assert len(first.store_id) == 32 and second.store_id == first.store_id
        assert other.store_id not in ("", first.store_id)
    finally:
        await second.close()


def _sql(db_path: str, statement: str) -> None:
    """Run one statement through a connection of the test's own, beside the store's."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute(statement)
    finally:
        conn.close()


async def test_failed_append_stores_nothing_of_the_batch(store: SqliteStore, db_path: str) -> None:
    [before] = await store.append([msg(("bob",))])
    _sql(
        db_path,
        "CREATE TRIGGER refuse_victim BEFORE INSERT ON inbox WHEN NEW.recipient = 'victim'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    batch = [msg(("bob",), key="once"), msg(("carol", "victim")), broadcast()]
    with pytest.raises(StoreError) as failure:
        await store.append(batch)
    assert isinstance(failure.value.__cause__, sqlite3.Error)
    # Not one part of the batch is visible: no seqs taken, no counters moved, no messages.
    for user in ("bob", "carol", "victim"):
        assert await store.heads(user) == (before.seqs.get(user, 0), 0)
    assert await store.unread_count("bob") == 1
    assert await store.unread_count("carol") == 0
    assert all([await store.get("bob", new.id) is None for new in batch])

    _sql(db_path, "DROP TRIGGER refuse_victim")
    retried = await store.append(batch)
    # The idempotency key of the failed attempt was not kept, and the seqs carry on gaplessly.
    assert not any(s.duplicate for s in retried)
    assert [s.seqs for s in retried[:2]] == [{"bob": 2}, {"carol": 1, "victim": 1}]
    assert retried[2].broadcast_seq == 1
    assert await store.unread_count("bob") == 3


async def test_failed_mark_read_changes_no_state(store: SqliteStore, db_path: str) -> None:
    stored = await store.append([msg() for _ in range(3)] + [broadcast()])
    _sql(
        db_path,
        "CREATE TRIGGER refuse_counter BEFORE UPDATE ON counters"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    with pytest.raises(StoreError):
        await store.mark_read("bob", ids=[stored[0].id, stored[3].id], up_to_seq=2)
    with pytest.raises(StoreError):
        await store.delete("bob", stored[2].id)
    _sql(db_path, "DROP TRIGGER refuse_counter")
    assert await store.unread_count("bob") == 4
    unread = await store.inbox_before("bob", None, 10, read=ReadFilter.UNREAD)
    assert [e.seq for e in unread] == [3, 2, 1]
    assert [e.read for e in await store.broadcasts_after("bob", 0, 10)] == [False]


async def test_close_lets_calls_already_made_finish(db_path: str) -> None:
    store = SqliteStore(db_path)
    await store.open()
    appends = [asyncio.ensure_future(store.append([msg(("zed",))])) for _ in range(20)]
    # One turn of the loop lets each task make its call (it runs up to its first await).
    await asyncio.sleep(0)
    await store.close()
    results = await asyncio.gather(*appends)
    assert [stored.seqs["zed"] for [stored] in results] == list(range(1, 21))
    with pytest.raises(StoreError, match="not open"):
        await store.append([msg()])
    with pytest.raises(StoreError, match="not open"):
        await store.unread_count("zed")

    reopened = SqliteStore(db_path)
    await reopened.open()
    try:
        assert await reopened.heads("zed") == (20, 0)
    finally:
        await reopened.close()


async def test_file_is_in_wal_mode_so_reads_run_beside_writes(
    store: SqliteStore, db_path: str
) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # Another process holding the write lock does not stop this store's reads.
        conn.execute("BEGIN IMMEDIATE")
        assert await store.heads("bob") == (0, 0)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_wal_is_copied_into_the_database_beside_the_writer(
    store: SqliteStore, db_path: str
) -> None:
    from node.store.sqlite import CHECKPOINT_INTERVAL

    before = await asyncio.to_thread(os.path.getsize, db_path)
    # Far below the writer's own checkpoint threshold: only the background checkpoints move
    # these pages into the database file while the store stays open.
    for _ in range(20):
        await store.append([msg(("bob", "carol"), body="x" * 2000) for _ in range(10)])
    # Until the pages reach the database file (a few checkpoint intervals at most).
    async with asyncio.timeout(CHECKPOINT_INTERVAL * 20):
        while await asyncio.to_thread(os.path.getsize, db_path) <= before + 200 * 2000:
            await asyncio.sleep(CHECKPOINT_INTERVAL / 5)
    assert await asyncio.to_thread(os.path.getsize, db_path) > before + 200 * 2000
    assert await store.heads("bob") == (200, 0)


async def test_write_fails_cleanly_when_another_writer_holds_the_lock_too_long(
    db_path: str,
) -> None:
    store = SqliteStore(db_path, busy_timeout=0.1)
    await store.open()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"):
            await store.append([msg()])
        conn.execute("ROLLBACK")
        [stored] = await store.append([msg()])
        assert stored.seqs == {"bob": 1}
    finally:
        conn.close()
        await store.close()


async def test_in_memory_database_is_refused() -> None:
    with pytest.raises(StoreError, match="WAL"):
        await SqliteStore(":memory:").open()


async def test_broadcast_deleted_below_read_mark_stays_hidden(store: SqliteStore) -> None:
    casts = await store.append([broadcast(f"b{i}") for i in range(1, 6)])
    assert await store.mark_read("bob", ids=[casts[3].id]) == 4
    assert await store.delete("bob", casts[1].id) == 3
    assert await store.mark_read("bob", up_to_broadcast_seq=3) == 1
    assert await store.mark_read("bob", up_to_broadcast_seq=99) == 0
    # b2 was deleted before the read mark passed it, and must not come back.
    assert [e.body for e in await store.broadcasts_before("bob", None, 10)] == [
        "b5",
        "b4",
        "b3",
        "b1",
    ]
    assert await store.delete("bob", casts[1].id) is None
    # Deleting a broadcast below the read mark hides it and leaves the count alone.
    assert await store.delete("bob", casts[0].id) == 0
    assert await store.get("bob", casts[0].id) is None
    # The read mark stopped at the head, so a new broadcast is unread.
    await store.append([broadcast("b6")])
    assert await store.unread_count("bob") == 1


async def test_unread_counter_matches_the_messages_after_random_operations(
    store: SqliteStore,
) -> None:
    rng = random.Random(7)
    users = ["u1", "u2", "u3"]
    ids: list[str] = []
    for _ in range(300):
        user = rng.choice(users)
        op = rng.random()
        if op < 0.35:
            batch = [
                broadcast()
                if rng.random() < 0.2
                else msg(tuple(rng.sample(users, rng.randint(1, 3))), key=rng.choice(["", "k"]))
                for _ in range(rng.randint(1, 4))
            ]
            ids.extend(s.id for s in await store.append(batch))
        elif op < 0.55 and ids:
            count = await store.mark_read(user, ids=rng.sample(ids, min(len(ids), 3)))
        elif op < 0.65:
            head, broadcast_head = await store.heads(user)
            count = await store.mark_read(
                user,
                up_to_seq=rng.randint(0, head + 1),
                up_to_broadcast_seq=rng.randint(0, broadcast_head + 1),
            )
        elif op < 0.7:
            count = await store.mark_read(user, everything=True)
        elif ids:
            result = await store.delete(user, rng.choice(ids))
            count = await store.unread_count(user) if result is None else result
        else:
            continue
        if op >= 0.35:
            # The kept counter must equal a count of the messages themselves.
            inbox = await store.inbox_before(user, None, 10_000, read=ReadFilter.UNREAD)
            casts = await store.broadcasts_before(user, None, 10_000, read=ReadFilter.UNREAD)
            assert count == len(inbox) + len(casts)
            assert count == await store.unread_count(user)


async def test_append_reports_each_recipients_unread_count_with_the_commit(tmp_path) -> None:
    from node.store.base import Kind, NewMessage
    from node.store.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path / "unread.db"))
    await store.open()
    try:

        def new(i: int, to: tuple[str, ...], kind: Kind = Kind.USER) -> NewMessage:
            return NewMessage(f"u{i}", "alice", kind, to, "", "x", {}, i)

        await store.append([new(0, (), Kind.BROADCAST)])
        first, second = await store.append([new(1, ("bob", "carol")), new(2, ("bob",))])
        assert second.unread == {"bob": 3}  # two messages and the broadcast
        assert first.unread == {"bob": 3, "carol": 2}
        assert await store.unread_count("bob") == 3
        # Read marks count: the broadcast read on its own, everything read up to a seq.
        assert await store.mark_read("bob", ids=["u0"]) == 2
        assert await store.mark_read("carol", up_to_seq=1) == 1
        # A broadcast in the same batch is part of the count that batch reports.
        [_, third] = await store.append([new(3, (), Kind.BROADCAST), new(4, ("bob", "carol"))])
        assert third.unread == {"bob": 4, "carol": 3}
        assert third.unread["bob"] == await store.unread_count("bob")
        assert third.unread["carol"] == await store.unread_count("carol")
    finally:
        await store.close()
