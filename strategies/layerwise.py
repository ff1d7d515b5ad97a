"""LayerwiseAvg: partial averaging (FedPer / FedBN / any layer set) and the per-round LMC monitor.

Adilova et al. (ICLR 2024) find that averaging single layers costs almost nothing even when averaging
the whole model does; partial averaging is the FL way to exploit (or test) that. ``LayerwiseAvg``
averages only the *shared* keys of the state dict; every other key is *personal*: it lives on the
client, in ``Context.state`` under ``clients.client_app.PERSONAL_STATE_KEY``, persists across rounds
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

The module also holds the LMC monitor's measurements (``--lmc-monitor``, any FedFuseStrategy) and
the client-model dump behind ``--save-client-models``.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from fedfuse.config import LAYERWISE_PRESETS
from fedfuse.errors import ConfigError
from fedfuse.lmc import average_states, layer_groups, multi_model_barrier
from fedfuse.train import evaluate
from strategies.base import FedFuseStrategy

__all__ = ["LayerwiseAvg", "shared_keys", "head_keys", "lmc_round_stats", "save_client_states", "plot_lmc_monitor"]

SHARED_KEYS_CONFIG = "shared-keys"  # round-config key: comma-joined shared keys (the client's layer-wise switch)


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the head: the last ``nn.Linear`` registered (the classifier of every fedfuse model)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear head; use layerwise-preset=layers=<globs>")
    return [k for k in model.state_dict() if k.rsplit(".", 1)[0] == last]


def _batchnorm_keys(model: nn.Module) -> list[str]:
    names = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return [k for k in model.state_dict() if k.rsplit(".", 1)[0] in names]


def shared_keys(model: nn.Module, preset: str) -> list[str]:
    """The state-dict keys ``preset`` averages, in state-dict order (see the module docstring)."""
    keys = list(model.state_dict())
    if preset == "body":
        head = set(head_keys(model))
        shared = [k for k in keys if k not in head]
    elif preset == "head":
        shared = head_keys(model)
    elif preset == "no-bn":
        bn = set(_batchnorm_keys(model))
        if not bn:
            raise ConfigError("layerwise-preset='no-bn' keeps nothing local: the model has no BatchNorm (--batch-norm)")
        shared = [k for k in keys if k not in bn]
    elif preset.startswith("layers="):
        patterns = [p.strip() for p in preset[len("layers=") :].split(",") if p.strip()]
        unmatched = [p for p in patterns if not any(_matches(k, p) for k in keys)]
        if unmatched:
            raise ConfigError(
                f"layerwise-preset={preset!r}: {unmatched} match no state-dict key; keys: {', '.join(keys[:8])} ..."
            )
        shared = [k for k in keys if any(_matches(k, p) for p in patterns)]
    else:
        allowed = ", ".join(LAYERWISE_PRESETS)
        raise ConfigError(f"layerwise-preset={preset!r} is not allowed; allowed: {allowed} or layers=<glob,glob>")
    if not shared:
        raise ConfigError(f"layerwise-preset={preset!r} shares no parameter of {type(model).__name__}")
    return shared


def _matches(key: str, pattern: str) -> bool:
    return fnmatchcase(key, pattern) or fnmatchcase(key, pattern + ".*")


class LayerwiseAvg(FedFuseStrategy):
    """FedAvg over the shared keys only; personal keys stay on the clients (FedPer, FedBN, ...).

    Extra per-round metrics: ``personal_accuracy`` / ``personal_loss`` (clients' own models on their
    holdouts, example-weighted) and ``shared_fraction`` (shared entries / all entries).
    """

    def __init__(self, *, template: nn.Module | None = None, preset: str = "body", seed: int = 0, **kwargs: Any):
        kwargs.setdefault("fraction_evaluate", 1.0)
        super().__init__(seed=seed, template=template, **kwargs)
        if template is None:
            raise ConfigError("LayerwiseAvg needs template (a module of the global architecture)")
        self.preset = preset
        self.shared = shared_keys(template, preset)
        state = template.state_dict()
        self.personal = [k for k in state if k not in set(self.shared)]
        total = sum(v.numel() for v in state.values())
        self.shared_fraction = sum(state[k].numel() for k in self.shared) / max(total, 1)
        self._global: dict[str, torch.Tensor] = {}
        self._run_config: dict[str, Any] = {}

    def _shared_record(self, state: Mapping[str, torch.Tensor]) -> ArrayRecord:
        return ArrayRecord({k: state[k] for k in self.shared})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Send the shared keys only; the config says which keys they are."""
        self._global = arrays.to_torch_state_dict()
        config[SHARED_KEYS_CONFIG] = ",".join(self.shared)
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
        self.round_stats["shared_fraction"] = self.shared_fraction
        return {k: shared[k] if k in shared else v for k, v in self._global.items()}

    def aggregate_evaluate(self, server_round: int, replies: Any) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and "eval-accuracy" in metrics:
            self.round_stats["personal_accuracy"] = float(metrics["eval-accuracy"])
            self.round_stats["personal_loss"] = float(metrics["eval-loss"])
        return metrics

    def client_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A reply completed to a full model (personal keys from the global, i.e. initial, model)."""
        return {k: state.get(k, v) for k, v in self._global.items()}


# --------------------------------------------------------------------------- LMC monitor


def _slug(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "model"


@torch.no_grad()
def lmc_round_stats(
    template: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, float]:
    """Barriers among one round's N client models θ₁..θ_N (weights wᵢ normalised), on (x, y).

    * ``lmc_full_{loss,error}_barrier`` = L(Σ wᵢθᵢ) − Σ wᵢ L(θᵢ) (:func:`fedfuse.lmc.multi_model_barrier`):
      what averaging everything costs.
    * ``lmc_<group>_loss_barrier`` = Σ wᵢ L(θᵢ with group G replaced by Σ wⱼθⱼ[G]) − Σ wᵢ L(θᵢ), groups
      from :func:`fedfuse.lmc.layer_groups`: the N-model layer-wise midpoint barrier — average one layer,
      keep every other layer at each client's own values, mean over the clients as base. For N = 2 and equal
      weights it is the mean of the bases-A and -B single-layer midpoint barriers of ``layerwise_barriers``.

    No BatchNorm statistics are recomputed (cheap, and what plain averaging delivers).
    """
    mm = multi_model_barrier(template, states, x, y, weights)
    stats = {"lmc_full_loss_barrier": float(mm.loss_barrier), "lmc_full_error_barrier": float(mm.error_barrier)}
    w = list(mm.weights)
    work = copy.deepcopy(template)
    for name, keys in layer_groups(template).items():
        floats = [k for k in keys if k in states[0] and states[0][k].is_floating_point()]
        if not floats:
            continue
        avg = average_states([{k: s[k] for k in floats} for s in states], w)
        losses = []
        for s in states:
            work.load_state_dict({**s, **avg})
            losses.append(evaluate(work, x, y)[0])
        barrier = sum(wi * li for wi, li in zip(w, losses, strict=True)) - mm.mean_loss
        stats[f"lmc_{_slug(name)}_loss_barrier"] = float(barrier)
    return stats


def save_client_states(directory: Path, labels: Sequence[str], states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """``directory/<label>.pt`` = one client's state dict (``torch.save``), written atomically."""
    from fedfuse.results import atomic_write_bytes

    for label, state in zip(labels, states, strict=True):
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
        atomic_write_bytes(Path(directory) / f"{label}.pt", buf.getvalue())


def plot_lmc_monitor(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Loss barrier per layer group vs round (full model dashed); None when no row has monitor keys."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("lmc_") and k.endswith("_loss_barrier")))
    if not keys:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    for key in keys:
        pts = [(r["round"], r[key]) for r in rows if key in r]
        label = key[len("lmc_") : -len("_loss_barrier")]
        style = {"color": "k", "ls": "--", "lw": 2} if label == "full" else {"marker": "o", "ms": 3}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set(xlabel="round", ylabel="midpoint loss barrier among clients", title="LMC monitor")
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(path, dpi=120)
    return Path(path)
