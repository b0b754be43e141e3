"""The attack rows, harness side: another user's latency before and during an attack on a
Pigeon cluster (issue 20, items 1-4).

Each row times a victim (another, well-behaved user, in a worker of its own) in a window before
the attack and in a window during it, while `plan.attackers` concurrent attackers in
`plan.attack_workers` other worker processes attack; it records how the service answered the
attackers (status codes, counted) and the victim. The target, judged in bench.report, is the
issue's: the victim's median during the attack at most max(50 ms, 10 x its idle median).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterable
from typing import Any

from bench.scenarios import (
    READY_TIMEOUT,
    REPORT_TIMEOUT,
    START_LEAD_NS,
    Scenarios,
    _merge,
    percentiles,
)
from bench.workers import Pool, Worker

__all__ = ["Attacks"]

# Bounds a victim's call (the harness waits this long beyond a window for its last call).
VICTIM_CALL_TIMEOUT = 30.0
# After a failed-auth attack's planned length, the time its calls have left to be answered.
FAILED_AUTH_GRACE = 10.0
# Services at rest (the Gate, the node, the dispatcher, etcd) use a few hundredths of a core.
CALM_CORES = 0.15
SETTLE_LIMIT = 30.0


def _victim_figures(found: dict[str, Any]) -> dict[str, Any]:
    latencies = array("q")
    latencies.frombytes(found["latencies"])
    return {"ms": percentiles(latencies), "codes": found["codes"]}


def _held_figures(reports: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The hold workers' counts by kind, added up (first and last closing over all)."""
    total: dict[str, dict[str, Any]] = {}
    for report in reports:
        for name, f in report.items():
            into = total.setdefault(
                name, {"open": 0, "closed": 0, "first_closed_s": None, "last_closed_s": None}
            )
            into["open"] += f["open"]
            into["closed"] += f["closed"]
            for key, pick in (("first_closed_s", min), ("last_closed_s", max)):
                values = [v for v in (into[key], f[key]) if v is not None]
                into[key] = pick(values) if values else None
    return total


