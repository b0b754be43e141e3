"""Per-caller rate limits: a token bucket for each user and each API key."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from prometheus_client import Counter

from pigeon.errors import ResourceExhausted

__all__ = ["RateLimiter"]

LIMITED = Counter("pigeon_rate_limited", "Calls refused by a rate limit", ["kind"])

# The shortest wait a refusal names, seconds.
MIN_RETRY_AFTER = 0.001

# Idle buckets are forgotten once there are this many, so memory stays bounded.
MAX_BUCKETS = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Allows `rate` calls per second per caller, with bursts up to `burst`.

    Args:
        rate: tokens added per second (0: no limit).
        burst: the bucket's size.
        kind: "user" or "key", for messages and metrics.
    """

    def __init__(self, rate: float, burst: int, kind: str) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._kind = kind
        self._buckets: dict[str, _Bucket] = {}

    def take(self, caller: str) -> None:
        """Spend one token of the caller's bucket or raise RESOURCE_EXHAUSTED with the wait."""
        if self._rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self._buckets[caller] = _Bucket(self._burst, now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        LIMITED.labels(self._kind).inc()
        wait = (1.0 - bucket.tokens) / self._rate
        raise ResourceExhausted(
            f"rate limit of {self._rate:g} requests/s per {self._kind} exceeded",
            retry_after=_whole_ms(wait),
            reason="RATE_LIMITED",
        )

    def _forget_idle(self, now: float) -> None:
        full_after = self._burst / self._rate
        idle = [k for k, b in self._buckets.items() if now - b.updated >= full_after]
        for key in idle:
            del self._buckets[key]
        if len(self._buckets) >= MAX_BUCKETS:
            # Everyone is active: drop the oldest half rather than grow without bound.
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            for key in oldest[: len(oldest) // 2]:
                del self._buckets[key]


def _whole_ms(wait: float) -> float:
    """The wait rounded up to a millisecond, and never 0.

    A refusal without a wait goes out without RetryInfo or Retry-After; rounding to the nearest
    millisecond turned a bucket just short of a token into exactly that.
    """
    return max(MIN_RETRY_AFTER, math.ceil(wait * 1000) / 1000)
