"""The embedded Store: one SQLite file in WAL mode, shared safely by several node processes.

All SQLite work runs off the event loop on two threads, each with its own connection: one writer
(every write is one ``BEGIN IMMEDIATE`` transaction, so writers in other processes queue behind
it instead of interleaving) and one reader (WAL lets it read a consistent snapshot while the
writer commits). Each thread is a one-worker executor, so calls on it run in the order they were
made and ``close`` can wait for them simply by queueing behind them.

Schema (``user_version`` 1):

- ``messages``: one row per stored message, the broadcast ones included.
- ``inbox``: (recipient, seq) → message id and status (0 unread, 1 read, 2 deleted).
- ``counters``: per user, the inbox head seq, the exact number of unread inbox rows (so the unread
  count never scans the inbox) and ``broadcast_read_upto``, below which every broadcast is read.
- ``broadcasts``: the broadcast stream, seq → message id.
- ``meta``: facts about the store itself: ``store_id``, made when the file was created.
- ``broadcast_state``: a user's individual state of one broadcast: status 1 (read) only above
  their ``broadcast_read_upto`` (rows at or below it are pruned as redundant when it moves up),
  status 2 (deleted) at any seq, since a delete must outlive "mark everything read".

A user's unread count is then ``counters.unread`` + (broadcast head - ``broadcast_read_upto``
- their ``broadcast_state`` rows above ``broadcast_read_upto``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from json.encoder import encode_basestring as _json_string
from typing import Any, Final, TypeVar

from node.store.base import Entry, Kind, NewMessage, ReadFilter, Stored, StoreError
from pigeon.runtime import cancel_and_wait

__all__ = ["SqliteStore"]

_T = TypeVar("_T")

_SCHEMA_VERSION: Final = 1
_UNREAD: Final = 0
_READ: Final = 1
_DELETED: Final = 2
log = logging.getLogger("pigeon.node.sqlite")

# Well under SQLITE_MAX_VARIABLE_NUMBER (32766 since 3.32), and small enough that one statement
# per chunk costs nothing next to the rows it touches.
_IN_CHUNK: Final = 500
# Rows per counters upsert: 3 parameters each, well under SQLite's 32,766.
_UPSERT_ROWS: Final = 500
# Checkpoints run beside the writer (see SqliteStore._checkpoints); the writer checkpoints
# itself only if the WAL outgrows this, i.e. if those fall far behind.
_WAL_AUTOCHECKPOINT_PAGES: Final = 16000
CHECKPOINT_INTERVAL: Final = 0.5

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    kind INTEGER NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at_ns INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
    ON messages (sender, idempotency_key) WHERE idempotency_key != '';
CREATE TABLE IF NOT EXISTS inbox (
    recipient TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (recipient, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_status ON inbox (recipient, status, seq);
CREATE INDEX IF NOT EXISTS inbox_message ON inbox (recipient, message_id);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    user TEXT PRIMARY KEY,
    head_seq INTEGER NOT NULL DEFAULT 0,
    unread INTEGER NOT NULL DEFAULT 0,
    broadcast_read_upto INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS broadcasts (
    seq INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS broadcast_state (
    user TEXT NOT NULL,
    seq INTEGER NOT NULL,
    status INTEGER NOT NULL,
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;
"""

_MESSAGE_COLUMNS: Final = "m.id, m.sender, m.kind, m.title, m.body, m.metadata, m.created_at_ns"

# A broadcast's status as one user sees it; needs the parameter :upto (their broadcast_read_upto)
# and a LEFT JOIN of broadcast_state as s.
_BROADCAST_STATUS: Final = (
    "CASE WHEN s.status IS NOT NULL THEN s.status WHEN b.seq <= :upto THEN 1 ELSE 0 END"
)

_BROADCAST_SELECT: Final = f"""
SELECT {_MESSAGE_COLUMNS}, b.seq, {_BROADCAST_STATUS} AS status
FROM broadcasts AS b
JOIN messages AS m ON m.id = b.message_id
LEFT JOIN broadcast_state AS s ON s.user = :user AND s.seq = b.seq
"""


