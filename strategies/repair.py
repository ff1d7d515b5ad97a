"""Post-fusion statistics round: federated BatchNorm reset and federated REPAIR (the maths: fedfuse.align.repair).

After a fusion strategy has fused the round's replies, it may ask the same clients (one extra Message round of
type ``query.repair``, which fedfuse's ClientApp registers) for statistics of the fused model on their local
data — never the data itself:

* ``bn-repair=reset``: each client recomputes the fused model's BatchNorm running statistics on its data; the
  server pools them as the statistics of the union (:func:`fedfuse.align.repair.pool_bn_statistics`).
* ``bn-repair=repair``: each client gets the fused model and *its own model aligned to it* and reports per-unit
  (mean, std) of both; the server rescales every unit of the fused model to the λ-weighted average of the
  clients' own statistics (REPAIR). Correcting a layer moves the statistics of the layers above, so the fused
  model is re-measured ``repair-rounds`` times (only the fused model travels again); the default, one round per
  repaired layer, is exact sequential REPAIR (:mod:`fedfuse.align.repair`).

  REPAIR corrects the model the round *serves* (central evaluation, ``model.pt``, the checkpoint's global
  model), while the next round's clients train on from the unrepaired fused model (:meth:`PostFusionRepair.
  train_arrays`; it is part of the strategy's checkpoint state, so a resumed run continues identically).
  *(Our choice, measured: feeding the repaired model back compounds — under Dirichlet(0.1) label skew and one
  local epoch per round the second MLP layer's units were rescaled by ≈ ×1.2 net per round, and 2 of 3 seeds
  diverged to chance within 20 rounds; benchmarks/results/regimes-mnist10k-b20.md. Clients specialised on one or
  two classes have a larger activation spread than their average, which REPAIR restores every round.)* With one
  round (one-shot fusion) the two are the same.

Nothing is sent unless the option is set, so any ClientApp works with the default. A client that errs or
does not answer (e.g. a ClientApp without the handler) is left out with a logged note; with no answer at all
the fused model is kept as it is. Extra traffic is reported in the round metrics (``repair_down_bytes``,
``repair_up_bytes``, ``repair_replies``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedfuse import protocol
from fedfuse.align.repair import (
    STATS_BOUND,
    average_statistics,
    bound_statistics,
    pool_bn_statistics,
    repair_sites,
    rescale_units,
)
from fedfuse.errors import ConfigError
from strategies.options import REPAIR_MODES, REPAIR_OPTIONS

__all__ = ["REPAIR_MODES", "REPAIR_OPTIONS", "PostFusionRepair"]

log = logging.getLogger("fedfuse")
State = dict[str, torch.Tensor]


def record_bytes(record: ArrayRecord) -> int:
    """Serialised size of an ArrayRecord's arrays."""
    return sum(len(getattr(record[k], "data", b"")) for k in record.keys())


