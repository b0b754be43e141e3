"""`python -m bench.soak`: thousands of connected clients and a steady load for minutes, checked
message by message.

A routed cluster (etcd, one dispatcher, the Gate, two nodes on one SQLite file) is started on
free ports in a temporary folder, as `python -m bench` starts its own. Load-generator processes
(bench.workers) then connect the clients the way a real client connects (Gate.Connect, then
Node.Subscribe on the node the Gate names, and back through the Gate from the cursor after any
end of the stream) and send an open-loop load of single-message Send calls, each from a random
client, on the node it was placed on, to another random client: same-node and cross-node
traffic.

The check: every acknowledged message (its id, from the Send response, and its recipient) must
reach its recipient, and nothing else may; the two sets of (message id, user) are compared
exactly after the load, once the stragglers are in (or a bounded wait has passed). Each minute:
messages sent, acknowledged, delivered, send-to-receive latency (from the scheduled send time)
and the RSS of every server process, sampled every few seconds.

Exit code: 0 when delivered == acknowledged and no send failed; 1 otherwise (or when the run
could not be made); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cli import Progress, interrupt_on_signals, machine
from bench.scenarios import BenchError, CpuMeter, percentiles, rss_kb
from bench.workers import Pool, Worker, WorkerError
from pigeon.local import LocalCluster

__all__ = ["Options", "main"]

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# User ids are PREFIX + number.
PREFIX = "soak-u"
BODY_BYTES = 100
# How many streams one receiver process holds, and how many messages/s one sender process
# offers, at most.
STREAMS_PER_RECEIVER = 1250
RATE_PER_SENDER = 500
# A Send not answered in this time counts as failed (DEADLINE_EXCEEDED).
CALL_TIMEOUT = 30.0
READY_TIMEOUT = 120.0
REPORT_TIMEOUT = 120.0
START_LEAD_NS = 500_000_000
MINUTE = 60.0
# The processes whose memory is followed, besides the cluster's services.
ETCD = "etcd"


@dataclass(frozen=True)
class Options:
    """One soak run."""

    clients: int = 5000
    rate: float = 1000.0
    # Messages per Send: at 1,000/s, a sender batching 10 ms. One per call at that rate is more
    # gRPC calls than the load generators and the nodes together can make and answer on a
    # 2-core machine (see bench/README.md).
    batch: int = 10
    minutes: float = 10.0
    nodes: int = 2
    output: Path = RESULTS
    progress: bool = True
    settle: float = 60.0
    keep: bool = False

    @property
    def seconds(self) -> float:
        return self.minutes * MINUTE

    @property
    def buckets(self) -> int:
        """Minutes of the report (the last may be partial)."""
        return max(1, math.ceil(self.seconds / MINUTE))

    @property
    def receivers(self) -> int:
        return max(1, min(4, math.ceil(self.clients / STREAMS_PER_RECEIVER)))

    @property
    def senders(self) -> int:
        return max(1, min(4, math.ceil(self.rate / RATE_PER_SENDER)))

    @property
    def command(self) -> str:
        return (
            f"python -m bench.soak --clients {self.clients} --rate {self.rate:g} "
            f"--batch {self.batch} --minutes {self.minutes:g} --nodes {self.nodes}"
        )


class Memory:
    """VmRSS of the server processes, sampled by the harness, with the time of each sample."""

    def __init__(self, cluster: LocalCluster) -> None:
        self._cluster = cluster
        # (seconds since the load started, {process: KB}).
        self.samples: list[tuple[float, dict[str, int]]] = []

    def processes(self) -> dict[str, int]:
        """The server processes alive now: name -> pid."""
        pids = {ETCD: self._cluster.etcd.pid or 0}
        for service in self._cluster.services:
            if service.alive and service.process is not None:
                pids[service.name] = service.process.pid
        return {name: pid for name, pid in pids.items() if pid}

    def now(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for name, pid in self.processes().items():
            # A process may exit between the listing and the read.
            if pid:
                with contextlib.suppress(OSError, BenchError):
                    found[name] = rss_kb(pid)
        return found

    def sample(self, elapsed: float) -> dict[str, int]:
        taken = self.now()
        self.samples.append((round(elapsed, 2), taken))
        return taken


class Soak:
    """The run, step by step, on a started cluster and a pool of workers."""

    def __init__(
        self, options: Options, pool: Pool, cluster: LocalCluster, progress: Progress
    ) -> None:
        self.options = options
        self.pool = pool
        self.cluster = cluster
        self.progress = progress
        self.memory = Memory(cluster)
        self.target = {
            "kind": "pigeon",
            "cluster_secret": cluster.secrets.cluster_secret,
            "jwt_secret": cluster.secrets.jwt_secret,
            "api_key": cluster.secrets.api_key,
        }
        # Tokens outlive the run (and its reconnects).
        self.token_ttl = int(options.seconds + 3600)
        self.readies: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.got: list[dict[str, Any]] = []
        self.progress_lines: list[dict[str, Any]] = []
        # Per minute: where the machine's CPU went (cores), as bench.scenarios.CpuMeter splits it.
        self.cpu: list[dict[str, float]] = []
        self.baseline: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self.connect_s = 0.0

    def run(self) -> None:
        rx = self.connect()
        tx = self.prepare_senders(rx)
        self.load(rx, tx)
        self.settle(rx)

    def connect(self) -> list[Worker]:
        """Every client connected and live, or BenchError."""
        o = self.options
        self.progress.describe(f"connect {o.clients:,} clients through the Gate")
        ready_timeout = READY_TIMEOUT + o.clients / 20
        users = list(range(o.clients))
        started = time.monotonic()
        rx = self.pool.run(
            "soak_receive",
            [
                {
                    "target": self.target,
                    "gate": self.cluster.gate.address,
                    "prefix": PREFIX,
                    "users": users[i :: o.receivers],
                    "channels": 4,
                    "concurrency": 100,
                    "call_timeout": CALL_TIMEOUT,
                    "token_ttl": self.token_ttl,
                    "ready_timeout": ready_timeout,
                }
                for i in range(o.receivers)
            ],
        )
        self.readies = Pool.expect(rx, "ready", ready_timeout + READY_TIMEOUT)
        self.connect_s = time.monotonic() - started
        failed = sum(r["failed"] for r in self.readies)
        if failed:
            errors = _merge(r["errors"] for r in self.readies)
            raise BenchError(
                f"{failed} of {o.clients} clients did not connect in {ready_timeout:.0f} s: "
                f"{errors or 'no error'}"
            )
        self.progress.advance()
        return rx

    def prepare_senders(self, rx: list[Worker]) -> list[Worker]:
        o = self.options
        self.progress.describe("start the senders")
        placement = sorted(p for r in self.readies for p in r["placement"])
        tx = self.pool.run(
            "soak_send",
            [
                {
                    "target": self.target,
                    "prefix": PREFIX,
                    "clients": placement,
                    "rate": o.rate,
                    "batch": o.batch,
                    "part": part,
                    "parts": o.senders,
                    "groups": len(rx),
                    "body": BODY_BYTES,
                    "channels": 2,
                    "call_timeout": CALL_TIMEOUT,
                    "token_ttl": self.token_ttl,
                    "seed": 1,
                }
                for part in range(o.senders)
            ],
            first=len(rx),
        )
        Pool.expect(tx, "ready", READY_TIMEOUT)
        return tx

    def load(self, rx: list[Worker], tx: list[Worker]) -> None:
        """The load, from start to end, with RSS samples and a line per minute."""
        o = self.options
        self.baseline = self.memory.now()
        duration = o.seconds
        interval = min(5.0, max(1.0, duration / 12))
        start_ns = time.time_ns() + START_LEAD_NS
        Pool.command(rx, "go", start_ns=start_ns, minutes=o.buckets)
        Pool.command(tx, "go", start_ns=start_ns, duration_ns=int(duration * 1e9))
        start = start_ns / 1e9
        self.progress.describe(f"load: minute 1 of {o.buckets}")
        generators = [w.process.pid or 0 for w in self.pool.workers]
        meter = CpuMeter(self.memory.processes(), generators)
        self.progress.wait(max(0.0, start - time.time()))
        meter.start()
        next_sample = 0.0
        boundaries = [min((m + 1) * MINUTE, duration) for m in range(o.buckets)]
        for minute, boundary in enumerate(boundaries, 1):
            while True:
                elapsed = time.time() - start
                if elapsed >= next_sample:
                    self.memory.sample(max(0.0, elapsed))
                    while next_sample <= elapsed:
                        next_sample += interval
                    self._check_alive()
                if elapsed >= boundary:
                    break
                self.progress.wait(max(0.0, min(next_sample, boundary) - elapsed))
            self.cpu.append(meter.stop())
            meter = CpuMeter(self.memory.processes(), generators)
            meter.start()
            self._minute_line(minute, rx, tx)
            self.progress.advance()
            if minute < o.buckets:
                self.progress.describe(f"load: minute {minute + 1} of {o.buckets}")
        self.progress.describe("wait for the calls in flight")
        Pool.command(tx, "finish")
        self.sent = Pool.expect(tx, "report", CALL_TIMEOUT + 30 + REPORT_TIMEOUT)

    def settle(self, rx: list[Worker]) -> None:
        """Hand each receiver the messages acknowledged for its users; wait (bounded) for the
        stragglers; collect the reports."""
        o = self.options
        self.progress.describe(f"wait up to {o.settle:g} s for the stragglers")
        for group, worker in enumerate(rx):
            expected = "\n".join(k for report in self.sent if (k := report["keys"][group]))
            worker.command("settle", expected=expected, timeout=o.settle)
        self.got = Pool.expect(rx, "report", o.settle + REPORT_TIMEOUT)
        self.after = self.memory.now()
        self.progress.advance()

    def _check_alive(self) -> None:
        dead = self.cluster.dead()
        if dead:
            tails = "\n".join(f"{s.name}:\n{s.log_tail(15)}" for s in dead)
            raise BenchError(f"{', '.join(s.name for s in dead)} exited during the soak:\n{tails}")

    def _minute_line(self, minute: int, rx: list[Worker], tx: list[Worker]) -> None:
        workers = [*rx, *tx]
        Pool.command(workers, "stats")
        answers = Pool.expect(workers, "stats", 60)
        got, sent = answers[: len(rx)], answers[len(rx) :]
        rss = self.memory.samples[-1][1] if self.memory.samples else {}
        line = {
            "minute": minute,
            "sent": sum(s["sent"] for s in sent),
            "acked": sum(s["acked"] for s in sent),
            "failed": sum(s["failed"] for s in sent),
            "in_flight": sum(s["in_flight"] for s in sent),
            "delivered": sum(g["delivered"] for g in got),
            "live_streams": sum(g["live"] for g in got),
            "reconnects": sum(g["reconnects"] for g in got),
            "generator_max_lag_ms": max(s["max_lag_ms"] for s in sent),
            "rss_kb": rss,
            "cpu_cores": self.cpu[-1] if self.cpu else {},
        }
        self.progress_lines.append(line)
        memory = ", ".join(f"{name} {kb / 1024:.0f}" for name, kb in sorted(rss.items()))
        self.progress.write(
            f"minute {minute}/{self.options.buckets}: sent {line['sent']:,}, acked "
            f"{line['acked']:,}, failed {line['failed']:,}, delivered {line['delivered']:,}, "
            f"in flight {line['in_flight']:,}; live streams {line['live_streams']:,}, "
            f"reconnects {line['reconnects']:,}; generator lag "
            f"{line['generator_max_lag_ms']:,.0f} ms; CPU cores {_cpu_text(line['cpu_cores'])}; "
            f"RSS MB: {memory}"
        )


# --- the results -------------------------------------------------------------------------------


def _merge(counters: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for counter in counters:
        total.update(counter)
    return dict(total)


def _cpu_split(cores: dict[str, float]) -> tuple[float, float, float, float]:
    """Cores used by the nodes, the other servers, the load generators, and everything else."""
    nodes = sum(v for k, v in cores.items() if k.startswith("node"))
    rest = sum(
        v
        for k, v in cores.items()
        if not k.startswith("node") and k not in ("generators", "foreign")
    )
    return nodes, rest, cores.get("generators", 0.0), cores.get("foreign", 0.0)


def _cpu_text(cores: dict[str, float]) -> str:
    if not cores:
        return "—"
    return " / ".join(f"{v:.2f}" for v in _cpu_split(cores))


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None with fewer than two distinct x."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def _memory(
    samples: list[tuple[float, dict[str, int]]], buckets: int
) -> tuple[list[dict[str, dict[str, int]]], dict[str, dict[str, Any]]]:
    """Per minute and process, the largest and the last sample; per process, the growth from
    the first minute to the last and the slope over every sample."""
    names = sorted({name for _, taken in samples for name in taken})
    by_minute: list[list[dict[str, int]]] = [[] for _ in range(buckets)]
    for at, taken in samples:
        # The sample taken as the load ends belongs to its last minute.
        by_minute[min(int(at // MINUTE), buckets - 1)].append(taken)
    per_minute: list[dict[str, dict[str, int]]] = []
    for inside in by_minute:
        row: dict[str, dict[str, int]] = {}
        for name in names:
            values = [taken[name] for taken in inside if name in taken]
            if values:
                row[name] = {"max_kb": max(values), "last_kb": values[-1]}
        per_minute.append(row)
    growth: dict[str, dict[str, Any]] = {}
    for name in names:
        series = [(at, taken[name]) for at, taken in samples if name in taken]
        lasts = [row[name]["last_kb"] for row in per_minute if name in row]
        if not series or not lasts:
            continue
        slope = _slope([(at / MINUTE, float(kb)) for at, kb in series])
        # The end of the first minute against the end of the last; a run of one minute (or
        # less) has no two: its start against its end.
        first = lasts[0] if len(per_minute) > 1 else series[0][1]
        last = lasts[-1]
        growth[name] = {
            "first_minute_kb": first,
            "last_minute_kb": last,
            "growth_kb": last - first,
            "growth_pct": round((last - first) / first * 100, 2) if first else None,
            "slope_kb_per_min": round(slope, 1) if slope is not None else None,
        }
    return per_minute, growth


def summarize(soak: Soak) -> dict[str, Any]:
    """The JSON document of a finished run."""
    o = soak.options
    sent, got = soak.sent, soak.got
    buckets = o.buckets
    minutes_rss, growth = _memory(soak.memory.samples, buckets)
    minutes = []
    everything = array("q")
    for m in range(buckets):
        samples = array("q")
        for report in got:
            samples.frombytes(report["latencies"][m])
        everything.extend(samples)
        minutes.append(
            {
                "minute": m + 1,
                "seconds": round(min(MINUTE, o.seconds - m * MINUTE), 2),
                "sent": sum(r["sent"][m] for r in sent),
                "acknowledged": sum(r["acked"][m] for r in sent),
                "failed": _merge(r["failed"][m] for r in sent),
                "delivered": sum(r["per_minute"][m] for r in got),
                "latency_ms": percentiles(samples),
                "rss_kb": minutes_rss[m],
                "cpu_cores": soak.cpu[m] if m < len(soak.cpu) else {},
                # Sends not answered yet as the minute ended (a backlog grows node memory).
                "in_flight_at_end": soak.progress_lines[m]["in_flight"]
                if m < len(soak.progress_lines)
                else None,
            }
        )
    acknowledged = sum(sum(r["acked"]) for r in sent)
    delivered = sum(r["delivered"] for r in got)
    missing = sum(r["missing"] for r in got)
    unexpected = sum(r["unexpected"] for r in got)
    failed = _merge(m["failed"] for m in minutes)
    failed_numbers = {n for r in sent for n in r["failed_numbers"]}
    unexpected_numbers = [n for r in got for n in r["unexpected_numbers"]]
    offered = sum(sum(r["sent"]) for r in sent)
    problems = []
    if not acknowledged:
        problems.append("no message was acknowledged")
    if missing:
        problems.append(f"{missing:,} acknowledged messages were not delivered")
    if unexpected:
        problems.append(f"{unexpected:,} messages were delivered that were never acknowledged")
    if failed:
        problems.append(f"{sum(failed.values()):,} sends failed: {failed}")
    # Redundant with the two set differences above; stated because it is the promise.
    equal = missing == 0 and unexpected == 0 and delivered == acknowledged
    placement = Counter(node for r in soak.readies for _, _, node in r["placement"])
    return {
        "meta": {
            "command": o.command,
            "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "options": {**asdict(o), "output": str(o.output)},
            "loadavg_end": os.getloadavg(),
        },
        "ok": equal and not problems,
        "problems": problems,
        "setup": {
            "clients": o.clients,
            "clients_per_node": dict(sorted(placement.items())),
            "connect_s": round(soak.connect_s, 2),
            "rate": o.rate,
            "seconds": o.seconds,
            "nodes": o.nodes,
            "messages_per_call": o.batch,
            "body_bytes": BODY_BYTES,
            "receiver_processes": o.receivers,
            "sender_processes": o.senders,
            "same_node_share": round(sum(r["same_node"] for r in sent) / offered, 3)
            if offered
            else None,
            "generator_max_lag_ms": max(r["max_lag_ns"] for r in sent) / 1e6 if sent else None,
        },
        "check": {
            "offered": offered,
            "acknowledged": acknowledged,
            "delivered": delivered,
            "equal": equal,
            "missing": missing,
            "unexpected": unexpected,
            "unexpected_after_failed_send": sum(n in failed_numbers for n in unexpected_numbers),
            "failed_sends": failed,
            "duplicates": sum(r["duplicates"] for r in got),
            "repeats_dropped": sum(r["repeats"] for r in got),
            "gaps": sum(r["gaps"] for r in got),
            "reconnects": _merge(r["reconnects"] for r in got),
            "live_streams_at_end": sum(r["live"] for r in got),
            "straggler_wait_s": round(max((r["settle_s"] for r in got), default=0.0), 2),
            "missing_sample": [k for r in got for k in r["missing_sample"]][:20],
            "unexpected_sample": [k for r in got for k in r["unexpected_sample"]][:20],
        },
        "latency_ms": percentiles(everything),
        "minutes": minutes,
        "memory": {
            "baseline_kb": soak.baseline,
            "after_kb": soak.after,
            "growth": growth,
            "sample_every_s": min(5.0, max(1.0, o.seconds / 12)),
            "samples": soak.memory.samples,
        },
        "progress": soak.progress_lines,
    }


def _n(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" + ("" if number == 1 else "es" if noun.endswith("s") else "s")


def _counted(counts: dict[str, int]) -> str:
    """A total and what it is made of: `3 (DEADLINE_EXCEEDED 2, UNAVAILABLE 1)`."""
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{sum(counts.values()):,}" + (f" ({parts})" if parts else "")


def _mb(kb: int | None) -> str:
    return "—" if kb is None else f"{kb / 1024:,.1f}"


def markdown(document: dict[str, Any]) -> str:
    """The report as markdown: the check, then a row per minute."""
    setup, check, minutes = document["setup"], document["check"], document["minutes"]
    latency = document["latency_ms"]
    growth = document["memory"]["growth"]
    baseline = document["memory"]["baseline_kb"]
    names = sorted(growth, key=lambda n: (not n.startswith("node"), n))
    verdict = "PASS" if document["ok"] else "FAIL"
    lines = [
        f"## Soak: {setup['clients']:,} clients, {setup['rate']:,.0f} msgs/s offered, "
        f"{setup['seconds'] / 60:g} min — {verdict}",
        "",
        "| Check | Value |",
        "|---|---|",
        f"| Acknowledged (Send answered with an id) | {check['acknowledged']:,} "
        f"(of {check['offered']:,} offered) |",
        f"| Delivered (distinct, to the right user) | {check['delivered']:,} |",
        f"| Delivered == acknowledged (sets of message id and user) | "
        f"{'yes' if check['equal'] else '**no**'} |",
        f"| Missing (acknowledged, never delivered) | {check['missing']:,} |",
        f"| Unexpected (delivered, never acknowledged) | {check['unexpected']:,} |",
        f"| Failed sends | {_counted(check['failed_sends'])} |",
        f"| Duplicates the application would see / repeats dropped by the cursor | "
        f"{check['duplicates']:,} / {check['repeats_dropped']:,} |",
        f"| Reconnects, by reason | {_counted(check['reconnects'])} |",
        f"| Latency, whole run: p50 / p99 / p99.9 / max | {_n(latency.get('p50'), 1)} / "
        f"{_n(latency.get('p99'), 1)} / {_n(latency.get('p99.9'), 1)} / "
        f"{_n(latency.get('max'), 1)} ms |",
        f"| Waited for stragglers | {check['straggler_wait_s']:.1f} s |",
    ]
    for name in names:
        g = growth[name]
        pct = "" if g["growth_pct"] is None else f" ({g['growth_pct']:+.1f}%)"
        slope = "—" if g["slope_kb_per_min"] is None else f"{g['slope_kb_per_min']:+,.0f}"
        lines.append(
            f"| RSS {name}: before the load; first → last minute | "
            f"{_mb(baseline.get(name))}; {_mb(g['first_minute_kb'])} → "
            f"{_mb(g['last_minute_kb'])} MB{pct}; slope {slope} KB/min |"
        )
    header = ["Minute", "Sent", "Acked", "Failed", "Delivered", "In flight at end"]
    header += ["p50 ms", "p99 ms", "max ms"]
    header += [f"{name} MB" for name in names]
    header += ["CPU cores: nodes / other servers / load gen. / other work"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in minutes:
        ms = m["latency_ms"]
        label = f"{m['minute']}" + (f" ({m['seconds']:g} s)" if m["seconds"] < MINUTE else "")
        cells = [
            label,
            f"{m['sent']:,}",
            f"{m['acknowledged']:,}",
            f"{sum(m['failed'].values()):,}",
            f"{m['delivered']:,}",
            _n(m["in_flight_at_end"]),
            _n(ms.get("p50"), 1),
            _n(ms.get("p99"), 1),
            _n(ms.get("max"), 1),
        ]
        cells += [_mb(m["rss_kb"].get(name, {}).get("max_kb")) for name in names]
        cells += [_cpu_text(m["cpu_cores"])]
        lines.append("| " + " | ".join(cells) + " |")
    info = document["meta"]["machine"]
    per_node = ", ".join(f"{n} {c:,}" for n, c in setup["clients_per_node"].items())
    lines += [
        "",
        f"- Command: `{document['meta']['command']}`; "
        f"{document['meta']['started_at']}. Machine: {info['nproc']} CPUs ({info['cpu']}), "
        f"Python {info['python']}, grpcio {info['grpcio']}; load generators and servers share "
        "these CPUs.",
        f"- Clients: one user and one stream each, connected through Gate.Connect in "
        f"{setup['connect_s']:.1f} s ({per_node}); "
        f"{_count(setup['receiver_processes'], 'receiver process')}. Load: open loop, "
        f"{_count(setup['messages_per_call'], 'message')} of {setup['body_bytes']} bytes per "
        "Send (a call leaves when its last message is due), from a random client on its node "
        f"to other random clients ({_n((setup['same_node_share'] or 0) * 100)}% same-node), "
        f"{_count(setup['sender_processes'], 'sender process')}; generator lag at most "
        f"{_n(setup['generator_max_lag_ms'], 1)} ms.",
        "- Rows are by the minute a message was due to be sent; latency is from that time to "
        "its arrival; in flight: Send calls not answered yet as the minute ended. RSS is the "
        "largest VmRSS sample of the minute (every "
        f"{document['memory']['sample_every_s']:g} s); growth compares the last sample of the "
        "first minute with the last sample of the last minute (in a run of one minute or less, "
        "the first sample with the last); the slope is fitted to every sample of the load. CPU "
        "is per minute, in cores of the machine: the nodes, etcd + Gate + dispatcher, the load "
        "generators and this harness, and work outside the soak.",
    ]
    if document["problems"]:
        lines.append("- Problems: " + "; ".join(document["problems"]) + ".")
    return "\n".join(lines) + "\n"


# --- the command -------------------------------------------------------------------------------


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def _parse(argv: list[str] | None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Hold many clients under a steady load on a local cluster for minutes; "
        "check that delivered == acknowledged, message by message; latency and memory per "
        "minute.",
    )
    parser.add_argument(
        "--clients",
        type=_positive(int),
        default=defaults.clients,
        help=f"connected clients, one user and one stream each (default {defaults.clients:,})",
    )
    parser.add_argument(
        "--rate",
        type=_positive(float),
        default=defaults.rate,
        help=f"messages per second offered, open loop (default {defaults.rate:,.0f})",
    )
    parser.add_argument(
        "--batch",
        type=_positive(int),
        default=defaults.batch,
        help="messages per Send call, each to its own random recipient; a call leaves when its "
        f"last message is due (default {defaults.batch})",
    )
    parser.add_argument(
        "--minutes",
        type=_positive(float),
        default=defaults.minutes,
        help=f"length of the load; fractions allowed (default {defaults.minutes:g})",
    )
    parser.add_argument(
        "--nodes",
        type=_positive(int),
        default=defaults.nodes,
        help=f"nodes in the cluster (default {defaults.nodes})",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=defaults.settle,
        metavar="SECONDS",
        help="after the load, wait at most this long for messages still on their way "
        f"(default {defaults.settle:g})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=defaults.output,
        help=f"folder for soak-latest.json and soak-latest.md (default {RESULTS})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder with the service logs"
    )
    args = parser.parse_args(argv)
    if args.clients < 2:
        parser.error("--clients must be at least 2: every message goes from one to another")
    return Options(
        clients=args.clients,
        rate=args.rate,
        batch=args.batch,
        minutes=args.minutes,
        nodes=args.nodes,
        output=args.output,
        progress=not args.no_progress,
        settle=max(0.0, args.settle),
        keep=args.keep,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when delivered == acknowledged and no send failed."""
    options = _parse(argv)
    interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="pigeon-soak-"))
    # Start the cluster, connect, one step per minute, the stragglers.
    progress = Progress(3 + options.buckets, options.progress)
    pool: Pool | None = None
    cluster: LocalCluster | None = None
    document: dict[str, Any] | None = None
    try:
        pool = Pool(options.receivers + options.senders)
        progress.describe(f"start a cluster of {options.nodes} nodes")
        cluster = LocalCluster(
            workdir / "cluster",
            nodes=options.nodes,
            gate_port=0,
            gate_http_port=0,
            # Only PATH: no PIGEON_* setting of the caller's shell leaks into the cluster.
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        cluster.start(timeout=60)
        progress.advance()
        soak = Soak(options, pool, cluster, progress)
        soak.run()
        document = summarize(soak)
    except KeyboardInterrupt:
        progress.write("interrupted: stopping everything this run started")
        return 130
    except (BenchError, WorkerError, OSError, RuntimeError) as exc:
        # TimeoutError is an OSError: a cluster that did not start in time.
        progress.write(f"the soak could not be run: {type(exc).__name__}: {exc}")
        return 1
    finally:
        progress.close()
        if pool is not None:
            pool.close()
        if cluster is not None:
            cluster.stop()
        if options.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    assert document is not None
    text = markdown(document)
    print(text)
    out = options.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak-latest.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "soak-latest.md").write_text(text)
    print(f"wrote {out / 'soak-latest.json'}", file=sys.stderr)
    return 0 if document["ok"] else 1


# Guarded: multiprocessing's spawn start method imports the main module again in every worker.
if __name__ == "__main__":
    sys.exit(main())