def _inbox_select(index: str = "") -> str:
    # The planner's choice follows ANALYZE statistics, which average over all users; the index
    # is named where one query shape has a clearly best access path whatever the statistics say
    # (a user with 100,000 read messages and 3 unread ones must not scan the 100,000).
    indexed_by = f"INDEXED BY {index}" if index else ""
    return (
        f"SELECT {_MESSAGE_COLUMNS}, i.seq, i.status FROM inbox AS i {indexed_by}"
        " JOIN messages AS m ON m.id = i.message_id"
    )


_INBOX_SELECT: Final = _inbox_select()
_INBOX_BY_STATUS: Final = _inbox_select("inbox_status")
_INBOX_BY_MESSAGE: Final = _inbox_select("inbox_message")


class SqliteStore:
    """The Store on one SQLite file (WAL mode), safe to share between node processes.

    Args:
        path: the database file; created with its schema on ``open`` if missing.
        busy_timeout: seconds a write waits for another process's write transaction on the same
            file before it fails with StoreError.
        synchronous: "full" (the default) syncs the WAL at every commit, so an acknowledged
            message survives a power loss; "normal" syncs at checkpoints only (survives any
            process crash, but the last commits before a power loss can roll back).
    """

    def __init__(self, path: str, *, busy_timeout: float = 10.0, synchronous: str = "full") -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be full or normal, not {synchronous!r}")
        self._path = path
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._checkpointer: concurrent.futures.ThreadPoolExecutor | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._store_id = ""

    @property
    def store_id(self) -> str:
        return self._store_id

    # -- life cycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file, switch it to WAL and create the schema and indexes if missing."""
        if self._writer is not None:
            raise StoreError(f"SQLite store {self._path!r} is already open")
        writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pigeon-sqlite-w")
        reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pigeon-sqlite-r")
        checkpointer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="pigeon-sqlite-c"
        )
        loop = asyncio.get_running_loop()
        try:
            self._write_conn = await loop.run_in_executor(writer, self._open_writer)
            self._read_conn = await loop.run_in_executor(reader, self._open_reader)
            self._checkpoint_conn = await loop.run_in_executor(checkpointer, self._connect)
        except BaseException:
            await loop.run_in_executor(writer, self._close_connection, self._write_conn)
            await loop.run_in_executor(reader, self._close_connection, self._read_conn)
            for executor in (writer, reader, checkpointer):
                executor.shutdown()
            self._write_conn = self._read_conn = None
            raise
        self._writer, self._reader, self._checkpointer = writer, reader, checkpointer
        self._checkpoint_task = asyncio.create_task(
            self._checkpoints(checkpointer, self._checkpoint_conn), name="sqlite-checkpoints"
        )

    async def _checkpoints(
        self, executor: concurrent.futures.ThreadPoolExecutor, conn: sqlite3.Connection
    ) -> None:
        """Copy the WAL into the database every CHECKPOINT_INTERVAL s, on a connection of its own.

        Left to the writer, a checkpoint (two fsyncs, thousands of pages) ran inside the commit
        that crossed the threshold: one send in a hundred waited 10-25 ms more. A PASSIVE
        checkpoint here takes no lock the writer needs, so commits go on meanwhile.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            try:
                await loop.run_in_executor(executor, _checkpoint, conn)
            except sqlite3.Error as exc:
                # The writer's own (larger) threshold still bounds the WAL; try again later.
                log.warning("SQLite checkpoint of %r failed: %s", self._path, exc)

    async def close(self) -> None:
        """Finish every call already made, then close both connections and threads."""
        writer, reader, checkpointer = self._writer, self._reader, self._checkpointer
        if writer is None or reader is None or checkpointer is None:
            return
        # From here on new calls fail fast; calls already queued still run, because the close
        # jobs below queue behind them on the same one-worker executors.
        self._writer = self._reader = self._checkpointer = None
        if self._checkpoint_task is not None:
            await cancel_and_wait(self._checkpoint_task)
            self._checkpoint_task = None
        loop = asyncio.get_running_loop()
        try:
            # The checkpoint connection first: the writer's close, as the last connection,
            # checkpoints what is left and removes the WAL.
            await loop.run_in_executor(checkpointer, self._close_connection, self._checkpoint_conn)
            await asyncio.gather(
                loop.run_in_executor(writer, self._close_writer, self._write_conn),
                loop.run_in_executor(reader, self._close_connection, self._read_conn),
            )
        finally:
            self._write_conn = self._read_conn = self._checkpoint_conn = None
            # The queues are empty now, so this only joins idle threads.
            for executor in (writer, reader, checkpointer):
                executor.shutdown()

    def _connect(self) -> sqlite3.Connection:
        try:
            # timeout is SQLite's busy_timeout: a call that finds another process (another node
            # on the same file) holding the write lock waits for it instead of failing at once.
            # isolation_level=None: the module must not open transactions behind our back; every
            # transaction here is an explicit BEGIN ... COMMIT. The same-thread check stays on:
            # each connection lives and dies on its executor's one thread.
            return sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self._path!r}: {exc}") from exc

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            mode = self._wal(conn)
            if str(mode).lower() != "wal":
                # An in-memory or otherwise WAL-less database would give the reader connection
                # a different (or a blocked) view of the data.
                raise StoreError(
                    f"SQLite store {self._path!r} cannot use WAL (journal mode {mode!r}); "
                    "give it a file on a local disk"
                )
            # "Acknowledged means durable": FULL syncs the WAL at every commit (one fsync per
            # group commit, not per message). NORMAL, if chosen, survives any process crash but
            # may lose the last commits on a power loss.
            conn.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
            # A batch of messages to many users dirties a page per user in each inbox index, so
            # a commit writes hundreds of pages to the WAL; at the default of 1,000 pages a
            # checkpoint (two fsyncs) ran every few commits and took half the append time.
            # 4,000 pages (16 MB of WAL) measured about 1.5x the append throughput here.
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > _SCHEMA_VERSION:
                    raise StoreError(
                        f"SQLite store {self._path!r} has schema version {version}; this Pigeon "
                        f"knows up to {_SCHEMA_VERSION}"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)",
                    (uuid.uuid4().hex,),
                )
                row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
                self._store_id = str(row[0])
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot create the schema in {self._path!r}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _wal(self, conn: sqlite3.Connection) -> str:
        """Switch the file to WAL; returns the journal mode it has then."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                # Two processes (nodes) switching a new file at once: SQLite answers the second
                # BUSY at once, without its busy handler (waiting there could deadlock), so it
                # waits its turn here.
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _open_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            # A guard: a write through this connection would bypass the writer's serialization.
            conn.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot configure SQLite store {self._path!r}: {exc}") from exc
        return conn

    @staticmethod
    def _close_connection(conn: sqlite3.Connection | None) -> None:
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    @staticmethod
    def _close_writer(conn: sqlite3.Connection | None) -> None:
        if conn is not None:
            # Lets SQLite refresh the planner statistics it finds stale; cheap when none are.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA optimize")
        SqliteStore._close_connection(conn)

    # -- running work ---------------------------------------------------------------------------

    async def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` in one write transaction on the writer thread."""
        executor, conn = self._writer, self._write_conn
        if executor is None or conn is None:
            raise StoreError(f"SQLite store {self._path!r} is not open")

        def run() -> _T:
            try:
                # IMMEDIATE takes the write lock up front, so a writer in another process waits
                # (busy_timeout) here rather than failing later on a stale read snapshot, and
                # the counters read in this transaction cannot change before it commits.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite write to {self._path!r} failed: {exc}") from exc
            return result

        return await asyncio.get_running_loop().run_in_executor(executor, run)

    async def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` in one read transaction (one snapshot) on the reader thread."""
        executor, conn = self._reader, self._read_conn
        if executor is None or conn is None:
            raise StoreError(f"SQLite store {self._path!r} is not open")

        def run() -> _T:
            try:
                conn.execute("BEGIN")
                try:
                    return work(conn)
                finally:
                    _rollback(conn)
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite read from {self._path!r} failed: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(executor, run)

    # -- writes ---------------------------------------------------------------------------------

    async def append(self, batch: Sequence[NewMessage]) -> list[Stored]:
        """Store a batch in one transaction, assigning seqs; see Store.append."""
        if not batch:
            return []
        return await self._write(lambda conn: _append(conn, batch))

    async def mark_read(
        self,
        user: str,
        *,
        ids: Sequence[str] = (),
        up_to_seq: int = 0,
        up_to_broadcast_seq: int = 0,
        everything: bool = False,
    ) -> int:
        """Mark messages read and return the unread count; see Store.mark_read."""
        ids = list(dict.fromkeys(ids))
        return await self._write(
            lambda conn: _mark_read(conn, user, ids, up_to_seq, up_to_broadcast_seq, everything)
        )

    async def delete(self, user: str, message_id: str) -> int | None:
        """Delete a message from the user's view; see Store.delete."""
        return await self._write(lambda conn: _delete(conn, user, message_id))

    # -- reads ----------------------------------------------------------------------------------

    async def heads(self, user: str) -> tuple[int, int]:
        """The user's last inbox seq and the last broadcast seq (0 when empty)."""

        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute(
                "SELECT (SELECT head_seq FROM counters WHERE user = ?),"
                " (SELECT max(seq) FROM broadcasts)",
                (user,),
            ).fetchone()
            return int(row[0] or 0), int(row[1] or 0)

        return await self._read(work)

    async def unread_count(self, user: str) -> int:
        """Unread messages of the user, broadcasts included."""
        return await self._read(lambda conn: _unread_count(conn, user))

    async def inbox_after(self, user: str, after_seq: int, limit: int) -> list[Entry]:
        """Inbox entries with seq > after_seq, oldest first, deleted ones left out."""

        def work(conn: sqlite3.Connection) -> list[Entry]:
            rows = conn.execute(
                f"{_INBOX_SELECT} WHERE i.recipient = ? AND i.seq > ? AND i.status != 2"
                " ORDER BY i.seq LIMIT ?",
                (user, after_seq, limit),
            )
            return [_entry(row, user) for row in rows]

        return await self._read(work) if limit > 0 else []

    async def broadcasts_after(self, user: str, after_seq: int, limit: int) -> list[Entry]:
        """Broadcasts with seq > after_seq, oldest first, with the user's read state, without
        those the user deleted."""

        def work(conn: sqlite3.Connection) -> list[Entry]:
            params = {"user": user, "upto": _read_upto(conn, user), "after": after_seq}
            rows = conn.execute(
                f"{_BROADCAST_SELECT} WHERE b.seq > :after AND {_BROADCAST_STATUS} != 2"
                " ORDER BY b.seq LIMIT :limit",
                {**params, "limit": limit},
            )
            return [_entry(row, "") for row in rows]

        return await self._read(work) if limit > 0 else []

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
        select = _INBOX_BY_STATUS
        where = ["i.recipient = :user"]
        if read == ReadFilter.UNREAD:
            where.append("i.status = 0")
        elif read == ReadFilter.READ:
            where.append("i.status = 1")
        else:
            select = _INBOX_SELECT
            where.append("i.status != 2")
        if before_seq is not None:
            where.append("i.seq < :before")
        if sender:
            where.append("m.sender = :sender")
        if kind is not None:
            where.append("m.kind = :kind")
        sql = f"{select} WHERE {' AND '.join(where)} ORDER BY i.seq DESC LIMIT :limit"
        params = {
            "user": user,
            "before": before_seq,
            "sender": sender,
            "kind": None if kind is None else int(kind),
            "limit": limit,
        }

        def work(conn: sqlite3.Connection) -> list[Entry]:
            return [_entry(row, user) for row in conn.execute(sql, params)]

        return await self._read(work) if limit > 0 else []

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
        if read == ReadFilter.UNREAD:
            # Unread broadcasts all lie above read_upto: say so, and the scan starts there.
            where = ["b.seq > :upto", "s.status IS NULL"]
        elif read == ReadFilter.READ:
            where = [f"{_BROADCAST_STATUS} = 1"]
        else:
            where = [f"{_BROADCAST_STATUS} != 2"]
        if before_seq is not None:
            where.append("b.seq < :before")
        if sender:
            where.append("m.sender = :sender")
        sql = f"{_BROADCAST_SELECT} WHERE {' AND '.join(where)} ORDER BY b.seq DESC LIMIT :limit"

        def work(conn: sqlite3.Connection) -> list[Entry]:
            params = {
                "user": user,
                "upto": _read_upto(conn, user),
                "before": before_seq,
                "sender": sender,
                "limit": limit,
            }
            return [_entry(row, "") for row in conn.execute(sql, params)]

        return await self._read(work) if limit > 0 else []

    async def get(self, user: str, message_id: str) -> Entry | None:
        """One message of the user's inbox or of the broadcast stream, unless deleted by them."""

        def work(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(
                f"{_INBOX_BY_MESSAGE} WHERE i.recipient = ? AND i.message_id = ? AND i.status != 2",
                (user, message_id),
            ).fetchone()
            if row is not None:
                return _entry(row, user)
            params = {"user": user, "upto": _read_upto(conn, user), "id": message_id}
            row = conn.execute(f"{_BROADCAST_SELECT} WHERE b.message_id = :id", params).fetchone()
            if row is None or row[8] == _DELETED:
                return None
            return _entry(row, "")

        return await self._read(work)


# -- the work itself, run on the store's threads ---------------------------------------------------


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _rollback(conn: sqlite3.Connection) -> None:
    # A failed statement may already have ended the transaction (SQLite rolls back by itself on
    # some errors), and a failing ROLLBACK must not hide the error that caused it.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def _encode_metadata(metadata: Mapping[str, str]) -> str:
    """A flat JSON object of strings; what json.dumps(ensure_ascii=False) writes, at a third of
    its cost per call (it sets up an encoder each time, and this runs once per message)."""
    if not metadata:
        return "{}"
    return (
        "{" + ",".join([_json_string(k) + ":" + _json_string(v) for k, v in metadata.items()]) + "}"
    )


def _entry(row: Any, recipient: str) -> Entry:
    """An Entry from a row of _MESSAGE_COLUMNS, seq, status."""
    metadata = row[5]
    return Entry(
        id=row[0],
        seq=row[7],
        sender=row[1],
        kind=Kind(row[2]),
        title=row[3],
        body=row[4],
        metadata={} if metadata == "{}" else json.loads(metadata),
        created_at_ns=row[6],
        read=row[8] == _READ,
        recipient=recipient,
    )


def _append(conn: sqlite3.Connection, batch: Sequence[NewMessage]) -> list[Stored]:
    results: list[Stored | None] = [None] * len(batch)
    # (sender, key) → (id, created_at_ns) of the first message with it, in the DB or this batch.
    firsts: dict[tuple[str, str], tuple[str, int]] = {}
    fresh: list[tuple[int, NewMessage, tuple[str, ...]]] = []
    per_recipient: dict[str, int] = {}
    broadcasts = 0
    for index, new in enumerate(batch):
        if new.idempotency_key:
            key = (new.sender, new.idempotency_key)
            first = firsts.get(key)
            if first is None:
                # The `!= ''` repeats the partial index's condition: without it SQLite cannot
                # prove the index applies to a bound parameter and scans the whole table.
                row = conn.execute(
                    "SELECT id, created_at_ns FROM messages"
                    " WHERE sender = ? AND idempotency_key = ? AND idempotency_key != ''",
                    key,
                ).fetchone()
                if row is None:
                    firsts[key] = (new.id, new.created_at_ns)
                else:
                    first = (row[0], row[1])
                    firsts[key] = first
            if first is not None:
                results[index] = Stored(first[0], {}, 0, first[1], duplicate=True)
                continue
        if new.kind == Kind.BROADCAST:
            recipients: tuple[str, ...] = ()
            broadcasts += 1
        else:
            # Distinct by contract; deduplicating is cheap insurance against a broken caller
            # giving one user two seqs for one message.
            recipients = tuple(dict.fromkeys(new.recipients))
            for recipient in recipients:
                per_recipient[recipient] = per_recipient.get(recipient, 0) + 1
        fresh.append((index, new, recipients))

    # The broadcast head once this batch is in: recipients' unread counts include it.
    broadcast_seq = _broadcast_head(conn) if broadcasts or per_recipient else 0
    head_after = broadcast_seq + broadcasts
    # Reserve each recipient's seqs with multi-row upserts: this transaction holds the write
    # lock, so the head_seq they return is the only truth, across processes too. They return
    # each recipient's unread count as of this commit as well, so the node pushes it with the
    # messages instead of reading it again later.
    next_seq: dict[str, int] = {}
    unread: dict[str, int] = {}
    reserved = list(per_recipient.items())
    for start in range(0, len(reserved), _UPSERT_ROWS):
        chunk = reserved[start : start + _UPSERT_ROWS]
        params: list[str | int] = []
        for recipient, count in chunk:
            params += (recipient, count, count)
        params.append(head_after)
        for user, head, count_unread in conn.execute(_upsert_counters(len(chunk)), params):
            next_seq[user] = head - per_recipient[user] + 1
            unread[user] = count_unread

    message_rows = []
    inbox_rows = []
    broadcast_rows = []
    for index, new, recipients in fresh:
        message_rows.append(
            (
                new.id,
                new.sender,
                int(new.kind),
                new.title,
                new.body,
                _encode_metadata(new.metadata),
                new.created_at_ns,
                new.idempotency_key,
            )
        )
        seqs: dict[str, int] = {}
        this_broadcast = 0
        if new.kind == Kind.BROADCAST:
            broadcast_seq += 1
            this_broadcast = broadcast_seq
            broadcast_rows.append((broadcast_seq, new.id))
        for recipient in recipients:
            seq = next_seq[recipient]
            next_seq[recipient] = seq + 1
            seqs[recipient] = seq
            inbox_rows.append((recipient, seq, new.id))
        results[index] = Stored(
            new.id,
            seqs,
            this_broadcast,
            new.created_at_ns,
            unread={recipient: unread[recipient] for recipient in recipients},
        )

    conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)", message_rows)
    if inbox_rows:
        conn.executemany(
            "INSERT INTO inbox (recipient, seq, message_id, status) VALUES (?, ?, ?, 0)",
            inbox_rows,
        )
    if broadcast_rows:
        conn.executemany("INSERT INTO broadcasts (seq, message_id) VALUES (?, ?)", broadcast_rows)
    return [stored for stored in results if stored is not None]


