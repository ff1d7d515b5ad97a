"""Interpolation curves and barriers of one linear path θ(α) = (1 − α)·θA + α·θB; the N-model barrier.

See :mod:`fedfuse.lmc` for the definitions of the max and midpoint barriers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.state import interpolate, normalise_weights, weighted_average
from fedfuse.train import evaluate

__all__ = [
    "Curve",
    "BarrierStats",
    "MultiModelBarrier",
    "METRICS",
    "interpolation_curve",
    "max_barrier",
    "midpoint_barrier",
    "barrier_stats",
    "barrier",
    "multi_model_barrier",
]

State = Mapping[str, torch.Tensor]
Metric = Literal["loss", "error"]
METRICS = ("loss", "error")

BN_RESET_BATCH = 256  # batch size of the BatchNorm statistics reset at every α (a cumulative average over batches)


# --------------------------------------------------------------------------- results


@dataclass
class Curve:
    """Loss and accuracy of θ(α) at each α of the grid (ascending, containing 0, ½ and 1).

    ``loss_a``/``loss_b`` and ``accuracy_a``/``accuracy_b`` are L(θA), L(θB) of the full end models, the
    barrier's reference line; ``None`` means "the curve's own values at α = 0 and α = 1" (a full path).
    """

    alphas: list[float]
    losses: list[float]
    accuracies: list[float]
    loss_a: float | None = None
    loss_b: float | None = None
    accuracy_a: float | None = None
    accuracy_b: float | None = None

    @property
    def errors(self) -> list[float]:
        """Error 1 − accuracy at each α."""
        return [1.0 - a for a in self.accuracies]


@dataclass
class BarrierStats:
    """Max and midpoint barriers of one path, for the loss and for the error."""

    max_loss: float
    max_error: float
    mid_loss: float
    mid_error: float


@dataclass
class MultiModelBarrier:
    """L(Σ wᵢθᵢ) − Σ wᵢ L(θᵢ) for the loss and the error (the barrier that FL averaging pays)."""

    loss_barrier: float
    error_barrier: float
    loss_of_mean: float
    error_of_mean: float
    mean_loss: float
    mean_error: float
    losses: list[float]
    errors: list[float]
    weights: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- evaluation


def _path_state(state_a: State, state_b: State, alpha: float, keys: Iterable[str] | None, base: str) -> dict[str, Any]:
    """θ(α) on ``keys`` with every other entry from the base model (A or B)."""
    if base == "a":
        return interpolate(state_a, state_b, alpha, keys)
    if base == "b":
        return interpolate(state_b, state_a, 1.0 - alpha, keys)
    raise ConfigError(f"base={base!r} is not supported; allowed: 'a', 'b'")


def _grid(num_points: int) -> list[float]:
    """``num_points`` evenly spaced α in [0, 1], with ½ added when absent (the midpoint barrier needs it)."""
    if int(num_points) < 2:
        raise ConfigError(f"num_points={num_points} must be >= 2")
    alphas = [float(a) for a in np.linspace(0.0, 1.0, int(num_points))]
    if not any(math.isclose(a, 0.5) for a in alphas):
        alphas = sorted([*alphas, 0.5])
    return alphas


def interpolation_curve(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: torch.Tensor,
    y: torch.Tensor,
    num_points: int = 11,
    keys: Iterable[str] | None = None,
    base: Literal["a", "b"] = "a",
    bn_reset_data: torch.Tensor | None = None,
) -> Curve:
    """Evaluate θ(α) = (1 − α)θA + αθB on ``keys`` (others from ``base``) at ``num_points`` evenly spaced α
    (plus α = ½). ``model`` is a template: it is copied, never modified. With ``bn_reset_data`` the
    BatchNorm running statistics are recomputed at every α (:func:`fedfuse.align.reset_bn_stats`). With ``keys`` the
    full models A and B are evaluated too, as the barrier's reference line (``Curve.loss_a`` ...)."""
    return _curve(model, state_a, state_b, x, y, num_points, keys, base, bn_reset_data, None)


