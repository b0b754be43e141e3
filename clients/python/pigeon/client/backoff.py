"""Exponential backoff with full jitter, as the Gate advises in ``ConnectResponse.backoff``."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pigeon.v1 import gate_pb2

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between reconnect attempts: attempt ``n`` waits a random time between 0 and
    ``min(max, initial * multiplier ** n)``.

    Full jitter (rather than a fixed delay with a little noise) spreads the thousands of clients
    that lost the same node over the whole window, so they do not all hit the Gate at once.

    Attributes:
        initial: The upper bound of the first delay, seconds.
        max: The largest upper bound, seconds.
        multiplier: How much the bound grows per failed attempt.
    """

    initial: float = 0.5
    max: float = 30.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        """A random delay for the given attempt (0 for the first retry)."""
        # Bound the exponent: 2.0 ** 2000 overflows a float.
        bound = min(self.max, self.initial * self.multiplier ** min(attempt, 64))
        return random.uniform(0.0, max(bound, 0.0))

    @classmethod
    def from_proto(cls, hint: gate_pb2.Backoff, default: Backoff) -> Backoff:
        """The Gate's hint, with ``default``'s value for each field it left unset."""
        initial = hint.initial.ToNanoseconds() / 1e9 if hint.HasField("initial") else 0.0
        largest = hint.max.ToNanoseconds() / 1e9 if hint.HasField("max") else 0.0
        return cls(
            initial=initial if initial > 0 else default.initial,
            max=largest if largest > 0 else default.max,
            multiplier=hint.multiplier if hint.multiplier >= 1 else default.multiplier,
        )
