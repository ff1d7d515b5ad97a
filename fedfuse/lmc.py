"""Linear mode connectivity: interpolation curves, loss/error barriers, layer-wise and cumulative barriers.

Notation: θ(α) = (1 − α)·θA + α·θB on a chosen set of keys (every other entry held at a *base* model);
L is the mean cross-entropy (or the error 1 − accuracy) on (x, y). The barrier of a path is how far L rises
above the straight line between the losses of the two *full* models A and B (Frankle et al. 2020; Adilova et
al., ICLR 2024):

* max barrier       B_max = max_α [ L(θ(α)) − ((1 − α)·L(θA) + α·L(θB)) ]
* midpoint barrier  B_mid = L(θ(½)) − ½·(L(θA) + L(θB))

Layer-wise: interpolate one group only, the rest from A (and, separately, from B); the reference line stays
the full models' (as in Adilova et al.'s code), so a single-layer B_mid near 0 means "averaging this layer alone
costs nothing". Cumulative: grow the interpolated set one group at a time. Pure PyTorch; results are
dataclasses of floats (``dataclasses.asdict``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from fnmatch import fnmatchcase
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.train import evaluate

__all__ = [
    "Curve",
    "BarrierStats",
    "GroupBarrier",
    "LayerwiseResult",
    "CumulativeStep",
    "CumulativeResult",
    "MultiModelBarrier",
    "interpolate",
    "average_states",
    "reset_batchnorm",
    "interpolation_curve",
    "max_barrier",
    "midpoint_barrier",
    "barrier_stats",
    "layer_groups",
    "layerwise_barriers",
    "cumulative_barriers",
    "barrier",
    "multi_model_barrier",
    "plot_curve",
    "plot_layerwise",
    "plot_cumulative",
]

State = Mapping[str, torch.Tensor]
Metric = Literal["loss", "error"]
METRICS = ("loss", "error")
ORDERS = ("shallow", "deep", "random")


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
class GroupBarrier:
    """Layer-wise barriers of one group: only ``keys`` interpolated, the rest held at A (``base_a``) or B."""

    group: str
    keys: list[str]
    base_a: BarrierStats
    base_b: BarrierStats


@dataclass
class LayerwiseResult:
    """One :class:`GroupBarrier` per group, plus the full-model barrier for reference."""

    groups: list[GroupBarrier]
    full: BarrierStats


@dataclass
class CumulativeStep:
    """Barriers after adding group ``added``; ``groups`` is the whole interpolated set so far."""

    added: str
    groups: list[str]
    stats: BarrierStats


@dataclass
class CumulativeResult:
    """Cumulative barriers in one ``order``; the last step equals ``full`` when the groups cover every float key."""

    order: str
    seed: int
    steps: list[CumulativeStep]
    full: BarrierStats


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


# --------------------------------------------------------------------------- state arithmetic


def _check_compatible(state_a: State, state_b: State) -> None:
    if set(state_a) != set(state_b):
        diff = sorted(set(state_a) ^ set(state_b))
        raise ConfigError(f"state dicts have different keys: {diff[:5]}{' ...' if len(diff) > 5 else ''}")
    for k, va in state_a.items():
        if tuple(va.shape) != tuple(state_b[k].shape):
            raise ConfigError(f"state entry {k!r} has shape {tuple(va.shape)} in A but {tuple(state_b[k].shape)} in B")


def interpolate(state_a: State, state_b: State, alpha: float, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """θ(α) = (1 − α)·θA + α·θB on ``keys`` (default: every float tensor); every other entry is copied from A.

    Integer buffers (``num_batches_tracked``) always come from A. Uses ``torch.lerp``, which returns θA
    exactly at α = 0 and θB exactly at α = 1, so a model interpolated with itself is unchanged.
    """
    _check_compatible(state_a, state_b)
    chosen = set(state_a) if keys is None else set(keys)
    unknown = sorted(chosen - set(state_a))
    if unknown:
        raise ConfigError(f"keys not in the state dict: {unknown[:5]}")
    out: dict[str, Any] = {}
    for k, va in state_a.items():
        va = va.detach()
        if k in chosen and va.is_floating_point():
            out[k] = torch.lerp(va, state_b[k].detach().to(device=va.device, dtype=va.dtype), float(alpha))
        else:
            out[k] = va.clone()
    return out


def _path_state(state_a: State, state_b: State, alpha: float, keys: Iterable[str] | None, base: str) -> dict[str, Any]:
    """θ(α) on ``keys`` with every other entry from the base model (A or B)."""
    if base == "a":
        return interpolate(state_a, state_b, alpha, keys)
    if base == "b":
        return interpolate(state_b, state_a, 1.0 - alpha, keys)
    raise ConfigError(f"base={base!r} is not supported; allowed: 'a', 'b'")


def average_states(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Weighted mean Σ wᵢθᵢ / Σ wᵢ of float entries (integer buffers from the first state).

    Computed as θ₀ + Σ w̃ᵢ(θᵢ − θ₀) with normalised w̃, so N identical states average to exactly θ₀.
    """
    if not states:
        raise ConfigError("states must hold at least one state dict")
    w = _normalised_weights(len(states), weights)
    for s in states[1:]:
        _check_compatible(states[0], s)
    out: dict[str, Any] = {}
    for k, v0 in states[0].items():
        v0 = v0.detach()
        if not v0.is_floating_point():
            out[k] = v0.clone()
            continue
        acc = v0.clone()
        for wi, s in zip(w[1:], states[1:], strict=True):
            acc += wi * (s[k].detach().to(device=v0.device, dtype=v0.dtype) - v0)
        out[k] = acc
    return out


