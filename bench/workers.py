"""Load-generator processes and the harness's side of talking to them.

Each worker is a process of its own (multiprocessing, spawn), running one asyncio loop (uvloop)
for its whole life, so that its gRPC clients never share a process, a loop or a GIL with the
harness or with each other. The harness hands it one role at a time (see bench.roles and
bench.attacks) over a pipe; a role reports `ready`, waits for `go` (or other commands), and ends
with a `report`. A role that raises reports `error` with its traceback; `abort` cancels a role.

Messages on the pipe are plain dicts: commands carry "op", answers carry "kind".
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import signal
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Control", "Pool", "Worker", "WorkerError"]

_CONTEXT = multiprocessing.get_context("spawn")


class WorkerError(RuntimeError):
    """A worker's role failed, the worker died, or it did not answer in time."""


class Worker:
    """One load-generator process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._conn, child = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(
            target=_worker_main, args=(child, index), name=f"bench-worker-{index}", daemon=True
        )
        self.process.start()
        child.close()

    def run(self, role: str, params: dict[str, Any]) -> None:
        """Start a role (see bench.roles.ROLES and bench.attacks.ATTACK_ROLES)."""
        self.command("run", role=role, params=params)

    def command(self, op: str, **fields: Any) -> None:
        try:
            self._conn.send({"op": op, **fields})
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"worker {self.index} is gone ({exc})") from exc

    def expect(self, kind: str, timeout: float, *, errors: bool = True) -> dict[str, Any]:
        """The next answer of the given kind; raises on an error (unless `errors` is false: then
        errors are skipped), a dead worker or a timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._conn.poll(remaining):
                raise WorkerError(f"worker {self.index}: no {kind!r} within {timeout:.0f} s")
            try:
                message: dict[str, Any] = self._conn.recv()
            except (EOFError, OSError) as exc:
                raise WorkerError(
                    f"worker {self.index} died (exit code {self.process.exitcode})"
                ) from exc
            if message["kind"] == "error" and errors:
                raise WorkerError(f"worker {self.index} failed:\n{message['error']}")
            if message["kind"] == kind:
                return message

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(WorkerError):
            self.command("exit")
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self._conn.close()


class Pool:
    """A fixed set of workers, started once and given one role after another."""

    def __init__(self, size: int) -> None:
        self.workers: list[Worker] = []
        try:
            for index in range(size):
                self.workers.append(Worker(index))
        except BaseException:
            self.close()
            raise

    def run(self, role: str, params: Sequence[dict[str, Any]], first: int = 0) -> list[Worker]:
        """Start `role` on len(params) workers from `first` on, one params dict each."""
        if first + len(params) > len(self.workers):
            raise ValueError(f"{len(params)} {role} workers asked, {len(self.workers)} exist")
        chosen = self.workers[first : first + len(params)]
        for worker, p in zip(chosen, params, strict=True):
            worker.run(role, p)
        return chosen

    @staticmethod
    def expect(workers: Iterable[Worker], kind: str, timeout: float) -> list[dict[str, Any]]:
        """One answer of `kind` from each worker, all within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        return [w.expect(kind, max(0.1, deadline - time.monotonic())) for w in workers]

    @staticmethod
    def command(workers: Iterable[Worker], op: str, **fields: Any) -> None:
        for worker in workers:
            worker.command(op, **fields)

    def abort(self) -> None:
        """Cancel whatever role is running anywhere (after a failure), and drop stale answers."""
        for worker in self.workers:
            with contextlib.suppress(WorkerError):
                worker.command("abort")
        for worker in self.workers:
            with contextlib.suppress(WorkerError):
                worker.expect("aborted", 15, errors=False)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers.clear()


class Control:
    """A role's side of the pipe: answers out, commands in."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def send(self, kind: str, **fields: Any) -> None:
        self._conn.send({"kind": kind, **fields})

    def deliver(self, message: dict[str, Any]) -> None:
        self._inbox.put_nowait(message)

    async def recv(self, ops: str | tuple[str, ...], within: float) -> dict[str, Any]:
        """The next command, which must be one of `ops`, within `within` seconds."""
        expected = (ops,) if isinstance(ops, str) else ops
        async with asyncio.timeout(within):
            message = await self._inbox.get()
        if message["op"] not in expected:
            raise RuntimeError(f"expected command {' or '.join(expected)}, got {message['op']!r}")
        return message


def _worker_main(conn: multiprocessing.connection.Connection, index: int) -> None:
    # Ctrl-C reaches the whole process group: let the harness stop the workers in its finally.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pigeon.runtime import run

    async def serve() -> int:
        await _serve(conn)
        return 0

    run(serve)


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    from bench.attacks import ATTACK_ROLES
    from bench.roles import ROLES
    from pigeon.runtime import cancel_and_wait

    roles = {**ROLES, **ATTACK_ROLES}

    loop = asyncio.get_running_loop()
    task: asyncio.Task[None] | None = None
    control: Control | None = None

    async def perform(role: str, params: dict[str, Any], ctl: Control) -> None:
        try:
            result = await roles[role](ctl, params)
        except asyncio.CancelledError:
            raise
        except BaseException:
            ctl.send("error", error=traceback.format_exc())
        else:
            ctl.send("report", **result)

    while True:
        try:
            message = await loop.run_in_executor(None, conn.recv)
        except (EOFError, OSError):
            message = {"op": "exit"}
        op = message["op"]
        if op in ("exit", "abort"):
            if task is not None and not task.done():
                await cancel_and_wait(task)
            task = None
            if op == "exit":
                return
            conn.send({"kind": "aborted"})
        elif op == "run":
            if task is not None and not task.done():
                conn.send({"kind": "error", "error": "a role is already running"})
                continue
            # Earlier roles' leftovers are collected now, and this process's long-lived objects
            # are set aside, so no full collection over them lands in this role's measurement.
            gc.collect()
            gc.freeze()
            control = Control(conn)
            task = asyncio.create_task(perform(message["role"], message["params"], control))
        elif control is not None:
            control.deliver(message)
