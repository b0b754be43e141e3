"""Placement of users on nodes: rendezvous hashing with a load bound."""

from __future__ import annotations

from collections import Counter

import pytest

from gate.placement import rank_nodes
from pigeon.v1 import types_pb2

pytestmark = pytest.mark.unit


def nodes(*loads: int) -> list[types_pb2.NodeInfo]:
    return [
        types_pb2.NodeInfo(node_id=f"n{i}", connections=load, state=types_pb2.NODE_STATE_SERVING)
        for i, load in enumerate(loads)
    ]


def placed(users: list[str], cluster: list[types_pb2.NodeInfo]) -> dict[str, str]:
    return {u: rank_nodes(u, cluster, epsilon=0.25)[0].node_id for u in users}


USERS = [f"user-{i}" for i in range(2000)]


def test_a_user_lands_on_the_same_node_while_the_node_set_is_unchanged() -> None:
    cluster = nodes(10, 10, 10, 10)
    assert placed(USERS, cluster) == placed(USERS, list(reversed(cluster)))


def test_users_spread_evenly_over_nodes() -> None:
    counts = Counter(placed(USERS, nodes(0, 0, 0, 0)).values())
    assert len(counts) == 4 and max(counts.values()) < 1.2 * min(counts.values())


def test_only_the_users_of_a_node_that_leaves_move() -> None:
    before = placed(USERS, nodes(10, 10, 10, 10))
    after = placed(USERS, nodes(10, 10, 10, 10)[:3])
    moved = {u for u in USERS if before[u] != after[u]}
    assert moved == {u for u in USERS if before[u] == "n3"}


def test_a_node_over_the_load_bound_stops_taking_new_users() -> None:
    # n0 holds far more than (1 + 0.25) x the average: nobody new lands there.
    cluster = nodes(1000, 100, 100, 100)
    counts = Counter(placed(USERS, cluster).values())
    assert counts["n0"] == 0
    assert set(counts) == {"n1", "n2", "n3"}


def test_a_hot_node_is_still_used_when_it_is_the_only_one() -> None:
    assert rank_nodes("alice", nodes(5000))[0].node_id == "n0"


def test_draining_nodes_take_no_one_and_an_empty_cluster_gives_nothing() -> None:
    cluster = nodes(0, 0)
    cluster[0].state = types_pb2.NODE_STATE_DRAINING
    assert {n.node_id for u in USERS[:50] for n in rank_nodes(u, cluster)} == {"n1"}
    assert rank_nodes("alice", []) == []
