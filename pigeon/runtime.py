"""Process plumbing shared by the services: logging, the event loop, and stop signals."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = [
    "cancel_and_wait",
    "configure_logging",
    "freeze_heap",
    "rescan_heap",
    "run",
    "stop_signals",
    "stop_with_parent",
]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait until each has ended (None is skipped; a task that had failed
    raises its exception here).

    A task's own CancelledError ends here. The caller's does not: with a bare
    ``suppress(CancelledError)`` around the wait, a caller cancelled while it waits would swallow
    that too and go on as if nothing had happened.
    """
    running = [task for task in tasks if task is not None]
    current = asyncio.current_task()
    # A caller cleaning up after its own cancellation counts one already: only a new one is its.
    already = current.cancelling() if current is not None else 0
    for task in running:
        task.cancel()
    for task in running:
        try:
            await task
        except asyncio.CancelledError:
            if current is not None and current.cancelling() > already:
                raise


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Structured logs on stderr: one JSON object per line, or plain text for people."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and the etcd client are chatty at info about reconnects we already log ourselves.
    logging.getLogger("aetcd").setLevel(max(root.level, logging.WARNING))


# How often the objects set aside by full collections are looked at again.
RESCAN_INTERVAL = 3600.0


def freeze_heap() -> None:
    """Move everything allocated at start-up out of the collector's way, and from then on the
    survivors of every full collection.

    A full collection re-examines every long-lived object: with 10,000 open streams (~650,000
    objects) one took 0.6 s, ten times while the streams opened and once inside a broadcast
    fan-out, and each found almost nothing (0-120 objects; a closed stream's objects are freed by
    reference counting). Frozen objects are never scanned again, so later full collections look
    only at what is newer. `rescan_heap` looks at everything once in a while, so a cycle among
    set-aside objects is not kept for ever.
    """
    gc.collect()
    gc.freeze()
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


async def rescan_heap(interval: float = RESCAN_INTERVAL) -> None:
    """Every interval, hand the frozen objects back to the collector: the next full collection
    examines them all (and frees any cycle among them), then sets the survivors aside again."""
    while True:
        await asyncio.sleep(interval)
        gc.unfreeze()


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[], None]) -> Any:
    """Call on_stop on SIGINT or SIGTERM while the block runs (a second signal still stops it)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def stop_with_parent() -> None:
    """Ask for SIGTERM when the process that started this one dies (PIGEON_PARENT_PID, set by
    `pigeon up` and the test clusters), so a killed launcher leaves no service behind. Linux
    only; elsewhere the launcher's own stop is the only guard."""
    parent = os.environ.get("PIGEON_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    # The parent may have died before the request was made.
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a service's main coroutine on uvloop (5-10% faster with grpc.aio) and return its code."""
    stop_with_parent()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        return asyncio.run(main())
    return uvloop.run(main())
