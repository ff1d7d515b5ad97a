"""A node that dies after the first round must not stall the run (Flower's node wait has no timeout)."""

from __future__ import annotations

import threading

from strategies.sampling import NodeOrder, seeded_sample


class _Grid:
    """The one Grid call seeded_sample makes without ``query``: the ids of the online nodes."""

    def __init__(self, online: list[int]) -> None:
        self.online = online

    def get_node_ids(self) -> list[int]:
        return list(self.online)


def _sample(grid: _Grid, order: NodeOrder, server_round: int) -> tuple[threading.Thread, list[list[int]]]:
    """seeded_sample(fraction 1, min_nodes 2, min_available 3) in a thread: Flower's wait blocks."""
    out: list[list[int]] = []
    t = threading.Thread(target=lambda: out.append(seeded_sample(grid, order, 0, server_round, 1.0, 2, 3)), daemon=True)
    t.start()
    return t, out


def test_first_round_waits_for_everyone_later_rounds_go_on_without_a_dead_node() -> None:
    order = NodeOrder(query=False)
    grid = _Grid([11, 22])
    t, out = _sample(grid, order, 1)
    t.join(2.5)
    assert t.is_alive() and not out  # 2 of 3 online: round 1 waits, every node must join first
    grid.online = [11, 22, 33]
    t.join(10)
    assert sorted(out[0]) == [11, 22, 33]
    grid.online = [11, 22]  # node 33 was killed
    t, out = _sample(grid, order, 2)
    t.join(10)
    assert sorted(out[0]) == [11, 22]  # round 2 goes on with the two that are left
    grid.online = [11]  # below min_nodes=2: waits rather than training on one node
    t, out = _sample(grid, order, 3)
    t.join(2.5)
    assert t.is_alive() and not out
    grid.online = [11, 44]  # a replacement joins: the round goes on
    t.join(10)
    assert sorted(out[0]) == [11, 44]
