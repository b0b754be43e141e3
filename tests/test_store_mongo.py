"""What only the MongoDB store has to prove: other processes writing at once, real indexes,
transactions that leave nothing behind when a write fails or a writer dies mid-way.

The shared behaviour is in test_store_contract.py; these run against the same secantusdb server
(in this process, on a thread), and child processes reach it over the wire like another node.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from node.store.base import Kind, NewMessage, ReadFilter, StoreError
from node.store.mongo import MongoStore

pytestmark = pytest.mark.integration

_ROOT = Path(__file__).resolve().parents[1]
_ids = itertools.count(1)


def msg(
    to: tuple[str, ...] = ("bob",),
    *,
    sender: str = "alice",
    key: str = "",
    metadata: dict[str, str] | None = None,
) -> NewMessage:
    return NewMessage(
        id=f"mm{next(_ids):08d}-{uuid.uuid4().hex[:6]}",
        sender=sender,
        kind=Kind.USER,
        recipients=to,
        title="t",
        body="hi",
        metadata=metadata or {},
        created_at_ns=time.time_ns(),
        idempotency_key=key,
    )


def with_params(uri: str, **params: str) -> str:
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return uri + ("&" if "?" in uri else "?") + extra


@pytest.fixture
def database() -> str:
    return f"pigeon_mongo_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def admin(mongo_uri: str) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    """A plain client of the test server, outside any store (and outside fail points)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000
    )
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def mongo(mongo_uri: str, database: str) -> AsyncIterator[MongoStore]:
    store = MongoStore(mongo_uri, database)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# A child process is another node: its own interpreter, its own client, the same server.
_CHILD = """
import asyncio, json, sys, time
from node.store.base import Kind, NewMessage
from node.store.mongo import MongoStore

uri, database, name, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

async def main():
    store = MongoStore(uri, database, timeout_ms=60000)
    await store.open()
    print("ready", flush=True)
    sys.stdin.readline()  # "go": both children start writing together
    out = []
    for b in range(batches):
        batch = [
            NewMessage(
                id=f"{name}-{b}-{i}", sender=name, kind=Kind.USER,
                recipients=("zed",) if i % 2 else ("zed", f"{name}-other"),
                title="t", body="b", metadata={}, created_at_ns=time.time_ns(),
            )
            for i in range(1 + b % 3)
        ]
        for new, stored in zip(batch, await store.append(batch)):
            out.append([new.id, stored.seqs["zed"]])
    await store.close()
    print(json.dumps(out), flush=True)

asyncio.run(main())
"""


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        *args,
        cwd=_ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def _line(process: asyncio.subprocess.Process, within: float = 30) -> str:
    """The child's next line of output, waited for at most `within` seconds."""
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), within)
    assert line, f"child exited early with {await process.wait()}"
    return line.decode().strip()


async def test_two_processes_writing_for_one_recipient_get_gapless_seqs(
    mongo_uri: str, database: str, mongo: MongoStore
) -> None:
    children = [await _spawn(_CHILD, mongo_uri, database, name, "12") for name in ("p1", "p2")]
    try:
        for child in children:
            assert await _line(child) == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        results = [json.loads(await _line(child, within=90)) for child in children]
        assert [await child.wait() for child in children] == [0, 0]
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()

    acknowledged = {message_id: seq for result in results for message_id, seq in result}
    count = len(acknowledged)
    assert count == 2 * sum(1 + b % 3 for b in range(12))
    assert sorted(acknowledged.values()) == list(range(1, count + 1))
    # Each process saw its own messages in the order it sent them.
    for result in results:
        seqs = [seq for _, seq in result]
        assert seqs == sorted(seqs)
    inbox = await mongo.inbox_after("zed", 0, count + 10)
    assert [(e.id, e.seq) for e in inbox] == sorted(acknowledged.items(), key=lambda kv: kv[1])
    assert await mongo.heads("zed") == (count, 0)
    assert await mongo.unread_count("zed") == count