class Attacks(Scenarios):
    """The attack measurements (see the module's docstring)."""

    @staticmethod
    def _deal(total: int, parts: int) -> list[int]:
        """`total` split into `parts` as evenly as it goes."""
        return [total // parts + (i < total % parts) for i in range(parts)]

    def _share(self, total: int) -> list[int]:
        """`total` split over the attacker processes."""
        return self._deal(total, self.plan.attack_workers)

    def _calm(self) -> float:
        """Wait (at least plan.attack_settle, at most SETTLE_LIMIT seconds) until the measured
        services use under CALM_CORES over half a second: an attack leaves them work (requests
        received and not yet parsed or answered) that would land in the next idle window.
        Returns the seconds waited."""
        started = time.monotonic()
        self._wait(self.plan.attack_settle)
        while time.monotonic() - started < SETTLE_LIMIT:
            meter = self._meter()
            meter.start()
            self._wait(0.5)
            used = meter.stop()
            if sum(v for k, v in used.items() if k not in ("generators", "foreign")) < CALM_CORES:
                break
        return round(time.monotonic() - started, 1)

    def _victim(self, target: dict[str, str], victims: list[dict[str, Any]]) -> Worker:
        (worker,) = self.pool.run(
            "victim",
            [
                {
                    "target": target,
                    "victims": victims,
                    "interval": self.plan.victim_interval,
                    "call_timeout": VICTIM_CALL_TIMEOUT,
                }
            ],
            first=self.plan.attack_workers,
        )
        worker.expect("ready", READY_TIMEOUT)
        return worker

    def _measure(self, victim: Worker, from_ns: int, to_ns: int) -> dict[str, Any]:
        """Ask the victim to time its calls in [from_ns, to_ns) and wait for the figures."""
        victim.command("measure", from_ns=from_ns, to_ns=to_ns)
        within = (to_ns - time.time_ns()) / 1e9 + VICTIM_CALL_TIMEOUT + REPORT_TIMEOUT
        found: dict[str, Any] = victim.expect("measured", within)["victims"]
        return found

    def _idle(self, victim: Worker) -> tuple[dict[str, Any], float]:
        """The victim's figures before an attack, and the seconds waited for calm first."""
        settled = self._calm()
        start = time.time_ns() + START_LEAD_NS
        return self._measure(victim, start, start + int(self.plan.attack_idle * 1e9)), settled

    @staticmethod
    def _pair(idle: dict[str, Any], during: dict[str, Any]) -> dict[str, Any]:
        return {
            name: {
                "idle": _victim_figures(idle[name]),
                "during": _victim_figures(during[name]),
            }
            for name in idle
        }

    def _attack(
        self,
        target: dict[str, str],
        victims: list[dict[str, Any]],
        params: list[dict[str, Any]],
        seconds: float,
        grace: float = 0.0,
    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        """Time the victims idle, then during `seconds` of attack by workers given `params`;
        attackers may go on `grace` seconds longer to finish a fixed number of calls. Returns
        the victims' figures, the attackers' reports, and the CPU of the attack window with the
        seconds waited for calm before the idle window."""
        victim = self._victim(target, victims)
        try:
            idle, settled = self._idle(victim)
            attackers = self.pool.run("attack", [{"target": target, **p} for p in params])
            Pool.expect(attackers, "ready", READY_TIMEOUT)
            start = time.time_ns() + START_LEAD_NS
            end = start + int(seconds * 1e9)
            Pool.command(attackers, "go", start_ns=start, end_ns=end + int(grace * 1e9))
            victim.command("measure", from_ns=start, to_ns=end)
            cpu = self._window(start, end)
            during = victim.expect("measured", VICTIM_CALL_TIMEOUT + REPORT_TIMEOUT)["victims"]
            reports = Pool.expect(attackers, "report", grace + REPORT_TIMEOUT)
        finally:
            victim.command("stop")
        victim.expect("report", REPORT_TIMEOUT)
        return self._pair(idle, during), reports, {"cpu_cores": cpu, "settled_s": settled}

    def _base(self, what: str, seconds: float) -> dict[str, Any]:
        return {
            "attack": what,
            "attackers": self.plan.attackers,
            "attacker_processes": self.plan.attack_workers,
            "seconds": seconds,
        }

    def huge_tokens(
        self, target: dict[str, str], *, gate: str, where: str, prefix: str
    ) -> dict[str, Any]:
        """Attackers loop Gate.Connect with a ~plan.token_bytes token with a fake signature, its
        bulk in the payload or (where="header") in the header; the victim connects."""
        plan = self.plan
        victims = [{"name": "connect", "kind": "connect", "address": gate, "user": f"{prefix}-v"}]
        params = [
            {
                "kind": "huge_token",
                "gate": gate,
                "token_bytes": plan.token_bytes,
                "where": where,
                "attackers": n,
            }
            for n in self._share(plan.attackers)
        ]
        victim, reports, cpu = self._attack(target, victims, params, plan.attack_window)
        codes = _merge(r["codes"] for r in reports)
        return {
            **self._base(
                f"Gate.Connect, {plan.token_bytes:,}-character token ({where})", plan.attack_window
            ),
            "request_bytes": reports[0]["request_bytes"],
            "attack_calls": sum(codes.values()),
            "attack_codes": codes,
            "victims": victim,
            **cpu,
        }

    def big_sends(
        self,
        target: dict[str, str],
        *,
        node: str,
        node_name: str,
        http: str,
        transport: str,
        prefix: str,
    ) -> dict[str, Any]:
        """Logged-in attackers (one user each) loop Send with plan.recipients recipients over
        `transport` (rest or grpc); victims send one small message over REST and over gRPC."""
        plan = self.plan
        users = [f"{prefix}-a{i}" for i in range(plan.attackers)]
        victims = [
            {
                "name": "rest",
                "kind": "send_rest",
                "address": http,
                "user": f"{prefix}-vr",
                "node": node_name,
                "peer": f"{prefix}-peer",
            },
            {
                "name": "grpc",
                "kind": "send_grpc",
                "address": node,
                "user": f"{prefix}-vg",
                "node": node_name,
                "peer": f"{prefix}-peer",
            },
        ]
        params = []
        taken = 0
        for n in self._share(plan.attackers):
            params.append(
                {
                    "kind": f"big_send_{transport}",
                    "node": node,
                    "http": http,
                    "node_name": node_name,
                    "users": users[taken : taken + n],
                    "recipients": plan.recipients,
                    "attackers": n,
                }
            )
            taken += n
        victim, reports, cpu = self._attack(target, victims, params, plan.attack_window)
        codes = _merge(r["codes"] for r in reports)
        what = "POST /v1/messages (JSON)" if transport == "rest" else "Node.Send (gRPC)"
        return {
            **self._base(f"{what}, {plan.recipients:,} recipients", plan.attack_window),
            "transport": transport,
            "attacker_users": plan.attackers,
            "request_bytes": reports[0]["request_bytes"],
            "attack_calls": sum(codes.values()),
            "attack_codes": codes,
            "victims": victim,
            **cpu,
        }

    def failed_auth(self, target: dict[str, str], *, gate: str, prefix: str) -> dict[str, Any]:
        """plan.failed_connects Gate.Connects with no or a bad token at plan.failed_rate per
        second, and meanwhile plan.failed_publishes wrong-API-key Gate.Publish calls as fast
        as they are answered; the victim connects."""
        plan = self.plan
        victims = [{"name": "connect", "kind": "connect", "address": gate, "user": f"{prefix}-v"}]
        seconds = plan.failed_connects / plan.failed_rate
        per = plan.attackers
        connects = self._deal(plan.failed_connects, per)
        publishes = self._deal(plan.failed_publishes, per)
        params = []
        taken = 0
        for n in self._share(per):
            params.append(
                {
                    "kind": "failed_auth",
                    "gate": gate,
                    "attackers": n,
                    "connects": connects[taken : taken + n],
                    "rate": plan.failed_rate / per,
                    "publishes": publishes[taken : taken + n],
                }
            )
            taken += n
        victim, reports, cpu = self._attack(
            target, victims, params, seconds, grace=FAILED_AUTH_GRACE
        )
        connect_codes = _merge(r["connect_codes"] for r in reports)
        publish_codes = _merge(r["publish_codes"] for r in reports)
        spans = [span for r in reports for span in r["publish_spans"]]
        publish_seconds = (
            (max(e for _, e in spans) - min(b for b, _ in spans)) / 1e9 if spans else None
        )
        return {
            **self._base(
                "Gate.Connect with no or a bad token; Gate.Publish with a wrong API key", seconds
            ),
            "connects": plan.failed_connects,
            "connect_rate": plan.failed_rate,
            "connect_codes": connect_codes,
            "generator_max_lag_ms": max(r["max_lag_ns"] for r in reports) / 1e6,
            "publishes": plan.failed_publishes,
            "publish_codes": publish_codes,
            "publish_seconds": publish_seconds,
            "attack_calls": sum(connect_codes.values()) + sum(publish_codes.values()),
            "attack_codes": _merge([connect_codes, publish_codes]),
            "victims": victim,
            **cpu,
        }

    def idle_connections(
        self, target: dict[str, str], *, gate: str, node: str, http: str, prefix: str
    ) -> dict[str, Any]:
        """plan.idle_connections gRPC connections (handshake done, no call, no credential) to
        the Gate and to the node, and as many idle TCP connections to the node's HTTP port; how
        many are still open at each of plan.idle_checks seconds after they opened, and the
        victim's Connect before and while they are held."""
        plan = self.plan
        victims = [{"name": "connect", "kind": "connect", "address": gate, "user": f"{prefix}-v"}]
        params = [
            {
                "target": target,
                "kind": "hold",
                "gate": gate,
                "node": node,
                "http": http,
                "connections": n,
            }
            for n in self._share(plan.idle_connections)
        ]
        victim = self._victim(target, victims)
        holders: list[Worker] = []
        try:
            idle, settled = self._idle(victim)
            holders = self.pool.run("attack", params)
            Pool.expect(holders, "ready", READY_TIMEOUT)
            Pool.command(holders, "go")
            opened = Pool.expect(holders, "opened", READY_TIMEOUT)
            opened_at = time.monotonic()
            start = time.time_ns() + START_LEAD_NS
            end = start + int(plan.attack_window * 1e9)
            victim.command("measure", from_ns=start, to_ns=end)
            cpu = self._window(start, end)
            during = victim.expect("measured", VICTIM_CALL_TIMEOUT + REPORT_TIMEOUT)["victims"]
            checks = []
            for at in plan.idle_checks:
                self._wait(max(0.0, opened_at + at - time.monotonic()))
                Pool.command(holders, "count")
                counted = _held_figures(c["held"] for c in Pool.expect(holders, "counted", 30))
                checks.append(
                    {
                        "after_s": round(time.monotonic() - opened_at, 1),
                        "open": {name: f["open"] for name, f in counted.items()},
                        "closed": counted,
                    }
                )
                if not any(f["open"] for f in counted.values()):
                    # All closed: later counts cannot differ.
                    break
        finally:
            victim.command("stop")
            Pool.command(holders, "stop")
        victim.expect("report", REPORT_TIMEOUT)
        Pool.expect(holders, "report", REPORT_TIMEOUT)
        return {
            **self._base("idle connections, no call, no credential", plan.attack_window),
            "connections": plan.idle_connections,
            "opened": _merge(o["open"] for o in opened),
            "open_failed": _merge(o["failed"] for o in opened),
            "checks": checks,
            "victims": self._pair(idle, during),
            "cpu_cores": cpu,
            "settled_s": settled,
        }
