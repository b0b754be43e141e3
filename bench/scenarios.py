"""The measurements, as the harness runs them: hand roles to the workers, start them together on
the shared clock, collect and summarize. Each function measures one thing against one target
(a Pigeon cluster or the ceiling relay) and returns a JSON-ready dict."""

from __future__ import annotations

import math
import os
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.workers import Pool, Worker

__all__ = [
    "BenchError",
    "CpuMeter",
    "Plan",
    "Scenarios",
    "percentiles",
    "rss_kb",
]

# Time given to workers to get ready / to report, on top of the planned duration.
READY_TIMEOUT = 120.0
REPORT_TIMEOUT = 120.0
START_LEAD_NS = 200_000_000


class BenchError(RuntimeError):
    """A measurement could not be made (failed set-up, missing streams)."""


@dataclass(frozen=True)
class Plan:
    """How big and how long every scenario is."""

    quick: bool
    warmup: float
    window: float
    latency_seconds: float
    streams: int
    storm: int
    connect_calls: int
    senders: int = 100
    receivers: int = 100
    batch: int = 16
    body: int = 100
    rate: int = 1000
    # Messages per call of the batched latency variant (10 ms of client-side batching at 1,000/s).
    latency_batch: int = 10
    connect_clients: int = 100
    rx_workers: int = 2
    tx_workers: int = 2
    hold_workers: int = 4
    # Channels (HTTP/2 connections) per worker per address when one worker holds many streams.
    stream_channels: int = 4
    settle: float = 2.0
    # How long the latency scenario waits for answers still in flight after its last send.
    drain: float = 60.0
    # The attack rows (bench.attack_steps): the victim's timed windows before and during each
    # attack, and a pause after each attack for the services to finish what it left them.
    attack_idle: float = 5.0
    attack_window: float = 15.0
    attack_settle: float = 3.0
    attackers: int = 12
    attack_workers: int = 4
    # The victim starts a call at most this often (under the per-user rate limit).
    victim_interval: float = 0.02
    token_bytes: int = 4_000_000
    recipients: int = 380_000
    idle_connections: int = 300
    # When, after they are open, the idle connections still open are counted.
    idle_checks: tuple[float, ...] = (30.0, 150.0)
    failed_connects: int = 3000
    failed_rate: int = 1500
    failed_publishes: int = 1000

    @classmethod
    def full(cls) -> Plan:
        return cls(
            quick=False,
            warmup=3.0,
            window=12.0,
            latency_seconds=30.0,
            streams=10_000,
            storm=10_000,
            connect_calls=10_000,
        )

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(
            quick=True,
            warmup=0.2,
            window=0.6,
            latency_seconds=1.0,
            streams=500,
            storm=500,
            connect_calls=500,
            settle=0.3,
            drain=0.5,
            attack_idle=0.5,
            attack_window=1.0,
            attack_settle=0.5,
            idle_connections=60,
            idle_checks=(3.0,),
            failed_connects=1500,
            failed_publishes=500,
        )

    @property
    def workers(self) -> int:
        return max(
            self.rx_workers + self.tx_workers, self.hold_workers + 1, self.attack_workers + 1
        )


def percentiles(
    values_ns: Iterable[int], points: Sequence[float] = (50, 99, 99.9)
) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds, plus count and max."""
    ordered = sorted(values_ns)
    out: dict[str, float] = {"count": len(ordered)}
    if not ordered:
        return out
    for point in points:
        rank = max(1, math.ceil(point / 100 * len(ordered)))
        out[f"p{point:g}"] = ordered[rank - 1] / 1e6
    out["max"] = ordered[-1] / 1e6
    return out


def rss_kb(pid: int) -> int:
    """A process's resident set size (VmRSS), in KB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


_TICKS = os.sysconf("SC_CLK_TCK")


def _process_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # utime and stime: fields 14 and 15 of proc(5), counted from the state field here.
    return int(fields[11]) + int(fields[12])