async def test_open_creates_the_indexes(
    mongo: MongoStore, admin: AsyncMongoClient[dict[str, Any]], database: str
) -> None:
    db = admin[database]

    async def indexes(collection: str) -> dict[str, dict[str, Any]]:
        cursor = await db[collection].list_indexes()
        return {index["name"]: dict(index) async for index in cursor}

    messages = await indexes("messages")
    idempotency = messages["sender_idempotency_key"]
    assert dict(idempotency["key"]) == {"sender": 1, "idempotency_key": 1}
    assert idempotency["unique"] is True
    assert "partialFilterExpression" in idempotency

    inbox = await indexes("inbox")
    assert dict(inbox["recipient_seq"]["key"]) == {"recipient": 1, "seq": 1}
    assert inbox["recipient_seq"]["unique"] is True
    assert dict(inbox["recipient_status_seq"]["key"]) == {"recipient": 1, "status": 1, "seq": 1}
    assert dict(inbox["recipient_message_id"]["key"]) == {"recipient": 1, "message_id": 1}

    assert (await indexes("broadcasts"))["message_id"]["unique"] is True
    state = (await indexes("broadcast_state"))["user_seq"]
    assert dict(state["key"]) == {"user": 1, "seq": 1} and state["unique"] is True
    assert "counters" in await db.list_collection_names()


async def test_opening_again_over_existing_data_works(mongo_uri: str, database: str) -> None:
    first = MongoStore(mongo_uri, database)
    await first.open()
    await first.append([msg()])
    await first.close()
    second = MongoStore(mongo_uri, database)
    await second.open()
    try:
        assert await second.heads("bob") == (1, 0)
    finally:
        await second.close()


@pytest.mark.parametrize(
    ("failing", "skip"),
    [
        # The messages insert goes through; the inbox insert, after the seq was reserved, fails.
        ("insert", 1),
        # The counter's $inc itself fails.
        ("findAndModify", 0),
        # Everything ran; the commit is refused.
        ("commitTransaction", 0),
    ],
)
async def test_failed_write_raises_and_leaves_nothing_behind(
    mongo_uri: str,
    database: str,
    admin: AsyncMongoClient[dict[str, Any]],
    failing: str,
    skip: int,
) -> None:
    app = f"pigeon-fault-{uuid.uuid4().hex[:8]}"
    store = MongoStore(with_params(mongo_uri, appName=app), database)
    await store.open()
    try:
        [first] = await store.append([msg()])
        await admin.admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": {"skip": skip, "times": 1},
                # BadValue: not transient, so the transaction is not retried.
                "data": {"failCommands": [failing], "errorCode": 2, "appName": app},
            }
        )
        lost = msg()
        try:
            with pytest.raises(StoreError):
                await store.append([lost])
        finally:
            await admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})

        # No false acknowledgement: nothing of the failed call is visible, no seq was used.
        assert await store.get("bob", lost.id) is None
        assert [e.id for e in await store.inbox_after("bob", 0, 10)] == [first.id]
        assert await store.heads("bob") == (1, 0)
        assert await store.unread_count("bob") == 1
        assert await admin[database]["messages"].find_one({"_id": lost.id}) is None
        # The sender's retry goes through and takes the next seq.
        [retried] = await store.append([lost])
        assert retried.seqs == {"bob": 2}
    finally:
        await store.close()


async def test_transient_failure_after_reserving_is_retried_without_a_gap(
    mongo_uri: str, database: str, admin: AsyncMongoClient[dict[str, Any]]
) -> None:
    app = f"pigeon-transient-{uuid.uuid4().hex[:8]}"
    store = MongoStore(with_params(mongo_uri, appName=app), database)
    await store.open()
    try:
        await admin.admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": {"skip": 1, "times": 2},
                # WriteConflict on the inbox insert, after the counter moved: the transaction
                # is aborted (the counter with it) and run again.
                "data": {"failCommands": ["insert"], "errorCode": 112, "appName": app},
            }
        )
        try:
            stored = await store.append([msg(), msg()])
        finally:
            await admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
        assert [s.seqs for s in stored] == [{"bob": 1}, {"bob": 2}]
        assert [e.seq for e in await store.inbox_after("bob", 0, 10)] == [1, 2]
    finally:
        await store.close()


