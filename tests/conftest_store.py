"""Fixtures for the stores: the same contract runs against SQLite, MongoDB (the real pymongo
driver over the wire to a secantusdb server) and the in-memory fake."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from node.store.base import Store

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB-compatible server (secantusdb, in this process, on a free port)."""
    from secantus import SecantusDBServer

    path = tmp_path_factory.mktemp("secantus")
    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=str(path))
    server.start()
    try:
        uri = server.uri
        yield uri + ("&" if "?" in uri else "?") + "directConnection=true"
    finally:
        server.stop()


def make_store(kind: str, tmp_path: Path, mongo_uri: str | None = None) -> Store:
    """A store of the given kind on fresh storage."""
    if kind == "memory":
        from node.store.memory import MemoryStore

        return MemoryStore()
    if kind == "sqlite":
        from node.store.sqlite import SqliteStore

        return SqliteStore(str(tmp_path / "pigeon.db"))
    if kind == "mongodb":
        from node.store.mongo import MongoStore

        assert mongo_uri is not None
        return MongoStore(mongo_uri, f"pigeon_test_{next(_databases)}")
    raise ValueError(kind)


@contextlib.asynccontextmanager
async def opened_store(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path
) -> AsyncIterator[Store]:
    """An opened store of the given kind (starting secantusdb if needed), closed afterwards."""
    uri = request.getfixturevalue("mongo_uri") if kind == "mongodb" else None
    store = make_store(kind, tmp_path, uri)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["memory", "sqlite", "mongodb"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened store of each kind, closed afterwards."""
    async with opened_store(request, request.param, tmp_path) as opened:
        yield opened


@pytest.fixture(params=["sqlite", "mongodb"])
async def durable_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened store of each production kind, closed afterwards."""
    async with opened_store(request, request.param, tmp_path) as opened:
        yield opened
