"""FedFuseStrategy: Flower's FedAvg, deterministic and strict about what it aggregates (the Flower adaptation only):
seeded sampling and reply order (:mod:`strategies.sampling`), :func:`fedfuse.replies.unpack_reply`,
:func:`fedfuse.screening.screen_round`, then :meth:`aggregate_arrays`, which subclasses override (and ``options``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedfuse import protocol
from fedfuse.config import SERVER_OPTIONS, Option
from fedfuse.errors import require_model
from fedfuse.experiment import derive_seed
from fedfuse.merge.distill import distill_states
from fedfuse.replies import decode_arrays, error_summary, traffic, unpack_reply
from fedfuse.robust import Reducer, reducer
from fedfuse.screening import ROBUST_OPTIONS, ScreeningConfig, screen_apart_claims, screen_round
from fedfuse.state import weighted_average
from fedfuse.validation import MAX_NUM_EXAMPLES, MAX_REPLY_FACTOR, check_known_args, check_strategy_args, non_finite
from strategies.options import STRATEGY_OPTIONS
from strategies.sampling import NodeOrder, seeded_sample

__all__ = ["FedFuseStrategy", "require_model", "ROBUST_OPTIONS", "SERVER_OPTIONS"]

log = logging.getLogger("fedfuse")
State = dict[str, torch.Tensor]


class FedFuseStrategy(FedAvg):
    """FedAvg whose sampling, aggregation order and fault handling depend on ``seed`` only (float64, partition order);
    FedAvg's arguments keep FedAvg's defaults, the screening ones :class:`fedfuse.screening.ScreeningConfig`'s;
    ``distill_epochs`` > 0: FedDF on ``server_data``; ``pool_clients`` = N > 0: SuperNodes serving clients 0..N-1."""

    options: ClassVar[tuple[Option, ...]] = STRATEGY_OPTIONS["fedavg"]  # run options beyond the core ones

    def __init__(
        self, *, seed: int = 0, discover_partitions: bool = False, query_timeout: float = 600.0,
        max_num_examples: float = MAX_NUM_EXAMPLES, max_reply_factor: float = MAX_REPLY_FACTOR,
        robust: str = "none", robust_fraction: float = 0.2, server_data: torch.Tensor | None = None,
        distill_epochs: int = 0, distill_model: torch.nn.Module | None = None,
        trusted: Callable[[State, int], State] | None = None, pool_clients: int = 0, **kwargs: Any,
    ) -> None:  # fmt: skip
        names = ScreeningConfig.__dataclass_fields__
        self.screening = ScreeningConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        check_strategy_args(seed, kwargs, max_num_examples, max_reply_factor, distill_epochs, server_data,
                            distill_model)  # fmt: skip
        check_known_args(self, super().__init__, kwargs, names)  # a misspelt argument: one line, the nearest
        super().__init__(**kwargs)
        self.reduce: Reducer | None = reducer(robust, robust_fraction)  # None: the weighted average
        self.robust, self.seed = robust, int(seed)
        self.max_num_examples, self.max_reply_factor = float(max_num_examples), float(max_reply_factor)  # rejection
        self.nodes = NodeOrder(query_timeout, query=discover_partitions)  # see strategies.sampling
        self.nodes.clients = int(pool_clients)  # > 0: the nodes are a pool serving this many clients
        self.round_metrics: dict[str, float] = {}  # statistics of the current round, returned with the metrics
        self.started_apart = False  # round-1 clients trained from their own inits (no direction guard then)
        self._sent: State = {}
        self._sent_to: dict[int, State] = {}  # per node, where nodes get different models (widths, LoRA ranks);
        self._frozen_to: dict[int, State] = {}  # and what it was sent to use, not to train (unpack_reply's frozen)
        self._sampled, self._valid_nodes = 0, []  # nodes sampled; whose states aggregate_arrays gets (in order)
        self.server_data, self.distill_epochs, self.distill_model = server_data, int(distill_epochs), distill_model
        self.trusted = trusted  # (sent, round) -> the server's own trained state (fedfuse.trust), or None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, model: Any = None, example_input: Any = None, **kwargs: Any):
        """The strategy a validated run config asks for (fedfuse's ServerApp, whose ClientApp answers the
        partition query): :func:`strategies.registry.config_arguments`; ``kwargs`` are FedAvg's sampling ones."""
        from fedfuse.experiment import init_mode
        from strategies.registry import config_arguments

        strategy = cls(**config_arguments(cls, cfg, model, example_input, kwargs))
        strategy.started_apart = init_mode(cfg) != "shared"
        return strategy

    @classmethod
    def config_kwargs(cls, cfg: Mapping[str, Any], *, model: Any, example_input: Any) -> dict[str, Any]:
        """Constructor arguments from this strategy's run options (none here)."""
        return {}

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, kind: str):
        train = kind == MessageType.TRAIN
        fraction = self.fraction_train if train else self.fraction_evaluate
        minimum = self.min_train_nodes if train else self.min_evaluate_nodes
        if fraction == 0.0:
            return []
        node_ids = seeded_sample(grid, self.nodes, self.seed, server_round, fraction, minimum, self.min_available_nodes)
        config.update({protocol.SERVER_ROUND: server_round, **self.nodes.pool_config(node_ids)})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, kind)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model and config to a seeded sample of nodes."""
        messages = self._messages(server_round, arrays, config, grid, MessageType.TRAIN)
        self._sent, self._sent_to, self._frozen_to, self._sampled = decode_arrays(arrays), {}, {}, len(messages)
        self.round_metrics = {}
        log.info("round %d: sampled %d nodes", server_round, len(messages))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation on a seeded sample (FedAvg's default ``fraction_evaluate=1.0``; 0 turns it off)."""
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    def sent_to(self, node: int) -> State:
        """What ``node`` was sent this round: its own model under width or rank heterogeneity, else the global."""
        return self._sent_to.get(node, self._sent)

    def frozen_to(self, node: int) -> State:
        """What ``node`` was sent to use, not to train: its reply may return it unchanged (LoRA's folded base)."""
        return self._frozen_to.get(node, {})

    def shape_ok(self, key: str, shape: tuple[int, ...], reference: tuple[int, ...]) -> bool:
        """Whether a reply's ``shape`` for ``key`` may differ from the global one (False; see FedFusion)."""
        return False

    def screen_view(self, unpacked: list, sent: list[State]) -> tuple[list, list[State]]:
        """The replies and what each was sent, as screening compares them: as they are (LoRA ranks: one space)."""
        return unpacked, sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject invalid updates, screen the rest, then :meth:`aggregate_arrays` them in partition order."""
        replies = list(replies)
        for msg in replies:
            self.nodes.learn(msg)
        replies.sort(key=lambda m: self.nodes.key(m.metadata.src_node_id))
        for msg in (m for m in replies if m.has_error()):
            log.warning("round %d: %s replied with an error: %s", server_round,
                        self.nodes.label(msg.metadata.src_node_id), error_summary(msg.error.reason))  # fmt: skip
        answers = [m for m in replies if not m.has_error()]
        sent = [self.sent_to(m.metadata.src_node_id) for m in answers]
        unpacked = [unpack_reply(m, s, self.weighted_by_key, max_reply_factor=self.max_reply_factor,
                                 max_num_examples=self.max_num_examples, shape_ok=self.shape_ok,
                                 frozen=self.frozen_to(m.metadata.src_node_id))
                    for m, s in zip(answers, sent, strict=True)]  # fmt: skip
        moved, (unpacked, sent) = traffic(sent, unpacked), self.screen_view(unpacked, sent)
        guard = not (self.started_apart and server_round == 1)  # apart clients share no starting point
        use = self.trusted and guard and len(answers) >= 3 and self.screening.direction_guard != "off"
        reference = self.trusted(self._sent, server_round) if use else None  # type: ignore[misc]
        losses = getattr(self.trusted, "losses", None) if use else None  # a plain callable: no influence test
        rs = screen_round(server_round, [self.nodes.label(m.metadata.src_node_id) for m in answers], unpacked, sent,
                          self.screening, direction=guard, reference=reference, losses=losses)  # fmt: skip
        stats = {**rs.stats, "skipped": 0.0, **moved}
        if len(replies) < self._sampled:
            log.warning("round %d: %d sampled node(s) replied too late", server_round, self._sampled - len(replies))
        if len(rs.keep) < max(self.min_train_nodes, 1):
            log.warning("round %d: %d valid update(s) < min_train_nodes=%d; keeping the previous global model",
                        server_round, len(rs.keep), self.min_train_nodes)  # fmt: skip
            return None, MetricRecord({**stats, "skipped": 1.0})
        t_agg = time.perf_counter()
        msgs, states, weights = [answers[i] for i in rs.keep], rs.states, rs.weights
        self._valid_nodes = [m.metadata.src_node_id for m in msgs]
        if not guard and len(msgs) >= 3 and (own := getattr(self.trusted, "losses", None)):  # apart: claims answer
            weights, stats["cut"] = screen_apart_claims(server_round, [self.nodes.label(n) for n in self._valid_nodes],
                weights, lambda ws: self.trial_aggregate(server_round, states, ws), own, self.screening)  # fmt: skip
        new_state = self.aggregate_arrays(server_round, states, weights)
        if self.distill_epochs:
            new_state = self.distill_aggregate(server_round, new_state, states, weights)
        stats["aggregate_s"] = time.perf_counter() - t_agg
        if non_finite(new_state) is not None:
            log.warning("round %d: the aggregate is not finite; keeping the previous global model", server_round)
            return None, MetricRecord({**stats, "skipped": 1.0})
        try:
            metrics = dict(self.train_metrics_aggr_fn([m.content for m in msgs], self.weighted_by_key))
        except Exception as exc:  # noqa: BLE001 — inconsistent client metric keys must not lose the round's model
            log.warning("round %d: client metrics not aggregated: %s", server_round, exc)
            metrics = {}
        return ArrayRecord(new_state), MetricRecord({**metrics, **stats, **self.round_metrics})

    def aggregate_arrays(self, server_round: int, states: list[State], weights: list[float]) -> State:
        """θ = Σ_i (n_i / Σ_j n_j) θ_i (:func:`fedfuse.state.weighted_average`), or the unweighted ``robust`` one."""
        return (self.reduce or weighted_average)(states, weights)

    def trial_aggregate(self, server_round: int, states: list[State], weights: list[float]) -> State:
        """The aggregate under trial ``weights`` (the apart claim test), asking no client anything."""
        return self.aggregate_arrays(server_round, states, weights)

    def distill_aggregate(self, server_round: int, state: State, states: list[State], weights: list[float]) -> State:
        """FedDF (:func:`fedfuse.merge.distill.distill_states`), seeded by (seed, round): bit-identical on resume."""
        assert self.distill_model is not None and self.server_data is not None
        return distill_states(self.distill_model, state, states, self.server_data, epochs=self.distill_epochs,
                              seed=derive_seed(self.seed, server_round, 31), weights=weights)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the global model (the ServerApp checkpoints it; subclasses extend)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
