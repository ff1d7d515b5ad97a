"""FedFuseStrategy: Flower's FedAvg, made deterministic and strict about what it aggregates.

Only what every fedfuse strategy shares: seeded sampling and a fixed reply order
(:mod:`strategies.sampling`); reply validation (keys and size against the sent model before anything is
decoded, then :func:`fedfuse.validation.check_update`) and round-level screening (:mod:`fedfuse.robust`:
update-norm and num-examples bounds relative to the round's median) before any aggregation, with the
``robust`` reduction (or the weighted average), keeping the previous model
when fewer than ``min_train_nodes`` updates are valid; round
statistics (``rejected``, ``skipped``, ``aggregate_s`` + ``self.round_metrics``) in the MetricRecord
``aggregate_train`` returns. The round loop is Flower's own ``Strategy.start``. Subclasses override
:meth:`aggregate_arrays` and, for run options, ``options`` + :meth:`from_config` (:mod:`strategies.registry`).
"""

from __future__ import annotations

import logging
import math
import re
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
from fedfuse.errors import ConfigError, MissingArgumentError
from fedfuse.robust import NORM_ACTIONS, Reducer, reducer, screen_updates
from fedfuse.state import weighted_average
from fedfuse.validation import MAX_NUM_EXAMPLES, MAX_REPLY_FACTOR, check_reply_size, check_update, non_finite
from strategies.options import (  # noqa: F401  (re-exported: the options' home is the table)
    EXAMPLES_BOUND,
    MIN_UPDATE_COSINE,
    ROBUST_OPTIONS,
    SERVER_OPTIONS,
    STRATEGY_OPTIONS,
    UPDATE_NORM_BOUND,
)
from strategies.sampling import NodeOrder, seeded_sample

__all__ = [
    "FedFuseStrategy", "reply_size_reason", "unpack_reply", "error_summary", "require_model", "ROBUST_OPTIONS",
    "SERVER_OPTIONS",
]  # fmt: skip

log = logging.getLogger("fedfuse")
State = dict[str, torch.Tensor]


_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.+?)\s*$")
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")


def error_summary(reason: str | None) -> str:
    """One line of an error reply's reason (often a whole traceback, under Ray wrapped twice): the client's
    own ``Type: message`` line where there is one, else the last line."""
    lines = [ln for ln in (reason or "").splitlines() if ln.strip()]
    found = [m for ln in lines if (m := _EXC_LINE.match(ln))]
    own = [m for m in found if not any(w in m.group(1) for w in _WRAPPERS)]
    if own:
        return f"{own[-1].group(1).rsplit('.', 1)[-1]}: {own[-1].group(2)}"
    return lines[-1].strip() if lines else "no reason given"


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


def unpack_reply(
    msg: Message,
    sent: Mapping[str, torch.Tensor],
    weighted_by_key: str,
    *,
    max_reply_factor: float = MAX_REPLY_FACTOR,
    max_num_examples: float = MAX_NUM_EXAMPLES,
    shape_ok: Any = None,
) -> tuple[State, float] | str:
    """(state, num-examples) of a train reply, or why it is rejected; never raises. Checks, in order: one
    ArrayRecord + one MetricRecord, the weight key, the size limit BEFORE decoding, decoding, then
    :func:`fedfuse.validation.check_update` against the model ``sent`` to that client."""
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected exactly one ArrayRecord and one MetricRecord"
    metrics = next(iter(content.metric_records.values()))
    if weighted_by_key not in metrics:
        return f"MetricRecord lacks {weighted_by_key!r}"
    record = next(iter(content.array_records.values()))
    reason = reply_size_reason(record, sent, max_reply_factor)
    if reason is not None:
        return reason
    try:
        state = record.to_torch_state_dict()
    except Exception as exc:  # noqa: BLE001 — undecodable arrays are a bad update, not a crash
        return f"arrays cannot be decoded ({type(exc).__name__})"
    weight = metrics[weighted_by_key]
    reason = check_update(state, sent, weight, shape_ok=shape_ok, max_num_examples=max_num_examples)
    return reason if reason is not None else (state, float(weight))  # type: ignore[arg-type]


