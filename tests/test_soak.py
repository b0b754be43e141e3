"""The soak harness works end to end: `python -m bench.soak`, scaled down to seconds, starts a
cluster, connects its clients through the Gate, checks every acknowledged message against what
was delivered and writes its JSON. No figure is asserted: timing belongs in bench/, not in
tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_small_soak_delivers_every_acknowledged_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            *("--clients", "50", "--rate", "50", "--minutes", "0.25"),
            *("--output", str(tmp_path), "--no-progress"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    document = json.loads((tmp_path / "soak-latest.json").read_text())
    check = document["check"]
    assert check["acknowledged"] == check["delivered"] > 0
    assert check["equal"] is True
    assert check["missing"] == check["unexpected"] == 0
    assert not check["failed_sends"]
    assert document["ok"] is True
    assert document["setup"]["clients"] == 50
    assert sum(document["setup"]["clients_per_node"].values()) == 50
    (minute,) = document["minutes"]
    assert minute["acknowledged"] == minute["delivered"] > 0
    assert minute["latency_ms"]["count"] == minute["delivered"]
    assert {"node-1", "node-2", "gate", "dispatcher-1"} <= set(minute["rss_kb"])
    assert all(rss["max_kb"] > 0 for rss in minute["rss_kb"].values())
    assert "| Minute |" in result.stdout
    assert (tmp_path / "soak-latest.md").read_text().startswith("## Soak:")
