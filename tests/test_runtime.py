"""Process plumbing: the collector keeps long-lived objects aside (in a process of its own, so the
test run's own collector is left alone)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PROBE = """
import asyncio, gc, json
from pigeon.runtime import freeze_heap, rescan_heap

freeze_heap()
after_start = gc.get_freeze_count()
kept = [[i] for i in range(20_000)]          # long-lived, like the objects of open streams
gc.collect()                                  # a full collection ...
after_full = gc.get_freeze_count()            # ... sets its survivors aside
cycle = [[]]; cycle[0].append(cycle)          # a cycle among set-aside objects
gc.collect()
del cycle
found_frozen = gc.collect()                   # frozen: not looked at

async def rescan():
    task = asyncio.create_task(rescan_heap(0.01))
    async with asyncio.timeout(10):
        while gc.get_freeze_count():          # handed back to the collector
            await asyncio.sleep(0.001)
    task.cancel()

asyncio.run(rescan())
found_after_rescan = gc.collect()             # everything is looked at again
print(json.dumps([after_start, after_full, found_frozen, found_after_rescan,
                  gc.get_freeze_count() > 0]))
"""


def test_survivors_of_full_collections_are_set_aside_and_looked_at_again() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    after_start, after_full, found_frozen, found_after_rescan, refrozen = json.loads(done.stdout)
    assert after_full >= after_start + 20_000
    assert found_frozen == 0
    assert found_after_rescan >= 2  # the list and the list inside it
    assert refrozen