def _busy_ticks() -> int:
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    # Everything but idle and iowait.
    return sum(fields) - fields[3] - fields[4]


class CpuMeter:
    """Where the machine's CPU went during a measurement: each server process, the load
    generators (and this harness), and everything else on the machine ("foreign": other people's
    work on a shared box, which makes every figure of the window less trustworthy). In cores."""

    def __init__(self, servers: dict[str, int], generators: list[int]) -> None:
        self._servers = servers
        self._generators = [*generators, os.getpid()]
        self._started = 0.0
        self._before: dict[str, int] = {}
        self._busy = 0

    def _sample(self) -> dict[str, int]:
        sample = {name: _process_ticks(pid) for name, pid in self._servers.items()}
        sample["generators"] = sum(_process_ticks(pid) for pid in self._generators)
        return sample

    def start(self) -> None:
        self._started = time.monotonic()
        self._busy = _busy_ticks()
        self._before = self._sample()

    def stop(self) -> dict[str, float]:
        seconds = max(1e-3, time.monotonic() - self._started)
        busy = _busy_ticks() - self._busy
        after = self._sample()
        used = {k: (after[k] - self._before.get(k, 0)) / _TICKS / seconds for k in after}
        ours = sum(used.values())
        used["foreign"] = max(0.0, busy / _TICKS / seconds - ours)
        return {k: round(v, 2) for k, v in used.items()}