class PostFusionRepair:
    """The ``bn-repair`` round of a fusion strategy (see the module docstring)."""

    def __init__(
        self,
        mode: str = "none",
        *,
        rounds: int = 1,
        template: nn.Module | None = None,
        example_input: Any = None,
        timeout: float = 600.0,
    ) -> None:
        if mode not in REPAIR_MODES:
            raise ConfigError(f"bn_repair={mode!r} is not allowed; allowed: {', '.join(REPAIR_MODES)}")
        if isinstance(rounds, bool) or int(rounds) < 0:
            raise ConfigError(f"repair_rounds={rounds!r} is out of range; allowed: an integer >= 0 (0 = exact)")
        self.mode, self.rounds, self.timeout = mode, int(rounds), float(timeout)
        self.train_from: State | None = None  # the last unrepaired fused model (repair): what clients train on
        self._hit = 0  # the most clients bounded in one statistics round of the current call
        self.sites = []
        if mode == "repair":
            if template is None or example_input is None:
                raise ConfigError("bn_repair='repair' needs the model and an example_input batch")
            self.sites = repair_sites(template, example_input=example_input)
            if not self.sites:
                raise ConfigError("bn_repair='repair': the model has no hidden Linear/Conv/BatchNorm unit to repair")
            self.rounds = self.rounds or len(self.sites)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def needs_aligned(self) -> bool:
        return self.mode == "repair"

    def train_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model the next round's clients train on: the last unrepaired fused model once REPAIR has run
        (see the module docstring), else ``arrays`` (the served global model)."""
        return arrays if self.train_from is None else ArrayRecord(self.train_from)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: the unrepaired fused model clients train on next (``None`` before any REPAIR)."""
        return {"repair_train_from": self.train_from}

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`."""
        self.train_from = state.get("repair_train_from")

    def __call__(
        self,
        grid: Grid,
        server_round: int,
        nodes: Sequence[int],
        weights: Sequence[float],
        fused: State,
        aligned: Sequence[State] | None,
        config: ConfigRecord,
        label: Any = str,
    ) -> tuple[State, dict[str, float]]:
        """``fused`` after the statistics round(s) with ``nodes`` (whose train weights are ``weights``)."""
        metrics = {"repair_down_bytes": 0.0, "repair_up_bytes": 0.0, "repair_replies": 0.0}
        self._hit = 0
        if not self.enabled or not nodes:
            return fused, metrics
        if self.mode == "reset":
            replies = self._ask(grid, server_round, nodes, fused, None, config, "bn-stats", metrics, label)
            ok = [(w, r[protocol.REPAIR_FUSED]) for n, w in zip(nodes, weights, strict=True) if (r := replies.get(n))]
            if not ok:
                return self._nobody(server_round, fused)
            pooled = pool_bn_statistics(self._bounded([s for _, s in ok]), [w for w, _ in ok])
            metrics["repair_replies"] = float(len(ok))
            self._warn_bounded(server_round)
            return {**fused, **{k: v.to(fused[k].dtype) for k, v in pooled.items() if k in fused}}, metrics
        assert aligned is not None
        replies = self._ask(grid, server_round, nodes, fused, aligned, config, "unit-stats", metrics, label)
        kept = [(n, w) for n, w in zip(nodes, weights, strict=True) if n in replies]
        if not kept:
            return self._nobody(server_round, fused)
        lam = [w for _, w in kept]
        target = average_statistics(self._bounded([replies[n][protocol.REPAIR_OWN] for n, _ in kept]), lam)
        fused_stats = average_statistics(self._bounded([replies[n][protocol.REPAIR_FUSED] for n, _ in kept]), lam)
        state = rescale_units(fused, self.sites, fused_stats, target)
        metrics["repair_replies"] = float(len(kept))
        for _ in range(self.rounds - 1):  # Jacobi rounds: only the fused model travels again
            nodes_kept = [n for n, _ in kept]
            again = self._ask(grid, server_round, nodes_kept, state, None, config, "unit-stats", metrics, label)
            both = [(n, w) for n, w in kept if n in again]
            if not both:
                break
            stats = self._bounded([again[n][protocol.REPAIR_FUSED] for n, _ in both])
            fused_stats = average_statistics(stats, [w for _, w in both])
            state = rescale_units(state, self.sites, fused_stats, target)
        self._warn_bounded(server_round)
        return state, metrics

    def for_strategy(
        self, strategy: Any, server_round: int, fused: State, aligned: Sequence[State] | None, weights: Sequence[float]
    ) -> State:
        """Run the round for a FedFuseStrategy that kept ``_grid``/``_train_config`` from configure_train; the
        metrics go into its ``round_metrics``. Unchanged ``fused`` when the option is off."""
        grid = getattr(strategy, "_grid", None)
        if not self.enabled or grid is None:
            return fused
        state, metrics = self(
            grid, server_round, strategy._valid_nodes, weights, fused, aligned, strategy._train_config,
            strategy.nodes.label,
        )  # fmt: skip
        strategy.round_metrics.update(metrics)
        if self.mode == "repair":
            self.train_from = {k: v.clone() for k, v in fused.items()}
        return state

    def _nobody(self, server_round: int, fused: State) -> tuple[State, dict[str, float]]:
        log.warning(
            "round %d: bn-repair=%s: no client returned statistics (does its ClientApp register "
            "@app.query(%r)?); the fused model is kept as it is", server_round, self.mode, protocol.REPAIR_ACTION,
        )  # fmt: skip
        return fused, {"repair_down_bytes": 0.0, "repair_up_bytes": 0.0, "repair_replies": 0.0}

    def _bounded(self, stats: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """:func:`fedfuse.align.repair.bound_statistics`; the most clients bounded in one statistics round of this
        call is kept for :meth:`_warn_bounded`."""
        out, hit = bound_statistics(stats)
        self._hit = max(self._hit, hit)
        return out

    def _warn_bounded(self, server_round: int) -> None:
        """One warning per server round (not per Jacobi round) when a client's statistics were bounded."""
        if self._hit:
            log.warning("round %d: bn-repair=%s: statistics of %d client(s) bounded at %g × the clients' median",
                        server_round, self.mode, self._hit, STATS_BOUND)  # fmt: skip

    def _ask(
        self,
        grid: Grid,
        server_round: int,
        nodes: Sequence[int],
        fused: State,
        aligned: Sequence[State] | None,
        config: ConfigRecord,
        kind: str,
        metrics: dict[str, float],
        label: Any,
    ) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
        """Send one statistics request per node; ``{node: {record name: statistics}}`` of the usable replies."""
        cfg = ConfigRecord({**dict(config), protocol.REPAIR_KIND: kind, protocol.SERVER_ROUND: server_round})
        if kind == "unit-stats":
            cfg[protocol.REPAIR_SITES] = ",".join(s.module for s in self.sites)
        fused_record = ArrayRecord(fused)
        messages = []
        for i, node in enumerate(nodes):
            content = {protocol.ARRAYS: fused_record, protocol.CONFIG: cfg}
            if aligned is not None:
                content[protocol.REPAIR_OWN] = ArrayRecord(aligned[i])
            metrics["repair_down_bytes"] += float(sum(record_bytes(r) for k, r in content.items() if k != "config"))
            msg = Message(content=RecordDict(content), message_type=protocol.REPAIR_MESSAGE_TYPE, dst_node_id=node)
            messages.append(msg)
        wanted = [protocol.REPAIR_FUSED] + ([protocol.REPAIR_OWN] if aligned is not None else [])
        out: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: %s: no repair statistics (%s)", server_round, label(node), reply.error.reason)
                continue
            records = reply.content.array_records
            metrics["repair_up_bytes"] += float(sum(record_bytes(r) for r in records.values()))
            reason = next((f"lacks the {k!r} record" for k in wanted if k not in records), None)
            stats = {} if reason else {k: records[k].to_torch_state_dict() for k in wanted}
            reason = reason or self._check(stats, fused, kind)
            if reason:
                log.warning("round %d: %s: repair statistics rejected: %s", server_round, label(node), reason)
                continue
            out[node] = stats
        if len(out) < len(nodes):
            missing = len(nodes) - len(out)
            log.warning(
                "round %d: bn-repair=%s: %d of %d client(s) left out", server_round, self.mode, missing, len(nodes)
            )
        return out

    def _check(self, stats: dict[str, dict[str, torch.Tensor]], fused: State, kind: str) -> str | None:
        for part in stats.values():
            if kind == "bn-stats":
                expected = {k: fused[k].shape for k in fused if k.endswith((".running_mean", ".running_var"))}
            else:
                expected = {s.module: (2, fused[f"{s.module}.weight"].shape[0]) for s in self.sites}
            if set(part) != set(expected):
                return f"keys {sorted(part)[:3]}... do not match the expected {sorted(expected)[:3]}..."
            for k, v in part.items():
                if tuple(v.shape) != tuple(expected[k]):
                    return f"{k}: shape {tuple(v.shape)} (expected {tuple(expected[k])})"
                if not bool(torch.isfinite(v).all()):
                    return f"{k}: {int(v.numel() - torch.isfinite(v).sum())} non-finite value(s)"
        return None
