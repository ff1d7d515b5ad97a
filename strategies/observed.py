"""ObservedStrategy: how the ServerApp runs *any* Message-API strategy and learns what happened in a round.

The ServerApp never reads a strategy's internals. It wraps the strategy (fedfuse's or a user's plain
``FedAvg`` subclass) in :class:`ObservedStrategy`, which delegates every call and records:

- what any strategy exposes: messages sent, replies received, error replies, late replies
  (sampled − received; a simulated straggler's ``injected-late`` reply counts as late and is dropped),
  and the MetricRecords ``aggregate_train``/``aggregate_evaluate`` return;
- what :class:`RoundObserver` objects compute from the round's client models (the LMC monitor, the
  client-model dump of :mod:`strategies.monitor`), given the replies that pass
  :func:`fedfuse.validation.check_update` against the model that was sent.

For a strategy without fedfuse's own checks (any strategy that is not a
:class:`strategies.base.FedFuseStrategy`, e.g. Flower's ``FedMedian``), a :class:`ReplyGuard` applies them
before the strategy sees the replies: the same :func:`fedfuse.replies.unpack_reply` and
:func:`fedfuse.screening.screen_round` (the same defaults). Rejected replies are dropped, logged naming the node,
and counted as ``rejected``; clipped or projected updates replace the reply's arrays. (Capped num-examples
cannot be passed on: the inner strategy reads the reply's own claim; use a fedfuse strategy for the cap.)

It also resumes: with ``first_round=k`` Flower's own ``Strategy.start`` loop runs rounds 1..N−k+1
and every call is shifted to rounds k..N. Flower offers no start-round hook; this offset is the smallest
wrapper that keeps its loop (no copy of it here). Flower's log then counts "[ROUND 1/…]" from the restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedfuse import protocol
from fedfuse.replies import Reply, decode_arrays, error_summary, unpack_reply
from fedfuse.screening import ScreeningConfig, screen_round
from fedfuse.validation import MAX_NUM_EXAMPLES, MAX_REPLY_FACTOR
from strategies.base import FedFuseStrategy

__all__ = ["ClientModel", "RoundObserver", "ObservedStrategy", "ReplyGuard"]

log = logging.getLogger("fedfuse")


@dataclass(frozen=True)
class ClientModel:
    """One valid client reply: a label (``partition3`` or ``node17``), its full state dict, its weight."""

    label: str
    state: dict[str, torch.Tensor]
    weight: float


class RoundObserver(Protocol):
    """Looks at a round's client models; returns extra per-round metrics (may be empty)."""

    def observe(self, server_round: int, clients: Sequence[ClientModel]) -> Mapping[str, float]: ...


def _metric_keys(replies: Iterable[Message]) -> set[str]:
    return {k for m in replies if not m.has_error() for rec in m.content.metric_records.values() for k in rec}


def _injected_late(msg: Message) -> bool:
    return any(protocol.INJECTED_LATE in rec for rec in msg.content.metric_records.values())


@dataclass
class _Round:
    sampled: int = 0
    received: int = 0
    failures: int = 0
    first_error: str = ""
    train: dict[str, float] = field(default_factory=dict)
    train_client_keys: set[str] = field(default_factory=set)
    evaluate: dict[str, float] = field(default_factory=dict)
    evaluate_client_keys: set[str] = field(default_factory=set)
    observed: dict[str, float] = field(default_factory=dict)


@dataclass
class ReplyGuard:
    """fedfuse's reply checks for a strategy that has none (see the module docstring); the arguments are
    :class:`strategies.base.FedFuseStrategy`'s of the same names."""

    screening: ScreeningConfig = field(default_factory=ScreeningConfig)
    max_num_examples: float = MAX_NUM_EXAMPLES
    max_reply_factor: float = MAX_REPLY_FACTOR

    def filter(
        self, server_round: int, replies: list[Message], sent: Mapping[str, torch.Tensor], weighted_by_key: str
    ) -> tuple[list[Message], int]:
        """The replies ``aggregate_train`` may see (error replies pass through untouched) and how many were
        rejected. A clipped or projected update replaces the reply's arrays."""
        answers = [m for m in replies if not m.has_error()]
        unpacked = [
            unpack_reply(m, sent, weighted_by_key, max_reply_factor=self.max_reply_factor,
                         max_num_examples=self.max_num_examples)
            for m in answers
        ]  # fmt: skip
        labels = [f"node {m.metadata.src_node_id}" for m in answers]
        rs = screen_round(server_round, labels, unpacked, [dict(sent)] * len(answers), self.screening)
        for i, new in zip(rs.keep, rs.states, strict=True):
            old = unpacked[i]
            if isinstance(old, Reply) and any(new[k] is not old.state[k] for k in old.state):  # clipped/projected
                msg = answers[i]
                msg.content.array_records[next(iter(msg.content.array_records))] = ArrayRecord(new)
        kept = {id(answers[i]) for i in rs.keep}
        return [m for m in replies if m.has_error() or id(m) in kept], int(rs.stats["rejected"])


