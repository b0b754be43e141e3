"""A MongoDB-compatible server for the MongoDB-store scenario: secantusdb (the embedded test
server from PyPI, not a production MongoDB), in a process of its own so that its CPU shows apart
from the harness's.

Run as `python -m bench.mongo STORAGE_DIR`; it prints `URI <uri>` once it listens on a free port
and stops on SIGTERM, SIGINT or end of its standard input.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["main"]


def _stop_at_eof() -> None:
    while os.read(sys.stdin.fileno(), 1024):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.mongo STORAGE_DIR`."""
    from secantus import SecantusDBServer

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.mongo STORAGE_DIR", file=sys.stderr)
        return 2
    # Block the stop signals before the server's threads start, so they stay with this thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=args[0])
    server.start()
    # The harness holds our stdin open: when it dies, however it dies, we see end-of-file.
    threading.Thread(target=_stop_at_eof, daemon=True).start()
    try:
        print(f"URI {server.uri}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
