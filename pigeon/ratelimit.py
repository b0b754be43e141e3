"""Per-caller limits: a token bucket for each user, API key or client address, and a bound on
each caller's large requests in flight."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from pigeon.errors import ResourceExhausted

__all__ = ["LargeRequests", "RateLimiter", "client_address", "parse_networks"]

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
        kind: "user", "key" or "address", for messages and metrics.
        message: what a refusal says; by default that the rate per ``kind`` was exceeded.
        reason: the refusal's reason.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        kind: str,
        *,
        message: str = "",
        reason: str = "RATE_LIMITED",
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._kind = kind
        self._message = message or f"rate limit of {rate:g} requests/s per {kind} exceeded"
        self._reason = reason
        self._buckets: dict[str, _Bucket] = {}

    def take(self, caller: str, cost: float = 1.0) -> None:
        """Spend ``cost`` tokens of the caller's bucket (at most the whole bucket, so any request
        can pass when the bucket is full) or raise RESOURCE_EXHAUSTED with the wait."""
        if self._rate <= 0:
            return
        cost = min(max(cost, 1.0), self._burst)
        now = time.monotonic()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self._buckets[caller] = _Bucket(self._burst, now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return
        LIMITED.labels(self._kind).inc()
        wait = (cost - bucket.tokens) / self._rate
        raise ResourceExhausted(self._message, retry_after=_whole_ms(wait), reason=self._reason)

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


LARGE_REQUEST_BYTES = 64 * 1024
"""A request past this size is large: each caller has at most :data:`LARGE_AT_ONCE` of them in
flight."""

CHARGE_BYTES = 16 * 1024
"""A request costs one token of its caller's rate limit per started 16 KiB (at most the whole
bucket): the largest takes a default user's whole burst."""

LARGE_AT_ONCE = 2

LARGE_REFUSED = Counter(
    "pigeon_large_requests_refused", "Large requests refused: the caller had too many in flight"
)


class LargeRequests:
    """Bounds each caller's large requests in flight, so one caller cannot keep the process busy
    decoding and checking big bodies while others wait."""

    def __init__(self, at_once: int = LARGE_AT_ONCE) -> None:
        self._at_once = at_once
        self._in_flight: dict[str, int] = {}

    @staticmethod
    def cost(size: int) -> float:
        """Rate-limit tokens a request of ``size`` bytes costs (1 for a small one)."""
        return float(max(1, math.ceil(size / CHARGE_BYTES)))

    @contextlib.contextmanager
    def admit(self, caller: str, size: int) -> Iterator[None]:
        """Hold one of the caller's large-request places while the request is served.

        Raises:
            ResourceExhausted: ``TOO_MANY_LARGE_REQUESTS``: the caller has as many large requests
                in flight as it may.
        """
        if size <= LARGE_REQUEST_BYTES:
            yield
            return
        count = self._in_flight.get(caller, 0)
        if count >= self._at_once:
            LARGE_REFUSED.inc()
            raise ResourceExhausted(
                f"at most {self._at_once} requests over {LARGE_REQUEST_BYTES // 1024} KiB may be "
                "in flight per caller; retry when one has been answered",
                retry_after=1.0,
                reason="TOO_MANY_LARGE_REQUESTS",
            )
        self._in_flight[caller] = count + 1
        try:
            yield
        finally:
            left = self._in_flight[caller] - 1
            if left:
                self._in_flight[caller] = left
            else:
                del self._in_flight[caller]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses and networks (``10.0.0.0/8``) as networks; raises ValueError on a bad entry."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_address(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The address a call came from, for per-address limits.

    Args:
        peer: the connection's address (an IP, or gRPC's ``ipv4:1.2.3.4:5678`` form).
        forwarded_for: ``X-Forwarded-For`` values, oldest hop first; believed only as far as
            each hop that appended to them is a trusted proxy.
        trusted: the trusted proxies.

    Returns:
        The client's address as text (the peer itself when it is not a trusted proxy).
    """
    current = _peer_host(peer)
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    while hops:
        parsed = _address(current)
        if parsed is None or not any(parsed in network for network in trusted):
            break
        current = hops.pop().strip()
    return current


def _peer_host(peer: str) -> str:
    """``1.2.3.4`` from gRPC's ``ipv4:1.2.3.4:5678``, ``::1`` from ``ipv6:[::1]:5678``; other
    forms (a Unix socket) whole."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer
