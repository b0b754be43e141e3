"""The Python SDK as a site's backend installs it: clients/python alone, in a fresh virtual
environment, with nothing of the server, running the README's example against a real cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import pigeon.client
from pigeon.auth import mint_user_token
from pigeon.local import LocalCluster
from tests.test_client import runnable_blocks

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 300
# What installing the client may bring, beside the venv's own pip and setuptools.
EXPECTED = {
    "pigeon-client",
    "grpcio",
    "protobuf",
    "googleapis-common-protos",
    "grpcio-status",
    "typing-extensions",
}


def _name(requirement: str) -> str:
    return requirement.split("==")[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with clients/python installed from the source tree."""
    venv = tmp_path_factory.mktemp("client-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(ROOT / "clients" / "python")],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        # Not inside the repository, whose own pigeon/ would shadow what was installed.
        cwd=venv,
    )
    assert install.returncode == 0, install.stderr
    return python


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        tmp_path_factory.mktemp("package"),
        nodes=1,
        gate_port=0,
        gate_http_port=0,
        env={"PATH": os.environ.get("PATH", "/usr/bin")},
    )
    with local:
        yield local


def test_the_client_package_pulls_only_grpc_and_protobuf(client_venv: Path) -> None:
    frozen = subprocess.run(
        [str(client_venv), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    installed = {_name(line) for line in frozen} - {"pip", "setuptools"}
    assert installed == EXPECTED
    # Nothing of the server: its modules and its dependencies are not there.
    probe = subprocess.run(
        [str(client_venv), "-c", "import pigeon.auth"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=client_venv.parent,
    )
    assert probe.returncode != 0 and "No module named 'pigeon.auth'" in probe.stderr


def test_the_readme_sdk_example_runs_from_the_client_package(
    client_venv: Path, cluster: LocalCluster
) -> None:
    [example] = runnable_blocks(pigeon.client)
    assert example.strip() in (ROOT / "README.md").read_text()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "PIGEON_GATE": cluster.gate.address,
        "PIGEON_API_KEYS": cluster.secrets.api_key,
        "BOB_TOKEN": mint_user_token(cluster.secrets.jwt_secret, "bob"),
    }
    result = subprocess.run(
        [str(client_venv), "-c", example],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=client_venv.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "shop: Your order has shipped (#" in result.stdout
    assert "unread: " in result.stdout
