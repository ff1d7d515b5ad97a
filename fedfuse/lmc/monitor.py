"""The per-round LMC monitor's maths (``--lmc-monitor``) and the client-model dump (``--save-client-models``).

Pure PyTorch: the server-side observer passes one round's client states and weights, and writes the rows.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedfuse.lmc.curves import multi_model_barrier
from fedfuse.lmc.layerwise import layer_groups
from fedfuse.state import weighted_average
from fedfuse.train import evaluate

__all__ = ["lmc_round_stats", "save_client_states", "plot_lmc_monitor"]


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
        avg = weighted_average([{k: s[k] for k in floats} for s in states], w)
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
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    for key in keys:
        pts = [(r["round"], r[key]) for r in rows if key in r]
        label = key[len("lmc_") : -len("_loss_barrier")]
        style = {"color": "k", "ls": "--", "lw": 2} if label == "full" else {"marker": "o", "ms": 3}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no half rounds
    ax.set(xlabel="round", ylabel="midpoint loss barrier among clients", title="LMC monitor")
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(path, dpi=120)
    return Path(path)
