"""From results to what people read: the table (Pigeon beside the ceiling, with targets), the
JSON document and the PNG chart."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Row",
    "attack_bound_ms",
    "attack_rows",
    "chart",
    "foreign_cpu",
    "markdown",
    "rows",
    "write_json",
]


@dataclass
class Row:
    """One line of the table. `met` is None where no target applies or a figure is missing."""

    scenario: str
    pigeon: str
    ceiling: str
    ratio: str
    target: str
    met: bool | None


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _ok(value: Any) -> bool:
    return isinstance(value, dict) and "error" not in value


def _failed(value: Any) -> str:
    if isinstance(value, dict) and "error" in value:
        return "failed: " + str(value["error"]).splitlines()[0][:80]
    return "not run"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def _ratio(pigeon: float | None, ceiling: float | None) -> float | None:
    if pigeon is None or not ceiling:
        return None
    return pigeon / ceiling


def _all(*checks: bool | None) -> bool | None:
    if any(c is None for c in checks):
        return None
    return all(bool(c) for c in checks)


def rows(results: dict[str, Any]) -> list[Row]:
    """The table's rows, in scenario order."""
    s = results
    out: list[Row] = []
    ceiling_tp = _get(s, "ceiling", "throughput")
    ceiling_tp1 = _get(s, "ceiling", "throughput_batch1")

    def rate_row(
        label: str,
        value: Any,
        ceiling_dict: Any,
        target: str = "—",
        check: Callable[[float, float | None], bool | None] | None = None,
    ) -> float | None:
        ceiling_value = ceiling_dict["msgs_per_s"] if _ok(ceiling_dict) else None
        ceiling_text = _rate_text(ceiling_dict) if _ok(ceiling_dict) else _failed(ceiling_dict)
        if not _ok(value):
            out.append(Row(label, _failed(value), ceiling_text, "n/a", target, None))
            return None
        mps = value["msgs_per_s"]
        ratio = _ratio(mps, ceiling_value)
        met = check(mps, ratio) if check else None
        out.append(Row(label, _rate_text(value), ceiling_text, _pct(ratio), target, met))
        return float(mps)

    same = rate_row(
        "1. Same-node delivery, SQLite store",
        _get(s, "same_node", "sqlite"),
        ceiling_tp,
        "≥ 50% of ceiling; ≥ 3,000 msgs/s",
        lambda mps, ratio: _all(ratio is not None and ratio >= 0.5, mps >= 3000),
    )
    rate_row(
        "1. Same-node delivery, MongoDB store (secantusdb test server)",
        _get(s, "same_node", "mongodb"),
        ceiling_tp,
        "— (labelled: test server)",
    )
    for mode in ("routed", "broadcast"):
        for nodes in (2, 4):
            value = _get(s, "cross_node", f"{mode}_{nodes}")
            label = f"2. Cross-node, {mode} mode, {nodes} nodes"
            if mode == "routed":
                target = "≥ 35% of ceiling; ≥ 60% of same-node"

                def check(mps: float, ratio: float | None) -> bool | None:
                    return _all(
                        ratio is not None and ratio >= 0.35,
                        None if same is None else mps >= 0.6 * same,
                    )

            else:
                target, check = "— (original design)", None  # type: ignore[assignment]
            mps = rate_row(label, value, ceiling_tp, target, check)
            if mps is not None and same:
                out[-1].pigeon += f" ({mps / same * 100:.0f}% of same-node)"

    batch = _get(s, "latency", "same_node_batched", "batch") or 10
    for key, ceiling_key, label in (
        ("same_node", "latency", "3. Latency at 1,000 msgs/s, 1 per call, same node"),
        ("cross_node", "latency", "3. Latency at 1,000 msgs/s, 1 per call, cross-node routed"),
        (
            "same_node_batched",
            "latency_batched",
            f"3. Latency at 1,000 msgs/s, {batch} per call, same node",
        ),
        (
            "cross_node_batched",
            "latency_batched",
            f"3. Latency at 1,000 msgs/s, {batch} per call, cross-node routed",
        ),
    ):
        label += ": p50 / p99 / p99.9"
        value = _get(s, "latency", key)
        ceiling_latency = _get(s, "ceiling", ceiling_key)
        ceiling_text = _latencies_text(ceiling_latency) if _ok(ceiling_latency) else "n/a"
        if _ok(value):
            p99 = _from_call(value).get("p99")
            missing = value["sent"] - value["delivered"]
            text = _latencies_text(value) + (
                f" ({_num(missing)} of {_num(value['sent'])} not delivered in time)"
                if missing
                else ""
            )
            met = None if p99 is None else (p99 < 20 and not missing)
            out.append(Row(label, text, ceiling_text, "—", "p99 < 20 ms", met))
        else:
            out.append(Row(label, _failed(value), ceiling_text, "—", "p99 < 20 ms", None))

    fanout = _get(s, "fanout", "broadcast")
    ceiling_fanout = _get(s, "ceiling", "fanout")
    streams = _get(s, "fanout", "broadcast", "streams") or _get(s, "ceiling", "fanout", "streams")
    label = f"4. Fan-out: 1 broadcast → {_num(streams)} streams, time to last"
    c_time = ceiling_fanout.get("time_to_last_s") if _ok(ceiling_fanout) else None
    c_rate = ceiling_fanout.get("deliveries_per_s") if _ok(ceiling_fanout) else None
    if _ok(fanout) and fanout.get("time_to_last_s") is not None:
        seconds = fanout["time_to_last_s"]
        missed = f", {fanout['missed']} missed" if fanout["missed"] else ""
        if fanout.get("unread_settled_s"):
            missed += f"; every unread count after {fanout['unread_settled_s']:.2f} s"
        out.append(
            Row(
                label,
                f"{seconds:.3f} s{missed}",
                "n/a" if c_time is None else f"{c_time:.3f} s",
                "n/a" if not c_time else f"{c_time / seconds * 100:.0f}%",
                "< 1 s",
                seconds < 1 and not fanout["missed"],
            )
        )
        out.append(
            Row(
                "4. Fan-out deliveries/s",
                f"{_num(fanout['deliveries_per_s'])}/s",
                _num(c_rate),
                _pct(_ratio(fanout["deliveries_per_s"], c_rate)),
                "—",
                None,
            )
        )
    else:
        out.append(Row(label, _failed(fanout), _num(c_time, 3), "n/a", "< 1 s", None))

    idle = _get(s, "connections", "idle")
    ceiling_idle = _get(s, "ceiling", "idle")
    c_kb = ceiling_idle.get("kb_per_stream") if _ok(ceiling_idle) else None
    label = f"5. Memory per idle stream ({_num(_get(s, 'connections', 'idle', 'streams'))} streams)"
    if _ok(idle) and idle.get("kb_per_stream") is not None:
        kb = idle["kb_per_stream"]
        failed = f", {idle['failed']} failed" if idle["failed"] else ""
        out.append(
            Row(
                label,
                f"{kb:.1f} KB{failed}",
                "n/a" if c_kb is None else f"{c_kb:.1f} KB",
                "—",
                "< 40 KB",
                kb < 40,
            )
        )
    else:
        out.append(Row(label, _failed(idle), _num(c_kb, 1), "—", "< 40 KB", None))

    storm = _get(s, "connections", "storm")
    ceiling_storm = _get(s, "ceiling", "storm")
    label = (
        f"5. Connect storm: {_num(_get(s, 'connections', 'storm', 'clients'))} x "
        "(Gate.Connect + Subscribe)"
    )
    c_text = _storm_text(ceiling_storm) if _ok(ceiling_storm) else "n/a"
    if _ok(storm):
        out.append(
            Row(label, _storm_text(storm), c_text, "—", "0 failures", storm["failures"] == 0)
        )
    else:
        out.append(Row(label, _failed(storm), c_text, "—", "0 failures", None))

    connect = _get(s, "connections", "connect")
    ceiling_connect = _get(s, "ceiling", "connect")
    label = (
        f"5. Gate.Connect: {_num(_get(s, 'connections', 'connect', 'calls'))} calls from "
        f"{_num(_get(s, 'connections', 'connect', 'clients'))} clients"
    )
    c_text = _connect_text(ceiling_connect) if _ok(ceiling_connect) else "n/a"
    if _ok(connect):
        c_rate = ceiling_connect["calls_per_s"] if _ok(ceiling_connect) else None
        out.append(
            Row(
                label,
                _connect_text(connect),
                c_text,
                _pct(_ratio(connect["calls_per_s"], c_rate)),
                "no errors",
                connect["errors"] == 0,
            )
        )
    else:
        out.append(Row(label, _failed(connect), c_text, "—", "no errors", None))

    on = rate_row(
        "6. Group commit on (default), 1 message per call",
        _get(s, "group_commit", "on"),
        ceiling_tp1,
    )
    off = rate_row(
        "6. Group commit off (PIGEON_BATCH_MAX_SIZE=1), 1 message per call",
        _get(s, "group_commit", "off"),
        ceiling_tp1,
        "on > off",
        lambda mps, ratio: None if on is None else on > mps,
    )
    if on is not None and off:
        out[-1].pigeon += f" (on = {on / off:.1f}x off)"
    out.extend(attack_rows(s))
    return out