def require_model(strategy: object, model: Any) -> Any:
    """``model``, or one line naming what is missing, with an example (a :class:`MissingArgumentError`, which is
    a TypeError as Python's own "missing argument" error is)."""
    if model is None:
        name = type(strategy).__name__
        raise MissingArgumentError(
            f"{name} needs model=, a torch module of the global architecture (the clients' model), "
            f"e.g. {name}(model=Net())"
        )
    return model


class FedFuseStrategy(FedAvg):
    """FedAvg whose sampling, aggregation order and fault handling depend on ``seed`` only.

    θ = Σ_i (n_i / Σ_j n_j) θ_i over the valid replies, summed in partition order in float64.

    FedAvg's arguments (``fraction_train``, ``fraction_evaluate``, ``min_*_nodes``, ...) pass through with
    FedAvg's defaults, so swapping ``FedAvg(...)`` for a fedfuse strategy changes the aggregation only
    (``fraction_evaluate=1.0``: federated evaluation on every node, as FedAvg; fedfuse's own ServerApp
    evaluates centrally and passes ``fraction_evaluate=0.0`` itself, :func:`strategies.registry.build_strategy`).

    With ``distill_epochs`` > 0 (FedDF, Lin et al. 2020) the aggregate is the student of
    :func:`fedfuse.merge.distill.distill`: the clients' models (``distill_model``'s architecture) are the
    teachers, their n-weighted averaged logits on ``server_data`` (unlabeled inputs) the target.
    """

    options: ClassVar[tuple[Option, ...]] = STRATEGY_OPTIONS["fedavg"]  # run options beyond the core ones

    def __init__(
        self,
        *,
        seed: int = 0,
        discover_partitions: bool = False,
        query_timeout: float = 600.0,
        max_num_examples: float = MAX_NUM_EXAMPLES,
        max_reply_factor: float = MAX_REPLY_FACTOR,
        robust: str = "none",
        robust_fraction: float = 0.2,
        update_norm_bound: float = UPDATE_NORM_BOUND,
        update_norm_action: str = "reject",
        examples_bound: float = EXAMPLES_BOUND,
        min_update_cosine: float = MIN_UPDATE_COSINE,
        server_data: torch.Tensor | None = None,
        distill_epochs: int = 0,
        distill_model: torch.nn.Module | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        if isinstance(distill_epochs, bool) or int(distill_epochs) < 0:
            raise ConfigError(f"distill_epochs={distill_epochs!r} is out of range; allowed: an integer >= 0 (0 = off)")
        if int(distill_epochs) and (server_data is None or len(server_data) < 2 or distill_model is None):
            raise ConfigError(
                f"distill-epochs={distill_epochs} needs server-data >= 2 (unlabeled inputs the server holds) "
                "and the model"
            )
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
        for name, value in (("update_norm_bound", update_norm_bound), ("examples_bound", examples_bound)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 0:
                raise ConfigError(f"{name}={value!r} is out of range; allowed: a number >= 0 (0 = off)")
        if isinstance(min_update_cosine, bool) or not -1.0 <= float(min_update_cosine) <= 1.0:
            raise ConfigError(f"min_update_cosine={min_update_cosine!r} is out of range; allowed: [-1, 1] (-1 = off)")
        if update_norm_action not in NORM_ACTIONS:
            raise ConfigError(f"update_norm_action={update_norm_action!r}; allowed: {', '.join(NORM_ACTIONS)}")
        super().__init__(**fedavg_kwargs)
        self.reduce: Reducer | None = reducer(robust, robust_fraction)  # None: the weighted average
        self.robust = robust
        self.update_norm_bound, self.update_norm_action = float(update_norm_bound), update_norm_action
        self.examples_bound, self.min_update_cosine = float(examples_bound), float(min_update_cosine)
        self.seed = int(seed)
        self.max_num_examples = float(max_num_examples)  # a reply's num-examples above this is rejected
        self.max_reply_factor = float(max_reply_factor)  # a reply above this × the sent model's bytes is rejected
        self.nodes = NodeOrder(query_timeout, query=discover_partitions)  # see strategies.sampling
        self.round_metrics: dict[str, float] = {}  # statistics of the current round, returned with the metrics
        self._sent: State = {}
        self._sent_to: dict[int, State] = {}  # per node, where nodes get different models (width heterogeneity)
        self._sampled = 0
        self._valid_nodes: list[int] = []
        self.server_data = server_data
        self.distill_epochs = int(distill_epochs)
        self.distill_model = distill_model

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, model: Any = None, example_input: Any = None, **kwargs: Any):
        """The strategy a validated run config asks for (fedfuse's ServerApp, whose ClientApp answers the
        partition query); ``kwargs`` are FedAvg's sampling arguments, :meth:`config_kwargs` the strategy's own."""
        own = cls.config_kwargs(cfg, model=model, example_input=example_input)
        defences = {o.name.replace("-", "_"): cfg[o.name] for o in ROBUST_OPTIONS if o.name in cfg}
        if int(cfg.get("distill-epochs", 0)):
            defences |= {"distill_epochs": int(cfg["distill-epochs"]), "distill_model": model}
        return cls(**{**kwargs, "seed": int(cfg["seed"]), "discover_partitions": True, **defences, **own})

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
        """Federated evaluation on a seeded sample (FedAvg's default ``fraction_evaluate=1.0``; 0 turns it off)."""
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    # ---- validation and aggregation -------------------------------------------------------------
    def shape_ok(self, key: str, shape: tuple[int, ...], reference: tuple[int, ...]) -> bool:
        """Whether a reply's ``shape`` for ``key`` may differ from the global one (False; see FedFusion)."""
        return False

    def _unpack(self, msg: Message) -> tuple[State, float] | str:
        """(state, weight) of a reply, or the reason it is rejected (:func:`unpack_reply`)."""
        sent = self._sent_to.get(msg.metadata.src_node_id, self._sent)
        return unpack_reply(
            msg, sent, self.weighted_by_key, max_reply_factor=self.max_reply_factor,
            max_num_examples=self.max_num_examples, shape_ok=self.shape_ok,
        )  # fmt: skip

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject invalid updates, then :meth:`aggregate_arrays` the rest in partition order."""
        replies = list(replies)
        for msg in replies:
            self.nodes.learn(msg)
        replies.sort(key=lambda m: self.nodes.key(m.metadata.src_node_id))
        valid, states, weights, sent = [], [], [], []
        rejected: list[tuple[str, str]] = []
        for msg in replies:
            label = self.nodes.label(msg.metadata.src_node_id)
            if msg.has_error():
                reason = error_summary(msg.error.reason)
                log.warning("round %d: %s replied with an error: %s", server_round, label, reason)
                continue
            unpacked = self._unpack(msg)
            if isinstance(unpacked, str):
                rejected.append((label, unpacked))
                continue
            valid.append(msg)
            states.append(unpacked[0])
            weights.append(unpacked[1])
            sent.append(self._sent_to.get(msg.metadata.src_node_id, self._sent))
        answered = sum(not m.has_error() for m in replies)
        diverged = self._diverged(server_round, rejected, answered)
        for label, reason in rejected:
            if (label, reason) not in diverged:
                log.warning("round %d: rejected update from %s: %s", server_round, label, reason)
        valid, states, weights, screen_stats = self._screen(server_round, valid, states, weights, sent)
        stats = {"rejected": float(answered - len(valid) - len(diverged)), "skipped": 0.0}
        if diverged:
            stats["diverged"] = float(len(diverged))
        stats.update(screen_stats)
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
        if self.distill_epochs:
            new_state = self.distill_aggregate(server_round, new_state, states, weights)
        stats["aggregate_s"] = time.perf_counter() - t_agg
        if non_finite(new_state) is not None:
            log.warning("round %d: the aggregate is not finite; keeping the previous global model", server_round)
            return None, MetricRecord({**stats, "skipped": 1.0})
        try:
            metrics = dict(self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key))
        except Exception as exc:  # noqa: BLE001 — inconsistent client metric keys must not lose the round's model
            log.warning("round %d: client metrics not aggregated: %s", server_round, exc)
            metrics = {}
        return ArrayRecord(new_state), MetricRecord({**metrics, **stats, **self.round_metrics})

    def _diverged(self, server_round: int, rejected: list[tuple[str, str]], answered: int) -> list[tuple[str, str]]:
        """The non-finite updates to blame on the global model rather than on the clients: when at least half
        of the round's answers (and at least 2) diverged, training from the model sent is what fails — a
        poisoned global (defences off) or a too large learning rate. Counted as ``diverged``, not ``rejected``."""
        diverged = [(label, reason) for label, reason in rejected if "non-finite value" in reason]
        if len(diverged) < 2 or 2 * len(diverged) < answered:
            return []
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in self._sent.values() if v.is_floating_point()))
        log.warning(
            "round %d: %d of %d updates are non-finite after training from the global model sent (norm %.4g); "
            "the global model is the likely cause, not the clients (%s)",
            server_round, len(diverged), answered, norm, ", ".join(label for label, _ in diverged),
        )  # fmt: skip
        return diverged

    def _screen(
        self, server_round: int, valid: list[Message], states: list[State], weights: list[float], sent: list[State]
    ) -> tuple[list[Message], list[State], list[float], dict[str, float]]:
        """Round-level defences (:func:`fedfuse.robust.screen_updates`): updates far above the round's median
        norm and num-examples far above its median are rejected (logged, naming the client) or clipped."""
        screen = screen_updates(
            states, sent, weights, norm_factor=self.update_norm_bound, norm_action=self.update_norm_action,
            examples_factor=self.examples_bound, min_cosine=self.min_update_cosine,
        )  # fmt: skip
        keep = []
        for i, reason in enumerate(screen.reasons):
            if reason is None:
                keep.append(i)
            else:
                label = self.nodes.label(valid[i].metadata.src_node_id)
                log.warning("round %d: rejected update from %s: %s", server_round, label, reason)
        stats = dict(screen.ratios)
        if self.update_norm_action == "clip" and self.update_norm_bound > 0:
            stats["clipped"] = float(screen.clipped)
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return pick(valid), pick(screen.states), pick(weights), stats

    def aggregate_arrays(self, server_round: int, states: list[State], weights: list[float]) -> State:
        """FedAvg: θ = Σ_i (n_i / Σ_j n_j) θ_i (:func:`fedfuse.state.weighted_average`), or the ``robust``
        reduction (:func:`fedfuse.robust.robust_reduce`)."""
        return (self.reduce or weighted_average)(states, weights)

    def distill_aggregate(self, server_round: int, state: State, states: list[State], weights: list[float]) -> State:
        """FedDF: ``state`` (the student) distilled from the clients' models (λ_i = n_i/Σn) on ``server_data``,
        seeded by (seed, round) so a resumed run distils bit-identically (:func:`fedfuse.merge.distill.distill`)."""
        import copy

        from fedfuse.align.transport import load_state
        from fedfuse.experiment import derive_seed
        from fedfuse.merge.distill import distill

        assert self.distill_model is not None and self.server_data is not None
        nets = [load_state(copy.deepcopy(self.distill_model), s) for s in (state, *states)]
        out = distill(
            nets[0], nets[1:], self.server_data,
            epochs=self.distill_epochs, seed=derive_seed(self.seed, server_round, 31), weights=weights,
        )  # fmt: skip
        return {k: out[k].to(v.dtype) for k, v in state.items()}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the global model (the ServerApp checkpoints it; subclasses extend)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
