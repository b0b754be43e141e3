"""Process plumbing: the collector keeps long-lived objects aside (in a process of its own, so the
test run's own collector is left alone)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from pigeon.runtime import cancel_and_wait

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


async def _slow_to_stop(stopped: asyncio.Event, winding: asyncio.Event | None = None) -> None:
    """A task that takes a while to wind down once cancelled (as a writer finishing a batch)."""
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        if winding is not None:
            winding.set()
        await asyncio.sleep(0.2)
        stopped.set()
        raise


async def test_cancel_and_wait_ends_the_tasks_and_keeps_their_cancellation() -> None:
    stopped = asyncio.Event()
    tasks = [asyncio.create_task(_slow_to_stop(stopped)), asyncio.create_task(asyncio.sleep(60))]
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(None, *tasks)
    assert stopped.is_set()
    assert all(task.cancelled() for task in tasks)


async def test_a_caller_cancelled_while_it_waits_stays_cancelled() -> None:
    stopped, winding = asyncio.Event(), asyncio.Event()
    went_on = False

    async def stop_it(task: asyncio.Task[None]) -> None:
        nonlocal went_on
        await cancel_and_wait(task)
        went_on = True  # only if the caller's own cancellation was swallowed

    inner = asyncio.create_task(_slow_to_stop(stopped, winding))
    await asyncio.sleep(0)
    caller = asyncio.create_task(stop_it(inner))
    async with asyncio.timeout(5):
        await winding.wait()  # the caller has cancelled inner and waits for it to wind down
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.wait([inner])
    assert caller.cancelled() and not went_on


async def test_cancel_and_wait_raises_what_a_failed_task_raised() -> None:
    async def fail() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fail())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await cancel_and_wait(task)


async def test_clean_up_in_a_cancelled_task_runs_to_its_end() -> None:
    steps: list[str] = []

    async def owner() -> None:
        first = asyncio.create_task(asyncio.sleep(60))
        try:
            await asyncio.sleep(60)
        finally:
            # Cancelled already: the waits below must not take that for a new cancellation.
            await cancel_and_wait(first)
            steps.append("first stopped")
            second = asyncio.create_task(asyncio.sleep(60))
            await asyncio.sleep(0)
            await cancel_and_wait(second)
            steps.append("second stopped")

    task = asyncio.create_task(owner())
    await asyncio.sleep(0)
    task.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert steps == ["first stopped", "second stopped"]
