"""A whole Pigeon cluster on one machine, as child processes: what `pigeon up` runs, and what
integration tests start."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pigeon.etcd_server import EtcdServer, StartCancelled, free_port, never
from pigeon.v1 import gate_pb2, gate_pb2_grpc

__all__ = ["ClusterSecrets", "LocalCluster", "ServiceProcess"]

log = logging.getLogger("pigeon.local")


def write_private(path: Path, text: str) -> None:
    """Write a file of secrets readable by its owner alone: created anew (an older file keeps
    its mode), with that mode from the start, not after a chmod."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


@dataclass(frozen=True)
class ClusterSecrets:
    """The three secrets of a cluster, from the environment or generated once per data folder."""

    jwt_secret: str
    api_key: str
    cluster_secret: str

    @classmethod
    def load(cls, data_dir: Path, env: Mapping[str, str]) -> ClusterSecrets:
        """Take each secret from PIGEON_* in env, else from data_dir, else generate and keep it.

        Only generated secrets are kept: one from the environment holds for this run alone, so a
        later run without it goes back to the kept one.
        """
        saved_path = data_dir / "secrets.json"
        saved: dict[str, str] = {}
        if saved_path.exists():
            saved = json.loads(saved_path.read_text())
        # Hex, not base64url: a secret starting with "-" reads as a flag (`--api-key -x...`).
        kept = {
            name: saved.get(name) or secrets.token_hex(32)
            for name in ("jwt_secret", "api_key", "cluster_secret")
        }
        if kept != saved:
            data_dir.mkdir(parents=True, exist_ok=True)
            write_private(saved_path, json.dumps(kept, indent=2))
        return cls(
            jwt_secret=env.get("PIGEON_JWT_SECRET") or kept["jwt_secret"],
            api_key=(env.get("PIGEON_API_KEYS") or "").split(",")[0] or kept["api_key"],
            cluster_secret=env.get("PIGEON_CLUSTER_SECRET") or kept["cluster_secret"],
        )