# Reserves seqs inside MongoStore's own transaction, says so, and waits to be killed: a node
# that dies between moving the counter and writing the inbox rows.
_DIES_MID_APPEND = """
import asyncio, sys, time
from node.store.base import Kind, NewMessage
from node.store.mongo import MongoStore

uri, database = sys.argv[1], sys.argv[2]
original = MongoStore._reserve

async def reserve_then_hang(self, *args, **kwargs):
    result = await original(self, *args, **kwargs)
    print("reserved", flush=True)
    await asyncio.Event().wait()
    return result

MongoStore._reserve = reserve_then_hang

async def main():
    store = MongoStore(uri, database, timeout_ms=60000)
    await store.open()
    new = NewMessage(id="doomed", sender="x", kind=Kind.USER, recipients=("bob",), title="t",
                     body="b", metadata={}, created_at_ns=time.time_ns(), idempotency_key="k")
    await store.append([new])

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def short_lived_txn_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that reaps abandoned transactions after 1 s (mongod's
    transactionLifetimeLimitSeconds, 60 by default)."""
    from secantus import SecantusDBServer

    path = tmp_path_factory.mktemp("secantus-short-txn")
    server = SecantusDBServer(
        host="127.0.0.1", port=0, storage_path=str(path), transaction_lifetime_seconds=1.0
    )
    server.start()
    try:
        yield with_params(server.uri, directConnection="true")
    finally:
        server.stop()


async def test_writer_killed_after_reserving_seqs_leaves_no_gap(
    short_lived_txn_uri: str, database: str
) -> None:
    store = MongoStore(short_lived_txn_uri, database, timeout_ms=20000)
    await store.open()
    try:
        [before] = await store.append([msg()])
        child = await _spawn(_DIES_MID_APPEND, short_lived_txn_uri, database)
        try:
            assert await _line(child) == "reserved"
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()

        # The dead writer's transaction holds bob's counter until the server reaps it; the
        # next append waits that out (retrying its write conflicts) and takes seq 2.
        [after] = await store.append([msg()])
        assert (before.seqs, after.seqs) == ({"bob": 1}, {"bob": 2})
        assert [e.seq for e in await store.inbox_after("bob", 0, 10)] == [1, 2]
        assert await store.get("bob", "doomed") is None
        # Its idempotency key was rolled back too, so the sender's retry is stored, not
        # answered as a duplicate of a message nobody has.
        retry = msg(sender="x", key="k")
        [stored] = await store.append([retry])
        assert not stored.duplicate and stored.seqs == {"bob": 3}
    finally:
        await store.close()


async def test_one_idempotency_key_from_two_nodes_at_once_is_stored_once(
    mongo_uri: str, database: str, mongo: MongoStore
) -> None:
    other = MongoStore(mongo_uri, database)
    await other.open()
    try:
        first, second = msg(key="same"), msg(key="same")
        [a], [b] = await asyncio.gather(mongo.append([first]), other.append([second]))
    finally:
        await other.close()
    assert sorted([a.duplicate, b.duplicate]) == [False, True]
    assert a.id == b.id and a.created_at_ns == b.created_at_ns
    assert [e.id for e in await mongo.inbox_after("bob", 0, 10)] == [a.id]
    assert await mongo.heads("bob") == (1, 0)


async def test_metadata_keys_mongodb_would_choke_on_round_trip(mongo: MongoStore) -> None:
    metadata = {"a.b": "dotted", "$where": "dollar", "": "empty"}
    [stored] = await mongo.append([msg(metadata=metadata)])
    entry = await mongo.get("bob", stored.id)
    assert entry is not None and dict(entry.metadata) == metadata


async def test_unreachable_server_fails_fast_with_store_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = MongoStore(f"mongodb://127.0.0.1:{port}/?directConnection=true", timeout_ms=300)
    started = time.monotonic()
    with pytest.raises(StoreError):
        await store.open()
    assert time.monotonic() - started < 5


@asynccontextmanager
async def _stalling(
    admin: AsyncMongoClient[dict[str, Any]], app: str, commands: list[str], ms: int
) -> AsyncIterator[None]:
    """The server holds the given commands of client `app` for `ms` before answering."""
    await admin.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {
                "failCommands": commands,
                "blockConnection": True,
                "blockTimeMS": ms,
                "appName": app,
            },
        }
    )
    try:
        yield
    finally:
        await admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})


async def _named_store(mongo_uri: str, database: str) -> tuple[MongoStore, str]:
    """An opened store with a 0.5 s timeout whose client carries an app name of its own."""
    app = f"pigeon-stall-{uuid.uuid4().hex[:8]}"
    store = MongoStore(with_params(mongo_uri, appName=app), database, timeout_ms=500)
    await store.open()
    return store, app


async def test_server_that_stops_answering_gives_store_error_within_the_timeout(
    mongo_uri: str, database: str, admin: AsyncMongoClient[dict[str, Any]]
) -> None:
    store, app = await _named_store(mongo_uri, database)
    try:
        async with _stalling(admin, app, ["find", "insert"], 3000):
            for call in (store.heads("bob"), store.append([msg()])):
                started = time.monotonic()
                with pytest.raises(StoreError):
                    await call
                assert time.monotonic() - started < 2
    finally:
        await store.close()


