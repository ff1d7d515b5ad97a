"""Byzantine-robust aggregation and update screening, on state dicts (no Flower here).

Two layers of defence, both pure functions of a round's client models:

* **Screening** (:func:`screen_updates`), before any aggregation: a client's update ``Δ_i = θ_i − θ_sent``
  whose norm exceeds ``norm_factor × m`` — ``m`` the *lower median* of the round's update norms — is
  rejected (or clipped to that norm), and a claimed ``num-examples`` above ``examples_factor × ``the lower
  median of the round's claims is rejected. Why relative to the round's median rather than to ``‖θ‖``:
  update norms shrink as training converges and differ per architecture, learning rate and local epochs
  (one-shot runs start every client from its own init), so no fixed multiple of the global norm fits every
  run; the median of the round adapts and cannot be moved by fewer than half of the clients. The *lower*
  median (the ⌈n/2⌉-th smallest) keeps the bound honest-controlled even with 2 clients, one of them bad.
* **Robust reduction** (:func:`robust_reduce`), used wherever a weighted average would be — in particular
  *after* alignment, on the aligned models (``fedfuse.align.fuse(..., reduce=...)``):

  - ``median``: coordinate-wise λ-weighted median (the smallest value whose cumulative weight reaches ½);
  - ``trimmed-mean``: per coordinate, drop the ``k = ⌊β·n⌋`` smallest and ``k`` largest values and take
    the λ-weighted mean of the rest (Yin et al. 2018);
  - ``krum``: multi-Krum (Blanchard et al. 2017) on the flattened models: with ``f = ⌊β·n⌋``, score
    ``s_i = Σ_{j ∈ N_i} ‖θ_i − θ_j‖²`` over the ``n − f − 2`` nearest others, keep the ``n − f`` lowest
    scores and take their λ-weighted mean (``f = 0`` keeps everyone: plain averaging).

  ``β`` (``fraction``) is the assumed fraction of Byzantine clients, in [0, ½). Integer buffers
  (``num_batches_tracked``) are copied from the reference model, as in :func:`fedfuse.state.weighted_average`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedfuse.errors import ConfigError
from fedfuse.state import check_compatible, normalise_weights, weighted_average

__all__ = [
    "ROBUST_METHODS",
    "NORM_ACTIONS",
    "Reducer",
    "coordinate_median",
    "trimmed_mean",
    "krum_select",
    "multi_krum",
    "robust_reduce",
    "reducer",
    "lower_median",
    "update_norm",
    "Screening",
    "screen_updates",
]

State = Mapping[str, Tensor]
Reducer = Callable[..., dict[str, Tensor]]  # (states, weights, *, ref) -> state, like weighted_average
ROBUST_METHODS = ("none", "median", "trimmed-mean", "krum")
NORM_ACTIONS = ("reject", "clip")


def _stack(states: Sequence[State], key: str) -> Tensor:
    return torch.stack([s[key].detach().to(torch.float64).reshape(-1) for s in states])  # (n, d)


def _per_key(states: Sequence[State], ref: int, fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Apply ``fn`` ((n, d) float64 → (d,)) to every floating entry; integer buffers come from ``states[ref]``."""
    check_compatible(states, ref)
    out: dict[str, Tensor] = {}
    for k, v in states[ref].items():
        if not torch.is_floating_point(v):
            out[k] = v.detach().clone()
            continue
        out[k] = fn(_stack(states, k)).reshape(v.shape).to(v.dtype)
    return out


def coordinate_median(states: Sequence[State], weights: Sequence[float] | None = None, *, ref: int = 0) -> dict:
    """Per coordinate, the λ-weighted (lower) median: the smallest value ``x_(j)`` with ``Σ_{i<=j} λ_(i) >= ½``."""
    lam = torch.tensor(normalise_weights(weights, len(states)), dtype=torch.float64)

    def median(x: Tensor) -> Tensor:
        values, order = torch.sort(x, dim=0)
        cum = torch.cumsum(lam[order], dim=0)
        idx = torch.searchsorted(cum.T.contiguous(), torch.full((x.shape[1], 1), 0.5 - 1e-12, dtype=torch.float64))
        return values.gather(0, idx.T.clamp(max=x.shape[0] - 1)).reshape(-1)

    return _per_key(states, ref, median)