# Attack rows: (key in results["attacks"], label), in the order (issue 20, items 1-4).
_ATTACKS = (
    ("huge_token_payload", "7.1 Huge token (payload) on Gate.Connect, no credential"),
    ("huge_token_header", "7.1 Huge token (JSON header) on Gate.Connect, no credential"),
    ("big_send_rest", "7.2 Big REST Sends from logged-in users"),
    ("big_send_grpc", "7.2 Big gRPC Sends from logged-in users"),
    ("idle_connections", "7.3 Idle connections"),
    ("failed_auth", "7.4 Failed authentication"),
)
_VICTIMS = {"connect": "Connect", "rest": "Send over REST", "grpc": "Send over gRPC"}


def attack_bound_ms(idle_p50: float) -> float:
    """The issue's target for the victim's median during an attack."""
    return max(50.0, 10 * idle_p50)


def _codes_text(codes: dict[str, int]) -> str:
    if not codes:
        return "none"
    ordered = sorted(codes.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{code} {_num(n)}" for code, n in ordered)


def _attack_text(key: str, value: dict[str, Any]) -> str:
    """What the attackers did and how they were answered."""
    if key == "idle_connections":
        total = value["connections"]
        parts = []
        for name, label in (
            ("gate_grpc", "Gate gRPC"),
            ("node_grpc", "node gRPC"),
            ("node_http", "node HTTP"),
        ):
            opened = value["opened"].get(name, 0)
            counts = ", ".join(
                f"{check['open'].get(name, 0)}/{opened} open after {check['after_s']:.0f} s"
                for check in value["checks"]
            )
            failed = f" ({total - opened} failed to open)" if opened < total else ""
            closed = value["checks"][-1].get("closed", {}).get(name) if value["checks"] else None
            if closed and closed["closed"]:
                first, last = closed["first_closed_s"], closed["last_closed_s"]
                when = f"{first:.1f}" if first == last else f"{first:.1f} to {last:.1f}"
                counts += f" (closed {when} s after opening)"
            parts.append(f"{label}: {counts or 'not counted'}{failed}")
        return "; ".join(parts)
    attackers = f"{value['attackers']} attackers"
    if key == "failed_auth":
        took = value.get("publish_seconds")
        publish = f" in {took:.2f} s" if took is not None else ""
        return (
            f"{attackers}: {_num(value['connects'])} Connects at {_num(value['connect_rate'])}/s "
            f"({_codes_text(value['connect_codes'])}); {_num(value['publishes'])} wrong-key "
            f"Publishes{publish} ({_codes_text(value['publish_codes'])})"
        )
    size = value["request_bytes"] / 1e6
    return (
        f"{attackers}, {size:.1f} MB requests, {value['seconds']:g} s: "
        f"{_codes_text(value['attack_codes'])}"
    )


def attack_rows(results: dict[str, Any]) -> list[Row]:
    """One row per attack and victim: the victim's p50 / p99 idle and during the attack, what
    the attackers were answered, and the target (during-p50 <= max(50 ms, 10 x idle p50),
    every victim call answered OK)."""
    out: list[Row] = []
    target = "p50 during ≤ max(50 ms, 10x idle), victim calls OK"
    for key, label in _ATTACKS:
        value = _get(results, "attacks", key)
        if value is None:
            continue
        if not _ok(value):
            out.append(Row(label, _failed(value), "—", "—", target, None))
            continue
        attack = _attack_text(key, value)
        for name, figures in value["victims"].items():
            idle, during = figures["idle"]["ms"], figures["during"]["ms"]
            errors = {c: n for c, n in figures["during"]["codes"].items() if c != "OK"}
            victim = f"another user's {_VICTIMS.get(name, name)}"
            if "p50" not in idle or "p50" not in during:
                out.append(
                    Row(f"{label}: {victim}", "no samples; " + attack, "—", "—", target, None)
                )
                continue
            bound = attack_bound_ms(idle["p50"])
            failed = f", {_codes_text(errors)} of {_num(during['count'])}" if errors else ""
            text = (
                f"p50 / p99 idle {idle['p50']:.1f} / {idle['p99']:.1f} ms → during "
                f"{during['p50']:,.1f} / {during['p99']:,.1f} ms ({_num(during['count'])} "
                f"call{'' if during['count'] == 1 else 's'}{failed}); {attack}"
            )
            out.append(
                Row(
                    f"{label}: {victim}",
                    text,
                    "—",
                    f"{during['p50'] / idle['p50']:,.1f}x idle" if idle["p50"] else "n/a",
                    f"{target} (≤ {bound:.0f} ms)",
                    during["p50"] <= bound and not errors,
                )
            )
    return out


def foreign_cpu(results: dict[str, Any]) -> tuple[float, float] | None:
    """Mean and max cores that other processes on the machine used in the measurement windows."""
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            cpu = node.get("cpu_cores")
            if isinstance(cpu, dict) and "foreign" in cpu:
                found.append(cpu["foreign"])
            for value in node.values():
                walk(value)

    walk(results)
    if not found:
        return None
    return sum(found) / len(found), max(found)


def _rate_text(value: dict[str, Any]) -> str:
    cost = value.get("server_cpu_us_per_msg")
    return f"{_num(value['msgs_per_s'])} msgs/s" + (
        f" ({cost:,.0f} µs server CPU/msg)" if cost else ""
    )


def _from_call(value: dict[str, Any]) -> dict[str, float]:
    """Percentiles from the time each message's Send call was due (older results: from the
    message's own scheduled time)."""
    from_call: dict[str, float] = value.get("from_call_ms") or value["latency_ms"]
    return from_call


def _latencies_text(value: dict[str, Any]) -> str:
    """From the call; with batching, also from each message's own time (its wait included)."""
    text = _latency_text(_from_call(value))
    if value.get("batch", 1) > 1 and "from_call_ms" in value:
        text += f" (from each message's own time: {_latency_text(value['latency_ms'])})"
    return text


def _latency_text(ms: dict[str, float]) -> str:
    if "p50" not in ms:
        return "no samples"
    return f"{ms['p50']:.1f} / {ms['p99']:.1f} / {ms['p99.9']:.1f} ms"


def _storm_text(value: dict[str, Any]) -> str:
    seconds = value.get("time_s")
    return f"{'n/a' if seconds is None else f'{seconds:.2f}'} s, {value['failures']} failures"


def _connect_text(value: dict[str, Any]) -> str:
    p99 = value["latency_ms"].get("p99")
    errors = f", {value['errors']} errors" if value["errors"] else ""
    return f"{_num(value['calls_per_s'])}/s, p99 {_num(p99, 1)} ms{errors}"


def markdown(table: list[Row], notes: list[str]) -> str:
    """The table as Markdown (it reads fine in a terminal too), with notes under it."""
    header = [
        "Scenario",
        "Pigeon",
        "Ceiling (bare grpc.aio relay)",
        "Pigeon / ceiling",
        "Target",
        "Met",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        met = {True: "yes", False: "**no**", None: "—"}[row.met]
        cells = [row.scenario, row.pigeon, row.ceiling, row.ratio, row.target, met]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {note}" for note in notes)
    return "\n".join(lines) + "\n"


def write_json(path: Path, document: dict[str, Any], table: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**document, "table": [asdict(row) for row in table]}
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def chart(path: Path, results: dict[str, Any], title: str) -> str | None:
    """Three panels: throughput, latency percentiles, fan-out and storm times, each beside the
    ceiling. Returns why it was not drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"

    s = results
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(19, 5.5))
    figure.suptitle(title)

    bars = [
        ("ceiling\n16/call", _get(s, "ceiling", "throughput"), "#999999"),
        ("same-node\nSQLite", _get(s, "same_node", "sqlite"), "#1f77b4"),
        ("same-node\nMongo*", _get(s, "same_node", "mongodb"), "#1f77b4"),
        ("routed\n2 nodes", _get(s, "cross_node", "routed_2"), "#2ca02c"),
        ("routed\n4 nodes", _get(s, "cross_node", "routed_4"), "#2ca02c"),
        ("bcast\n2 nodes", _get(s, "cross_node", "broadcast_2"), "#98df8a"),
        ("bcast\n4 nodes", _get(s, "cross_node", "broadcast_4"), "#98df8a"),
        ("ceiling\n1/call", _get(s, "ceiling", "throughput_batch1"), "#999999"),
        ("commit on\n1/call", _get(s, "group_commit", "on"), "#ff7f0e"),
        ("commit off\n1/call", _get(s, "group_commit", "off"), "#ff7f0e"),
    ]
    labels = [b[0] for b in bars]
    values = [b[1]["msgs_per_s"] if _ok(b[1]) else 0 for b in bars]
    left.bar(labels, values, color=[b[2] for b in bars])
    left.set_title("Delivered messages/s (100 senders, 100-byte bodies)")
    left.tick_params(axis="x", labelsize=6.5)
    for x, value in enumerate(values):
        left.annotate(f"{value:,.0f}", (x, value), ha="center", va="bottom", fontsize=7)

    series = [
        ("ceiling, 1/call", _get(s, "ceiling", "latency"), "#999999"),
        ("same node, 1/call", _get(s, "latency", "same_node"), "#1f77b4"),
        ("cross-node, 1/call", _get(s, "latency", "cross_node"), "#2ca02c"),
        ("ceiling, batched", _get(s, "ceiling", "latency_batched"), "#cccccc"),
        ("same node, batched", _get(s, "latency", "same_node_batched"), "#aec7e8"),
        ("cross-node, batched", _get(s, "latency", "cross_node_batched"), "#98df8a"),
    ]
    points = ["p50", "p99", "p99.9"]
    width = 0.8 / len(series)
    for i, (name, value, color) in enumerate(series):
        ms = _from_call(value) if _ok(value) else {}
        middle.bar(
            [x + (i - (len(series) - 1) / 2) * width for x in range(len(points))],
            [ms.get(p, 0) for p in points],
            width,
            label=name,
            color=color,
        )
    middle.axhline(20, color="red", linestyle="--", linewidth=1, label="target p99 20 ms")
    middle.set_xticks(range(len(points)), points)
    middle.set_yscale("log")
    middle.set_title("Send → receive latency at 1,000 msgs/s, from the call (ms)")
    middle.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3)

    pairs = [
        ("fan-out\nto last", "fanout", ("fanout", "broadcast"), "time_to_last_s"),
        ("connect\nstorm", "storm", ("connections", "storm"), "time_s"),
    ]
    for i, (_name, ceiling_key, where, field) in enumerate(pairs):
        ours = _get(s, *where)
        theirs = _get(s, "ceiling", ceiling_key)
        right.bar(
            i - 0.2,
            (theirs or {}).get(field) or 0 if _ok(theirs) else 0,
            0.4,
            color="#999999",
            label="ceiling" if i == 0 else None,
        )
        right.bar(
            i + 0.2,
            (ours or {}).get(field) or 0 if _ok(ours) else 0,
            0.4,
            color="#1f77b4",
            label="Pigeon" if i == 0 else None,
        )
    right.axhline(1, color="red", linestyle="--", linewidth=1, label="fan-out target 1 s")
    right.set_xticks(range(len(pairs)), [p[0] for p in pairs])
    streams = _get(s, "fanout", "broadcast", "streams") or _get(s, "ceiling", "fanout", "streams")
    right.set_title(f"Seconds ({_num(streams)} streams / clients)")
    right.legend(fontsize=8)

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None