def _split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Deal items round-robin into `parts` lists (none empty when there are enough items)."""
    parts = max(1, min(parts, len(items)))
    return [list(items[i::parts]) for i in range(parts)]


def _merge(counters: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for counter in counters:
        total.update(counter)
    return dict(total)


def _samples(reports: Iterable[dict[str, Any]], key: str = "latencies") -> array[int]:
    merged = array("q")
    for report in reports:
        merged.frombytes(report[key])
    return merged


Placement = Callable[[int], tuple[str, str]]
"""Receiver number → (node address, node name) it subscribes on."""


class Scenarios:
    """The measurements, on a pool of workers, paced by a progress bar."""

    def __init__(
        self,
        plan: Plan,
        pool: Pool,
        wait: Callable[[float], None],
        servers: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self.plan = plan
        self.pool = pool
        # Sleeps while keeping the progress bar alive.
        self._wait = wait
        # The processes being measured, by name.
        self._servers = servers

    def _meter(self) -> CpuMeter:
        return CpuMeter(self._servers(), [w.process.pid or 0 for w in self.pool.workers])

    def quiet(self, limit: float, threshold: float = 0.3) -> float:
        """Wait (at most `limit` seconds) until other work on the machine uses less than
        `threshold` cores over half a second; return the seconds waited."""
        started = time.monotonic()
        while True:
            meter = self._meter()
            meter.start()
            self._wait(0.5)
            waited = time.monotonic() - started
            if meter.stop()["foreign"] < threshold or waited >= limit:
                return waited

    def _window(self, low_ns: int, high_ns: int) -> dict[str, float]:
        """Wait out a window [low_ns, high_ns] (wall clock) and say where the CPU went in it."""
        self._wait_until(low_ns)
        meter = self._meter()
        meter.start()
        self._wait_until(high_ns)
        return meter.stop()

    def _wait_until(self, wall_ns: int) -> None:
        self._wait(max(0.0, (wall_ns - time.time_ns()) / 1e9))

    def _receivers(
        self, target: dict[str, str], users: Sequence[str], placement: Placement, channels: int = 1
    ) -> tuple[list[Worker], list[dict[str, Any]]]:
        streams = []
        for i, user in enumerate(users):
            address, node = placement(i)
            streams.append([address, user, node])
        chunks = _split(streams, self.plan.rx_workers)
        workers = self.pool.run(
            "receive",
            [
                {"target": target, "streams": c, "channels": channels, "ready_timeout": 60}
                for c in chunks
            ],
        )
        readies = Pool.expect(workers, "ready", READY_TIMEOUT)
        failed = sum(r["failed"] for r in readies)
        if failed:
            errors = _merge(r["errors"] for r in readies)
            raise BenchError(f"{failed} of {len(streams)} receiver streams failed: {errors}")
        return workers, readies

    def throughput(
        self,
        target: dict[str, str],
        *,
        address: str,
        node: str,
        placement: Placement,
        prefix: str,
        batch: int | None = None,
    ) -> dict[str, Any]:
        """Closed-loop senders on one node → receivers placed by `placement`; msgs/s delivered."""
        plan = self.plan
        batch = plan.batch if batch is None else batch
        receivers = [f"{prefix}-r{i}" for i in range(plan.receivers)]
        senders = [f"{prefix}-s{i}" for i in range(plan.senders)]
        rx, _ = self._receivers(target, receivers, placement)
        try:
            tx = self.pool.run(
                "send",
                [
                    {
                        "target": target,
                        "address": address,
                        "node": node,
                        "senders": chunk,
                        "recipients": receivers,
                        "batch": batch,
                        "body": plan.body,
                    }
                    for chunk in _split(senders, plan.tx_workers)
                ],
                first=plan.rx_workers,
            )
            Pool.expect(tx, "ready", READY_TIMEOUT)
            start = time.time_ns() + START_LEAD_NS
            low = start + int(plan.warmup * 1e9)
            high = low + int(plan.window * 1e9)
            Pool.command(rx, "window", from_ns=low, to_ns=high)
            Pool.command(tx, "go", start_ns=start, from_ns=low, to_ns=high)
            cpu = self._window(low, high)
            sent = Pool.expect(tx, "report", REPORT_TIMEOUT)
        finally:
            Pool.command(rx, "stop")
        got = Pool.expect(rx, "report", REPORT_TIMEOUT)
        delivered = sum(r["counted"] for r in got)
        acked = sum(r["acked"] for r in sent)
        events = sum(r["events"] for r in got)
        server_cores = sum(v for k, v in cpu.items() if k not in ("generators", "foreign"))
        return {
            "msgs_per_s": delivered / plan.window,
            # What a message costs the servers, whatever else runs on the machine.
            "server_cpu_us_per_msg": server_cores * plan.window / delivered * 1e6
            if delivered
            else None,
            "events_per_msg": events / delivered if delivered else None,
            "acked_per_s": acked / plan.window,
            "calls_per_s": sum(r["calls"] for r in sent) / (plan.window + plan.warmup),
            "batch": batch,
            "senders": plan.senders,
            "receivers": plan.receivers,
            "body_bytes": plan.body,
            "window_s": plan.window,
            "delivery_ms": percentiles(_samples(got)),
            "call_ms": percentiles(_samples(sent)),
            "send_errors": _merge(r["errors"] for r in sent),
            "stream_errors": _merge(r["errors"] for r in got),
            "streams_cut": _merge(r["cuts"] for r in got),
            "cpu_cores": cpu,
        }

    def latency(
        self,
        target: dict[str, str],
        *,
        address: str,
        node: str,
        placement: Placement,
        prefix: str,
        batch: int = 1,
    ) -> dict[str, Any]:
        """Open loop at plan.rate msgs/s, `batch` messages per call, from one node to receivers
        placed by `placement`; send-to-receive percentiles."""
        plan = self.plan
        receivers = [f"{prefix}-r{i}" for i in range(plan.receivers)]
        senders = [f"{prefix}-s{i}" for i in range(10)]
        rx, _ = self._receivers(target, receivers, placement)
        try:
            tx = self.pool.run(
                "send_at_rate",
                [
                    {
                        "target": target,
                        "address": address,
                        "node": node,
                        "senders": senders,
                        "recipients": receivers,
                        "rate": plan.rate,
                        "batch": batch,
                        "body": plan.body,
                        "drain": plan.drain,
                    }
                ],
                first=plan.rx_workers,
            )
            Pool.expect(tx, "ready", READY_TIMEOUT)
            start = time.time_ns() + START_LEAD_NS
            duration = int(plan.latency_seconds * 1e9)
            Pool.command(rx, "window", from_ns=start, to_ns=start + duration, by_send=True)
            Pool.command(tx, "go", start_ns=start, duration_ns=duration)
            cpu = self._window(start, start + duration)
            (sent,) = Pool.expect(tx, "report", plan.drain + REPORT_TIMEOUT)
            # The last messages are still on their way.
            self._wait(min(0.5, plan.drain / 2))
        finally:
            Pool.command(rx, "stop")
        got = Pool.expect(rx, "report", REPORT_TIMEOUT)
        samples = _samples(got)
        return {
            "rate": plan.rate,
            "batch": batch,
            "seconds": plan.latency_seconds,
            "sent": sent["sent"],
            "acked": sent["ok"],
            "unanswered": sent["sent"] - sent["ok"] - sum(sent["errors"].values()),
            "delivered": len(samples),
            "send_errors": sent["errors"],
            "generator_max_lag_ms": sent["max_lag_ns"] / 1e6,
            "latency_ms": percentiles(samples),
            "from_call_ms": percentiles(_samples(got, "from_call")),
            "stream_errors": _merge(r["errors"] for r in got),
            "cpu_cores": cpu,
        }

    def streams_and_fanout(
        self, target: dict[str, str], *, address: str, node: str, pid: int, prefix: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Open plan.streams idle streams (RSS of `pid` before and after), then publish one
        broadcast and time it to the last stream."""
        plan = self.plan
        users = [f"{prefix}-h{i}" for i in range(plan.streams)]
        streams = [[address, user, node] for user in users]
        before = rss_kb(pid)
        opened = time.monotonic()
        holders = self.pool.run(
            "receive",
            [
                {
                    "target": target,
                    "streams": chunk,
                    "channels": plan.stream_channels,
                    "ready_timeout": READY_TIMEOUT,
                }
                for chunk in _split(streams, plan.hold_workers)
            ],
        )
        try:
            readies = Pool.expect(holders, "ready", READY_TIMEOUT + 30)
            open_s = time.monotonic() - opened
            ready = sum(r["ready"] for r in readies)
            self._wait(plan.settle)
            after = rss_kb(pid)
            idle = {
                "streams": plan.streams,
                "ready": ready,
                "failed": plan.streams - ready,
                "open_s": open_s,
                "rss_before_kb": before,
                "rss_after_kb": after,
                "kb_per_stream": (after - before) / ready if ready else None,
                "errors": _merge(r["errors"] for r in readies),
            }
            (publisher,) = self.pool.run(
                "publish",
                [{"target": target, "address": address, "body": plan.body}],
                first=plan.hold_workers,
            )
            publisher.expect("ready", READY_TIMEOUT)
            publisher.command("go")
            # The relay keeps no unread counts: only Pigeon's are waited for.
            unread_timeout = 60 if target["kind"] == "pigeon" else 0
            Pool.command(holders, "fanout", timeout=60, unread_timeout=unread_timeout)
            published = publisher.expect("report", REPORT_TIMEOUT)
            # The holders wait up to 60 s for the message, then up to 60 s for unread counts.
            arrivals = Pool.expect(holders, "fanout", REPORT_TIMEOUT + 60)
        finally:
            Pool.command(holders, "stop")
        Pool.expect(holders, "report", REPORT_TIMEOUT)
        got = sum(a["got"] for a in arrivals)
        last = max(a["last_ns"] for a in arrivals)
        seconds = (last - published["started_ns"]) / 1e9 if got else None
        unread_got = sum(a["unread_got"] for a in arrivals)
        unread_last = max(a["unread_last_ns"] for a in arrivals)
        fanout = {
            "streams": ready,
            "delivered": got,
            "missed": ready - got,
            "time_to_last_s": seconds,
            "deliveries_per_s": got / seconds if seconds else None,
            "publish_ack_s": (published["acked_ns"] - published["started_ns"]) / 1e9,
            # When the last stream had its new unread count too (Pigeon only).
            "unread_counts": unread_got,
            "unread_settled_s": (unread_last - published["started_ns"]) / 1e9
            if unread_got
            else None,
            "time_to_first_s": (
                min(a["first_ns"] for a in arrivals if a["got"]) - published["started_ns"]
            )
            / 1e9
            if got
            else None,
        }
        return idle, fanout

    def storm(self, target: dict[str, str], *, gate: str, prefix: str) -> dict[str, Any]:
        """plan.storm clients at once: Gate.Connect, then Subscribe until live."""
        plan = self.plan
        users = [f"{prefix}-c{i}" for i in range(plan.storm)]
        workers = self.pool.run(
            "storm",
            [
                {
                    "target": target,
                    "gate": gate,
                    "users": chunk,
                    "channels": plan.stream_channels,
                    "timeout": 120.0,
                }
                for chunk in _split(users, plan.hold_workers)
            ],
        )
        try:
            Pool.expect(workers, "ready", READY_TIMEOUT)
            start = time.time_ns() + START_LEAD_NS
            meter = self._meter()
            meter.start()
            Pool.command(workers, "go", start_ns=start)
            results = Pool.expect(workers, "result", 120.0 + REPORT_TIMEOUT)
            cpu = meter.stop()
        finally:
            Pool.command(workers, "stop")
        Pool.expect(workers, "report", REPORT_TIMEOUT)
        ok = sum(r["ok"] for r in results)
        failures = _merge(r["failures"] for r in results)
        last = max(r["last_ns"] for r in results)
        seconds = (last - start) / 1e9 if ok else None
        done = [t - start for t in _samples(results, "done_ns")]
        return {
            "clients": plan.storm,
            "ok": ok,
            "failures": sum(failures.values()),
            "failure_kinds": failures,
            "time_s": seconds,
            "clients_per_s": ok / seconds if seconds else None,
            "live_after_ms": percentiles(done),
            "cpu_cores": cpu,
        }

    def connect(self, target: dict[str, str], *, gate: str, prefix: str) -> dict[str, Any]:
        """plan.connect_calls Gate.Connect calls from plan.connect_clients concurrent clients."""
        plan = self.plan
        users = [f"{prefix}-k{i}" for i in range(plan.connect_calls)]
        parts = plan.hold_workers
        clients = [
            plan.connect_clients // parts + (i < plan.connect_clients % parts) for i in range(parts)
        ]
        workers = self.pool.run(
            "connect",
            [
                {"target": target, "gate": gate, "users": chunk, "clients": n, "channels": 1}
                for chunk, n in zip(_split(users, parts), clients, strict=True)
            ],
        )
        Pool.expect(workers, "ready", READY_TIMEOUT)
        start = time.time_ns() + START_LEAD_NS
        meter = self._meter()
        meter.start()
        Pool.command(workers, "go", start_ns=start)
        reports = Pool.expect(workers, "report", 300.0)
        cpu = meter.stop()
        ok = sum(r["ok"] for r in reports)
        seconds = (max(r["end_ns"] for r in reports) - start) / 1e9
        errors = _merge(r["errors"] for r in reports)
        return {
            "calls": plan.connect_calls,
            "clients": plan.connect_clients,
            "ok": ok,
            "errors": sum(errors.values()),
            "error_kinds": errors,
            "calls_per_s": ok / seconds if seconds > 0 else None,
            "latency_ms": percentiles(_samples(reports)),
            "cpu_cores": cpu,
        }
