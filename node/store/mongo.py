"""The production Store: MongoDB through pymongo's ``AsyncMongoClient``.

Collections (all created with their indexes by ``open``):

- ``messages``: ``_id`` = message id; sender, kind, title, body, metadata, created_at_ns,
  idempotency_key. A unique partial index on (sender, idempotency_key), limited to non-empty
  keys, is the idempotency check.
- ``inbox``: one row per (recipient, seq): message_id, status (0 unread, 1 read, 2 deleted), and
  the message's sender and kind copied in, so filtered listings stay one query keyed by recipient
  instead of a join. Unique (recipient, seq); (recipient, status, seq); (recipient, message_id).
- ``counters``: ``_id`` = user: head_seq, unread (the exact number of unread inbox rows, so a
  count never scans the inbox) and broadcast_read_upto (every broadcast at or below it is read).
  The broadcast stream's head lives here too, under the non-string ``_id``
  ``{"stream": "broadcast"}``, which no user id (a string) can collide with.
- ``broadcasts``: ``_id`` = broadcast seq; message_id (unique) and sender.
- ``broadcast_state``: a user's own state of one broadcast: (user, seq) unique, status 1 (read,
  only kept above broadcast_read_upto) or 2 (deleted, at any seq: a delete outlives "mark
  everything read").
- ``meta``: facts about the store itself: ``{_id: "store", store_id}``, made by the first open.

A user's unread count is ``counters.unread`` + broadcast head - broadcast_read_upto - their
``broadcast_state`` rows above broadcast_read_upto.

Gaplessness. Every write (append, mark_read, delete) is one multi-document transaction. append
inserts the messages first (the unique index rejects a repeated idempotency key before any seq
is reserved), then reserves a seq range per recipient with one ``$inc`` on their counter, then
inserts the inbox and broadcast rows, and commits. A process that dies anywhere before the
commit leaves nothing behind: the server aborts the transaction, the counter increment included,
so a reserved seq is never skipped. Two writers for one recipient serialise on the counter
document: the second gets a WriteConflict (TransientTransactionError), and ``with_transaction``
retries it whole. Because a writer can only move a counter after the previous writer's rows
committed with it, a reader never sees seq n+1 before seq n either. The cost is that MongoDB
must run as a replica set or a sharded cluster (``open`` refuses a standalone server), which is
the production target anyway; secantusdb in the tests presents itself as a one-node replica set
with real transactions.

Sharding: every inbox and broadcast_state query carries the recipient/user, so both can be
sharded on it. The unique idempotency index needs ``messages`` to stay unsharded or be sharded
on a key starting with ``sender`` (MongoDB enforces uniqueness only across a shard key prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

import pymongo
from bson.errors import BSONError
from pymongo import AsyncMongoClient, IndexModel, ReturnDocument, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    CollectionInvalid,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import ReadPreference
from pymongo.write_concern import WriteConcern

from node.store.base import Entry, Kind, NewMessage, ReadFilter, Stored, StoreError

__all__ = ["MongoStore"]

log = logging.getLogger("pigeon.store.mongo")

_T = TypeVar("_T")
_Doc = dict[str, Any]

_UNREAD: Final = 0
_READ: Final = 1
_DELETED: Final = 2
_BROADCAST_COUNTER: Final[Mapping[str, str]] = {"stream": "broadcast"}
_IDEMPOTENCY_INDEX: Final = "sender_idempotency_key"
_DUPLICATE_KEY: Final = 11000
_NAMESPACE_EXISTS: Final = 48
# Broadcast listings filter on per-user state that lives in another collection, so they read
# the stream in chunks and filter; a chunk well above a typical page keeps that to one pass.
_BROADCAST_CHUNK: Final = 100


def _inbox_status(read: ReadFilter) -> Any:
    """The inbox ``status`` condition for a read filter (deleted rows never match)."""
    if read == ReadFilter.UNREAD:
        return _UNREAD
    if read == ReadFilter.READ:
        return _READ
    return {"$lt": _DELETED}


def _message_doc(new: NewMessage) -> _Doc:
    return {
        "_id": new.id,
        "sender": new.sender,
        "kind": int(new.kind),
        "title": new.title,
        "body": new.body,
        # Pairs, not a subdocument: metadata keys come from applications, and keys with "." or
        # a leading "$" are not safe as MongoDB field names.
        "metadata": [[key, value] for key, value in new.metadata.items()],
        "created_at_ns": new.created_at_ns,
        "idempotency_key": new.idempotency_key,
    }


def _entry(message: _Doc, seq: int, read: bool, recipient: str) -> Entry:
    return Entry(
        id=message["_id"],
        seq=seq,
        sender=message["sender"],
        kind=Kind(message["kind"]),
        title=message["title"],
        body=message["body"],
        metadata={key: value for key, value in message["metadata"]},
        created_at_ns=message["created_at_ns"],
        read=read,
        recipient=recipient,
    )


def _idempotency_clash(exc: PyMongoError) -> bool:
    """Whether a failed messages insert hit the idempotency index (not, say, a reused id)."""
    if isinstance(exc, BulkWriteError):
        errors = exc.details.get("writeErrors", [])
    elif isinstance(exc, DuplicateKeyError):
        errors = [exc.details or {}]
    else:
        return False
    return any(
        error.get("code") == _DUPLICATE_KEY
        and (
            "idempotency_key" in (error.get("keyPattern") or {})
            or _IDEMPOTENCY_INDEX in str(error.get("errmsg", ""))
        )
        for error in errors
    )


class MongoStore:
    """The Store on MongoDB (a replica set or sharded cluster), one transaction per write.

    Args:
        uri: a MongoDB connection string (add ``directConnection=true`` for a single test
            server; ``appName=...`` names the client in server logs and fail points).
        database: the database holding Pigeon's collections.
        timeout_ms: the bound on server selection, connecting and on every store call as a
            whole, transaction retries included; a call that runs out raises StoreError.
    """

    def __init__(self, uri: str, database: str = "pigeon", *, timeout_ms: int = 5000) -> None:
        self._uri = uri
        self._database = database
        self._timeout_ms = timeout_ms
        self._client: AsyncMongoClient[_Doc] | None = None
        self._closing = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._store_id = ""

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check that transactions are available, and create the indexes."""
        if self._client is not None:
            return
        try:
            client: AsyncMongoClient[_Doc] = AsyncMongoClient(
                self._uri,
                serverSelectionTimeoutMS=self._timeout_ms,
                connectTimeoutMS=self._timeout_ms,
            )
        except PyMongoError as exc:
            raise StoreError(f"mongodb: bad connection settings: {exc}") from exc
        self._client = client
        self._closing = False
        try:
            async with self._call():
                hello = await client.admin.command("hello")
                if not hello.get("setName") and hello.get("msg") != "isdbgrid":
                    raise StoreError(
                        "mongodb: the server is a standalone; MongoStore needs a replica set or "
                        "a sharded cluster (it writes with multi-document transactions)"
                    )
                await self._create_indexes()
                self._store_id = await self._load_store_id()
        except BaseException:
            self._client = None
            await client.close()
            raise

    @property
    def store_id(self) -> str:
        return self._store_id

    async def _load_store_id(self) -> str:
        meta = self._db()["meta"]
        doc = None
        for _ in range(5):
            with contextlib.suppress(DuplicateKeyError):
                doc = await meta.find_one_and_update(
                    {"_id": "store"},
                    {"$setOnInsert": {"store_id": uuid.uuid4().hex}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            # Another node's upsert at the same moment can make this one fail on the key
            # (MongoDB) or come back empty (secantusdb): the document is there to read then.
            doc = doc or await meta.find_one({"_id": "store"})
            if doc is not None:
                break
            await asyncio.sleep(0.05)
        if doc is None or not isinstance(doc.get("store_id"), str):
            raise StoreError(f"mongodb: {self._database}.meta has no usable store id: {doc!r}")
        return str(doc["store_id"])

    async def _create_indexes(self) -> None:
        db = self._db()
        await db["messages"].create_indexes(
            [
                IndexModel(
                    [("sender", 1), ("idempotency_key", 1)],
                    name=_IDEMPOTENCY_INDEX,
                    unique=True,
                    # `$gt: ""` matches exactly the non-empty strings (type bracketing), so
                    # messages without a key never collide.
                    partialFilterExpression={"idempotency_key": {"$gt": ""}},
                )
            ]
        )
        await db["inbox"].create_indexes(
            [
                IndexModel([("recipient", 1), ("seq", 1)], name="recipient_seq", unique=True),
                IndexModel(
                    [("recipient", 1), ("status", 1), ("seq", 1)], name="recipient_status_seq"
                ),
                IndexModel([("recipient", 1), ("message_id", 1)], name="recipient_message_id"),
            ]
        )
        await db["broadcasts"].create_indexes(
            [IndexModel([("message_id", 1)], name="message_id", unique=True)]
        )
        await db["broadcast_state"].create_indexes(
            [IndexModel([("user", 1), ("seq", 1)], name="user_seq", unique=True)]
        )
        # counters needs only its _id index, which every collection has; creating the
        # collection up front keeps the first transaction from having to.
        if "counters" not in await db.list_collection_names():
            try:
                await db.create_collection("counters")
            except CollectionInvalid:
                pass  # another node created it in between
            except OperationFailure as exc:
                if exc.code != _NAMESPACE_EXISTS:
                    raise

    async def close(self) -> None:
        """Wait for calls in progress, then release the connections."""
        self._closing = True
        try:
            # Bounded: a shutdown must not hang on a call that never returns.
            async with asyncio.timeout(self._timeout_ms / 1000 + 5):
                await self._idle.wait()
        except TimeoutError:
            log.warning("mongodb: closing with %d calls still in progress", self._in_flight)
        client, self._client = self._client, None
        if client is not None:
            # The driver's close ends the sessions with a server call that has no bound of its
            # own: a server that stops answering would hold the shutdown forever.
            try:
                with pymongo.timeout(self._timeout_ms / 1000):
                    async with asyncio.timeout(self._timeout_ms / 1000 + 5):
                        await client.close()
            except TimeoutError:
                log.warning("mongodb: the server did not answer while closing; closed anyway")

    # -- plumbing --------------------------------------------------------------------------

    def _db(self) -> AsyncDatabase[_Doc]:
        if self._client is None:
            raise StoreError("mongodb: the store is not open")
        return self._client[self._database]

    def _collection(self, name: str) -> AsyncCollection[_Doc]:
        return self._db()[name]

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """One store call: counted for close, bounded by the timeout, errors made StoreError."""
        if self._client is None or self._closing:
            raise StoreError("mongodb: the store is not open")
        self._in_flight += 1
        self._idle.clear()
        try:
            with pymongo.timeout(self._timeout_ms / 1000):
                yield
        except (PyMongoError, BSONError) as exc:
            raise StoreError(f"mongodb: {exc}") from exc
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _transaction(
        self, work: Callable[[AsyncClientSession], Coroutine[Any, Any, _T]]
    ) -> _T:
        """Run work in one transaction, retried whole on transient errors (write conflicts)."""
        assert self._client is not None
        async with self._client.start_session() as session:
            # Snapshot reads give one consistent view across shards; majority writes are what
            # survive a failover, which is what "durably stored" means on a replica set.
            return await session.with_transaction(
                work,
                read_concern=ReadConcern("snapshot"),
                write_concern=WriteConcern(w="majority"),
                read_preference=ReadPreference.PRIMARY,
            )

    async def _counters(
        self, user: str, session: AsyncClientSession | None = None
    ) -> tuple[_Doc, int]:
        """The user's counter document ({} if none) and the broadcast head, in one query."""
        counters = self._collection("counters")
        user_doc: _Doc = {}
        broadcast_head = 0
        async for doc in counters.find(
            {"_id": {"$in": [user, _BROADCAST_COUNTER]}}, session=session
        ):
            if doc["_id"] == user:
                user_doc = doc
            else:
                broadcast_head = int(doc.get("head_seq", 0))
        return user_doc, broadcast_head

    async def _unread_total(
        self,
        user: str,
        inbox_unread: int,
        broadcast_head: int,
        read_upto: int,
        session: AsyncClientSession | None,
    ) -> int:
        """Inbox unread plus the broadcasts above read_upto the user has no state for."""
        handled = await self._collection("broadcast_state").count_documents(
            {"user": user, "seq": {"$gt": read_upto}}, session=session
        )
        return inbox_unread + max(0, broadcast_head - read_upto - handled)

    async def _messages(self, ids: Iterable[str]) -> dict[str, _Doc]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        cursor = self._collection("messages").find({"_id": {"$in": wanted}})
        return {doc["_id"]: doc async for doc in cursor}

    # -- append ----------------------------------------------------------------------------

    async def append(self, batch: Sequence[NewMessage]) -> list[Stored]:
        """Store a batch in one transaction; see the module docstring for how seqs stay gapless.

        A message whose (sender, idempotency_key) is already stored, or appears earlier in the
        batch, is answered with the first message and stores nothing.
        """
        async with self._call():
            # A later message repeating a key of an earlier one in the batch follows its leader.
            leader_of: dict[int, int] = {}
            first_with_key: dict[tuple[str, str], int] = {}
            for index, new in enumerate(batch):
                if new.idempotency_key:
                    key = (new.sender, new.idempotency_key)
                    leader_of[index] = first_with_key.setdefault(key, index)
            leaders = [i for i in range(len(batch)) if leader_of.get(i, i) == i]
            known: dict[tuple[str, str], Stored] = {}
            fresh: dict[int, Stored] = {}
            # Each clash found moves at least one key into `known`; the extra rounds cover a
            # clash with a writer that then rolled back.
            for _ in range(len(leaders) + 3):
                todo = [
                    i for i in leaders if (batch[i].sender, batch[i].idempotency_key) not in known
                ]
                if not todo:
                    break
                try:
                    stored = await self._transaction(
                        functools.partial(self._append_in, batch=[batch[i] for i in todo])
                    )
                except (BulkWriteError, DuplicateKeyError) as exc:
                    if not _idempotency_clash(exc):
                        raise
                    known.update(await self._first_with_keys([batch[i] for i in todo]))
                    continue
                fresh = dict(zip(todo, stored, strict=True))
                break
            else:
                raise StoreError("mongodb: idempotency keys kept clashing; try again")

            results: list[Stored] = []
            for index, new in enumerate(batch):
                leader = leader_of.get(index, index)
                first = fresh.get(leader) or known[(new.sender, new.idempotency_key)]
                if leader == index and index in fresh:
                    results.append(first)
                else:
                    results.append(Stored(first.id, {}, 0, first.created_at_ns, duplicate=True))
            return results

    async def _first_with_keys(self, batch: Sequence[NewMessage]) -> dict[tuple[str, str], Stored]:
        """The stored messages holding the batch's idempotency keys."""
        wanted = [
            {"sender": new.sender, "idempotency_key": new.idempotency_key}
            for new in batch
            if new.idempotency_key
        ]
        if not wanted:
            return {}
        cursor = self._collection("messages").find(
            {"$or": wanted}, {"sender": 1, "idempotency_key": 1, "created_at_ns": 1}
        )
        return {
            (doc["sender"], doc["idempotency_key"]): Stored(
                doc["_id"], {}, 0, doc["created_at_ns"], duplicate=True
            )
            async for doc in cursor
        }

    async def _append_in(
        self, session: AsyncClientSession, batch: Sequence[NewMessage]
    ) -> list[Stored]:
        """The body of append's transaction (re-run whole on a write conflict)."""
        if not batch:
            return []
        # First, so that a repeated idempotency key aborts before any counter is touched.
        await self._collection("messages").insert_many(
            [_message_doc(new) for new in batch], session=session
        )

        per_user: dict[str, int] = {}
        broadcasts = 0
        for new in batch:
            if new.kind == Kind.BROADCAST:
                # Fan-out on read: a broadcast's recipients (there should be none) get no rows,
                # so they must not get seqs either, or their inboxes would have holes.
                broadcasts += 1
                continue
            # dict.fromkeys: a repeated recipient must not take two seqs for one message.
            for recipient in dict.fromkeys(new.recipients):
                per_user[recipient] = per_user.get(recipient, 0) + 1
        next_seq = await self._reserve(session, per_user, broadcasts)

        inbox_rows: list[_Doc] = []
        broadcast_rows: list[_Doc] = []
        results: list[Stored] = []
        for new in batch:
            if new.kind == Kind.BROADCAST:
                seq = next_seq[None]
                next_seq[None] += 1
                broadcast_rows.append({"_id": seq, "message_id": new.id, "sender": new.sender})
                results.append(Stored(new.id, {}, seq, new.created_at_ns))
                continue
            seqs: dict[str, int] = {}
            for recipient in dict.fromkeys(new.recipients):
                seqs[recipient] = next_seq[recipient]
                next_seq[recipient] += 1
                inbox_rows.append(
                    {
                        "recipient": recipient,
                        "seq": seqs[recipient],
                        "message_id": new.id,
                        "status": _UNREAD,
                        "sender": new.sender,
                        "kind": int(new.kind),
                    }
                )
            results.append(Stored(new.id, seqs, 0, new.created_at_ns))
        if inbox_rows:
            await self._collection("inbox").insert_many(inbox_rows, session=session)
        if broadcast_rows:
            await self._collection("broadcasts").insert_many(broadcast_rows, session=session)
        return results

    async def _reserve(
        self, session: AsyncClientSession, per_user: Mapping[str, int], broadcasts: int
    ) -> dict[str | None, int]:
        """Move each counter on by its count; returns the first reserved seq of each
        (None: the broadcast stream)."""
        updates: dict[str | None, tuple[Any, _Doc, int]] = {
            user: (user, {"$inc": {"head_seq": n, "unread": n}}, n)
            for user, n in sorted(per_user.items())
        }
        if broadcasts:
            updates[None] = (_BROADCAST_COUNTER, {"$inc": {"head_seq": broadcasts}}, broadcasts)
        if not updates:
            return {}
        counters = self._collection("counters")
        heads: dict[str | None, int] = {}
        if len(updates) == 1:
            [(name, (doc_id, update, _))] = updates.items()
            doc = await counters.find_one_and_update(
                {"_id": doc_id},
                update,
                upsert=True,
                return_document=ReturnDocument.AFTER,
                session=session,
            )
            assert doc is not None
            heads[name] = int(doc["head_seq"])
        else:
            # One round trip for all the increments and one to read them back, whatever the
            # number of recipients; inside the transaction the read sees exactly our writes
            # on top of the snapshot, so the ranges are ours alone.
            await counters.bulk_write(
                [UpdateOne({"_id": d}, u, upsert=True) for d, u, _ in updates.values()],
                session=session,
            )
            ids = [doc_id for doc_id, _, _ in updates.values()]
            async for doc in counters.find({"_id": {"$in": ids}}, session=session):
                heads[doc["_id"] if isinstance(doc["_id"], str) else None] = int(doc["head_seq"])
        return {name: heads[name] - n + 1 for name, (_, _, n) in updates.items()}

    # -- reads -----------------------------------------------------------------------------

    async def heads(self, user: str) -> tuple[int, int]:
        """The user's last inbox seq and the last broadcast seq (0 when empty)."""
        async with self._call():
            user_doc, broadcast_head = await self._counters(user)
            return int(user_doc.get("head_seq", 0)), broadcast_head

    async def inbox_after(self, user: str, after_seq: int, limit: int) -> list[Entry]:
        """Inbox entries with seq > after_seq, oldest first, deleted ones left out."""
        return await self._inbox_page(user, {"$gt": after_seq}, 1, limit, {})

    async def inbox_before(
        self,
        user: str,
        before_seq: int | None,
        limit: int,
        *,
        read: ReadFilter = ReadFilter.ALL,
        sender: str = "",
        kind: Kind | None = None,
    ) -> list[Entry]:
        """Inbox entries with seq < before_seq (None: from the newest), newest first."""
        extra: _Doc = {"status": _inbox_status(read)}
        if sender:
            extra["sender"] = sender
        if kind is not None:
            extra["kind"] = int(kind)
        seq = {"$gt": 0} if before_seq is None else {"$lt": before_seq}
        return await self._inbox_page(user, seq, -1, limit, extra)

    async def _inbox_page(
        self, user: str, seq: _Doc, direction: int, limit: int, extra: _Doc
    ) -> list[Entry]:
        if limit <= 0:  # MongoDB reads limit(0) as "no limit"
            return []
        async with self._call():
            query: _Doc = {"recipient": user, "seq": seq, "status": {"$lt": _DELETED}, **extra}
            cursor = self._collection("inbox").find(query).sort("seq", direction).limit(limit)
            rows = await cursor.to_list()
            messages = await self._messages(row["message_id"] for row in rows)
            # A row whose message is gone is skipped rather than failing the page: only a
            # retention job removing messages ahead of their rows could cause it.
            return [
                _entry(messages[row["message_id"]], row["seq"], row["status"] == _READ, user)
                for row in rows
                if row["message_id"] in messages
            ]

    async def broadcasts_after(self, user: str, after_seq: int, limit: int) -> list[Entry]:
        """Broadcasts with seq > after_seq, oldest first, with the user's read state, without
        those the user deleted."""
        return await self._broadcast_page(user, after_seq, None, limit, ReadFilter.ALL, "")

    async def broadcasts_before(
        self,
        user: str,
        before_seq: int | None,
        limit: int,
        *,
        read: ReadFilter = ReadFilter.ALL,
        sender: str = "",
    ) -> list[Entry]:
        """Broadcasts with seq < before_seq (None: from the newest), newest first, as the user
        sees them (their read state; deleted ones left out)."""
        return await self._broadcast_page(user, None, before_seq, limit, read, sender)

    async def _broadcast_page(
        self,
        user: str,
        after_seq: int | None,
        before_seq: int | None,
        limit: int,
        read: ReadFilter,
        sender: str,
    ) -> list[Entry]:
        """Oldest first after after_seq, or newest first below before_seq (None: the head)."""
        if limit <= 0:
            return []
        async with self._call():
            user_doc, _ = await self._counters(user)
            read_upto = int(user_doc.get("broadcast_read_upto", 0))
            ascending = after_seq is not None
            lower = after_seq or 0
            upper = before_seq
            if read == ReadFilter.UNREAD:
                lower = max(lower, read_upto)
            base: _Doc = {"sender": sender} if sender else {}
            picked: list[tuple[_Doc, bool]] = []
            while len(picked) < limit:
                bounds: _Doc = {"$gt": lower}
                if upper is not None:
                    bounds["$lt"] = upper
                rows = (
                    await self._collection("broadcasts")
                    .find({**base, "_id": bounds})
                    .sort("_id", 1 if ascending else -1)
                    .limit(_BROADCAST_CHUNK)
                    .to_list()
                )
                if not rows:
                    break
                state_cursor = self._collection("broadcast_state").find(
                    {"user": user, "seq": {"$in": [row["_id"] for row in rows]}}
                )
                states = {doc["seq"]: doc["status"] async for doc in state_cursor}
                for row in rows:
                    status = states.get(row["_id"], _READ if row["_id"] <= read_upto else _UNREAD)
                    if status == _DELETED:
                        continue
                    if read != ReadFilter.ALL and (status == _READ) != (read == ReadFilter.READ):
                        continue
                    picked.append((row, status == _READ))
                    if len(picked) == limit:
                        break
                if len(rows) < _BROADCAST_CHUNK:
                    break
                if ascending:
                    lower = rows[-1]["_id"]
                else:
                    upper = rows[-1]["_id"]
            messages = await self._messages(row["message_id"] for row, _ in picked)
            return [
                _entry(messages[row["message_id"]], row["_id"], is_read, "")
                for row, is_read in picked
                if row["message_id"] in messages
            ]

    async def get(self, user: str, message_id: str) -> Entry | None:
        """One message of the user's inbox or of the broadcast stream, unless deleted by them."""
        async with self._call():
            message = await self._collection("messages").find_one({"_id": message_id})
            if message is None:
                return None
            if message["kind"] != Kind.BROADCAST:
                row = await self._collection("inbox").find_one(
                    {"recipient": user, "message_id": message_id, "status": {"$lt": _DELETED}}
                )
                if row is None:
                    return None
                return _entry(message, row["seq"], row["status"] == _READ, user)
            broadcast = await self._collection("broadcasts").find_one({"message_id": message_id})
            if broadcast is None:
                return None
            seq = int(broadcast["_id"])
            user_doc, _ = await self._counters(user)
            state = await self._collection("broadcast_state").find_one({"user": user, "seq": seq})
            if state is not None and state["status"] == _DELETED:
                return None
            is_read = state is not None or seq <= int(user_doc.get("broadcast_read_upto", 0))
            return _entry(message, seq, is_read, "")

    async def unread_count(self, user: str) -> int:
        """Unread messages of the user, broadcasts included."""
        async with self._call():

            async def work(session: AsyncClientSession) -> int:
                user_doc, broadcast_head = await self._counters(user, session)
                return await self._unread_total(
                    user,
                    int(user_doc.get("unread", 0)),
                    broadcast_head,
                    int(user_doc.get("broadcast_read_upto", 0)),
                    session,
                )

            # A read-only transaction: the counter and the state count from one snapshot.
            return await self._transaction(work)

    # -- read state ------------------------------------------------------------------------

    async def mark_read(
        self,
        user: str,
        *,
        ids: Sequence[str] = (),
        up_to_seq: int = 0,
        up_to_broadcast_seq: int = 0,
        everything: bool = False,
    ) -> int:
        """Mark messages read; returns the user's unread count afterwards. Unknown ids are
        ignored. up_to_broadcast_seq beyond the broadcast head counts as the head, so that
        broadcasts sent later are still unread."""
        ids = list(ids)

        async def work(session: AsyncClientSession) -> int:
            user_doc, broadcast_head = await self._counters(user, session)
            inbox_unread = int(user_doc.get("unread", 0))
            read_upto = int(user_doc.get("broadcast_read_upto", 0))

            inbox_filter: _Doc | None = None
            if everything:
                inbox_filter = {"recipient": user, "status": _UNREAD}
            else:
                clauses: list[_Doc] = []
                if ids:
                    clauses.append({"message_id": {"$in": ids}})
                if up_to_seq > 0:
                    clauses.append({"seq": {"$lte": up_to_seq}})
                if clauses:
                    inbox_filter = {"recipient": user, "status": _UNREAD, "$or": clauses}
            newly_read = 0
            if inbox_filter is not None:
                result = await self._collection("inbox").update_many(
                    inbox_filter, {"$set": {"status": _READ}}, session=session
                )
                newly_read = result.modified_count

            target = broadcast_head if everything else min(up_to_broadcast_seq, broadcast_head)
            new_upto = max(read_upto, target)
            update: _Doc = {}
            if newly_read:
                update["$inc"] = {"unread": -newly_read}
            if new_upto > read_upto:
                update["$set"] = {"broadcast_read_upto": new_upto}
            # Written only when something changed: every counter write contends with appends.
            if update:
                await self._collection("counters").update_one(
                    {"_id": user}, update, upsert=True, session=session
                )
            state = self._collection("broadcast_state")
            if new_upto > read_upto:
                # Read marks at or below the new mark say nothing any more; deletes must stay.
                await state.delete_many(
                    {"user": user, "seq": {"$lte": new_upto}, "status": _READ}, session=session
                )
            if ids and not everything:
                cursor = self._collection("broadcasts").find(
                    {"message_id": {"$in": ids}, "_id": {"$gt": new_upto}},
                    {"_id": 1},
                    session=session,
                )
                seqs = [row["_id"] async for row in cursor]
                if seqs:
                    # $setOnInsert: a deleted broadcast stays deleted.
                    await state.bulk_write(
                        [
                            UpdateOne(
                                {"user": user, "seq": seq},
                                {"$setOnInsert": {"status": _READ}},
                                upsert=True,
                            )
                            for seq in seqs
                        ],
                        session=session,
                    )
            return await self._unread_total(
                user, inbox_unread - newly_read, broadcast_head, new_upto, session
            )

        async with self._call():
            return await self._transaction(work)

    async def delete(self, user: str, message_id: str) -> int | None:
        """Delete a message from the user's view; returns the unread count afterwards, or None
        if the user has no such message."""

        async def work(session: AsyncClientSession) -> int | None:
            row = await self._collection("inbox").find_one_and_update(
                {"recipient": user, "message_id": message_id, "status": {"$lt": _DELETED}},
                {"$set": {"status": _DELETED}},
                projection={"status": 1},
                return_document=ReturnDocument.BEFORE,
                session=session,
            )
            user_doc, broadcast_head = await self._counters(user, session)
            inbox_unread = int(user_doc.get("unread", 0))
            read_upto = int(user_doc.get("broadcast_read_upto", 0))
            if row is None:
                broadcast = await self._collection("broadcasts").find_one(
                    {"message_id": message_id}, {"_id": 1}, session=session
                )
                if broadcast is None:
                    return None
                state = self._collection("broadcast_state")
                key = {"user": user, "seq": broadcast["_id"]}
                previous = await state.find_one(key, session=session)
                if previous is not None and previous["status"] == _DELETED:
                    return None
                await state.update_one(
                    key, {"$set": {"status": _DELETED}}, upsert=True, session=session
                )
            elif row["status"] == _UNREAD:
                await self._collection("counters").update_one(
                    {"_id": user}, {"$inc": {"unread": -1}}, session=session
                )
                inbox_unread -= 1
            return await self._unread_total(user, inbox_unread, broadcast_head, read_upto, session)

        async with self._call():
            return await self._transaction(work)
