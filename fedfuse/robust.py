"""Byzantine-robust aggregation on state dicts (no Flower here); the round-level screening that runs before
it is :mod:`fedfuse.screening`.

**Robust reduction** (:func:`robust_reduce`), used wherever a weighted average would be — in particular
*after* alignment, on the aligned models (``fedfuse.align.fuse(..., reduce=...)``). Through
:func:`robust_reduce` / :func:`reducer` the robust methods are **unweighted**: a claimed num-examples is the
one thing an attacker sets freely, so it buys no share of a median, a trim or a Krum selection (the
functions themselves still take optional weights λ for library use):

- ``median``: coordinate-wise (λ-weighted) median (the smallest value whose cumulative weight reaches ½);
- ``trimmed-mean``: per coordinate, drop the ``k = ⌊β·n⌋`` smallest and ``k`` largest values and take
  the (λ-weighted) mean of the rest (Yin et al. 2018);
- ``krum``: multi-Krum (Blanchard et al. 2017) on the flattened models: with ``f = ⌊β·n⌋``, score
  ``s_i = Σ_{j ∈ N_i} ‖θ_i − θ_j‖²`` over the ``n − f − 2`` nearest others, keep the ``n − f`` lowest
  scores and take their (λ-weighted) mean (``f = 0`` keeps everyone: plain averaging).

``β`` (``fraction``) is the assumed fraction of Byzantine clients, in [0, ½). Integer buffers
(``num_batches_tracked``) are copied from the reference model, as in :func:`fedfuse.state.weighted_average`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from fedfuse.errors import ConfigError
from fedfuse.screening_options import ROBUST_METHODS
from fedfuse.state import check_compatible, normalise_weights, weighted_average

__all__ = [
    "ROBUST_METHODS",
    "Reducer",
    "coordinate_median",
    "trimmed_mean",
    "krum_select",
    "multi_krum",
    "robust_reduce",
    "reducer",
]

State = Mapping[str, Tensor]
Reducer = Callable[..., dict[str, Tensor]]  # (states, weights, *, ref) -> state, like weighted_average


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
    """The ``method`` reduction of ``states``: ``none`` = :func:`fedfuse.state.weighted_average` with
    ``weights``; the robust methods ignore ``weights`` (unweighted: claims buy no share, see the module doc)."""
    if method == "none":
        return weighted_average(states, weights, ref=ref)
    if method == "median":
        return coordinate_median(states, ref=ref)
    if method == "trimmed-mean":
        return trimmed_mean(states, fraction=fraction, ref=ref)
    if method == "krum":
        return multi_krum(states, fraction=fraction, ref=ref)
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
