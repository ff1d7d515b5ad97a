"""FedFuseStrategy: Flower's FedAvg made deterministic and fault tolerant, with one aggregation hook.

Every fedfuse strategy inherits, and so never has to re-implement:
- seeded client sampling and a fixed reply order (bit-identical runs on the CPU);
- fault handling: error replies and timeouts are counted, invalid updates are rejected before any
  aggregation or fusion sees them, and a round with fewer valid replies than ``min_train_nodes``
  keeps the previous global model;
- a resumable round loop (``start(..., start_round=k)``) and ``state_dict``/``load_state_dict``
  for checkpoints.

Subclasses (FedWB, FedMatch, FedPFN, ...) override :meth:`aggregate_arrays` only: it receives the
valid replies' state dicts and weights, in partition order, and returns the new global state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.experiment import sample_clients
from fedfuse.validation import check_update

__all__ = ["FedFuseStrategy", "CLIENT_INFO_KEY"]

log = logging.getLogger("fedfuse")

# ConfigRecord key in replies carrying the client's identity (partition-id), for a deterministic order.
CLIENT_INFO_KEY = "client"


class FedFuseStrategy(FedAvg):
    """FedAvg whose sampling, aggregation order and fault handling depend on ``seed`` only.

    Simulation node ids are random per run, so the strategy first asks every node (one QUERY
    message) for its ``partition-id``; it then samples ``max(ceil(fraction_train · N), min_train_nodes)``
    partitions with a generator seeded by ``(seed, round)`` and sums replies in partition order.
    Deployed nodes without a partition id are ordered by node id after those with one.
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
        _check_fraction("fraction_train", fedavg_kwargs.get("fraction_train", 1.0))
        _check_fraction("fraction_evaluate", fedavg_kwargs["fraction_evaluate"])
        for name in ("min_train_nodes", "min_available_nodes"):
            value = fedavg_kwargs.get(name, 2)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} is out of range; allowed: an integer >= 0")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed={seed!r} is out of range; allowed: an integer >= 0")
        super().__init__(**fedavg_kwargs)
        self.seed = int(seed)
        self.template = template  # a module of the global architecture (for specs and masks)
        self.query_timeout = float(query_timeout)
        self.partition_of: dict[int, int] = {}
        self.last_train_metrics: dict[str, float] = {}
        self.round_stats: dict[str, float] = {}
        self.totals: dict[str, float] = {"failures": 0.0, "timeouts": 0.0, "rejected": 0.0, "skipped_rounds": 0.0}
        self._sent_state: dict[str, torch.Tensor] = {}
        self._sent_states: dict[int, dict[str, torch.Tensor]] = {}  # per node, where nodes get different models
        self._sampled = 0

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
        """Seeded sample of ``max(ceil(fraction·N), min_nodes)`` nodes, sorted by partition."""
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, 0)  # waits for min_available_nodes
        self._discover(grid, all_nodes)
        ordered = sorted(all_nodes, key=self._order_key)
        return [ordered[i] for i in sample_clients(self.seed, server_round, len(ordered), fraction, min_nodes)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model and config to a seeded sample of nodes."""
        if self.fraction_train == 0.0:
            return []
        node_ids = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        log.info("round %d: sampled %d nodes", server_round, len(node_ids))
        self._sent_state = arrays.to_torch_state_dict()
        self._sent_states = {}
        self._sampled = len(node_ids)
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

    # ---- optional observation of the round's client models (--lmc-monitor, --save-client-models) ---
    # Off unless the ServerApp calls configure_monitoring.
    lmc_data: tuple[torch.Tensor, torch.Tensor] | None = None
    save_client_models: int = 0
    out_dir: Path | None = None

    def configure_monitoring(
        self,
        *,
        lmc_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        save_client_models: int = 0,
        out: Path | None = None,
    ) -> None:
        """Log barriers among each round's client models on ``lmc_data`` (a held-out batch), and save the
        client models of round ``save_client_models`` under ``out/clients/round<R>/partition<P>.pt``."""
        self.lmc_data = lmc_data
        self.save_client_models = int(save_client_models)
        self.out_dir = None if out is None else Path(out)

    def client_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A valid reply as a full model state (strategies whose replies are partial complete it)."""
        return state

    def _observe_clients(
        self, server_round: int, valid: list[Message], states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> None:
        from strategies.layerwise import lmc_round_stats, save_client_states

        full = [self.client_model_state(s) for s in states]
        if self.save_client_models == server_round and self.out_dir is not None:
            labels = []
            for msg in valid:
                pid = self.partition_of.get(msg.metadata.src_node_id, -1)
                labels.append(f"partition{pid}" if pid >= 0 else f"node{msg.metadata.src_node_id}")
            save_client_states(self.out_dir / "clients" / f"round{server_round}", labels, full)
        if self.lmc_data is not None and self.template is not None and len(full) >= 2:
            try:
                self.round_stats.update(lmc_round_stats(self.template, full, weights, *self.lmc_data))
            except (ConfigError, RuntimeError) as exc:  # e.g. clients of other widths: skip, never lose the round
                log.warning("round %d: LMC monitor skipped: %s", server_round, exc)

    # ---- validation and aggregation -------------------------------------------------------------
    def shape_ok(self, key: str, shape: tuple[int, ...], reference: tuple[int, ...]) -> bool:
        """Whether a reply's ``shape`` for ``key`` is acceptable when it differs from the global one.

        False here; strategies that fuse clients of other widths override it.
        """
        return False

    def _client_label(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        pid = self.partition_of.get(node, -1)
        return f"node {node}" + (f" (partition {pid})" if pid >= 0 else "")

    def _unpack(self, msg: Message) -> tuple[dict[str, torch.Tensor], float] | str:
        """(state, weight) of a reply, or the reason it is rejected."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "expected exactly one ArrayRecord and one MetricRecord"
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            return f"MetricRecord lacks {self.weighted_by_key!r}"
        try:
            state = next(iter(content.array_records.values())).to_torch_state_dict()
        except Exception as exc:  # noqa: BLE001 — undecodable arrays are a bad update, not a crash
            return f"arrays cannot be decoded ({type(exc).__name__})"
        weight = metrics[self.weighted_by_key]
        sent = self._sent_states.get(msg.metadata.src_node_id, self._sent_state)
        reason = check_update(state, sent, weight, shape_ok=self.shape_ok)
        return reason if reason is not None else (state, float(weight))  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count faults, reject invalid updates, then :meth:`aggregate_arrays` the rest in partition order."""
        replies = sorted(replies, key=lambda m: self._order_key(m.metadata.src_node_id))
        errors = [m for m in replies if m.has_error()]
        for msg in errors:
            log.warning(
                "round %d: %s replied with an error: %s", server_round, self._client_label(msg), msg.error.reason
            )
        valid: list[Message] = []
        states: list[dict[str, torch.Tensor]] = []
        weights: list[float] = []
        rejected = 0
        for msg in replies:
            if msg.has_error():
                continue
            unpacked = self._unpack(msg)
            if isinstance(unpacked, str):
                rejected += 1
                log.warning("round %d: rejected update from %s: %s", server_round, self._client_label(msg), unpacked)
                continue
            valid.append(msg)
            states.append(unpacked[0])
            weights.append(unpacked[1])
        timeouts = max(self._sampled - len(replies), 0)
        if timeouts:
            log.warning("round %d: %d sampled node(s) did not reply before the timeout", server_round, timeouts)
        self.round_stats = {
            "replies": float(len(valid)),
            "failures": float(len(errors)),
            "timeouts": float(timeouts),
            "rejected": float(rejected),
        }
        for key in ("failures", "timeouts", "rejected"):
            self.totals[key] += self.round_stats[key]
        if len(valid) < max(self.min_train_nodes, 1):
            self.totals["skipped_rounds"] += 1
            self.round_stats["skipped"] = 1.0
            log.warning(
                "round %d: %d valid update(s) < min_train_nodes=%d; keeping the previous global model",
                server_round,
                len(valid),
                self.min_train_nodes,
            )
            return None, None
        self.round_stats["skipped"] = 0.0
        if self.lmc_data is not None or self.save_client_models == server_round:
            self._observe_clients(server_round, valid, states, weights)
        t_agg = time.perf_counter()
        new_state = self.aggregate_arrays(server_round, states, weights)
        self.round_stats["aggregate_s"] = time.perf_counter() - t_agg
        metrics = self._aggregate_metrics([m.content for m in valid])
        self.last_train_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return ArrayRecord(new_state), metrics

    def _aggregate_metrics(self, contents: list[RecordDict]) -> MetricRecord:
        try:
            return self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as exc:  # noqa: BLE001 — inconsistent metric keys must not lose the round's model
            log.warning("train metrics not aggregated: %s", exc)
            return MetricRecord({})

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

    # ---- round loop and checkpoint state --------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        start_round: int = 1,
    ) -> Result:
        """Flower's round loop (train → federated evaluate → central evaluate), from ``start_round``.

        ``start_round > 1`` resumes a run whose rounds before it are already in a checkpoint; the
        central evaluation of round 0 is skipped then.
        """
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        result.arrays = initial_arrays
        arrays = initial_arrays
        t_start = time.time()
        if evaluate_fn is not None and start_round == 1:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for rnd in range(start_round, num_rounds + 1):
            replies = grid.send_and_receive(self.configure_train(rnd, arrays, train_config, grid), timeout=timeout)
            agg_arrays, agg_metrics = self.aggregate_train(rnd, replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_metrics is not None:
                result.train_metrics_clientapp[rnd] = agg_metrics
            eval_msgs = self.configure_evaluate(rnd, arrays, evaluate_config, grid)
            if eval_msgs:
                agg_eval = self.aggregate_evaluate(rnd, grid.send_and_receive(eval_msgs, timeout=timeout))
                if agg_eval is not None:
                    result.evaluate_metrics_clientapp[rnd] = agg_eval
            if evaluate_fn is not None:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
        log.info(
            "%s finished rounds %d..%d in %.2fs", type(self).__name__, start_round, num_rounds, time.time() - t_start
        )
        return result

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the global model (extended by subclasses)."""
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals.update(state.get("totals", {}))


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name}={value!r} is out of range; allowed: a number in [0, 1]")
