"""Seeded sampling without a message per node: the simulation engine's registration order stands for the partition
order, checked on the sampled nodes only; where it does not hold (a deployment) every node is asked, as before."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedfuse import protocol
from fedfuse.experiment import sample_clients
from strategies.sampling import NodeOrder, seeded_sample


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages stamp the process's task identity (as the inline grid sets it)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class _Node:
    def __init__(self, node_id: int, registered_at: str) -> None:
        self.node_id, self.registered_at = node_id, registered_at


class _Grid:
    """N nodes with random ids; node k holds partition ``pids[k]`` and registered k-th (or at ``stamps[k]``)."""

    def __init__(self, n: int, rng: random.Random, pids: list[int] | None = None, stamps: list[str] | None = None):
        self.ids = rng.sample(range(1, 2**40), n)
        self.pid = dict(zip(self.ids, pids or range(n), strict=True))
        t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.stamps = stamps or [(t0 + timedelta(microseconds=37 * k)).isoformat() for k in range(n)]
        self.queried: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.ids)

    def get_nodes(self) -> list[_Node]:
        return [_Node(i, s) for i, s in zip(self.ids, self.stamps, strict=True)]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = []
        for m in messages:
            assert m.metadata.message_type == MessageType.QUERY
            node = m.metadata.dst_node_id
            self.queried.append(node)
            info = ConfigRecord({protocol.PARTITION_ID: self.pid[node]})
            m.metadata.__dict__["_message_id"] = f"q{len(self.queried)}"  # the link state's id
            reply = Message(RecordDict({protocol.CLIENT_INFO: info}), reply_to=m)
            assert reply.metadata.src_node_id == node
            replies.append(reply)
        return replies


def _partitions(grid: _Grid, rounds: int, fraction: float) -> tuple[list[list[int]], NodeOrder]:
    order = NodeOrder()
    picked = [seeded_sample(grid, order, 5, r, fraction, 2, len(grid.ids)) for r in range(1, rounds + 1)]
    return [[grid.pid[n] for n in nodes] for nodes in picked], order


def test_registration_order_samples_the_seeded_partitions_asking_only_sampled_nodes() -> None:
    # Prepare: two runs of 2,000 nodes with different random ids
    grids = [_Grid(2000, random.Random(s)) for s in (1, 2)]
    want = [sample_clients(5, r, 2000, 0.005, 2) for r in (1, 2, 3)]
    # Execute
    (a, order), (b, _) = (_partitions(g, 3, 0.005) for g in grids)
    # Assert: the seeded partitions in both runs, and one QUERY per sampled node, not per node
    assert a == b == want
    assert order.registered is True
    assert sorted(set(grids[0].queried)) == sorted(grids[0].queried)
    assert len(grids[0].queried) == len({p for r in want for p in r})


def test_registration_order_that_is_not_the_partition_order_falls_back_to_asking_every_node() -> None:
    # Prepare: a deployment: nodes registered in an order unrelated to their partition ids
    rng = random.Random(3)
    pids = list(range(50))
    rng.shuffle(pids)
    grid = _Grid(50, rng, pids=pids)
    # Execute
    got, order = _partitions(grid, 2, 0.1)
    # Assert: still the seeded partitions, via the full query
    assert got == [sample_clients(5, r, 50, 0.1, 2) for r in (1, 2)]
    assert order.registered is False and set(grid.queried) == set(grid.ids)


def test_equal_timestamps_mean_no_registration_order() -> None:
    grid = _Grid(20, random.Random(4), stamps=["2026-01-01T00:00:00+00:00"] * 20)
    got, order = _partitions(grid, 1, 0.2)
    assert got == [sample_clients(5, 1, 20, 0.2, 2)]
    assert order.registered is False and set(grid.queried) == set(grid.ids)
