"""The operator documentation names every metric the services export."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from prometheus_client import REGISTRY

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_every_metric_is_in_the_operations_table() -> None:
    for service in ("node.app", "dispatcher.app", "gate.app"):
        importlib.import_module(service)  # its modules register their metrics on import
    documented = set(re.findall(r"^\| \w+ \| `(pigeon_\w+)` \|", DOC.read_text(), re.M))
    exported = set()
    for metric in REGISTRY.collect():
        if metric.name.startswith("pigeon_"):
            exported.add(f"{metric.name}_total" if metric.type == "counter" else metric.name)
    assert "pigeon_node_commit_seconds" in exported
    assert exported == documented
