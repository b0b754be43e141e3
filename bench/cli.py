"""`python -m bench [--quick]`: start what is measured, drive it from worker processes, and
print/write the results.

The run, in order (each Pigeon figure has its ceiling figure measured earlier in the same run):

1. the ceiling relay (bench.relay): idle streams and fan-out (first, while the process is
   fresh), throughput at 16 and at 1 message per call, latency at 1,000 msgs/s, connect storm,
   Gate.Connect rate;
2. a cluster in routed mode (the default) with 4 nodes: idle streams and fan-out on node 1 (while
   it is fresh), cross-node at 4 nodes; two nodes are stopped: cross-node at 2 nodes and
   cross-node latency; one more is stopped: same-node throughput, group commit on, same-node
   latency, connect storm, Gate.Connect rate;
3. a cluster in broadcast mode: cross-node at 4, then 2 nodes;
4. a one-node cluster with group commit off (PIGEON_BATCH_MAX_SIZE=1), then a one-node cluster
   on the MongoDB store (a secantusdb server);
5. a fresh one-node cluster for the attack rows (bench.attack_steps): another user's latency
   before and during each attack of issue 20, items 1-4.

A quick run starts the four clusters side by side before anything is measured.
A step that fails is recorded as failed in the results and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import logging
import os
import platform
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench import report
from bench.attack_steps import Attacks
from bench.scenarios import BenchError, Plan, Scenarios
from bench.workers import Pool
from pigeon.local import LocalCluster

__all__ = ["main"]

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
GROUPS = ("ceiling", "routed", "broadcast", "single", "attacks")
"""The step groups, in run order: the ceiling relay, then one Pigeon cluster each."""
SCENARIOS = (
    "ceiling",
    "same_node",
    "cross_node",
    "latency",
    "fanout",
    "connections",
    "group_commit",
    "attacks",
)


class Progress:
    """A progress bar over the run's steps that keeps moving during timed waits."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm  # type: ignore[import-untyped]
            except ImportError:
                print("(tqdm not installed: no progress bar)", file=sys.stderr)
            else:
                self._bar = tqdm(
                    total=total,
                    unit="step",
                    dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]",
                )

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(text[:60])
        else:
            print(f"… {text}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def wait(self, seconds: float) -> None:
        """Sleep, refreshing the bar (and its elapsed time) a few times a second."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.25, left))
            if self._bar is not None:
                self._bar.refresh()

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Child:
    """A helper server process (the relay, secantusdb) that announces itself on stdout."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(
            args,
            cwd=REPO,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)},
            # Held open and never written: the child stops when it reads end-of-file, so it
            # does not outlive a harness that was killed before its finally could run.
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )

    def announced(self, prefix: str, timeout: float) -> str:
        """The rest of the first stdout line that starts with `prefix`."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(left):
                    break
                line = self.process.stdout.readline().decode().strip()
                if line.startswith(prefix + " "):
                    return line[len(prefix) + 1 :]
                if not line and self.process.poll() is not None:
                    break
        tail = self.log_path.read_text(errors="replace")[-2000:]
        command = " ".join(str(arg) for arg in self.process.args)  # type: ignore[union-attr]
        raise BenchError(f"{command} did not start:\n{tail}")

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL, for a throwaway server), then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()


def _pigeon_target(cluster: LocalCluster) -> dict[str, str]:
    return {
        "kind": "pigeon",
        "cluster_secret": cluster.secrets.cluster_secret,
        "jwt_secret": cluster.secrets.jwt_secret,
        "api_key": cluster.secrets.api_key,
    }


@dataclass(frozen=True)
class ClusterSpec:
    """A Pigeon cluster the run starts.

    Attributes:
        node_envs: extra environment of node 1, 2, ... (by position; the rest get none).
        mongo_node: the node (0-based) that stores in a secantusdb server started for it.
    """

    name: str
    nodes: int
    node_envs: tuple[dict[str, str], ...] = ()
    dispatcher_env: dict[str, str] = field(default_factory=dict)
    mongo_node: int | None = None


CLUSTERS = {
    spec.name: spec
    for spec in (
        ClusterSpec("routed", 4),
        ClusterSpec("broadcast", 4, dispatcher_env={"PIGEON_ROUTING_MODE": "broadcast"}),
        # Two single-node measurements that need a node of their own each, one after the
        # other. Separate clusters: nodes of one cluster must share one store.
        ClusterSpec("single", 1, node_envs=({"PIGEON_BATCH_MAX_SIZE": "1"},)),
        ClusterSpec("mongo", 1, mongo_node=0),
        # Fresh, so that no earlier load sits in the figures of the attacked services.
        ClusterSpec("attacks", 1),
    )
}
"""The clusters, by name."""

GROUP_CLUSTERS = {
    "routed": ("routed",),
    "broadcast": ("broadcast",),
    "single": ("single", "mongo"),
    "attacks": ("attacks",),
}
"""The clusters each step group uses."""


@dataclass
class Launched:
    """A started cluster and what stops it."""

    stack: contextlib.ExitStack
    cluster: LocalCluster
    helpers: dict[str, int]


class Run:
    """The ordered steps of one benchmark run and what they found."""

    def __init__(self, plan: Plan, pool: Pool, progress: Progress, workdir: Path) -> None:
        self.plan = plan
        self.pool = pool
        self.progress = progress
        self.workdir = workdir
        self.measure = Scenarios(plan, pool, progress.wait, self.servers)
        self.attack = Attacks(plan, pool, progress.wait, self.servers)
        self.results: dict[str, dict[str, Any]] = {name: {} for name in SCENARIOS}
        self.group = contextlib.ExitStack()
        self.relay_address = ""
        self.relay_pid = 0
        self.cluster: LocalCluster | None = None
        self.timings: list[tuple[str, float]] = []
        # Seconds spent waiting for other work on the machine to calm down (--quiet-wait).
        self.waited = 0.0
        # Helper server processes of the current group (relay, secantusdb), by name.
        self.helpers: dict[str, int] = {}
        # Clusters started ahead by prestart() and waiting for their group, and those that
        # failed to start.
        self._started: dict[str, Launched] = {}
        self._failed_starts: dict[str, Exception] = {}

    # Groups: what a series of steps runs against, stopped by the next group (or at the end).

    def servers(self) -> dict[str, int]:
        """The processes under measurement now, by name."""
        found = dict(self.helpers)
        if self.cluster is not None:
            if self.cluster.etcd.pid:
                found["etcd"] = self.cluster.etcd.pid
            for service in self.cluster.services:
                if service.alive and service.process is not None:
                    found[service.name] = service.process.pid
        return found

    def _new_group(self) -> contextlib.ExitStack:
        self.group.close()
        self.group = contextlib.ExitStack()
        self.cluster = None
        self.relay_address = ""
        self.helpers = {}
        return self.group

    def start_relay(self) -> None:
        group = self._new_group()
        relay = Child([sys.executable, "-m", "bench.relay"], self.workdir / "relay.log")
        group.callback(relay.stop)
        port = relay.announced("PORT", 30)
        self.relay_address = f"127.0.0.1:{port}"
        self.relay_pid = relay.process.pid
        self.helpers["relay"] = relay.process.pid

    def _prepare(self, spec: ClusterSpec) -> Launched:
        """A cluster ready to start (its MongoDB-compatible server already serving)."""
        stack = contextlib.ExitStack()
        helpers: dict[str, int] = {}
        try:
            node_envs = [dict(env) for env in spec.node_envs]
            node_envs += [{} for _ in range(spec.nodes - len(node_envs))]
            if spec.mongo_node is not None:
                storage = self.workdir / f"{spec.name}-mongo"
                storage.mkdir()
                server = Child(
                    [sys.executable, "-m", "bench.mongo", str(storage)],
                    self.workdir / f"{spec.name}-mongo.log",
                )
                # Its data is thrown away: no need to wait for a clean shutdown.
                stack.callback(server.stop, kill=True)
                uri = server.announced("URI", 60)
                helpers["secantusdb"] = server.process.pid
                uri += ("&" if "?" in uri else "?") + "directConnection=true"
                node_envs[spec.mongo_node].update(PIGEON_STORE="mongodb", PIGEON_MONGODB_URI=uri)
            cluster = LocalCluster(
                self.workdir / spec.name,
                nodes=spec.nodes,
                gate_port=0,
                gate_http_port=0,
                # Only PATH: no PIGEON_* setting of the caller's shell leaks into the cluster.
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                dispatcher_env=spec.dispatcher_env,
            )
            for node, env in zip(cluster.nodes, node_envs, strict=True):
                node.env.update(env)
            stack.callback(cluster.stop)
        except BaseException:
            stack.close()
            raise
        return Launched(stack, cluster, helpers)

    def prestart(self, groups: tuple[str, ...]) -> None:
        """Start every cluster the groups need now, side by side, and wait until all serve
        (quick runs: start-up is much of their length). Each then waits idle for its group; a
        cluster that failed to start fails its group's start step.

        Everything is started from this (the main) thread, in phases, rather than from helper
        threads: LocalCluster's services may ask for a signal when the thread that started them
        exits (PR_SET_PDEATHSIG is per thread)."""
        specs = [CLUSTERS[c] for g in groups for c in GROUP_CLUSTERS.get(g, ())]
        if not specs:
            return
        self.progress.describe("start the clusters")
        started = time.monotonic()
        pending: dict[str, Launched] = {}

        def attempt(name: str, action: Callable[[], None]) -> None:
            try:
                action()
            except Exception as exc:
                self._failed_starts[name] = exc
                pending.pop(name).stack.close()

        for spec in specs:
            try:
                pending[spec.name] = self._prepare(spec)
            except Exception as exc:
                self._failed_starts[spec.name] = exc
        for name, launched in list(pending.items()):
            attempt(name, functools.partial(launched.cluster.etcd.start, timeout=60))
        for name, launched in list(pending.items()):
            for service in launched.cluster.services:
                attempt(name, service.start)
        for name, launched in list(pending.items()):
            for service in launched.cluster.services:
                if name in pending:
                    attempt(name, functools.partial(service.wait_healthy, 60))
        self._started.update(pending)
        self.timings.append(("start the clusters", round(time.monotonic() - started, 2)))

    def start_cluster(self, name: str) -> None:
        group = self._new_group()
        failed = self._failed_starts.pop(name, None)
        if failed is not None:
            raise failed
        launched = self._started.pop(name, None)
        if launched is None:
            launched = self._prepare(CLUSTERS[name])
            group.push(launched.stack)
            launched.cluster.start(timeout=60)
        else:
            group.push(launched.stack)
        self.helpers.update(launched.helpers)
        self.cluster = launched.cluster

    def stop_nodes(self, keep: int) -> None:
        cluster = self._need_cluster()
        for node in cluster.nodes[keep:]:
            node.stop()
        # The Gate and the dispatchers see them leave through etcd (keys withdrawn on drain).
        self.progress.wait(0.2)

    def close(self) -> None:
        self.group.close()
        for launched in self._started.values():
            launched.stack.close()
        self._started.clear()

    def _need_cluster(self) -> LocalCluster:
        if self.cluster is None:
            raise BenchError("skipped: the cluster did not start")
        return self.cluster

    def _need_relay(self) -> str:
        if not self.relay_address:
            raise BenchError("skipped: the relay did not start")
        return self.relay_address

    # Steps.

    def ceiling(self) -> list[tuple[str, Callable[[], None]]]:
        m, put = self.measure, self._put
        relay = {"kind": "relay"}

        def on_relay(i: int) -> tuple[str, str]:
            return self._need_relay(), "relay"

        def fanout() -> None:
            idle, fan = m.streams_and_fanout(
                relay, address=self._need_relay(), node="relay", pid=self.relay_pid, prefix="cf"
            )
            put("ceiling", "idle", idle)
            put("ceiling", "fanout", fan)

        return [
            ("start the ceiling relay", self.start_relay),
            # First, while the process is fresh: memory freed by earlier steps would be reused
            # by the new streams and hide their cost.
            ("ceiling: idle streams and fan-out", fanout),
            (
                "ceiling: throughput, 16 per call",
                lambda: put(
                    "ceiling",
                    "throughput",
                    m.throughput(
                        relay,
                        address=self._need_relay(),
                        node="relay",
                        placement=on_relay,
                        prefix="ct",
                    ),
                ),
            ),
            (
                "ceiling: throughput, 1 per call",
                lambda: put(
                    "ceiling",
                    "throughput_batch1",
                    m.throughput(
                        relay,
                        address=self._need_relay(),
                        node="relay",
                        placement=on_relay,
                        prefix="ct1",
                        batch=1,
                    ),
                ),
            ),
            (
                "ceiling: latency at 1,000/s",
                lambda: put(
                    "ceiling",
                    "latency",
                    m.latency(
                        relay,
                        address=self._need_relay(),
                        node="relay",
                        placement=on_relay,
                        prefix="cl",
                    ),
                ),
            ),
            (
                "ceiling: latency at 1,000/s, batched",
                lambda: put(
                    "ceiling",
                    "latency_batched",
                    m.latency(
                        relay,
                        address=self._need_relay(),
                        node="relay",
                        placement=on_relay,
                        prefix="clb",
                        batch=self.plan.latency_batch,
                    ),
                ),
            ),
            (
                "ceiling: connect storm",
                lambda: put(
                    "ceiling", "storm", m.storm(relay, gate=self._need_relay(), prefix="cs")
                ),
            ),
            (
                "ceiling: Connect rate",
                lambda: put(
                    "ceiling", "connect", m.connect(relay, gate=self._need_relay(), prefix="cc")
                ),
            ),
        ]

    def _cross(self, mode: str, nodes: int) -> None:
        cluster = self._need_cluster()
        live = cluster.nodes[:nodes]
        sender = live[0]

        def elsewhere(i: int) -> tuple[str, str]:
            node = live[1 + i % (nodes - 1)]
            return node.address, node.name

        self._put(
            "cross_node",
            f"{mode}_{nodes}",
            self.measure.throughput(
                _pigeon_target(cluster),
                address=sender.address,
                node=sender.name,
                placement=elsewhere,
                prefix=f"x{mode[0]}{nodes}",
            ),
        )

    def _same_node(
        self, key: tuple[str, str], prefix: str, batch: int | None = None, node: int = 0
    ) -> None:
        cluster = self._need_cluster()
        where = cluster.nodes[node]
        self._put(
            *key,
            self.measure.throughput(
                _pigeon_target(cluster),
                address=where.address,
                node=where.name,
                placement=lambda i: (where.address, where.name),
                prefix=prefix,
                batch=batch,
            ),
        )

    def _latency(self, key: str, nodes: int, batch: int = 1) -> None:
        cluster = self._need_cluster()
        sender = cluster.nodes[0]
        receiver = cluster.nodes[nodes - 1]
        self._put(
            "latency",
            key,
            self.measure.latency(
                _pigeon_target(cluster),
                address=sender.address,
                node=sender.name,
                placement=lambda i: (receiver.address, receiver.name),
                prefix=f"l{nodes}b{batch}",
                batch=batch,
            ),
        )

    def _fanout(self) -> None:
        cluster = self._need_cluster()
        node = cluster.nodes[0]
        assert node.process is not None
        idle, fan = self.measure.streams_and_fanout(
            _pigeon_target(cluster),
            address=node.address,
            node=node.name,
            pid=node.process.pid,
            prefix="h",
        )
        self._put("connections", "idle", idle)
        self._put("fanout", "broadcast", fan)

    def routed(self) -> list[tuple[str, Callable[[], None]]]:
        m, put = self.measure, self._put

        def gate() -> tuple[dict[str, str], str]:
            cluster = self._need_cluster()
            return _pigeon_target(cluster), cluster.gate.address

        return [
            ("start a routed cluster, 4 nodes", lambda: self.start_cluster("routed")),
            # First, while node 1 is fresh (see the ceiling's).
            ("idle streams and fan-out", self._fanout),
            ("cross-node routed, 4 nodes", lambda: self._cross("routed", 4)),
            ("stop 2 nodes", lambda: self.stop_nodes(2)),
            ("cross-node routed, 2 nodes", lambda: self._cross("routed", 2)),
            ("latency cross-node at 1,000/s", lambda: self._latency("cross_node", 2)),
            (
                "latency cross-node at 1,000/s, batched",
                lambda: self._latency("cross_node_batched", 2, self.plan.latency_batch),
            ),
            ("stop 1 node", lambda: self.stop_nodes(1)),
            ("same-node, SQLite", lambda: self._same_node(("same_node", "sqlite"), "ss")),
            (
                "group commit on, 1 per call",
                lambda: self._same_node(("group_commit", "on"), "gon", batch=1),
            ),
            ("latency same-node at 1,000/s", lambda: self._latency("same_node", 1)),
            (
                "latency same-node at 1,000/s, batched",
                lambda: self._latency("same_node_batched", 1, self.plan.latency_batch),
            ),
            (
                "connect storm",
                lambda: put(
                    "connections", "storm", m.storm(gate()[0], gate=gate()[1], prefix="st")
                ),
            ),
            (
                "Gate.Connect rate",
                lambda: put(
                    "connections", "connect", m.connect(gate()[0], gate=gate()[1], prefix="gc")
                ),
            ),
        ]

    def broadcast(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            (
                "start a broadcast-mode cluster, 4 nodes",
                lambda: self.start_cluster("broadcast"),
            ),
            ("cross-node broadcast, 4 nodes", lambda: self._cross("broadcast", 4)),
            ("stop 2 nodes", lambda: self.stop_nodes(2)),
            ("cross-node broadcast, 2 nodes", lambda: self._cross("broadcast", 2)),
        ]

    def single(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("start a node with group commit off", lambda: self.start_cluster("single")),
            (
                "group commit off, 1 per call",
                lambda: self._same_node(("group_commit", "off"), "goff", batch=1),
            ),
            ("start a node on MongoDB", lambda: self.start_cluster("mongo")),
            (
                "same-node, MongoDB store",
                lambda: self._same_node(("same_node", "mongodb"), "sm"),
            ),
        ]

    def attacks(self) -> list[tuple[str, Callable[[], None]]]:
        a = self.attack

        def put(
            key: str, measure: Callable[[dict[str, str], LocalCluster], dict[str, Any]]
        ) -> None:
            cluster = self._need_cluster()
            self._put("attacks", key, measure(_pigeon_target(cluster), cluster))

        def gate(c: LocalCluster) -> str:
            return c.gate.address

        def big_sends(transport: str) -> Callable[[dict[str, str], LocalCluster], dict[str, Any]]:
            return lambda t, c: a.big_sends(
                t,
                node=c.nodes[0].address,
                node_name=c.nodes[0].name,
                http=c.nodes[0].http_address,
                transport=transport,
                prefix=f"ab{transport[0]}",
            )

        return [
            ("start a one-node cluster for the attacks", lambda: self.start_cluster("attacks")),
            (
                "attack: huge tokens on Gate.Connect",
                lambda: put(
                    "huge_token_payload",
                    lambda t, c: a.huge_tokens(t, gate=gate(c), where="payload", prefix="atp"),
                ),
            ),
            (
                "attack: huge token headers on Gate.Connect",
                lambda: put(
                    "huge_token_header",
                    lambda t, c: a.huge_tokens(t, gate=gate(c), where="header", prefix="ath"),
                ),
            ),
            ("attack: big REST Sends", lambda: put("big_send_rest", big_sends("rest"))),
            ("attack: big gRPC Sends", lambda: put("big_send_grpc", big_sends("grpc"))),
            (
                "attack: idle connections",
                lambda: put(
                    "idle_connections",
                    lambda t, c: a.idle_connections(
                        t,
                        gate=gate(c),
                        node=c.nodes[0].address,
                        http=c.nodes[0].http_address,
                        prefix="aic",
                    ),
                ),
            ),
            (
                "attack: failed authentication",
                lambda: put(
                    "failed_auth", lambda t, c: a.failed_auth(t, gate=gate(c), prefix="afa")
                ),
            ),
        ]

    def _put(self, scenario: str, key: str, value: dict[str, Any]) -> None:
        self.results[scenario][key] = value

    def steps(self, groups: tuple[str, ...] = GROUPS) -> list[tuple[str, Callable[[], None]]]:
        """The run's steps, group by group; each group stops the previous one's servers."""
        steps = []
        for name in groups:
            steps.extend(getattr(self, name)())
        return [*steps, ("stop", self.close)]

    def execute(self, groups: tuple[str, ...] = GROUPS, quiet_wait: float = 0.0) -> None:
        for label, step in self.steps(groups):
            self.progress.describe(label)
            before = {k: dict(v) for k, v in self.results.items()}
            if quiet_wait and label in _STEP_KEYS:
                self.progress.describe(f"{label} (waiting for a quiet machine)")
                waited = self.measure.quiet(quiet_wait)
                self.waited += waited
                self.progress.describe(label)
            started = time.monotonic()
            try:
                step()
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                self.progress.write(f"step failed: {label}: {text}")
                log.debug("%s", traceback.format_exc())
                self._record_failure(label, text, before)
                self.pool.abort()
            self.timings.append((label, round(time.monotonic() - started, 2)))
            self.progress.advance()

    def _record_failure(self, label: str, text: str, before: dict[str, dict[str, Any]]) -> None:
        """Mark what the failed step would have filled in, so the JSON says why it is missing."""
        for scenario, key in _STEP_KEYS.get(label, ()):
            if key not in before.get(scenario, {}):
                self.results[scenario].setdefault(key, {"error": text})
        self.results.setdefault("failures", {})[label] = text


# What each step fills in (a failed step marks these as failed).
_STEP_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "ceiling: throughput, 16 per call": (("ceiling", "throughput"),),
    "ceiling: throughput, 1 per call": (("ceiling", "throughput_batch1"),),
    "ceiling: latency at 1,000/s": (("ceiling", "latency"),),
    "ceiling: latency at 1,000/s, batched": (("ceiling", "latency_batched"),),
    "latency cross-node at 1,000/s, batched": (("latency", "cross_node_batched"),),
    "latency same-node at 1,000/s, batched": (("latency", "same_node_batched"),),
    "ceiling: idle streams and fan-out": (("ceiling", "idle"), ("ceiling", "fanout")),
    "ceiling: connect storm": (("ceiling", "storm"),),
    "ceiling: Connect rate": (("ceiling", "connect"),),
    "cross-node routed, 4 nodes": (("cross_node", "routed_4"),),
    "cross-node routed, 2 nodes": (("cross_node", "routed_2"),),
    "latency cross-node at 1,000/s": (("latency", "cross_node"),),
    "same-node, SQLite": (("same_node", "sqlite"),),
    "group commit on, 1 per call": (("group_commit", "on"),),
    "latency same-node at 1,000/s": (("latency", "same_node"),),
    "idle streams and fan-out": (("connections", "idle"), ("fanout", "broadcast")),
    "connect storm": (("connections", "storm"),),
    "Gate.Connect rate": (("connections", "connect"),),
    "cross-node broadcast, 4 nodes": (("cross_node", "broadcast_4"),),
    "cross-node broadcast, 2 nodes": (("cross_node", "broadcast_2"),),
    "group commit off, 1 per call": (("group_commit", "off"),),
    "same-node, MongoDB store": (("same_node", "mongodb"),),
    "attack: huge tokens on Gate.Connect": (("attacks", "huge_token_payload"),),
    "attack: huge token headers on Gate.Connect": (("attacks", "huge_token_header"),),
    "attack: big REST Sends": (("attacks", "big_send_rest"),),
    "attack: big gRPC Sends": (("attacks", "big_send_grpc"),),
    "attack: idle connections": (("attacks", "idle_connections"),),
    "attack: failed authentication": (("attacks", "failed_auth"),),
}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import google.protobuf
    import grpc

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
                break
    os_name = ""
    with contextlib.suppress(OSError), open("/etc/os-release") as release:
        for line in release:
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    try:
        uvloop_version = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop_version = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "uvloop": uvloop_version,
    }


def _notes(
    plan: Plan, info: dict[str, Any], seconds: float, command: str, results: dict[str, Any]
) -> list[str]:
    foreign = report.foreign_cpu(results)
    busy = (
        []
        if foreign is None
        else [
            f"Other work on the machine during the measurement windows: {foreign[0]:.2f} cores on "
            f"average, {foreign[1]:.2f} at most (of {info['nproc']}); the JSON gives each "
            "window's CPU split (servers, load generators, foreign)."
        ]
    )
    return [
        f"Command: `{command}`; {'quick (scaled down)' if plan.quick else 'full'} run, "
        f"{seconds:.0f} s, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gb']} GB, {info['os']}; "
        f"Python {info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}, "
        f"uvloop {info['uvloop']}. Load generators, servers, etcd and the dispatcher all share "
        "these CPUs.",
        f"Throughput load (Pigeon and ceiling alike): {plan.senders} concurrent closed-loop "
        f"senders in {plan.tx_workers} processes, {plan.batch} messages of {plan.body}-byte "
        f"body per Send call (group-commit rows: 1 per call), each to one of {plan.receivers} "
        f"receivers (one stream each) in {plan.rx_workers} processes; delivered messages "
        f"counted over {plan.window:g} s after {plan.warmup:g} s of warm-up.",
        "Cross-node: senders on node 1, receivers spread over the other nodes, through one "
        "dispatcher; every cluster stores in one SQLite file unless labelled MongoDB.",
        f"Latency: open loop at {plan.rate:,} msgs/s for {plan.latency_seconds:g} s, 1 message "
        f"per call (many users) or {plan.latency_batch} per call (a sender batching "
        f"{plan.latency_batch * 1000 // plan.rate} ms), to each message's arrival from the time "
        "its Send call was due (so a late sender, queueing and any stall count); batched rows "
        "also from each message's own scheduled time, which adds the up to "
        f"{(plan.latency_batch - 1) * 1000 // plan.rate} ms it waited in the sender for the rest "
        "of its batch. The ceiling is driven the same way.",
        f"Fan-out and memory: {plan.streams:,} streams (one user each) on one node from "
        f"{plan.hold_workers} processes; RSS is the node's VmRSS before and after opening them. "
        f"Storm: {plan.storm:,} clients at once.",
        "MongoDB row: secantusdb 0.7.0b3, an embedded MongoDB-compatible test server, not a "
        "production MongoDB.",
        *(_attack_notes(plan) if results.get("attacks") else []),
        *busy,
    ]


def _attack_notes(plan: Plan) -> list[str]:
    checks = ", ".join(f"{t:g}" for t in plan.idle_checks)
    return [
        f"Attack rows (7.x): a fresh one-node cluster; {plan.attackers} concurrent attackers "
        f"(one connection each) in {plan.attack_workers} worker processes, the victim (another "
        f"user, sequential calls, at most one per {plan.victim_interval * 1000:g} ms) in "
        f"another; victim timed {plan.attack_idle:g} s before and {plan.attack_window:g} s "
        "during each attack, after waiting for the services to calm down; attackers, victim "
        "and services share the machine's CPUs. Huge tokens: "
        f"{plan.token_bytes:,} characters, fake signature. Big Sends: {plan.recipients:,} "
        f"recipients, one attacker user each. Idle connections: {plan.idle_connections} each "
        f"(Gate gRPC, node gRPC, node HTTP), counted {checks} s after they opened. Failed "
        f"authentication: {plan.failed_connects:,} Connects at {plan.failed_rate:,}/s (no "
        f"token, not a JWT, wrong signature in turn) and {plan.failed_publishes:,} "
        "wrong-API-key Publishes as fast as they are answered, at once.",
    ]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure Pigeon end to end on this machine, beside a bare grpc.aio relay.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="every scenario scaled down (under a minute)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help=f"folder for latest.json, latest.md and latest.png (default {RESULTS})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each measurement, wait up to this long until other processes use under "
        "0.3 cores (default: 20 for a full run, 0 for --quick)",
    )
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help="comma-separated step groups to run, for working on the harness "
        f"(default: all of {','.join(GROUPS)})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder with the service logs"
    )
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupt_on_signals() -> None:
    """Raise KeyboardInterrupt on SIGTERM too, and on Ctrl-C even when started in the
    background, where a shell ignores SIGINT for us: the run then stops everything it started."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every step ran (targets are reported, not enforced)."""
    args = _parse(argv)
    interrupt_on_signals()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plan = Plan.quick_plan() if args.quick else Plan.full()
    groups = tuple(g for g in GROUPS if g in args.only.split(","))
    command = "python -m bench" + (" --quick" if args.quick else "")
    if groups != GROUPS:
        command += f" --only {','.join(groups)}"
    started = time.monotonic()
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="pigeon-bench-"))
    pool: Pool | None = None
    run: Run | None = None
    interrupted = False
    progress = Progress(0, False)
    try:
        pool = Pool(plan.workers)
        probe = Run(plan, pool, Progress(0, False), workdir)
        progress = Progress(len(probe.steps(groups)), not args.no_progress)
        run = Run(plan, pool, progress, workdir)
        if plan.quick:
            run.prestart(groups)
        quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0 if plan.quick else 20)
        run.execute(groups, quiet_wait)
    except KeyboardInterrupt:
        print("interrupted: stopping everything this run started", file=sys.stderr)
        interrupted = True
    finally:
        if run is not None:
            run.close()
        progress.close()
        if pool is not None:
            pool.close()
        if args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    if run is None:
        return 2
    if interrupted:
        return 130
    seconds = time.monotonic() - started
    table = report.rows(run.results)
    if groups != GROUPS:
        # The rows of the groups left out would all read "not run".
        table = [row for row in table if row.pigeon != "not run"]
    notes = _notes(plan, info, seconds, command, run.results)
    text = report.markdown(table, notes)
    print(text)
    out: Path = args.output
    document = {
        "meta": {
            "command": command,
            "quick": plan.quick,
            "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
            "machine": info,
            "plan": {k: getattr(plan, k) for k in plan.__dataclass_fields__},
            "step_seconds": run.timings,
            "quiet_waited_s": round(run.waited, 1),
            "loadavg_end": os.getloadavg(),
        },
        "scenarios": run.results,
    }
    report.write_json(out / "latest.json", document, table)
    (out / "latest.md").write_text(text)
    if not args.no_chart:
        title = f"Pigeon vs a bare grpc.aio relay — {command}, {info['nproc']} CPUs"
        problem = report.chart(out / "latest.png", run.results, title)
        if problem:
            print(f"(no chart: {problem})", file=sys.stderr)
    print(f"wrote {out / 'latest.json'}", file=sys.stderr)
    failures = run.results.get("failures") or {}
    return 1 if failures else 0