def _read_upto(conn: sqlite3.Connection, user: str) -> int:
    row = conn.execute(
        "SELECT broadcast_read_upto FROM counters WHERE user = ?", (user,)
    ).fetchone()
    return 0 if row is None else int(row[0])


# A user's unread count from their counters row, given the broadcast head (a parameter): unread
# inbox messages, plus broadcasts above their read mark less those read one by one.
_UNREAD_OF_ROW: Final = (
    "unread + ? - broadcast_read_upto - (SELECT count(*) FROM broadcast_state AS s"
    " WHERE s.user = counters.user AND s.seq > counters.broadcast_read_upto)"
)


@functools.cache
def _upsert_counters(rows: int) -> str:
    """Adds (user, n, n) rows to head_seq and unread; returns each user's new head_seq and unread
    count given the broadcast head (the last parameter)."""
    return (
        "INSERT INTO counters (user, head_seq, unread) VALUES "
        + ", ".join(["(?, ?, ?)"] * rows)
        + " ON CONFLICT (user) DO UPDATE SET head_seq = head_seq + excluded.head_seq,"
        " unread = unread + excluded.unread"
        f" RETURNING user, head_seq, {_UNREAD_OF_ROW}"
    )


def _broadcast_head(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM broadcasts").fetchone()[0])


def _unread_count(conn: sqlite3.Connection, user: str) -> int:
    head = _broadcast_head(conn)
    row = conn.execute(
        f"SELECT {_UNREAD_OF_ROW} FROM counters WHERE user = ?", (head, user)
    ).fetchone()
    # Without a row the user has read nothing and been sent nothing but the broadcasts.
    return head if row is None else int(row[0])


def _mark_read(
    conn: sqlite3.Connection,
    user: str,
    ids: Sequence[str],
    up_to_seq: int,
    up_to_broadcast_seq: int,
    everything: bool,
) -> int:
    conn.execute("INSERT OR IGNORE INTO counters (user) VALUES (?)", (user,))
    newly_read = 0
    if everything:
        newly_read += conn.execute(
            "UPDATE inbox INDEXED BY inbox_status SET status = 1"
            " WHERE recipient = ? AND status = 0",
            (user,),
        ).rowcount
    else:
        if up_to_seq > 0:
            newly_read += conn.execute(
                "UPDATE inbox INDEXED BY inbox_status SET status = 1"
                " WHERE recipient = ? AND status = 0 AND seq <= ?",
                (user, up_to_seq),
            ).rowcount
        for chunk in _chunks(ids):
            newly_read += conn.execute(
                "UPDATE inbox INDEXED BY inbox_message SET status = 1"
                " WHERE recipient = ? AND status = 0"
                f" AND message_id IN ({','.join('?' * len(chunk))})",
                (user, *chunk),
            ).rowcount
    if newly_read:
        conn.execute("UPDATE counters SET unread = unread - ? WHERE user = ?", (newly_read, user))

    upto = _read_upto(conn, user)
    if everything or up_to_broadcast_seq > upto:
        head = conn.execute("SELECT coalesce(max(seq), 0) FROM broadcasts").fetchone()[0]
        # Never past the head: a broadcast sent later must arrive unread.
        target = head if everything else min(up_to_broadcast_seq, head)
        if target > upto:
            upto = target
            conn.execute("UPDATE counters SET broadcast_read_upto = ? WHERE user = ?", (upto, user))
            # Read marks at or below read_upto say nothing new; deletes stay (they hide).
            conn.execute(
                "DELETE FROM broadcast_state WHERE user = ? AND seq <= ? AND status = 1",
                (user, upto),
            )
    for chunk in _chunks(ids):
        # Only above read_upto, and never over an existing row (read already, or deleted).
        conn.execute(
            "INSERT OR IGNORE INTO broadcast_state (user, seq, status)"
            " SELECT ?, seq, 1 FROM broadcasts"
            f" WHERE seq > ? AND message_id IN ({','.join('?' * len(chunk))})",
            (user, upto, *chunk),
        )
    return _unread_count(conn, user)


def _delete(conn: sqlite3.Connection, user: str, message_id: str) -> int | None:
    row = conn.execute(
        "SELECT seq, status FROM inbox INDEXED BY inbox_message"
        " WHERE recipient = ? AND message_id = ?",
        (user, message_id),
    ).fetchone()
    if row is not None:
        seq, status = row
        if status == _DELETED:
            return None
        conn.execute("UPDATE inbox SET status = 2 WHERE recipient = ? AND seq = ?", (user, seq))
        if status == _UNREAD:
            conn.execute("UPDATE counters SET unread = unread - 1 WHERE user = ?", (user,))
        return _unread_count(conn, user)

    row = conn.execute("SELECT seq FROM broadcasts WHERE message_id = ?", (message_id,)).fetchone()
    if row is None:
        return None
    seq = row[0]
    state = conn.execute(
        "SELECT status FROM broadcast_state WHERE user = ? AND seq = ?", (user, seq)
    ).fetchone()
    if state is not None and state[0] == _DELETED:
        return None
    # _unread_count takes a user without a counters row to have acted on no broadcast.
    conn.execute("INSERT OR IGNORE INTO counters (user) VALUES (?)", (user,))
    conn.execute(
        "INSERT INTO broadcast_state (user, seq, status) VALUES (?, ?, 2)"
        " ON CONFLICT (user, seq) DO UPDATE SET status = 2",
        (user, seq),
    )
    return _unread_count(conn, user)
