"""etcd with credentials: TLS with client certificates and user/password authentication, against
a real etcd started with ``--client-cert-auth``, auth enabled and a 5 s auth-token TTL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from pigeon.auth import mint_user_token
from pigeon.config import CommonConfig
from pigeon.errors import ConfigError
from pigeon.etcd_client import EtcdClient
from pigeon.local import LocalCluster
from pigeon.registry import (
    EtcdCredentials,
    PrefixWatch,
    Registration,
    RegistryCredentialsError,
)
from pigeon.v1 import gate_pb2, gate_pb2_grpc
from tests.certs import make_mutual_tls
from tests.conftest_etcd import SECURE_ETCD_TOKEN_TTL, SecureEtcd
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/pigeon/nodes/"
KEY = PREFIX + "n1"


def _deleted_tokens(secure: SecureEtcd) -> list[str]:
    """The tokens of ``secure.user`` that etcd has dropped (unused past their TTL)."""
    lines = secure.server.log_path.read_text(errors="replace").splitlines()
    return [
        line
        for line in lines
        if "deleted a simple token" in line and f'"user-name":"{secure.user}"' in line
    ]


async def _wait_for_expired_tokens(secure: SecureEtcd, count: int) -> None:
    """Wait until etcd has dropped ``count`` of the user's tokens (an unused token goes after
    the TTL, checked every second)."""
    await wait_until(
        lambda: len(_deleted_tokens(secure)) >= count,
        SECURE_ETCD_TOKEN_TTL + 10,
        "etcd to drop the auth tokens",
    )


async def test_a_registration_over_tls_with_a_client_certificate_is_seen_by_a_watch(
    secure_etcd: SecureEtcd,
) -> None:
    # The certificate alone: etcd takes its common name as the user.
    credentials = secure_etcd.credentials(user="", password="")
    async with (
        Registration(
            [secure_etcd.server.endpoint], KEY, b"v1", credentials=credentials
        ) as registration,
        PrefixWatch([secure_etcd.server.endpoint], PREFIX, credentials=credentials) as watch,
    ):
        await watch.wait_for(lambda view: view.get(KEY) == b"v1", timeout=10)
        await wait_until(lambda: watch.connected, 10, "the watch to be established")
        assert await registration.update(b"v2") is True
        await watch.wait_for(lambda view: view.get(KEY) == b"v2", timeout=10)


async def test_registration_and_watch_keep_working_across_an_auth_token_expiry(
    secure_etcd: SecureEtcd,
) -> None:
    endpoints = [secure_etcd.server.endpoint]
    credentials = secure_etcd.credentials()
    # A 30 s lease is refreshed every 10 s, so both clients' tokens go unused past their TTL.
    async with (
        Registration(endpoints, KEY, b"v1", ttl=30, credentials=credentials) as registration,
        PrefixWatch(endpoints, PREFIX, credentials=credentials) as watch,
    ):
        await watch.wait_for(lambda view: view.get(KEY) == b"v1", timeout=10)
        await _wait_for_expired_tokens(secure_etcd, 2)

        # A write after the expiry: etcd refuses the old token, the client authenticates again.
        assert await registration.update(b"v2") is True
        # The watch opened before the expiry still delivers.
        await watch.wait_for(lambda view: view.get(KEY) == b"v2", timeout=10)

        # Another registration joins and the watch sees it; the first one's lease is kept alive.
        async with Registration(endpoints, PREFIX + "n2", b"two", credentials=credentials):
            await watch.wait_for(lambda view: view.get(PREFIX + "n2") == b"two", timeout=10)
        await watch.wait_for(lambda view: PREFIX + "n2" not in view, timeout=10)
        assert registration.registered

        # etcd forgets every token when it restarts: the watch resumes, renewing its token.
        secure_etcd.server.kill()
        secure_etcd.server.start()
        async with Registration(endpoints, PREFIX + "n3", b"three", credentials=credentials):
            await watch.wait_for(lambda view: view.get(PREFIX + "n3") == b"three", timeout=15)
        assert await registration.update(b"v3") is True
        await watch.wait_for(lambda view: view.get(KEY) == b"v3", timeout=10)


async def test_a_watch_created_after_the_token_expired_still_delivers(
    secure_etcd: SecureEtcd,
) -> None:
    host, port = secure_etcd.server.endpoint.rsplit(":", 1)
    client = EtcdClient(host, int(port), credentials=secure_etcd.credentials(), timeout=3)
    writer = EtcdClient(host, int(port), credentials=secure_etcd.credentials(), timeout=3)
    try:
        await client.get_prefix(PREFIX.encode())
        await _wait_for_expired_tokens(secure_etcd, 1)
        # etcd answers a watch on an expired token with a cancelled watch, not an error; aetcd
        # alone took that for a live watch that never delivered anything.
        watch = await client.watch_prefix(PREFIX.encode())
        await writer.put(KEY.encode(), b"after expiry")
        async with asyncio.timeout(10):
            event = await anext(aiter(watch))
        assert bytes(event.kv.value) == b"after expiry"
        await watch.cancel()
        assert client.authentications == 2  # renewed once, not in a loop
    finally:
        await client.close()
        await writer.close()


async def test_a_refused_password_is_a_clear_error_not_a_retry_loop(
    secure_etcd: SecureEtcd,
) -> None:
    host, port = secure_etcd.server.endpoint.rsplit(":", 1)
    client = EtcdClient(
        host, int(port), credentials=secure_etcd.credentials(password="wrong"), timeout=3
    )
    try:
        with pytest.raises(Exception, match="authentication failed"):
            await client.get(b"/pigeon/x")
        assert client.authentications == 0
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong CA", "TLS handshake with etcd failed"),
        ("no client certificate", "TLS handshake with etcd failed"),
        ("wrong password", "etcd refused etcd_user/etcd_password"),
        ("plaintext", None),
    ],
)
async def test_credentials_etcd_refuses_are_a_clear_start_up_error(
    secure_etcd: SecureEtcd, tmp_path: Path, case: str, expected: str | None
) -> None:
    other = make_mutual_tls(tmp_path / "other-ca")
    credentials = {
        "wrong CA": secure_etcd.credentials(ca=str(other.ca)),
        "no client certificate": secure_etcd.credentials(cert="", key=""),
        "wrong password": secure_etcd.credentials(password="not-the-password"),
        "plaintext": EtcdCredentials(),
    }[case]
    endpoints = [secure_etcd.server.endpoint]
    started = time.monotonic()
    async with asyncio.timeout(15):
        if expected is None:
            # Indistinguishable from etcd being away: registering fails, the watch waits.
            with pytest.raises(Exception, match="cannot register") as refused:
                async with Registration(endpoints, KEY, b"v", credentials=credentials):
                    pass
            assert not isinstance(refused.value, RegistryCredentialsError)
            return
        with pytest.raises(RegistryCredentialsError, match=expected) as refused:
            async with Registration(endpoints, KEY, b"v", credentials=credentials):
                pass
        assert "etcd refused the credentials" in str(refused.value)
        with pytest.raises(RegistryCredentialsError, match=expected):
            async with PrefixWatch(endpoints, PREFIX, credentials=credentials):
                pass
    assert time.monotonic() - started < 10


def _service_env(secure: SecureEtcd, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    return {
        **env,
        **secure.env(),
        "PIGEON_CLUSTER_SECRET": "s" * 32,
        "PIGEON_JWT_SECRET": "j" * 32,
        "PIGEON_PORT": "0",
        "PIGEON_HTTP_PORT": "0",
        **overrides,
    }


def test_a_gate_with_a_wrong_etcd_password_refuses_to_start(secure_etcd: SecureEtcd) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gate"],
        env=_service_env(secure_etcd, PIGEON_ETCD_PASSWORD="not-the-password"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "cannot start" in done.stderr
    assert "etcd refused the credentials" in done.stderr
    assert "etcd_user/etcd_password" in done.stderr
    assert "not-the-password" not in done.stderr


def test_etcd_settings_that_go_in_pairs_and_files_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="etcd_cert is set but etcd_key is not") as half:
        CommonConfig(cluster_secret="s", etcd_cert=str(tmp_path))
    assert half.value.metadata["key"] == "etcd_key"
    with pytest.raises(ConfigError, match="etcd_password is set but etcd_user is not"):
        CommonConfig(cluster_secret="s", etcd_password="pw")
    with pytest.raises(ConfigError, match=r"bad value for etcd_ca: .*no such file"):
        CommonConfig(cluster_secret="s", etcd_ca=str(tmp_path / "missing.pem"))
    config = CommonConfig(cluster_secret="s", etcd_user="u", etcd_password="secret-pw")
    assert "secret-pw" not in repr(config)


def test_a_node_with_half_the_client_certificate_exits_2_naming_the_setting(
    secure_etcd: SecureEtcd,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "node", "--etcd-key", ""],
        env=_service_env(secure_etcd),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "etcd_cert is set but etcd_key is not" in done.stderr
    assert "PIGEON_ETCD_KEY" in done.stderr


async def test_a_user_is_placed_through_a_gate_on_a_node_that_both_use_a_secure_etcd(
    secure_etcd: SecureEtcd, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin", **secure_etcd.env()}
    with LocalCluster(
        tmp_path / "cluster",
        nodes=1,
        gate_port=0,
        gate_http_port=0,
        env=env,
        etcd=secure_etcd.server,
    ) as cluster:
        async with grpc.aio.insecure_channel(cluster.gate.address) as channel:
            placed = await gate_pb2_grpc.GateStub(channel).Connect(
                gate_pb2.ConnectRequest(token=mint_user_token(cluster.secrets.jwt_secret, "u")),
                timeout=10,
            )
        assert placed.node_address == cluster.nodes[0].address
        # What etcd holds was written with the credentials: the node's key is there.
        listed = secure_etcd.server.etcdctl(
            f"--user=root:{secure_etcd.root_password}", "get", "--prefix", "/pigeon/nodes/"
        )
        assert "/pigeon/nodes/node-1" in listed
