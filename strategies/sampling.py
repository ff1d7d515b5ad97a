"""Which nodes train in a round, and in which order their replies are summed: a function of the seed only.

Simulation node ids are random per run, so ids cannot fix an order. With ``query=True`` (fedfuse's own
ServerApp) :class:`NodeOrder` asks every node it has not seen once (one QUERY message) for its
``partition-id`` and orders nodes by it; nodes without one come after, by node id. With ``query=False``
(the default for a strategy a user constructs) no message type the user's ClientApp may not register is
sent: nodes are ordered by the partition id their replies carry (fedfuse's ClientApp sends it) once seen,
else by node id — deterministic for fixed node ids (a deployment), not across simulation runs.
:func:`seeded_sample` draws ``max(ceil(fraction·N), min_nodes)`` positions of that order from ``(seed, round)``.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedfuse import protocol
from fedfuse.experiment import sample_clients

__all__ = ["NodeOrder", "seeded_sample"]


class NodeOrder:
    """Partition ids of the nodes seen so far; :meth:`key` sorts nodes (and their replies) deterministically."""

    def __init__(self, timeout: float = 600.0, *, query: bool = True) -> None:
        self.timeout = float(timeout)
        self.query = bool(query)
        self.partition_of: dict[int, int] = {}
        self.joined = False  # min_available nodes were online once (see seeded_sample)

    def learn(self, reply: Message) -> None:
        """Record the partition id a reply carries (``protocol.CLIENT_INFO``), if any."""
        if not reply.has_error() and protocol.CLIENT_INFO in reply.content.config_records:
            pid = int(reply.content.config_records[protocol.CLIENT_INFO].get(protocol.PARTITION_ID, -1))
            if pid >= 0:
                self.partition_of[reply.metadata.src_node_id] = pid

    def discover(self, grid: Grid, node_ids: list[int]) -> None:
        """With ``query``: ask nodes not seen before for their partition id (a QUERY message each)."""
        unknown = [n for n in node_ids if n not in self.partition_of]
        if not unknown or not self.query:
            return
        query = RecordDict({protocol.CONFIG: ConfigRecord({"query": protocol.PARTITION_ID})})
        msgs = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        for reply in grid.send_and_receive(msgs, timeout=self.timeout):
            self.partition_of[reply.metadata.src_node_id] = -1
            self.learn(reply)

    def key(self, node_id: int) -> tuple[int, int]:
        pid = self.partition_of.get(node_id, -1)
        return (0, pid) if pid >= 0 else (1, node_id)

    def label(self, node_id: int) -> str:
        pid = self.partition_of.get(node_id, -1)
        return f"node {node_id}" + (f" (partition {pid})" if pid >= 0 else "")


def seeded_sample(
    grid: Grid, order: NodeOrder, seed: int, server_round: int, fraction: float, min_nodes: int, min_available: int
) -> list[int]:
    """Node ids of the round's sample, in partition order.

    Before the first round this order has seen, waits for ``min_available`` nodes (everyone joins);
    afterwards only for ``min_nodes``: Flower's wait has no timeout, so a node that died (a killed
    container, a lost host) would otherwise stall every later round of the run forever.
    """
    needed = max(1, min(min_available, min_nodes)) if order.joined else min_available
    _, all_nodes = sample_nodes(grid, needed, 0)
    order.joined = True
    order.discover(grid, all_nodes)
    ordered = sorted(all_nodes, key=order.key)
    return [ordered[i] for i in sample_clients(seed, server_round, len(ordered), fraction, min_nodes)]