async def test_close_does_not_wait_on_a_server_that_stops_answering(
    mongo_uri: str, database: str, admin: AsyncMongoClient[dict[str, Any]]
) -> None:
    store, app = await _named_store(mongo_uri, database)
    await store.heads("bob")  # leaves a server session for the close to end
    async with _stalling(admin, app, ["endSessions"], 4000):
        started = time.monotonic()
        await store.close()
        assert time.monotonic() - started < 2.5
        with pytest.raises(StoreError, match="not open"):
            await store.heads("bob")


async def test_standalone_server_is_refused_with_a_reason(tmp_path: Path) -> None:
    from secantus import SecantusDBServer

    server = SecantusDBServer(
        host="127.0.0.1", port=0, storage_path=str(tmp_path), replica_set_name=None
    )
    server.start()
    try:
        store = MongoStore(with_params(server.uri, directConnection="true"))
        with pytest.raises(StoreError, match="replica set"):
            await store.open()
    finally:
        server.stop()


async def test_close_lets_calls_in_progress_finish(mongo: MongoStore) -> None:
    # gather starts the append first; close is asked for while it is in flight.
    stored, _ = await asyncio.gather(mongo.append([msg() for _ in range(5)]), mongo.close())
    assert len(stored) == 5
    with pytest.raises(StoreError, match="not open"):
        await mongo.heads("bob")


async def test_broadcast_pages_longer_than_one_read_chunk_skip_deleted_and_filter(
    mongo: MongoStore,
) -> None:
    # The store reads the broadcast stream in chunks of 100 and filters per-user state.
    news = [
        NewMessage(
            id=f"bc-{i}-{uuid.uuid4().hex[:6]}",
            sender="ops" if i % 2 else "news",
            kind=Kind.BROADCAST,
            recipients=(),
            title="t",
            body=str(i),
            metadata={},
            created_at_ns=time.time_ns(),
        )
        for i in range(1, 251)
    ]
    stored = await mongo.append(news)
    assert [s.broadcast_seq for s in stored] == list(range(1, 251))
    # More deleted in a row than one chunk holds, so a whole chunk filters down to nothing.
    deleted = {*range(20, 130), 239}
    for seq in sorted(deleted):
        assert await mongo.delete("bob", news[seq - 1].id) is not None
    await mongo.mark_read("bob", up_to_broadcast_seq=2, ids=[news[244].id])
    visible = [s for s in range(1, 251) if s not in deleted]

    after = await mongo.broadcasts_after("bob", 0, 300)
    assert [e.seq for e in after] == visible
    page = await mongo.broadcasts_after("bob", 100, 150)
    assert [e.seq for e in page] == [s for s in visible if s > 100][:150]
    newest = await mongo.broadcasts_before("bob", None, 10)
    assert [e.seq for e in newest] == visible[::-1][:10]
    read = await mongo.broadcasts_before("bob", None, 300, read=ReadFilter.READ)
    assert [e.seq for e in read] == [245, 2, 1]
    unread = await mongo.broadcasts_before("bob", 236, 200, read=ReadFilter.UNREAD)
    assert [e.seq for e in unread] == [s for s in visible[::-1] if 2 < s < 236][:200]
    from_ops = await mongo.broadcasts_before("bob", None, 300, sender="ops")
    assert [e.seq for e in from_ops] == [s for s in visible[::-1] if s % 2]
    assert await mongo.unread_count("bob") == len(visible) - 3


async def test_nodes_on_one_database_see_one_store_id_and_another_database_its_own(
    mongo_uri: str,
) -> None:
    database = f"pigeon_id_{uuid.uuid4().hex[:8]}"
    # Opened at once, as nodes started together do: one id is made, the others read it.
    stores = [MongoStore(mongo_uri, database) for _ in range(3)]
    other = MongoStore(mongo_uri, f"{database}_other")
    try:
        await asyncio.gather(*(store.open() for store in [*stores, other]))
        ids = {store.store_id for store in stores}
        assert len(ids) == 1 and "" not in ids and other.store_id not in ids | {""}
        again = MongoStore(mongo_uri, database)
        await again.open()
        await again.close()
        assert again.store_id in ids
    finally:
        for store in [*stores, other]:
            await store.close()