def _score(model: nn.Module, state: State, x: torch.Tensor, y: torch.Tensor, bn_reset_data: Any) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` loaded with ``state``, after a BN reset when ``bn_reset_data`` is given."""
    model.load_state_dict(state)
    if bn_reset_data is not None:
        from fedfuse.align.bn import reset_bn_stats  # lazy: POT/scipy load only when BN statistics are reset

        model.eval()  # everything but the BatchNorm layers (Dropout too) in inference mode during the reset
        reset_bn_stats(model, bn_reset_data, batch_size=BN_RESET_BATCH)
    loss, acc = evaluate(model, x, y)
    return float(loss), float(acc)


def _curve(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: torch.Tensor,
    y: torch.Tensor,
    num_points: int,
    keys: Iterable[str] | None,
    base: str,
    bn_reset_data: torch.Tensor | None,
    reference: tuple[float, float, float, float] | None,
) -> Curve:
    """:func:`interpolation_curve` with an optional precomputed reference (L(θA), L(θB), acc(θA), acc(θB))."""
    keys = None if keys is None else list(keys)
    work = copy.deepcopy(model)
    curve = Curve([], [], [])
    for alpha in _grid(num_points):
        loss, acc = _score(work, _path_state(state_a, state_b, alpha, keys, base), x, y, bn_reset_data)
        curve.alphas.append(alpha)
        curve.losses.append(loss)
        curve.accuracies.append(acc)
    if reference is None:
        if keys is None:  # a full path: θ(0) = θA and θ(1) = θB exactly (lerp is exact at 0 and 1)
            reference = _reference_of(curve)
        else:
            (la, aa), (lb, ab) = (_score(work, s, x, y, bn_reset_data) for s in (state_a, state_b))
            reference = (la, lb, aa, ab)
    curve.loss_a, curve.loss_b, curve.accuracy_a, curve.accuracy_b = reference
    return curve


def _reference_of(curve: Curve) -> tuple[float, float, float, float]:
    return (curve.losses[0], curve.losses[-1], curve.accuracies[0], curve.accuracies[-1])


# --------------------------------------------------------------------------- barriers


def _values(curve: Curve, metric: str) -> tuple[list[float], float, float]:
    """The metric along the curve and its values at the full end models A and B."""
    if metric == "loss":
        v = list(curve.losses)
        ends = (curve.loss_a, curve.loss_b)
    elif metric == "error":
        v = curve.errors
        ends = tuple(None if a is None else 1.0 - a for a in (curve.accuracy_a, curve.accuracy_b))
    else:
        raise ConfigError(f"metric={metric!r} is not supported; allowed: {', '.join(METRICS)}")
    va = v[_index(curve, 0.0)] if ends[0] is None else float(ends[0])
    vb = v[_index(curve, 1.0)] if ends[1] is None else float(ends[1])
    return v, va, vb


def _index(curve: Curve, alpha: float) -> int:
    for i, a in enumerate(curve.alphas):
        if math.isclose(a, alpha, abs_tol=1e-9):
            return i
    raise ConfigError(f"the curve has no point at alpha={alpha} (alphas: {curve.alphas})")


def max_barrier(curve: Curve, metric: Metric = "loss") -> float:
    """B_max = max_α [ L(θ(α)) − ((1 − α)·L(θA) + α·L(θB)) ] over the curve's grid.

    ``metric`` is ``"loss"`` (cross-entropy) or ``"error"`` (1 − accuracy). On a full path the endpoints give
    0, so B_max ≥ 0; on a partial (layer-wise) path the end α = 1 is a hybrid model, which counts too.
    """
    v, va, vb = _values(curve, metric)
    return float(max(li - ((1.0 - a) * va + a * vb) for a, li in zip(curve.alphas, v, strict=True)))


def midpoint_barrier(curve: Curve, metric: Metric = "loss") -> float:
    """B_mid = L(θ(½)) − ½·(L(θA) + L(θB)); may be negative. The curve must contain α = ½
    (every curve from :func:`interpolation_curve` does)."""
    v, va, vb = _values(curve, metric)
    return float(v[_index(curve, 0.5)] - 0.5 * (va + vb))


def barrier_stats(curve: Curve) -> BarrierStats:
    """Max and midpoint barriers of ``curve`` for the loss and the error."""
    return BarrierStats(
        max_loss=max_barrier(curve, "loss"),
        max_error=max_barrier(curve, "error"),
        mid_loss=midpoint_barrier(curve, "loss"),
        mid_error=midpoint_barrier(curve, "error"),
    )


# --------------------------------------------------------------------------- full-model and N-model barriers


def _report(curve: Curve) -> dict[str, Any]:
    return {**asdict(barrier_stats(curve)), "curve": asdict(curve)}


def barrier(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: torch.Tensor,
    y: torch.Tensor,
    align: bool = False,
    align_method: str = "weight",
    num_points: int = 11,
    bn_reset_data: torch.Tensor | None = None,
    align_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Full-model barrier between A and B: ``{"before": stats, "after": stats | None, "align_method": ...}``.

    Each ``stats`` holds ``max_loss``, ``max_error``, ``mid_loss``, ``mid_error`` and the ``curve``. With
    ``align=True``, B is first aligned to A by ``fedfuse.align.align(model_a, model_b, method=align_method,
    **align_kwargs)`` (``example_input=x[:2]`` unless ``spec``/``example_input``/``batch`` is given; activation
    matching needs ``batch``) and ``"after"`` is the barrier between A and the aligned B.
    """
    before = _report(interpolation_curve(model, state_a, state_b, x, y, num_points, None, "a", bn_reset_data))
    result: dict[str, Any] = {"before": before, "after": None, "align_method": align_method if align else None}
    if align:
        from fedfuse.align import align as align_models  # lazy: LMC works without the alignment engine

        model_a, model_b = copy.deepcopy(model), copy.deepcopy(model)
        model_a.load_state_dict(state_a)
        model_b.load_state_dict(state_b)
        kwargs = dict(align_kwargs or {})
        if not {"spec", "example_input", "batch"} & set(kwargs):
            kwargs["example_input"] = x[:2]  # the engine traces the template on a small batch to derive its spec
        aligned = align_models(model_a, model_b, method=align_method, **kwargs)
        if isinstance(aligned, nn.Module):
            aligned = aligned.state_dict()
        curve = interpolation_curve(model, state_a, aligned, x, y, num_points, None, "a", bn_reset_data)
        result["after"] = _report(curve)
    return result


def multi_model_barrier(
    model: nn.Module,
    states: Sequence[State],
    x: torch.Tensor,
    y: torch.Tensor,
    weights: Sequence[float] | None = None,
    bn_reset_data: torch.Tensor | None = None,
) -> MultiModelBarrier:
    """L(Σ wᵢθᵢ) − Σ wᵢ L(θᵢ) (weights normalised; uniform by default) for the loss and the error."""
    w = normalise_weights(weights, len(states))
    work = copy.deepcopy(model)
    scores = [(loss, 1.0 - acc) for loss, acc in (_score(work, s, x, y, bn_reset_data) for s in states)]
    loss_mean, acc_mean = _score(work, weighted_average(states, w), x, y, bn_reset_data)
    err_mean = 1.0 - acc_mean
    mean_loss = sum(wi * s[0] for wi, s in zip(w, scores, strict=True))
    mean_error = sum(wi * s[1] for wi, s in zip(w, scores, strict=True))
    return MultiModelBarrier(
        loss_barrier=loss_mean - mean_loss,
        error_barrier=err_mean - mean_error,
        loss_of_mean=loss_mean,
        error_of_mean=err_mean,
        mean_loss=mean_loss,
        mean_error=mean_error,
        losses=[s[0] for s in scores],
        errors=[s[1] for s in scores],
        weights=w,
    )
