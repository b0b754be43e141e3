"""Log lines that anyone can trigger, written at most once per interval with a count of what
happened since the last one, so a flood of bad calls cannot flood the log."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

__all__ = ["SparseLog"]


class SparseLog:
    """A warning written at most once every ``interval`` seconds.

    Args:
        logger: where the line goes.
        interval: seconds between two lines.
        message: a %-format whose first argument is the count since the last line; the arguments
            of each call follow it.
    """

    def __init__(self, logger: logging.Logger, interval: float, message: str) -> None:
        self._logger = logger
        self._interval = interval
        self._message = message
        self.logged_at = -math.inf
        self.since = 0

    def __call__(self, *args: Any) -> None:
        now = time.monotonic()
        self.since += 1
        if now - self.logged_at >= self._interval:
            self._logger.warning(self._message, self.since, *args)
            self.logged_at, self.since = now, 0
