"""Group commit: concurrent writes share one store transaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Generic, TypeVar

from prometheus_client import Histogram

from node.store.base import StoreError
from pigeon.runtime import cancel_and_wait

__all__ = ["GroupCommit"]

log = logging.getLogger("pigeon.node.commit")

T = TypeVar("T")
R = TypeVar("R")

BATCH_SIZE = Histogram(
    "pigeon_node_commit_batch_size",
    "Messages written per store transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
WRITE_SECONDS = Histogram(
    "pigeon_node_commit_seconds",
    "Time one group-commit store transaction takes (durable, then handed to the streams)",
    buckets=(
        0.0005,
        0.001,
        0.002,
        0.003,
        0.005,
        0.0075,
        0.01,
        0.015,
        0.02,
        0.03,
        0.05,
        0.1,
        0.25,
        1.0,
    ),
)


class GroupCommit(Generic[T, R]):
    """Collects the items of concurrent callers and writes them together.

    One writer task takes everything queued (up to max_size items, whole requests only) and
    writes it with one call; while that write runs, new requests queue for the next one. So under
    load batches grow by themselves, and an idle node answers a lone request after max_wait at
    most. Each caller gets its own results once the batch holding them is durable, or the
    batch's exception.

    Args:
        write: stores a batch, returning one result per item, in order.
        max_size: the most items per write (1 turns batching off).
        max_wait: seconds to wait for company after the first item of an idle period (0 writes at
            once; batches still form while a write is in flight).
        answered: called after each written batch's callers have been answered (their wake-ups
            are queued): work scheduled from it runs after them.
    """

    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_size: int = 256,
        max_wait: float = 0.0,
        answered: Callable[[], None] | None = None,
    ) -> None:
        self._write = write
        self._answered = answered
        self._max_size = max(1, max_size)
        self._max_wait = max_wait
        self._queue: list[tuple[Sequence[T], asyncio.Future[list[R]]]] = []
        self._queued_items = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._busy = False
        self.drain_timeout = 10.0
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> GroupCommit[T, R]:
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="group-commit")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            # Let queued and running writes finish (bounded): their callers wait for an answer.
            if self._queue or self._busy:
                self._idle.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.drain_timeout):
                        await self._idle.wait()
            # The flag ends the writer even if the cancellation is lost: on 3.11
            # asyncio.wait_for (inside the MongoDB driver) can swallow one that lands as its wait
            # ends, and the writer would go back to waiting for work that never comes.
            self._closing = True
            self._wake.set()
            await cancel_and_wait(self._task)
            self._task = None

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Write items as part of the next batch; returns their results once durable."""
        if self._task is None:
            raise RuntimeError("GroupCommit is not running")
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._queue.append((items, future))
        self._queued_items += len(items)
        self._wake.set()
        return await future

    def _take(self) -> list[tuple[Sequence[T], asyncio.Future[list[R]]]]:
        taken: list[tuple[Sequence[T], asyncio.Future[list[R]]]] = []
        size = 0
        while self._queue:
            items = self._queue[0][0]
            if taken and size + len(items) > self._max_size:
                break
            taken.append(self._queue.pop(0))
            size += len(items)
        self._queued_items -= size
        return taken

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if self._max_wait and self._queued_items < self._max_size:
                await asyncio.sleep(self._max_wait)
            while self._queue:
                taken = self._take()
                batch = [item for items, _ in taken for item in items]
                BATCH_SIZE.observe(len(batch))
                self._busy = True
                try:
                    with WRITE_SECONDS.time():
                        results = list(await self._write(batch))
                except asyncio.CancelledError:
                    # Stopped mid-write: the callers must not wait for ever; the write may or
                    # may not have committed, which their retry (idempotency key) settles.
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(StoreError("the node stopped during the write"))
                    raise
                except Exception as exc:
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self._busy = False
                offset = 0
                for items, future in taken:
                    if not future.done():
                        future.set_result(results[offset : offset + len(items)])
                    offset += len(items)
                if self._answered is not None:
                    self._answered()
            self._idle.set()