@dataclass
class ServiceProcess:
    """One service (`python -m <module>`) run as a child process with its log in a file."""

    name: str
    module: str
    env: dict[str, str]
    port: int
    http_port: int
    log_path: Path
    # Its ops listener (Prometheus /metrics), on loopback; 0 when it has none.
    metrics_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_address(self) -> str:
        """host:port of its ops listener, empty when it has none."""
        return f"127.0.0.1:{self.metrics_port}" if self.metrics_port else ""

    @property
    def metrics_url(self) -> str:
        """Where its Prometheus metrics are scraped (https when the cluster uses TLS)."""
        scheme = "https" if self.env.get("PIGEON_TLS_CERT") else "http"
        return f"{scheme}://{self.metrics_address}/metrics" if self.metrics_port else ""

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            # A session of its own: the cluster stops its children in order, not all at once on
            # the terminal's Ctrl-C.
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def channel(self) -> grpc.Channel:
        """A blocking channel to the service, with TLS when the cluster uses it."""
        # A short reconnect backoff: the default waits a second or more after the first refusal.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 200),
        ]
        if not self.env.get("PIGEON_TLS_CERT"):
            return grpc.insecure_channel(self.address, options)
        # Verified as the services verify each other: against tls_ca, else the trusted roots
        # (gRPC's, which GRPC_DEFAULT_SSL_ROOTS_FILE_PATH in their environment replaces).
        ca = self.env.get("PIGEON_TLS_CA") or self.env.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
        credentials = grpc.ssl_channel_credentials(Path(ca).read_bytes() if ca else None)
        return grpc.secure_channel(self.address, credentials, options)

    def wait_healthy(self, timeout: float, cancelled: Callable[[], bool] = never) -> None:
        """Wait until the gRPC health service says SERVING; raise with the log tail if not, or
        StartCancelled once ``cancelled()`` is true."""
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if cancelled():
                    raise StartCancelled(f"{self.name}'s start-up was cancelled")
                if not self.alive:
                    raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not healthy after {timeout:.0f} s:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        if self.alive and self.process is not None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0, *, signalled: bool = False) -> int | None:
        """SIGTERM (the service drains), then SIGKILL after timeout. Returns the exit code.

        With signalled=True the SIGTERM was already sent: a second one could arrive after the
        service removed its handler and cut its drain short.
        """
        if self.process is None:
            return None
        if not signalled:
            self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            self.process.kill()
            return self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.alive:
            self.process.kill()
            self.process.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class LocalCluster:
    """etcd, dispatchers, a Gate and nodes on this machine, on the embedded SQLite store.

    Use as a context manager, or call start() and stop(). Everything started is stopped on exit,
    also when start-up fails half-way. With ``stop_with_parent`` (a launcher that starts it from
    its main thread) etcd also stops when this process is killed outright. ``etcd`` is an etcd
    to use instead of a new one (one with TLS and authentication, say; its credentials then go in
    ``env``); it is stopped with the cluster all the same.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        nodes: int = 2,
        dispatchers: int = 1,
        gate_port: int = 7070,
        gate_http_port: int = 8070,
        env: Mapping[str, str] | None = None,
        node_env: Mapping[str, str] | None = None,
        dispatcher_env: Mapping[str, str] | None = None,
        stop_with_parent: bool = False,
        etcd: EtcdServer | None = None,
    ) -> None:
        self.data_dir = data_dir
        base_env = dict(os.environ if env is None else env)
        self.secrets = ClusterSecrets.load(data_dir, base_env)
        # A launcher killed outright (SIGKILL) leaves no etcd behind: the services watch their
        # parent themselves (PIGEON_PARENT_PID); etcd is told by the kernel.
        self.etcd = etcd or EtcdServer(data_dir / "etcd", stop_with_parent=stop_with_parent)
        self._env = {
            **base_env,
            "PIGEON_JWT_SECRET": self.secrets.jwt_secret,
            "PIGEON_API_KEYS": base_env.get("PIGEON_API_KEYS") or self.secrets.api_key,
            "PIGEON_CLUSTER_SECRET": self.secrets.cluster_secret,
            "PIGEON_ETCD_ENDPOINTS": self.etcd.endpoint,
            "PYTHONUNBUFFERED": "1",
            # The services stop by themselves if this process dies without stopping them.
            "PIGEON_PARENT_PID": str(os.getpid()),
        }
        logs = data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._dispatcher_env = dict(dispatcher_env or {})
        self.dispatchers = [self._dispatcher(i + 1) for i in range(dispatchers)]
        self.gate = self._process("gate", "gate", {}, gate_port, gate_http_port)
        self.gates = [self.gate]
        self.nodes = [
            self._process(
                f"node-{i + 1}",
                "node",
                {
                    "PIGEON_NODE_ID": f"node-{i + 1}",
                    # One store for the cluster: SQLite in WAL mode serves several processes.
                    "PIGEON_SQLITE_PATH": str(data_dir / "pigeon.db"),
                    **(node_env or {}),
                },
            )
            for i in range(nodes)
        ]

    def _dispatcher(self, number: int) -> ServiceProcess:
        name = f"dispatcher-{number}"
        return self._process(
            name, "dispatcher", {"PIGEON_DISPATCHER_ID": name, **self._dispatcher_env}
        )

    def add_dispatcher(self, timeout: float = 30.0) -> ServiceProcess:
        """Start one more dispatcher and wait until it is healthy."""
        dispatcher = self._dispatcher(len(self.dispatchers) + 1)
        self.dispatchers.append(dispatcher)
        dispatcher.start()
        dispatcher.wait_healthy(timeout)
        return dispatcher

    def add_gate(self, timeout: float = 30.0) -> ServiceProcess:
        """Start another Gate beside the first (Gates are stateless) and wait until healthy."""
        gate = self._process(f"gate-{len(self.gates) + 1}", "gate", {})
        self.gates.append(gate)
        gate.start()
        gate.wait_healthy(timeout)
        return gate

    def _process(
        self, name: str, module: str, env: dict[str, str], port: int = 0, http_port: int = 0
    ) -> ServiceProcess:
        port = port or free_port()
        http_port = http_port or free_port()
        # Free ports like the others: each service's default would clash on one machine.
        metrics_port = free_port()
        return ServiceProcess(
            name=name,
            module=module,
            env={
                **self._env,
                **env,
                "PIGEON_PORT": str(port),
                "PIGEON_HTTP_PORT": str(http_port),
                "PIGEON_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
            },
            port=port,
            http_port=http_port,
            log_path=self.data_dir / "logs" / f"{name}.log",
            metrics_port=metrics_port,
        )

    @property
    def services(self) -> list[ServiceProcess]:
        """Every service process, in start order."""
        return [*self.dispatchers, *self.gates, *self.nodes]

    def start(self, timeout: float = 30.0, cancelled: Callable[[], bool] = never) -> None:
        """Start everything and wait until every service reports SERVING.

        ``cancelled`` is asked while waiting: once it is true, everything started is stopped and
        StartCancelled raised (a Ctrl-C handler sets a flag; an exception raised from the handler
        could land between a fork and the note of its child, which would then be left running).
        """
        try:
            if not self.etcd.running:  # one given to the constructor may be started already
                self.etcd.start(timeout=timeout, cancelled=cancelled)
            # Dispatchers first: a node that starts before any dispatcher is registered
            # serves alone until it finds one.
            for service in self.dispatchers:
                service.start()
            for service in self.dispatchers:
                service.wait_healthy(timeout, cancelled)
            for service in [*self.gates, *self.nodes]:
                service.start()
            for service in [*self.gates, *self.nodes]:
                service.wait_healthy(timeout, cancelled)
            self._wait_gate_sees_nodes(timeout, cancelled)
        except BaseException:
            self.stop()
            raise

    def _wait_gate_sees_nodes(self, timeout: float, cancelled: Callable[[], bool]) -> None:
        """Healthy nodes are registered; wait until the Gate's etcd watch has them too."""
        if not self.nodes:
            return
        wanted = {n.name for n in self.nodes}
        metadata = (("authorization", f"Bearer {self.secrets.api_key}"),)
        deadline = time.monotonic() + timeout
        with self.gate.channel() as channel:
            stub = gate_pb2_grpc.GateStub(channel)
            while True:
                try:
                    listed = stub.ListNodes(
                        gate_pb2.ListNodesRequest(), metadata=metadata, timeout=2
                    )
                    if wanted <= {n.node_id for n in listed.nodes}:
                        return
                except grpc.RpcError:
                    pass
                if cancelled():
                    raise StartCancelled("the start-up was cancelled")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Gate did not see nodes {sorted(wanted)} in time")
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop nodes first (they drain), then the Gate and dispatchers, then etcd."""
        for service in reversed(self.services):
            service.signal(signal.SIGTERM)
        for service in reversed(self.services):
            service.stop(timeout, signalled=True)
        self.etcd.stop()

    def dead(self) -> list[ServiceProcess]:
        """Services that have exited."""
        return [s for s in self.services if s.process is not None and not s.alive]

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
