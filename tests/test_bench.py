"""The benchmark harness works end to end: `python -m bench --quick` starts everything it
measures, runs every scenario and writes its JSON. No figure is asserted: timing belongs in
bench/, not in tests."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent

EXPECTED = {
    "ceiling": {
        "throughput",
        "throughput_batch1",
        "latency",
        "latency_batched",
        "idle",
        "fanout",
        "storm",
        "connect",
    },
    "same_node": {"sqlite", "mongodb"},
    "cross_node": {"routed_2", "routed_4", "broadcast_2", "broadcast_4"},
    "latency": {"same_node", "cross_node", "same_node_batched", "cross_node_batched"},
    "fanout": {"broadcast"},
    "connections": {"idle", "storm", "connect"},
    "group_commit": {"on", "off"},
    "attacks": {
        "huge_token_payload",
        "huge_token_header",
        "big_send_rest",
        "big_send_grpc",
        "idle_connections",
        "failed_auth",
    },
}


@pytest.mark.timeout(900)
def test_quick_benchmark_runs_every_scenario_and_writes_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-progress", "--output", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    document = json.loads((tmp_path / "latest.json").read_text())
    scenarios = document["scenarios"]
    for scenario, keys in EXPECTED.items():
        for key in keys:
            value = scenarios[scenario].get(key)
            assert isinstance(value, dict), f"{scenario}.{key} missing"
            assert "error" not in value, f"{scenario}.{key}: {value['error']}"
    assert "failures" not in scenarios
    assert document["meta"]["quick"] is True
    assert document["meta"]["machine"]["nproc"] >= 1
    assert document["table"], "no table rows"
    assert "| Scenario |" in result.stdout
    # Each attack row says how the attackers were answered and times the victim both ways.
    attacks = scenarios["attacks"]
    for key in EXPECTED["attacks"] - {"idle_connections"}:
        assert sum(attacks[key]["attack_codes"].values()) > 0, key
    for key, value in attacks.items():
        for name, victim in value["victims"].items():
            assert victim["idle"]["ms"]["count"] > 0, f"{key}: victim {name} idle"
            assert victim["during"]["ms"]["count"] > 0, f"{key}: victim {name} during"
    held = attacks["idle_connections"]
    for kind in ("gate_grpc", "node_grpc", "node_http"):
        assert held["opened"][kind] > 0, f"no idle {kind} connection opened"
    assert held["checks"], "idle connections never counted"
    assert "7.4 Failed authentication" in result.stdout
    assert (tmp_path / "latest.md").read_text().startswith("| Scenario |")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "latest.png").stat().st_size > 0
