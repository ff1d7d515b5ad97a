"""In-process sequential simulation: a Flower ``Grid`` that calls the ClientApp directly.

Same ServerApp logic, same ClientApp, same strategies as the Ray backend, but no actors, no
polling and no serialisation round trip through a link state: each message is handed to the
ClientApp of its destination node in this process, one node after another (pfl-research style).
Messages still go through ``Message``/``RecordDict``/``ArrayRecord``, so the strategies see
exactly what they see under Ray. Ray stays the default for multi-core and multi-node runs.

Composition layer (imports Flower): nothing in the core imports this module.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InlineGrid", "run_inline"]


class _Contexts(dict):  # type: ignore[type-arg]
    """Node id -> Context, made on first access (``grid.contexts[k]``), so only nodes that took part cost memory."""

    def __init__(self, grid: InlineGrid) -> None:
        super().__init__()
        self.grid = grid

    def __missing__(self, node_id: int) -> Context:
        ctx = Context(
            run_id=self.grid.run_id,
            node_id=node_id,
            node_config={"partition-id": node_id - 1, "num-partitions": self.grid.num_nodes},
            state=RecordDict(),
            run_config={},
        )
        self[node_id] = ctx
        return ctx


class InlineGrid(Grid):
    """``num_nodes`` virtual SuperNodes (ids 1..N, ``partition-id`` 0..N-1) served by one ClientApp.

    Node contexts (and so ``Context.state``) persist across rounds like a SuperNode's; a node's context is
    made when it first receives a message, so memory grows with the nodes that took part, not with N. A
    ClientApp exception becomes an error reply (``CLIENT_APP_RAISED_EXCEPTION``), as under Ray.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self.num_nodes = int(num_nodes)
        self._run = Run.create_empty(run_id=run_id)
        # Messages stamp the process's task identity; set it as Flower's simulation entry point does.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self.run_id = run_id
        self.contexts = _Contexts(self)
        self._frozen = False

    def nodes_in_partition_order(self) -> range:
        """Every node id, ordered by partition id (node ``k + 1`` is partition ``k``), as a range: no O(N) list."""
        return range(1, self.num_nodes + 1)

    def partition_id(self, node_id: int) -> int:
        """Node ``node_id``'s ``partition-id`` (known here without asking the node, see ``NodeOrder``)."""
        return node_id - 1 if 1 <= node_id <= self.num_nodes else -1

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(1, self.num_nodes + 1)

    def get_nodes(self) -> Iterable[object]:  # NodeInfo protos are not needed in-process
        return []

    def _deliver(self, message: Message) -> Message:
        # A reply points at its instruction's id, which the link state assigns. Flower 1.41 has no public
        # setter; its own InMemoryGrid.push_messages sets the id exactly like this.
        message.metadata.__dict__["_message_id"] = str(uuid4())
        node = message.metadata.dst_node_id
        if not 1 <= node <= self.num_nodes:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, f"node {node} does not exist"), reply_to=message)
        try:
            return self.client_app(message, self.contexts[node])
        except Exception as exc:  # noqa: BLE001 — a client fault becomes an error reply, as under Ray
            reason = f"{type(exc).__name__}: {exc}"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._replies = [self._deliver(m) for m in messages]
        return [r.metadata.reply_to_message_id for r in self._replies]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        return [r for r in self._replies if r.metadata.reply_to_message_id in wanted]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver one after another. Clients stand for parallel devices, so each is held to ``timeout`` on
        its own time: a reply that took longer is dropped, as a late reply is under a real SuperLink."""
        replies = []
        for message in messages:
            start = time.monotonic()
            reply = self._deliver(message)
            if timeout is None or time.monotonic() - start <= timeout:
                replies.append(reply)
        self._freeze_once()
        return replies

    def _freeze_once(self) -> None:
        """After the first round (imports done: torch, its compiler stack on the first optimiser, the data), move
        every object alive into the collector's permanent generation (``gc.freeze``): they live as long as the run,
        and a full collection would otherwise walk all of them again (0.1 s and more each time the rounds' garbage
        triggers one). Cyclic garbage of round 1 stays unreclaimed: bounded, once."""
        if not self._frozen:
            self._frozen = True
            gc.freeze()


class _LazyFileHandler(logging.FileHandler):
    """A FileHandler that creates its folder at the first line (Flower logs once the run is under way)."""

    def _open(self):  # type: ignore[no-untyped-def]
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextlib.contextmanager
def flower_log(path: Path, verbose: bool = False) -> Iterator[None]:
    """Flower's log (logger ``flwr``) goes to ``path`` (appended, opened at the first line), as the Ray backend's
    does; its console handlers are detached unless ``verbose``, so the terminal shows fedfuse's lines only."""
    logger = logging.getLogger("flwr")
    handler = _LazyFileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s: %(message)s"))
    console = [] if verbose else [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
    for h in console:
        logger.removeHandler(h)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        for h in console:
            logger.addHandler(h)


def run_inline(
    cfg: dict[str, Any],
    on_round: Callable[[dict[str, Any]], None] | None = None,
    *,
    resume: bool = False,
    verbose: bool = False,
) -> None:
    """fedfuse's ServerApp logic on an :class:`InlineGrid` of ``cfg['num-clients']`` nodes (``client-pool`` nodes
    when set) running its ClientApp; Flower's log to ``OUT/flower.log`` (:func:`flower_log`)."""
    from clients.client_app import app as client_app
    from strategies.server_app import run_server

    nodes = int(cfg.get("client-pool", 0)) or int(cfg["num-clients"])  # a pool: K nodes serve the N clients
    with flower_log(Path(cfg["out"]) / "flower.log", verbose):
        run_server(InlineGrid(client_app, nodes), cfg, on_round, resume=resume)