class ObservedStrategy(Strategy):
    """Delegates to ``inner``; :meth:`round_metrics` is the flat record of the last round."""

    def __init__(
        self,
        inner: Strategy,
        observers: Sequence[RoundObserver] = (),
        *,
        first_round: int = 1,
        guard: ReplyGuard | None = None,
    ) -> None:
        """``guard``: the checks for a strategy without fedfuse's own (default: on unless ``inner`` is a
        :class:`FedFuseStrategy`, which checks every reply itself)."""
        self.inner = inner
        self.guard = guard if guard is not None else (None if isinstance(inner, FedFuseStrategy) else ReplyGuard())
        self.observers = list(observers)
        self.offset = int(first_round) - 1
        self._round = _Round()
        self._sent: dict[str, torch.Tensor] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round + self.offset, arrays, config, grid))
        self._round = _Round(sampled=len(messages))
        if self.observers or self.guard is not None:
            self._sent = decode_arrays(arrays)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # a simulated straggler's reply (fedfuse.protocol.INJECTED_LATE) counts as not received in time
        replies = [m for m in replies if m.has_error() or not _injected_late(m)]
        rnd = self._round
        rnd.received = len(replies)
        rnd.failures = sum(m.has_error() for m in replies)
        rnd.first_error = next((m.error.reason or "" for m in replies if m.has_error()), "")
        rnd.train_client_keys = _metric_keys(replies)
        if self.observers:
            clients = self._client_models(replies)
            for observer in self.observers:
                rnd.observed.update(observer.observe(server_round + self.offset, clients))
        guarded = 0
        t_server = time.perf_counter()  # validation, screening and aggregation: the server's own time
        if self.guard is not None:
            key = str(getattr(self.inner, "weighted_by_key", protocol.NUM_EXAMPLES))
            replies, guarded = self.guard.filter(server_round + self.offset, replies, self._sent, key)
        arrays, metrics = self.inner.aggregate_train(server_round + self.offset, replies)
        rnd.train = dict(metrics) if metrics is not None else {}
        rnd.train["server_s"] = time.perf_counter() - t_server
        if guarded:
            rnd.train["rejected"] = float(rnd.train.get("rejected", 0.0)) + guarded
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._round.evaluate_client_keys = _metric_keys(replies)
        metrics = self.inner.aggregate_evaluate(server_round + self.offset, replies)
        self._round.evaluate = dict(metrics) if metrics is not None else {}
        return metrics

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's loop over rounds ``first_round..num_rounds`` (round 0 is evaluated only on a fresh start)."""
        shifted = None
        if evaluate_fn is not None:

            def shifted(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
                return None if rnd == 0 and self.offset else evaluate_fn(rnd + self.offset, arrays)

        return super().start(
            grid, initial_arrays, num_rounds - self.offset, timeout, train_config, evaluate_config, shifted
        )

    def round_metrics(self) -> dict[str, float]:
        """The last round as one flat record: ``replies`` (valid), ``failures``, ``timeouts``, the strategy's
        own statistics, the clients' aggregated metrics as ``client_<key>`` and the observers' metrics."""
        rnd = self._round
        row: dict[str, float] = {}
        for metrics, client_keys in ((rnd.train, rnd.train_client_keys), (rnd.evaluate, rnd.evaluate_client_keys)):
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    name = key.replace("-", "_")
                    row["client_" + name if key in client_keys else name] = float(value)
        row["replies"] = float(rnd.received - rnd.failures - row.get("rejected", 0.0) - row.get("diverged", 0.0))
        row["failures"] = float(rnd.failures)
        row["timeouts"] = float(max(rnd.sampled - rnd.received, 0))
        return {**row, **rnd.observed}

    def all_failed(self) -> str | None:
        """If every sampled client of the last round replied with an error: a line saying so (with the first
        error's reason), else None. Late replies alone do not count (stragglers are expected)."""
        rnd = self._round
        if rnd.sampled == 0 or rnd.failures < rnd.sampled:
            return None
        return f"every client failed ({rnd.failures} of {rnd.sampled}); first error: {error_summary(rnd.first_error)}"

    def _client_models(self, replies: Sequence[Message]) -> list[ClientModel]:
        """Valid replies as full models, sorted by label: each checked against what its node was sent (its own
        width or LoRA rank, where the strategy sends per node), a partial reply (LoRA adapters) completed with the
        global model."""
        out: list[tuple[tuple[int, int], ClientModel]] = []
        sent_to, shape_ok = getattr(self.inner, "sent_to", None), getattr(self.inner, "shape_ok", None)
        frozen_to = getattr(self.inner, "frozen_to", None)
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            own = sent_to(node) if sent_to is not None else self._sent
            frozen = frozen_to(node) if frozen_to is not None else None
            reply = unpack_reply(msg, own, protocol.NUM_EXAMPLES, shape_ok=shape_ok, complete=True, frozen=frozen)
            if isinstance(reply, str):  # the strategy rejects (and logs) it itself
                continue
            info = msg.content.config_records.get(protocol.CLIENT_INFO)
            pid = int(info.get(protocol.PARTITION_ID, -1)) if info is not None else -1
            key, label = ((0, pid), f"partition{pid}") if pid >= 0 else ((1, node), f"node{node}")
            out.append((key, ClientModel(label, {**self._sent, **reply.state}, reply.weight)))
        return [client for _, client in sorted(out, key=lambda item: item[0])]
