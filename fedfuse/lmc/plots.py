"""Plots of LMC results (curves, layer-wise and cumulative barriers); matplotlib is imported on first use."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfuse.lmc.curves import Curve, Metric
from fedfuse.lmc.layerwise import CumulativeResult, LayerwiseResult

__all__ = ["plot_curve", "plot_layerwise", "plot_cumulative"]


def _as_dict(result: Any) -> Any:
    return asdict(result) if is_dataclass(result) and not isinstance(result, type) else result


def _figure(ncols: int = 1, width: float = 5.0) -> Any:
    # A bare Figure renders with Agg on savefig and never touches pyplot's global backend.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 3.6), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_curve(curves: Mapping[str, Curve | Mapping[str, Any]], path: str | Path) -> Path:
    """Loss and error along α, one line per labelled curve."""
    fig, (ax_loss, ax_err) = _figure(2)
    for label, c in curves.items():
        d = _as_dict(c)
        ax_loss.plot(d["alphas"], d["losses"], marker="o", ms=3, label=label)
        ax_err.plot(d["alphas"], [1.0 - a for a in d["accuracies"]], marker="o", ms=3, label=label)
    for ax, name in ((ax_loss, "loss"), (ax_err, "error")):
        ax.set(xlabel="α", ylabel=name)
    ax_loss.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_layerwise(result: LayerwiseResult | Mapping[str, Any], path: str | Path, metric: Metric = "loss") -> Path:
    """Max barrier per group (bars for base A and base B); the dashed line is the full-model barrier."""
    d = _as_dict(result)
    key = f"max_{metric}"
    names = [g["group"] for g in d["groups"]]
    pos = np.arange(len(names))
    fig, (ax,) = _figure(1, width=max(5.0, 0.5 * len(names)))
    ax.bar(pos - 0.2, [g["base_a"][key] for g in d["groups"]], 0.4, label="others from A")
    ax.bar(pos + 0.2, [g["base_b"][key] for g in d["groups"]], 0.4, label="others from B")
    ax.axhline(d["full"][key], color="k", ls="--", lw=1, label="full model")
    ax.set_xticks(pos, names, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel=f"{metric} barrier (max over α)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_cumulative(
    results_by_order: Mapping[str, CumulativeResult | Mapping[str, Any]], path: str | Path, metric: Metric = "loss"
) -> Path:
    """Max barrier after each added group, one line per order."""
    fig, (ax,) = _figure(1)
    key = f"max_{metric}"
    for label, r in results_by_order.items():
        d = _as_dict(r)
        ax.plot(range(1, len(d["steps"]) + 1), [s["stats"][key] for s in d["steps"]], marker="o", ms=3, label=label)
    ax.set(xlabel="groups interpolated", ylabel=f"{metric} barrier (max over α)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)
