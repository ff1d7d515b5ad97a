"""Which nodes train in a round, and in which order their replies are summed: a function of the seed only.

Simulation node ids are random per run, so ids cannot fix an order. With ``query=True`` (fedfuse's own
ServerApp) :class:`NodeOrder` first tries the order in which the nodes registered (Flower's simulation engine
registers partition k's node k-th), checking only the sampled nodes (:meth:`NodeOrder.sample_registered`: one QUERY
for each sampled node not seen before, so N nodes cost nothing up front); where that order does not hold it asks
every node it has not seen once for its ``partition-id`` and orders nodes by it; nodes without one come after, by
node id. With ``query=False``
(the default for a strategy a user constructs) no message type the user's ClientApp may not register is
sent: nodes are ordered by the partition id their replies carry (fedfuse's ClientApp sends it) once seen,
else by node id — deterministic for fixed node ids (a deployment), not across simulation runs.
A pool (``NodeOrder.clients`` = N > 0, the run option ``client-pool``): K connected SuperNodes serve N clients;
each round samples client ids from ``range(N)`` and hands them to nodes (:meth:`NodeOrder.assign`), so the
runtime holds K nodes, not N, and a round costs O(sample) whatever N is.
:func:`seeded_sample` draws ``max(ceil(fraction·N), min_nodes)`` positions of that order from ``(seed, round)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedfuse import protocol
from fedfuse.experiment import sample_clients

__all__ = ["NodeOrder", "seeded_sample"]

log = logging.getLogger("fedfuse")


class NodeOrder:
    """Partition ids of the nodes seen so far; :meth:`key` sorts nodes (and their replies) deterministically."""

    def __init__(self, timeout: float = 600.0, *, query: bool = True) -> None:
        self.timeout = float(timeout)
        self.query = bool(query)
        self.partition_of: dict[int, int] = {}
        self.joined = False  # min_available nodes were online once (see seeded_sample)
        self.lookup: Callable[[int], int] | None = None  # the grid's own node -> partition-id map, if it has one
        self._version = 0  # bumped when a node's key changes: invalidates the cached order
        self._cached: tuple[tuple[int, ...], int, list[int]] | None = None
        self.registered: bool | None = None  # registration order = partition order: unknown / held / failed
        self._registered_cache: tuple[frozenset[int], list[int] | None] | None = None
        self.clients = 0  # > 0: a pool; the connected nodes serve clients 0..clients-1, assigned per message batch

    def assign(self, node_ids: Iterable[int], clients: list[int]) -> list[int]:
        """Pool: client ``clients[i]`` goes to the i-th connected node by id for this message batch (a node is a
        stateless worker: what it computes depends only on the client id it is sent, so any assignment gives the
        same run). Returns those nodes; :meth:`partition` answers for them until the next batch. With fewer nodes
        than clients (pool nodes lost mid-run; the CLI refuses a pool smaller than a round's sample) the clients
        beyond the nodes sit this batch out, logged, as a lost node's client would."""
        nodes = sorted(node_ids)
        if len(clients) > len(nodes):
            log.warning("client-pool: %d clients sampled but %d SuperNodes connected; clients %s sit this round out",
                        len(clients), len(nodes), clients[len(nodes):][:10])  # fmt: skip
            clients = clients[: len(nodes)]
        picked = nodes[: len(clients)]
        self.partition_of = dict(zip(picked, clients, strict=True))
        self._version += 1
        return picked

    def pool_config(self, node_ids: list[int]) -> dict[str, list[str] | list[int]]:
        """In a pool, the round config's keys naming the client each of ``node_ids`` serves (one record shared by
        every message; node ids as strings, since Flower's are unsigned 64-bit); else nothing."""
        if not self.clients:
            return {}
        return {
            protocol.POOL_NODES: [str(n) for n in node_ids],
            protocol.POOL_CLIENTS: [self.partition(n) for n in node_ids],
        }

    def learn(self, reply: Message) -> None:
        """Record the partition id a reply carries (``protocol.CLIENT_INFO``), if any."""
        if not reply.has_error() and protocol.CLIENT_INFO in reply.content.config_records:
            pid = int(reply.content.config_records[protocol.CLIENT_INFO].get(protocol.PARTITION_ID, -1))
            if pid >= 0 and self.partition_of.get(reply.metadata.src_node_id) != pid:
                self.partition_of[reply.metadata.src_node_id] = pid
                self._version += 1

    def discover(self, grid: Grid, node_ids: list[int]) -> None:
        """With ``query``: ask nodes not seen before for their partition id (a QUERY message each). A grid that
        knows its nodes' partition ids (``grid.partition_id(node_id)``, fedfuse's inline grid) is asked instead:
        no message, no per-node state, so N nodes cost nothing up front."""
        lookup = getattr(grid, "partition_id", None)
        if callable(lookup):
            self.lookup = lookup
            return
        unknown = [n for n in node_ids if n not in self.partition_of]
        if not unknown or not self.query:
            return
        query = RecordDict({protocol.CONFIG: ConfigRecord({"query": protocol.PARTITION_ID})})
        msgs = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        for reply in grid.send_and_receive(msgs, timeout=self.timeout):
            self.partition_of[reply.metadata.src_node_id] = -1
            self._version += 1
            self.learn(reply)

    def sample_registered(
        self, grid: Grid, node_ids: list[int], seed: int, server_round: int, fraction: float, min_nodes: int
    ) -> list[int] | None:
        """The round's sample without asking every node: Flower's simulation engine registers the node of partition
        ``k`` k-th (``vce_api._register_nodes``), so ordering nodes by ``NodeInfo.registered_at`` is a candidate for
        the partition order. Only the sampled positions are checked — the nodes not seen yet get one QUERY each, in
        one batch — and the sample is used when node ``order[i]`` holds partition ``i`` at every sampled ``i``: then
        it is exactly the seeded sample of partitions. Otherwise (a deployment's nodes registered in any order, equal
        or missing timestamps) None, and from then on every node is asked once (:meth:`discover`), as before."""
        if not self.query or self.registered is False:
            return None
        guess = self._registration_order(grid, node_ids)
        if guess is None:
            self.registered = False
            return None
        positions = sample_clients(seed, server_round, len(guess), fraction, min_nodes)
        picked = [guess[i] for i in positions]
        self.discover(grid, picked)  # asks only those not seen yet
        if all(self.partition_of.get(n) == i for n, i in zip(picked, positions, strict=True)):
            if self.registered is None:
                log.info("node order: registration order = partition order on the sampled nodes; none asked up front")
            self.registered = True
            return picked
        if self.registered is None:
            log.info("node order: registration order is not the partition order; asking every node once")
        self.registered = False
        return None

    def _registration_order(self, grid: Grid, node_ids: list[int]) -> list[int] | None:
        """``node_ids`` sorted by registration time (cached while the node set is unchanged), or None when the grid
        gives no ``registered_at`` for some node or two share one (no order between them)."""
        nodes = frozenset(node_ids)  # 100,000 ids: ~5 ms a round (a sort would be ~40 ms)
        if self._registered_cache is not None and self._registered_cache[0] == nodes:
            return self._registered_cache[1]
        get_nodes = getattr(grid, "get_nodes", None)
        stamps: dict[int, str] = {}
        if callable(get_nodes):
            for info in get_nodes():
                stamps[int(info.node_id)] = str(getattr(info, "registered_at", "") or "")
        result: list[int] | None = None
        try:
            keyed = sorted((datetime.fromisoformat(stamps[n]), n) for n in nodes)
        except (KeyError, ValueError):  # a node without a (readable) timestamp
            keyed = []
        if keyed and all(a[0] < b[0] for a, b in zip(keyed, keyed[1:], strict=False)):
            result = [n for _, n in keyed]
        self._registered_cache = (nodes, result)
        return result

    def partition(self, node_id: int) -> int:
        """Node ``node_id``'s partition id, or -1 when unknown."""
        pid = self.partition_of.get(node_id, -1)
        if pid < 0 and self.lookup is not None:
            pid = self.lookup(node_id)
        return pid

    def key(self, node_id: int) -> tuple[int, int]:
        pid = self.partition(node_id)
        return (0, pid) if pid >= 0 else (1, node_id)

    def ordered(self, node_ids: list[int]) -> list[int]:
        """``node_ids`` sorted by :meth:`key`; the sort is reused while the nodes and their keys are unchanged
        (a C-speed tuple comparison per round instead of a Python key call per node)."""
        nodes = tuple(node_ids)
        if self._cached is None or self._cached[1] != self._version or self._cached[0] != nodes:
            self._cached = (nodes, self._version, sorted(nodes, key=self.key))
        return self._cached[2]

    def label(self, node_id: int) -> str:
        pid = self.partition(node_id)
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
    if order.clients:  # a pool: sample client ids, not nodes; the nodes only carry them (O(sample) per round)
        _, all_nodes = sample_nodes(grid, needed, 0)
        order.joined = True
        return order.assign(all_nodes, sample_clients(seed, server_round, order.clients, fraction, min_nodes))
    in_order = getattr(grid, "nodes_in_partition_order", None)
    if callable(in_order):  # a grid that knows its nodes (fedfuse's inline grid): O(sample), not O(N), per round
        ordered = in_order()
        order.discover(grid, [])
        order.joined = True
        return [ordered[i] for i in sample_clients(seed, server_round, len(ordered), fraction, min_nodes)]
    _, all_nodes = sample_nodes(grid, needed, 0)
    order.joined = True
    picked = order.sample_registered(grid, all_nodes, seed, server_round, fraction, min_nodes)
    if picked is not None:
        return picked
    order.discover(grid, all_nodes)
    ordered = order.ordered(all_nodes)
    return [ordered[i] for i in sample_clients(seed, server_round, len(ordered), fraction, min_nodes)]
