"""FedFuseStrategy: Flower's FedAvg, made deterministic and strict about what it aggregates.

Only what every fedfuse strategy shares: seeded sampling and a fixed reply order
(:mod:`strategies.sampling`); reply validation (keys and size against the sent model before anything is
decoded, then :func:`fedfuse.validation.check_update`) before any aggregation, keeping the previous model
when fewer than ``min_train_nodes`` updates are valid; round
statistics (``rejected``, ``skipped``, ``aggregate_s`` + ``self.round_metrics``) in the MetricRecord
``aggregate_train`` returns. The round loop is Flower's own ``Strategy.start``. Subclasses override
:meth:`aggregate_arrays` and, for run options, ``options`` + :meth:`from_config` (:mod:`strategies.registry`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedfuse import protocol
from fedfuse.config import Option
from fedfuse.errors import ConfigError
from fedfuse.state import weighted_average
from fedfuse.validation import MAX_NUM_EXAMPLES, MAX_REPLY_FACTOR, check_reply_size, check_update
from strategies.sampling import NodeOrder, seeded_sample

__all__ = ["FedFuseStrategy", "reply_size_reason"]

log = logging.getLogger("fedfuse")
State = dict[str, torch.Tensor]


def reply_size_reason(record: ArrayRecord, sent: State, max_factor: float = MAX_REPLY_FACTOR) -> str | None:
    """:func:`fedfuse.validation.check_reply_size` on a reply's serialised arrays, before anything is decoded
    (so a reply cannot make the server allocate much)."""
    sizes = {}
    for key in record.keys():
        data = getattr(record[key], "data", None)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return f"{key}: not a serialised array"
        sizes[key] = len(data)
    return check_reply_size(sizes, sent, max_factor)


class FedFuseStrategy(FedAvg):
    """FedAvg whose sampling, aggregation order and fault handling depend on ``seed`` only.

    θ = Σ_i (n_i / Σ_j n_j) θ_i over the valid replies, summed in partition order in float64.
    """

    options: ClassVar[tuple[Option, ...]] = ()  # run options this strategy reads (beyond the core ones)

    def __init__(
        self,
        *,
        seed: int = 0,
        discover_partitions: bool = False,
        query_timeout: float = 600.0,
        max_num_examples: float = MAX_NUM_EXAMPLES,
        max_reply_factor: float = MAX_REPLY_FACTOR,
        **fedavg_kwargs: Any,
    ) -> None:
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        if fedavg_kwargs["fraction_evaluate"] == 0.0:
            fedavg_kwargs.setdefault("min_evaluate_nodes", 0)
        for name in ("fraction_train", "fraction_evaluate"):
            value = fedavg_kwargs.get(name, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{name}={value!r} is out of range; allowed: a number in [0, 1]")
        for name, value in [*((n, fedavg_kwargs.get(n, 2)) for n in ("min_train_nodes", "min_available_nodes")),
                            ("seed", seed)]:  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} is out of range; allowed: an integer >= 0")
        for name, value in (("max_num_examples", max_num_examples), ("max_reply_factor", max_reply_factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
                raise ConfigError(f"{name}={value!r} is out of range; allowed: a number > 0")
        super().__init__(**fedavg_kwargs)
        self.seed = int(seed)
        self.max_num_examples = float(max_num_examples)  # a reply's num-examples above this is rejected
        self.max_reply_factor = float(max_reply_factor)  # a reply above this × the sent model's bytes is rejected
        self.nodes = NodeOrder(query_timeout, query=discover_partitions)  # see strategies.sampling
        self.round_metrics: dict[str, float] = {}  # statistics of the current round, returned with the metrics
        self._sent: State = {}
        self._sent_to: dict[int, State] = {}  # per node, where nodes get different models (width heterogeneity)
        self._sampled = 0
        self._valid_nodes: list[int] = []

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, model: Any = None, example_input: Any = None, **kwargs: Any):
        """The strategy a validated run config asks for (fedfuse's ServerApp, whose ClientApp answers the
        partition query); ``kwargs`` are FedAvg's sampling arguments, :meth:`config_kwargs` the strategy's own."""
        own = cls.config_kwargs(cfg, model=model, example_input=example_input)
        return cls(**{**kwargs, "seed": int(cfg["seed"]), "discover_partitions": True, **own})

    @classmethod
    def config_kwargs(cls, cfg: Mapping[str, Any], *, model: Any, example_input: Any) -> dict[str, Any]:
        """Constructor arguments from this strategy's run options (none here)."""
        return {}

    # ---- sampling -------------------------------------------------------------------------------
    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, kind: str):
        train = kind == MessageType.TRAIN
        fraction = self.fraction_train if train else self.fraction_evaluate
        minimum = self.min_train_nodes if train else self.min_evaluate_nodes
        if fraction == 0.0:
            return []
        node_ids = seeded_sample(grid, self.nodes, self.seed, server_round, fraction, minimum, self.min_available_nodes)
        config[protocol.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, kind)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model and config to a seeded sample of nodes."""
        messages = self._messages(server_round, arrays, config, grid, MessageType.TRAIN)
        self._sent, self._sent_to, self._sampled = arrays.to_torch_state_dict(), {}, len(messages)
        self.round_metrics = {}
        log.info("round %d: sampled %d nodes", server_round, len(messages))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation on a seeded sample (off unless ``fraction_evaluate`` > 0)."""
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    # ---- validation and aggregation -------------------------------------------------------------
    def shape_ok(self, key: str, shape: tuple[int, ...], reference: tuple[int, ...]) -> bool:
        """Whether a reply's ``shape`` for ``key`` may differ from the global one (False; see FedFusion)."""
        return False

    def _unpack(self, msg: Message) -> tuple[State, float] | str:
        """(state, weight) of a reply, or the reason it is rejected."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "expected exactly one ArrayRecord and one MetricRecord"
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            return f"MetricRecord lacks {self.weighted_by_key!r}"
        sent = self._sent_to.get(msg.metadata.src_node_id, self._sent)
        record = next(iter(content.array_records.values()))
        reason = reply_size_reason(record, sent, self.max_reply_factor)
        if reason is not None:
            return reason
        try:
            state = record.to_torch_state_dict()
        except Exception as exc:  # noqa: BLE001 — undecodable arrays are a bad update, not a crash
            return f"arrays cannot be decoded ({type(exc).__name__})"
        weight = metrics[self.weighted_by_key]
        reason = check_update(state, sent, weight, shape_ok=self.shape_ok, max_num_examples=self.max_num_examples)
        return reason if reason is not None else (state, float(weight))  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject invalid updates, then :meth:`aggregate_arrays` the rest in partition order."""
        replies = list(replies)
        for msg in replies:
            self.nodes.learn(msg)
        replies.sort(key=lambda m: self.nodes.key(m.metadata.src_node_id))
        valid, states, weights = [], [], []
        for msg in replies:
            label = self.nodes.label(msg.metadata.src_node_id)
            if msg.has_error():
                log.warning("round %d: %s replied with an error: %s", server_round, label, msg.error.reason)
                continue
            unpacked = self._unpack(msg)
            if isinstance(unpacked, str):
                log.warning("round %d: rejected update from %s: %s", server_round, label, unpacked)
                continue
            valid.append(msg)
            states.append(unpacked[0])
            weights.append(unpacked[1])
        stats = {"rejected": float(sum(not m.has_error() for m in replies) - len(valid)), "skipped": 0.0}
        if len(replies) < self._sampled:
            late = self._sampled - len(replies)
            log.warning("round %d: %d sampled node(s) did not reply in time", server_round, late)
        if len(valid) < max(self.min_train_nodes, 1):
            log.warning(
                "round %d: %d valid update(s) < min_train_nodes=%d; keeping the previous global model",
                server_round, len(valid), self.min_train_nodes,
            )  # fmt: skip
            return None, MetricRecord({**stats, "skipped": 1.0})
        t_agg = time.perf_counter()
        self._valid_nodes = [m.metadata.src_node_id for m in valid]  # whose states these are (post-fusion rounds)
        new_state = self.aggregate_arrays(server_round, states, weights)
        stats["aggregate_s"] = time.perf_counter() - t_agg
        try:
            metrics = dict(self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key))
        except Exception as exc:  # noqa: BLE001 — inconsistent client metric keys must not lose the round's model
            log.warning("round %d: client metrics not aggregated: %s", server_round, exc)
            metrics = {}
        return ArrayRecord(new_state), MetricRecord({**metrics, **stats, **self.round_metrics})

    def aggregate_arrays(self, server_round: int, states: list[State], weights: list[float]) -> State:
        """FedAvg: θ = Σ_i (n_i / Σ_j n_j) θ_i (:func:`fedfuse.state.weighted_average`)."""
        return weighted_average(states, weights)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the global model (the ServerApp checkpoints it; subclasses extend)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
