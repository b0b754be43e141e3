"""Metrics are for the operator: every service serves Prometheus /metrics on an ops listener of
its own (loopback by default), and its public HTTP port answers /metrics with 404."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pigeon.config import DispatcherConfig, GateConfig, NodeConfig
from pigeon.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.integration

ENV = {
    "PATH": "/usr/bin:/bin",
    "PIGEON_CLUSTER_SECRET": "cluster secret of the ops tests",
    "PIGEON_JWT_SECRET": "jwt secret of the ops tests, 32+ bytes long",
    "PIGEON_API_KEYS": "key of the ops tests",
}
# Another address of this machine (all of 127/8 is loopback): a listener on every address
# answers there, one bound to 127.0.0.1 alone refuses.
OTHER_LOCAL_ADDRESS = "127.0.0.2"


@contextlib.contextmanager
def service(
    name: str, etcd: EtcdServer, log: Path, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m name` against etcd with its log in a file; stopped after the block."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", name, "--etcd-endpoints", etcd.endpoint, *args],
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def logged_metrics_address(process: subprocess.Popen[bytes], log: Path, within: float) -> str:
    """The ops listener's host:port, from the line the service logs once it serves."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = re.search(r"serving gRPC on .* metrics on (\S+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        assert process.poll() is None, f"it exited:\n{log.read_text(errors='replace')}"
        time.sleep(0.05)
    raise AssertionError(f"no 'serving' line in {within} s:\n{log.read_text(errors='replace')}")


@pytest.mark.parametrize("name", ["gate", "node", "dispatcher"])
def test_metrics_are_served_on_the_loopback_ops_listener_and_not_on_the_public_port(
    name: str, etcd: EtcdServer, tmp_path: Path
) -> None:
    http_port = free_port()
    log = tmp_path / f"{name}.log"
    # The public ports on every address; the ops listener on loopback, on a port of its choice.
    args = ["--host", "0.0.0.0", "--port", "0", "--http-port", str(http_port)]
    args += ["--metrics-address", "127.0.0.1:0"]
    if name == "node":
        args += ["--sqlite-path", str(tmp_path / "pigeon.db")]
    with service(name, etcd, log, *args) as process:
        metrics = logged_metrics_address(process, log, within=30)
        host, port = metrics.rsplit(":", 1)
        assert host == "127.0.0.1"

        public = f"http://{OTHER_LOCAL_ADDRESS}:{http_port}"
        assert httpx.get(f"{public}/healthz", timeout=5).status_code == 200
        refused = httpx.get(f"{public}/metrics", timeout=5)
        assert refused.status_code == 404
        assert "pigeon_" not in refused.text
        assert "metrics_address" in refused.json()["message"]

        scraped = httpx.get(f"http://{metrics}/metrics", timeout=5)
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        assert re.search(rf"^pigeon_{name}_\w+", scraped.text, re.M), scraped.text[:500]
        assert httpx.get(f"http://{metrics}/healthz", timeout=5).status_code == 200
        # Bound to loopback alone: the machine's other addresses do not reach it.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{OTHER_LOCAL_ADDRESS}:{port}/metrics", timeout=5)


def test_each_service_defaults_to_a_loopback_ops_port_of_its_own() -> None:
    defaults = [c().metrics_address for c in (GateConfig, NodeConfig, DispatcherConfig)]
    assert defaults == ["127.0.0.1:9070", "127.0.0.1:9071", "127.0.0.1:9072"]


def test_a_taken_metrics_port_names_the_setting_to_change(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "dispatcher", "--etcd-endpoints", f"127.0.0.1:{free_port()}"],
            env={
                **ENV,
                "PIGEON_PORT": "0",
                "PIGEON_HTTP_PORT": "0",
                "PIGEON_METRICS_ADDRESS": f"127.0.0.1:{taken}",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{taken}: the port is taken" in result.stderr
    assert "set metrics_address (PIGEON_METRICS_ADDRESS) to host:port" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_address_without_a_port_is_refused_on_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gate", "--metrics-address", "127.0.0.1"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "python -m gate: bad value for --metrics-address: '127.0.0.1' is not host:port with a"
        " port from 0 to 65535 (e.g. 127.0.0.1:9071)"
    ]
