"""Waiting in tests on a condition, never on a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest


async def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)
