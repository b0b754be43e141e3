"""A worker process for pure-Python work too heavy for a service's event loop (decoding a large
JSON body into protobuf takes seconds of CPU and, on a thread, the loop's GIL with it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from pigeon.errors import Unavailable

__all__ = ["WorkerProcess"]

log = logging.getLogger("pigeon.offload")

T = TypeVar("T")


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group; the service that owns this worker stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class WorkerProcess:
    """One worker process, started on first use and restarted after it dies.

    Its jobs are module-level functions of picklable arguments. It is started with ``spawn``: a
    fork of a process running gRPC's threads is not safe.

    Args:
        timeout: seconds a job may take; a job past it gets UNAVAILABLE and the worker is replaced.
    """

    def __init__(self, timeout: float = 60.0) -> None:
        self._timeout = timeout
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def run(self, job: Callable[..., T], *args: Any) -> T:
        """Run ``job(*args)`` in the worker and return its result.

        Raises:
            Unavailable: the worker died or the job took longer than the timeout.
        """
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_interrupts,
            )
        pool = self._pool
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(pool.submit(job, *args)), self._timeout
            )
        except (BrokenProcessPool, TimeoutError) as exc:
            log.warning("the worker process failed or overran (%s): starting a new one", exc)
            self._replace(pool)
            raise Unavailable(
                "the request could not be decoded in time; retry", reason="DECODER_UNAVAILABLE"
            ) from exc

    def _replace(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker (a job in progress is left to finish in it)."""
        if self._pool is not None:
            self._replace(self._pool)
