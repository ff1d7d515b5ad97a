"""FedFuseStrategy: Flower's FedAvg with deterministic sampling and reply order, and one aggregation hook.

Subclasses (FedWB, FedMatch, ...) override :meth:`aggregate_arrays` only: it receives the valid
replies' state dicts and weights, already in a fixed order, and returns the new global state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import nn

from fedfuse.experiment import derive_seed

__all__ = ["FedFuseStrategy", "CLIENT_INFO_KEY"]

log = logging.getLogger(__name__)

# ConfigRecord key in replies carrying the client's identity (partition-id), for a deterministic order.
CLIENT_INFO_KEY = "client"


class FedFuseStrategy(FedAvg):
    """FedAvg whose client sampling and aggregation order depend on ``seed`` only.

    Simulation node ids are random per run, so the strategy first asks every node (one QUERY
    message) for its ``partition-id``; it then samples ``ceil(fraction_train · N)`` partitions with
    a generator seeded by ``(seed, round)`` and sums replies in partition order. Deployed nodes
    without a partition id are ordered by node id after those with one.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        template: nn.Module | None = None,
        query_timeout: float = 600.0,
        **fedavg_kwargs: Any,
    ) -> None:
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        if fedavg_kwargs["fraction_evaluate"] == 0.0:
            fedavg_kwargs.setdefault("min_evaluate_nodes", 0)
        super().__init__(**fedavg_kwargs)
        self.seed = int(seed)
        self.template = template  # a module of the global architecture (for specs and masks)
        self.query_timeout = float(query_timeout)
        self.partition_of: dict[int, int] = {}
        self.last_train_metrics: dict[str, float] = {}
        self.round_stats: dict[str, float] = {}

    # ---- sampling -------------------------------------------------------------------------------
    def _discover(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes we have not seen for their partition id (a QUERY message each)."""
        unknown = [n for n in node_ids if n not in self.partition_of]
        if not unknown:
            return
        query = RecordDict({self.configrecord_key: ConfigRecord({"query": "partition-id"})})
        msgs = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
            node = reply.metadata.src_node_id
            pid = -1
            if not reply.has_error() and CLIENT_INFO_KEY in reply.content.config_records:
                pid = int(reply.content.config_records[CLIENT_INFO_KEY].get("partition-id", -1))
            self.partition_of[node] = pid

    def _order_key(self, node_id: int) -> tuple[int, int]:
        pid = self.partition_of.get(node_id, -1)
        return (0, pid) if pid >= 0 else (1, node_id)

    def sample(self, grid: Grid, server_round: int, fraction: float, min_nodes: int) -> list[int]:
        """Seeded sample of ``max(ceil(fraction·N), min_nodes)`` nodes, as a sorted-by-partition list."""
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, 0)  # waits for min_available_nodes
        self._discover(grid, all_nodes)
        ordered = sorted(all_nodes, key=self._order_key)
        k = min(len(ordered), max(math.ceil(fraction * len(ordered)), min_nodes))
        rng = np.random.default_rng(derive_seed(self.seed, server_round, 7))
        chosen = sorted(rng.choice(len(ordered), size=k, replace=False).tolist())
        return [ordered[i] for i in chosen]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model and config to a seeded sample of nodes."""
        if self.fraction_train == 0.0:
            return []
        node_ids = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        log.info("configure_train: round %d sampled %d nodes", server_round, len(node_ids))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation on a seeded sample (off unless ``fraction_evaluate`` > 0)."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self.sample(grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    # ---- aggregation ----------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, order by partition, then :meth:`aggregate_arrays` on state dicts."""
        replies = sorted(replies, key=lambda m: self._order_key(m.metadata.src_node_id))
        valid, errors = self._check_and_log_replies(replies, is_train=True)
        self.round_stats = {"replies": float(len(valid)), "failures": float(len(errors))}
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        states = [next(iter(c.array_records.values())).to_torch_state_dict() for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        new_state = self.aggregate_arrays(server_round, states, weights)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        self.last_train_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return ArrayRecord(new_state), metrics

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """FedAvg: θ = Σ_i (n_i / Σ_j n_j) θ_i, summed in a fixed order; integer buffers from the first."""
        total = float(sum(weights))
        out: dict[str, torch.Tensor] = {}
        for key, ref in states[0].items():
            if not torch.is_floating_point(ref):
                out[key] = ref.clone()
                continue
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for state, w in zip(states, weights, strict=True):
                acc += state[key].to(torch.float64) * (w / total)
            out[key] = acc.to(ref.dtype)
        return out
