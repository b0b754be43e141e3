"""A test that runs close to its timeout has its waiting asyncio tasks printed at the end of the
run. The timeout's own report shows the main thread inside the event loop, which says nothing
about the coroutine that hangs, and CI shows only the end of the output."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_EARLY = 15.0  # seconds before the timeout
_reports: list[str] = []


def _awaiting(task: asyncio.Task[object]) -> str:
    """The task's chain of coroutines, each at the line where it waits, the innermost last."""
    links, awaited = [], task.get_coro()
    last_frame: Any = None
    while awaited is not None and len(links) < 24:
        frame = (
            getattr(awaited, "cr_frame", None)
            or getattr(awaited, "ag_frame", None)
            or getattr(awaited, "gi_frame", None)
        )
        if frame is None:
            # An async generator's asend/athrow hides the generator: it is the one running among
            # the locals of the frame that awaits it (pytest-asyncio's fixture finalizer), or the
            # `gen` of one of them (an asynccontextmanager's __aexit__).
            near = list(last_frame.f_locals.values()) if last_frame is not None else []
            running = [
                value
                for value in [*near, *(getattr(v, "gen", None) for v in near)]
                if getattr(value, "ag_running", False)
            ]
            if running:
                awaited = running[0]
                continue
            links.append(type(awaited).__name__)
            break
        last_frame = frame
        code = frame.f_code
        links.append(f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})")
        awaited = (
            getattr(awaited, "cr_await", None)
            or getattr(awaited, "ag_await", None)
            or getattr(awaited, "gi_yieldfrom", None)
        )
    return " > ".join(links[-8:])


def _waiting(nodeid: str, after: float) -> None:
    lines = [f"still running after {after:.0f} s: {nodeid}; its waiting tasks, innermost last:"]
    try:
        # Read from this thread while the loop runs: a diagnosis, so a torn read is acceptable.
        for task in list(asyncio.tasks._all_tasks):  # type: ignore[attr-defined]
            if not task.done():
                lines.append(f"  {task.get_name()}: {_awaiting(task)}")
    except Exception as exc:  # the report must not break the run
        lines.append(f"  (could not read the tasks: {exc!r})")
    _reports.append("\n".join(lines))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    after = float(item.config.getini("timeout") or 0) - _EARLY
    timer = threading.Timer(after, _waiting, (item.nodeid, after)) if after > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for report in _reports:
        terminalreporter.write_line(report)