def _trim_count(n: int, fraction: float) -> int:
    if not 0.0 <= fraction < 0.5:
        raise ConfigError(f"robust fraction={fraction!r} is out of range; allowed: [0, 0.5)")
    return min(int(math.floor(fraction * n)), (n - 1) // 2)


def trimmed_mean(
    states: Sequence[State], weights: Sequence[float] | None = None, *, fraction: float = 0.2, ref: int = 0
) -> dict[str, Tensor]:
    """Per coordinate, drop the ``k = ⌊β n⌋`` smallest and largest values, λ-weighted mean of the others."""
    n = len(states)
    k = _trim_count(n, fraction)
    lam = torch.tensor(normalise_weights(weights, n), dtype=torch.float64)

    def mean(x: Tensor) -> Tensor:
        values, order = torch.sort(x, dim=0)
        w = lam[order][k : n - k]
        return (values[k : n - k] * w).sum(0) / w.sum(0)

    return _per_key(states, ref, mean)


def krum_select(states: Sequence[State], f: int, m: int | None = None) -> list[int]:
    """Indices (ascending) of the ``m`` (default ``n − f``) models with the lowest Krum scores
    ``s_i = Σ ‖θ_i − θ_j‖²`` over the ``n − f − 2`` nearest other models (at least 1)."""
    n = len(states)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ConfigError(f"krum keeps m={m} of {n} models; allowed: 1..{n}")
    if f == 0 and m == n:
        return list(range(n))
    keys = [k for k, v in states[0].items() if torch.is_floating_point(v)]
    flat = torch.cat([_stack(states, k) for k in keys], dim=1)
    d2 = torch.cdist(flat, flat).pow(2)
    nearest = max(1, n - f - 2)
    d2.fill_diagonal_(float("inf"))
    scores = torch.sort(d2, dim=1).values[:, : min(nearest, n - 1)].sum(1)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return sorted(order[:m])


def multi_krum(
    states: Sequence[State], weights: Sequence[float] | None = None, *, fraction: float = 0.2, ref: int = 0
) -> dict[str, Tensor]:
    """λ-weighted mean of the ``n − f`` models :func:`krum_select` keeps, ``f = ⌊β n⌋``."""
    lam = normalise_weights(weights, len(states))
    keep = krum_select(states, _trim_count(len(states), fraction))
    new_ref = keep.index(ref) if ref in keep else 0
    return weighted_average([states[i] for i in keep], [lam[i] for i in keep], ref=new_ref)


def robust_reduce(
    states: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    method: str = "none",
    fraction: float = 0.2,
    ref: int = 0,
) -> dict[str, Tensor]:
    """The ``method`` reduction of ``states`` (``none`` = :func:`fedfuse.state.weighted_average`)."""
    if method == "none":
        return weighted_average(states, weights, ref=ref)
    if method == "median":
        return coordinate_median(states, weights, ref=ref)
    if method == "trimmed-mean":
        return trimmed_mean(states, weights, fraction=fraction, ref=ref)
    if method == "krum":
        return multi_krum(states, weights, fraction=fraction, ref=ref)
    raise ConfigError(f"robust={method!r} is not allowed; allowed: {', '.join(ROBUST_METHODS)}")


def reducer(method: str, fraction: float = 0.2) -> Reducer | None:
    """A ``(states, weights, *, ref)`` reduction for ``fuse(..., reduce=...)``; None for ``none`` (plain average)."""
    if method not in ROBUST_METHODS:
        raise ConfigError(f"robust={method!r} is not allowed; allowed: {', '.join(ROBUST_METHODS)}")
    _trim_count(2, fraction)  # validates the fraction
    if method == "none":
        return None

    def reduce(states: Sequence[State], weights: Sequence[float] | None = None, *, ref: int = 0) -> dict:
        return robust_reduce(states, weights, method=method, fraction=fraction, ref=ref)

    return reduce


# ---------------------------------------------------------------------------------------------------------------
# screening
# ---------------------------------------------------------------------------------------------------------------


def lower_median(values: Sequence[float]) -> float:
    """The ⌈n/2⌉-th smallest value (for 2 values, the smaller one)."""
    if not values:
        raise ConfigError("lower_median needs at least one value")
    return sorted(values)[(len(values) - 1) // 2]


def update_norm(state: State, sent: State) -> float:
    """``‖θ − θ_sent‖₂`` over the floating entries (float64)."""
    total = 0.0
    for k, v in state.items():
        if torch.is_floating_point(v):
            total += float((v.detach().double() - sent[k].detach().double()).pow(2).sum())
    return math.sqrt(total)


def _flat_delta(state: State, sent: State) -> Tensor:
    keys = [k for k, v in state.items() if torch.is_floating_point(v)]
    if not keys:
        return torch.zeros(1, dtype=torch.float64)
    return torch.cat([(state[k].detach().double() - sent[k].detach().double()).reshape(-1) for k in keys])


@dataclass
class Screening:
    """What :func:`screen_updates` decided: per client a rejection reason (or None), the states to aggregate
    (clipped ones replaced), how many were clipped, and the bounds used."""

    reasons: list[str | None]
    states: list[dict[str, Tensor]]
    clipped: int = 0
    bounds: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)  # largest value / lower median, per check


def screen_updates(
    states: Sequence[State],
    sent: Sequence[State],
    weights: Sequence[float],
    *,
    norm_factor: float = 0.0,
    norm_action: str = "reject",
    examples_factor: float = 0.0,
    min_cosine: float = -1.0,
) -> Screening:
    """Round-level checks relative to the round's own clients (see the module docstring).

    ``norm_factor`` > 0: ``‖θ_i − sent_i‖ > norm_factor · lower_median(norms)`` is rejected (``reject``) or
    ``θ_i ← sent_i + Δ_i · bound/‖Δ_i‖`` (``clip``). ``examples_factor`` > 0: ``n_i > examples_factor ·
    lower_median(n)`` is rejected. A factor of 0 turns that check off. ``min_cosine`` > −1: an update whose
    cosine with the coordinate-wise median update ``median_i Δ_i`` is below it is rejected (a sign-flipped
    update points away from what most clients did; −1 = off). With one or two clients there is nothing to
    compare with; they pass (the norm bound still applies to two).
    """
    if norm_action not in NORM_ACTIONS:
        raise ConfigError(f"update-norm-action={norm_action!r} is not allowed; allowed: {', '.join(NORM_ACTIONS)}")
    n = len(states)
    reasons: list[str | None] = [None] * n
    out = [dict(s) for s in states]
    result = Screening(reasons, out)
    if n < 2:
        return result
    if examples_factor > 0:
        median = lower_median(list(weights))  # weights are validated positive
        bound = examples_factor * median
        result.bounds["examples_bound"] = bound
        result.ratios["examples_ratio"] = max(weights) / median
        for i, w in enumerate(weights):
            if w > bound:
                reasons[i] = f"num-examples={w:g} exceeds {examples_factor:g} × the round's median (= {bound:g})"
    if min_cosine > -1.0 and n >= 3:
        deltas = [_flat_delta(s, r) for s, r in zip(states, sent, strict=True)]
        median = torch.stack(deltas).median(dim=0).values
        cosines = [float(torch.nn.functional.cosine_similarity(d, median, dim=0)) for d in deltas]
        result.ratios["update_cosine_min"] = min(cosines)
        for i, cos in enumerate(cosines):
            if reasons[i] is None and cos < min_cosine:
                reasons[i] = f"update direction: cosine {cos:.3f} with the round's median update < {min_cosine:g}"
    if norm_factor > 0:
        norms = [update_norm(s, r) for s, r in zip(states, sent, strict=True)]
        median = lower_median(norms)
        bound = norm_factor * median
        result.bounds["norm_bound"] = bound
        if median > 0:  # most clients did not move: nothing to scale a bound by
            result.ratios["update_norm_ratio"] = max(norms) / median
        for i, norm in enumerate(norms):
            if reasons[i] is not None or not norm > bound or median == 0:
                continue
            if norm_action == "reject":
                reasons[i] = f"update norm {norm:.4g} exceeds {norm_factor:g} × the round's median norm (= {bound:.4g})"
            else:
                scale = bound / norm
                out[i] = {
                    k: (sent[i][k] + (v - sent[i][k]) * scale).to(v.dtype) if torch.is_floating_point(v) else v
                    for k, v in states[i].items()
                }
                result.clipped += 1
    return result
