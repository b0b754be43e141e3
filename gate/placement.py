"""Which node a user's streams go to: rendezvous hashing with a load bound."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pigeon.v1 import types_pb2

__all__ = ["rank_nodes"]


def _weight(user_id: str, node_id: str) -> int:
    # blake2b is fast and stable across processes (unlike hash()), so every Gate agrees.
    digest = hashlib.blake2b(f"{node_id}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_nodes(
    user_id: str, nodes: Sequence[types_pb2.NodeInfo], *, epsilon: float = 0.25
) -> list[types_pb2.NodeInfo]:
    """Serving nodes in the order the user should try them.

    Highest-random-weight order keeps every device of a user on one node and moves only the users
    of a node that leaves. A node above (1 + epsilon) x the average connection count goes to the
    back of the list, so a hot node stops taking new users while the others can.
    """
    serving = [n for n in nodes if n.state != types_pb2.NODE_STATE_DRAINING]
    if not serving:
        return []
    ranked = sorted(serving, key=lambda n: _weight(user_id, n.node_id), reverse=True)
    average = sum(n.connections for n in serving) / len(serving)
    # Below a handful of connections per node the bound would only add noise.
    bound = max((1.0 + epsilon) * average, 1.0)
    within = [n for n in ranked if n.connections <= bound]
    over = [n for n in ranked if n.connections > bound]
    return within + over