def _normalised_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ConfigError(f"weights has {len(w)} entries for {n} states")
    if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise ConfigError(f"weights={w} must be finite, non-negative and sum to > 0")
    total = sum(w)
    return [x / total for x in w]


# --------------------------------------------------------------------------- evaluation


def _tracked_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reset_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Recompute BatchNorm running statistics on ``x``: reset them, then forward passes with ``momentum=None``
    (a plain cumulative average over batches) with only the BN layers in train mode; the model ends in eval."""
    bns = _tracked_batchnorms(model)
    model.eval()
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        model.eval()


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
    BatchNorm running statistics are recomputed at every α (see :func:`reset_batchnorm`). With ``keys`` the
    full models A and B are evaluated too, as the barrier's reference line (``Curve.loss_a`` ...)."""
    return _curve(model, state_a, state_b, x, y, num_points, keys, base, bn_reset_data, None)


def _score(model: nn.Module, state: State, x: torch.Tensor, y: torch.Tensor, bn_reset_data: Any) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` loaded with ``state``, after a BN reset when ``bn_reset_data`` is given."""
    model.load_state_dict(state)
    if bn_reset_data is not None:
        reset_batchnorm(model, bn_reset_data)
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


# --------------------------------------------------------------------------- layer groups


def _is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.modules.conv._ConvNd)


def layer_groups(
    model: nn.Module, patterns: Mapping[str, str | Sequence[str]] | Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Partition the state-dict keys of ``model`` into named groups, in registration (≈ shallow→deep) order.

    Default: one group per module owning parameters/buffers, named after the module; a BatchNorm joins the
    group of the Conv/Linear registered right before it. With ``patterns`` (a list of fnmatch globs, each its
    own group, or a mapping name → glob(s)), a key goes to the first group whose pattern matches it; keys
    matching nothing belong to no group.
    """
    state_keys = list(model.state_dict().keys())
    if patterns is not None:
        if isinstance(patterns, Mapping):
            items = [(str(n), [p] if isinstance(p, str) else list(p)) for n, p in patterns.items()]
        else:
            items = [(str(p), [str(p)]) for p in patterns]
        groups: dict[str, list[str]] = {name: [] for name, _ in items}
        for key in state_keys:
            for name, pats in items:
                if any(fnmatchcase(key, p) for p in pats):
                    groups[name].append(key)
                    break
        empty = [name for name, keys in groups.items() if not keys]
        if empty:
            raise ConfigError(f"layer group patterns match no state-dict key: {empty}")
        return groups

    known = set(state_keys)
    groups = {}
    owner: dict[str, str] = {}
    pair_with: str | None = None  # the group a following BatchNorm joins
    for name, module in model.named_modules():
        own = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        keys = [f"{name}.{n}" if name else n for n, _ in own]
        keys = [k for k in keys if k in known]
        if not keys:
            continue
        group = name or "model"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and pair_with is not None:
            group, pair_with = pair_with, None
        else:
            pair_with = group if _is_weight_layer(module) else None
        groups.setdefault(group, []).extend(keys)
        owner.update(dict.fromkeys(keys, group))
    for key in state_keys:  # entries no module enumerates (e.g. extra state) go to their module's group
        if key not in owner:
            groups.setdefault(key.rsplit(".", 1)[0] if "." in key else "model", []).append(key)
    return groups


def _resolve_groups(model: nn.Module, groups: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    resolved = layer_groups(model) if groups is None else {str(k): list(v) for k, v in groups.items()}
    if not resolved:
        raise ConfigError("no layer groups to evaluate")
    return resolved


def layerwise_barriers(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: torch.Tensor,
    y: torch.Tensor,
    groups: Mapping[str, Sequence[str]] | None = None,
    num_points: int = 11,
    bn_reset_data: torch.Tensor | None = None,
) -> LayerwiseResult:
    """For each group G: barriers of θ_G(α) = (1 − α)θA_G + αθB_G with every other entry from A (``base_a``)
    and, separately, from B (``base_b``), against the full models' line (1 − α)L(θA) + αL(θB).
    ``groups`` defaults to :func:`layer_groups`."""
    resolved = _resolve_groups(model, groups)
    full = _curve(model, state_a, state_b, x, y, num_points, None, "a", bn_reset_data, None)
    ref = _reference_of(full)
    rows = []
    for name, keys in resolved.items():
        per_base = [
            barrier_stats(_curve(model, state_a, state_b, x, y, num_points, keys, b, bn_reset_data, ref))
            for b in ("a", "b")
        ]
        rows.append(GroupBarrier(name, list(keys), per_base[0], per_base[1]))
    return LayerwiseResult(rows, barrier_stats(full))


def cumulative_barriers(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: torch.Tensor,
    y: torch.Tensor,
    groups: Mapping[str, Sequence[str]] | None = None,
    order: Literal["shallow", "deep", "random"] = "shallow",
    seed: int = 0,
    num_points: int = 11,
    bn_reset_data: torch.Tensor | None = None,
) -> CumulativeResult:
    """Grow the interpolated set S one group at a time (others from A) and record the barrier of θ_S(α) after
    each addition. ``order``: ``"shallow"`` (registration order), ``"deep"`` (reversed) or ``"random"``
    (a permutation from ``seed``). When the groups cover every float key the last step is the full barrier."""
    if order not in ORDERS:
        raise ConfigError(f"order={order!r} is not supported; allowed: {', '.join(ORDERS)}")
    resolved = _resolve_groups(model, groups)
    names = list(resolved)
    if order == "deep":
        names.reverse()
    elif order == "random":
        names = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    full = _curve(model, state_a, state_b, x, y, num_points, None, "a", bn_reset_data, None)
    ref = _reference_of(full)
    steps: list[CumulativeStep] = []
    keys: list[str] = []
    for i, name in enumerate(names):
        keys.extend(resolved[name])
        curve = _curve(model, state_a, state_b, x, y, num_points, keys, "a", bn_reset_data, ref)
        steps.append(CumulativeStep(name, names[: i + 1], barrier_stats(curve)))
    return CumulativeResult(order, int(seed), steps, barrier_stats(full))


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
    w = _normalised_weights(len(states), weights)
    work = copy.deepcopy(model)
    scores = [(loss, 1.0 - acc) for loss, acc in (_score(work, s, x, y, bn_reset_data) for s in states)]
    loss_mean, acc_mean = _score(work, average_states(states, w), x, y, bn_reset_data)
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


# --------------------------------------------------------------------------- plots


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
