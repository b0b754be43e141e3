"""The protobuf helpers the node, the dispatcher and the Gate share."""

from __future__ import annotations

import pytest

from pigeon.v1 import dispatcher_pb2, types_pb2
from pigeon.wire import duration, prefix_within

pytestmark = pytest.mark.unit


def _envelope(body_bytes: int) -> dispatcher_pb2.Envelope:
    return dispatcher_pb2.Envelope(recipient="u", message=types_pb2.Message(body="x" * body_bytes))


def test_a_prefix_stops_before_the_message_that_would_pass_the_byte_bound() -> None:
    envelopes = [_envelope(400) for _ in range(5)]
    assert len(prefix_within(envelopes, 1000)) == 2
    assert len(prefix_within(envelopes, 1000, count=1)) == 1
    assert len(prefix_within(envelopes, 1 << 20)) == 5


def test_a_message_larger_than_the_bound_goes_on_its_own() -> None:
    envelopes = [_envelope(5000), _envelope(10)]
    assert prefix_within(envelopes, 1000) == envelopes[:1]
    assert prefix_within([], 1000) == []


def test_a_prefix_is_a_new_list() -> None:
    envelopes = [_envelope(10)]
    prefix = prefix_within(envelopes, 1000)
    del envelopes[:]
    assert len(prefix) == 1


def test_a_duration_keeps_fractions_of_a_second() -> None:
    assert duration(0.5).ToNanoseconds() == 500_000_000
    assert duration(0).ToNanoseconds() == 0
