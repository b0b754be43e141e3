"""A service that cannot start says why in one line that names the setting, and exits 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pigeon.etcd_server import free_port

pytestmark = pytest.mark.integration

SECRETS = {
    "PIGEON_CLUSTER_SECRET": "cluster secret of the test",
    "PIGEON_JWT_SECRET": "jwt secret of the test",
    "PIGEON_API_KEYS": "key of the test",
}


def start(service: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `python -m service args` to its end; its exit code and its stderr."""
    # Nothing answers on this etcd port: the start-up fails before it matters.
    etcd = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", service, "--etcd-endpoints", etcd, *args],
        env={"PATH": "/usr/bin:/bin", **(SECRETS if env is None else env)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_an_unknown_variable_is_named_on_one_line() -> None:
    code, stderr = start("gate", env={**SECRETS, "PIGEON_PROT": "7070"})
    assert code == 2
    assert stderr.strip() == (
        "python -m gate: unknown setting PIGEON_PROT (did you mean PIGEON_PORT?)"
    )


def test_a_bad_value_is_named_on_one_line() -> None:
    code, stderr = start("dispatcher", "--port", "seventy")
    assert code == 2
    assert stderr.strip().splitlines() == [
        "python -m dispatcher: bad value for --port: expected an integer, got 'seventy'"
    ]


def test_a_missing_secret_names_its_variable_without_a_traceback() -> None:
    env = {k: v for k, v in SECRETS.items() if k != "PIGEON_CLUSTER_SECRET"}
    code, stderr = start("node", "--port", "0", "--http-port", "0", env=env)
    assert code == 2
    assert "PIGEON_CLUSTER_SECRET" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("flag", "other", "variable"),
    [("--port", "--http-port", "PIGEON_PORT"), ("--http-port", "--port", "PIGEON_HTTP_PORT")],
)
def test_a_taken_port_names_the_setting_to_change(
    taken_port: int, flag: str, other: str, variable: str
) -> None:
    code, stderr = start("gate", flag, str(taken_port), other, "0")
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{taken_port}: the port is taken" in stderr
    assert f"({variable}) to a free port" in stderr
    assert "Traceback" not in stderr
