"""`pigeon up` as a user runs it: it starts a cluster, serves, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pigeon.etcd_server import free_port

pytestmark = pytest.mark.integration

PIGEON = str(Path(sys.executable).parent / "pigeon")


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent pid is the 2nd field after the parenthesised command name.
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_up(
    data_dir: Path, gate_port: int = 0, gate_http_port: int = 0, **env: str
) -> subprocess.Popen[str]:
    """`pigeon up` on free Gate ports (unless given), output on one pipe, no PIGEON_* setting
    of the caller's environment but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    return subprocess.Popen(
        [
            *[PIGEON, "up", "--data-dir", str(data_dir)],
            *["--gate-port", str(gate_port or free_port())],
            *["--gate-http-port", str(gate_http_port or free_port())],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**clean, **env},
    )


def kill_all(process: subprocess.Popen[str]) -> None:
    """Kill a `pigeon up` that is still running, and its services, after a failed test."""
    if process.poll() is None:
        for pid in children_of(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait(10)


def read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    os.set_blocking(process.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line:
            seen.append(line)
            if marker in line:
                return "".join(seen)
        elif process.poll() is not None:
            break
        else:
            time.sleep(0.05)
    raise AssertionError(f"{marker!r} not printed; output so far:\n{''.join(seen)}")


def test_pigeon_up_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "up"
    gate_port, gate_http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    # Secrets from this shell's environment: another shell's `pigeon env` must still give them.
    secrets = {
        "PIGEON_JWT_SECRET": "jwt secret of this shell",
        "PIGEON_API_KEYS": "key-of-this-shell",
    }
    process = start_up(data_dir, gate_port, gate_http_port, **secrets)
    try:
        printed = read_until(process, "Ctrl-C stops everything", timeout=60)
        assert f"127.0.0.1:{gate_port}" in printed
        assert "PIGEON_API_KEYS=key-of-this-shell" in printed
        exports = subprocess.run(
            [PIGEON, "env", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        ).stdout.splitlines()
        assert exports == [
            f"export PIGEON_GATE=127.0.0.1:{gate_port}",
            "export PIGEON_JWT_SECRET='jwt secret of this shell'",
            "export PIGEON_API_KEYS=key-of-this-shell",
        ]
        assert (data_dir / "cluster.json").stat().st_mode & 0o777 == 0o600
        # The folder holds every message and the logs too: other users of the machine stay out.
        assert data_dir.stat().st_mode & 0o777 == 0o700
        with grpc.insecure_channel(f"127.0.0.1:{gate_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="pigeon.v1.Gate"), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # etcd, the dispatcher, the gate and two nodes.
        children = children_of(process.pid)
        assert len(children) == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert [pid for pid in children if alive(pid)] == []
    finally:
        kill_all(process)


def test_pigeon_up_prints_where_each_process_serves_its_metrics(tmp_path: Path) -> None:
    process = start_up(tmp_path / "up")
    try:
        printed = read_until(process, "Ctrl-C stops everything", timeout=60)
        public = dict(re.findall(r"^  (\S+) +gRPC \S+ +HTTP (http://\S+)$", printed, re.M))
        scraped = dict(re.findall(r"^  (\S+) +(http://127\.0\.0\.1:\d+/metrics)$", printed, re.M))
        names = {"gate", "node-1", "node-2", "dispatcher-1"}
        assert set(public) == set(scraped) == names, printed
        for name in names:
            metrics = httpx.get(scraped[name], timeout=5)
            assert metrics.status_code == 200, name
            assert re.search(r"^pigeon_\w+ ", metrics.text, re.M), name
            # The public port keeps its health check and shows no metrics.
            assert httpx.get(f"{public[name]}/healthz", timeout=5).status_code == 200
            assert httpx.get(f"{public[name]}/metrics", timeout=5).status_code == 404
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        kill_all(process)


def test_pigeon_up_help_documents_the_ports() -> None:
    result = subprocess.run([PIGEON, "up", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "--gate-port" in result.stdout and "--gate-http-port" in result.stdout
    assert "7070" in result.stdout and "8070" in result.stdout


def test_pigeon_up_on_a_taken_gate_port_says_which_flag_moves_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        result = subprocess.run(
            [
                PIGEON,
                "up",
                "--data-dir",
                str(tmp_path / "up"),
                "--gate-port",
                str(free_port()),
                "--gate-http-port",
                str(taken),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"pigeon up: port {taken} is taken; choose another with --gate-http-port"
    ]
    # Said before anything started (a Gate of another cluster on that port would otherwise
    # answer the start-up's checks).
    assert not (tmp_path / "up" / "etcd").exists()


def test_ctrl_c_during_the_start_up_stops_everything_started(tmp_path: Path) -> None:
    process = start_up(tmp_path / "up")
    try:
        read_until(process, "starting etcd", timeout=30)
        # Once something has started (etcd at least), well before the whole cluster is up.
        deadline = time.monotonic() + 30
        while not children_of(process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        started = children_of(process.pid)
        assert started
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        assert process.stdout is not None
        assert "interrupted during start-up" in process.stdout.read()
        assert [pid for pid in started if alive(pid)] == []
    finally:
        kill_all(process)


def test_a_killed_pigeon_up_leaves_nothing_running(tmp_path: Path) -> None:
    process = start_up(tmp_path / "up")
    children: list[int] = []
    try:
        read_until(process, "Ctrl-C stops everything", timeout=60)
        children = children_of(process.pid)
        assert len(children) == 5  # etcd, the dispatcher, the gate and two nodes
        process.kill()  # no chance to stop anything itself
        process.wait(10)
        deadline = time.monotonic() + 20
        while [pid for pid in children if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in children if alive(pid)] == []
    finally:
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        kill_all(process)
