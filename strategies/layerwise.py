"""LayerwiseAvg: partial averaging (FedPer / FedBN / any layer set) with personal layers kept on the clients.

Adilova et al. (ICLR 2024) find that averaging single layers costs almost nothing even when averaging
the whole model does; partial averaging is the FL way to exploit (or test) that. ``LayerwiseAvg``
averages only the *shared* keys of the state dict; every other key is *personal*: it lives on the
client, in ``Context.state`` under ``fedfuse.protocol.PERSONAL_STATE``, persists across rounds
and never travels — train and evaluate messages carry the shared keys only, and replies may carry
nothing else (``check_update`` compares them with the shared-only state that was sent).

Presets (``layerwise-preset``):

* ``body``  — FedPer: everything but the head (the last ``nn.Linear``) is shared; the head stays local.
* ``head``  — only the head is shared.
* ``no-bn`` — FedBN: BatchNorm weights, biases and running statistics stay local.
* ``layers=<glob,glob>`` — the shared keys are those matching a glob (``net.1`` also matches ``net.1.*``).

The server's global model = averaged shared keys + the personal keys of the *initial* model, so the
central accuracy in ``metrics.json`` is that of the shared part with initial personal layers (with
``body`` that is a trained body under a random head: low by construction). The number that matters
for personalised FL is ``personal_accuracy``: each client evaluates its own model (the new shared
keys + its personal keys) on a seeded 20 % holdout of its partition (it trains on the other 80 %),
in a federated evaluate round on every client (``fraction_evaluate = 1``); the row holds the
example-weighted mean. A resumed run restarts the personal layers from the initial model (they live
on the clients, not in the server's checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from fedfuse import protocol
from fedfuse.config import Option
from fedfuse.selection import shared_keys
from strategies.base import FedFuseStrategy, require_model
from strategies.options import STRATEGY_OPTIONS

__all__ = ["LayerwiseAvg"]


class LayerwiseAvg(FedFuseStrategy):
    """FedAvg over the shared keys only; personal keys stay on the clients (FedPer, FedBN, ...).

    Extra per-round metrics: ``personal_accuracy`` / ``personal_loss`` (clients' own models on their
    holdouts, example-weighted) and ``shared_fraction`` (shared entries / all entries).
    """

    options: ClassVar[tuple[Option, ...]] = STRATEGY_OPTIONS["layerwise"]

    def __init__(self, *, model: nn.Module | None = None, preset: str = "body", seed: int = 0, **kwargs: Any):
        model = require_model(self, model)
        super().__init__(seed=seed, **kwargs)
        self.preset = preset
        self.shared = shared_keys(model, preset)
        state = model.state_dict()
        self.personal = [k for k in state if k not in set(self.shared)]
        total = sum(v.numel() for v in state.values())
        self.shared_fraction = sum(state[k].numel() for k in self.shared) / max(total, 1)
        self._global: dict[str, torch.Tensor] = {}
        self._run_config: dict[str, Any] = {}

    @classmethod
    def config_kwargs(cls, cfg: Mapping[str, Any], *, model: Any, example_input: Any) -> dict[str, Any]:
        # personalised evaluation on every client's holdout, every round
        return {"model": model, "preset": str(cfg["layerwise-preset"]), "fraction_evaluate": 1.0}

    def _shared_record(self, state: Mapping[str, torch.Tensor]) -> ArrayRecord:
        return ArrayRecord({k: state[k] for k in self.shared})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Send the shared keys only; the config says which keys they are."""
        self._global = arrays.to_torch_state_dict()
        config[protocol.SHARED_KEYS] = ",".join(self.shared)
        self._run_config = dict(config)
        return list(super().configure_train(server_round, self._shared_record(self._global), config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Personalised evaluation: the new shared keys, with the run config the clients need."""
        for key, value in self._run_config.items():
            if key not in config:
                config[key] = value
        state = arrays.to_torch_state_dict()
        return list(super().configure_evaluate(server_round, self._shared_record(state), config, grid))

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """Weighted average of the shared keys; personal keys of the global model stay at the initial values."""
        shared = super().aggregate_arrays(server_round, states, weights)
        self.round_metrics["shared_fraction"] = self.shared_fraction
        return {k: shared[k] if k in shared else v for k, v in self._global.items()}

    def aggregate_evaluate(self, server_round: int, replies: Any) -> MetricRecord | None:
        """The clients' personalised evaluation, also as ``personal_accuracy`` / ``personal_loss``."""
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and protocol.EVAL_ACCURACY in metrics:
            metrics["personal_accuracy"] = float(metrics[protocol.EVAL_ACCURACY])
            metrics["personal_loss"] = float(metrics[protocol.EVAL_LOSS])
        return metrics
