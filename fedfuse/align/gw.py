"""Fused Gromov-Wasserstein barycenter fusion (method ``"gwb"``).

Plain GW fusion (method ``"gw"``, :func:`fedfuse.align.fusion.gromov_wasserstein_barycenter`) matches neurons
through their intra-model distance matrices only. Those matrices are nearly flat for hidden layers trained from
different inits (every pair of neurons is about equally far apart), so the GW objective barely identifies
neurons and 5-parent fusion falls below plain averaging. The fused GW barycenter adds the feature term WB uses.

Per group ``g`` and model ``i`` (layers shallow → deep, each model's incoming weights already re-indexed by the
transports of the layers below, as in WB), with ``w̄_a`` the barycenter's and ``w_b`` model ``i``'s neuron rows:

* feature cost ``M[a, b] = ‖w̄_a − w_b‖²`` (WB's cost);
* structures ``C̄[a, a'] = ‖w̄_a − w̄_a'‖`` and ``C_i[b, b'] = ‖w_b − w_b'‖`` (invariant to how the layer
  below is ordered);
* the coupling ``Π_i`` minimises the FGW objective (Vayer et al. 2019; POT's
  ``ot.gromov.fused_gromov_wasserstein``, conditional gradient)::

      (1 − α) ⟨M/m, Π⟩ + α Σ_{a,a',b,b'} (C̄[a,a']/c̄ − C_i[b,b']/c_i)² Π[a,b] Π[a',b']

  over couplings with uniform marginals, where ``m``, ``c̄``, ``c_i`` are the mean entries of ``M``, ``C̄``,
  ``C_i``. *(our reading: the normalisation makes α a trade-off between unit-free terms, and removes the
  barycenter's uniformly shrunk distances — averaging aligned neurons pulls them together — from the
  structure term; the paper does not say how the terms are scaled.)*
* ``T_i = Π_i / Π_i·1``; the barycenter is ``θ̄ ← Σ λ_i apply_transport(θ_i, T_i)``; repeat until no coupling
  changes or ``max_iter``.

Initialisation *(our choice)*: the WB barycenter and its couplings (:func:`wasserstein_barycenter`), so the
conditional gradient starts from the WB plan (``G0``) and only moves where the structure term pays for it;
``α = 0`` gives WB back, ``α = 1`` is GW warm-started from WB. Default ``α = 0.5``. Measured on mnist10k
(``benchmarks/results/repair-mnist10k-5.md``, 5 parents): at ``α ≤ 0.5`` the WB plan is a stationary point of
this objective for the MLP and the CNN (the conditional gradient does not leave it, so gwb = wb); ``α = 0.9``
and ``1`` move the plans (10 % / 31–34 % relative change of the aligned weights) without gaining accuracy
(MLP +0.2 / 0.0 pts, CNN −0.3 / −2.3 pts). Cold-started FGW is not offered: plain GW from scratch
(method ``"gw"``) is what fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import ot
import torch
from torch import Tensor

from fedfuse.align.heads import merged_spec
from fedfuse.align.solvers import group_features, pairwise_sq_dist
from fedfuse.align.spec import TransportSpec
from fedfuse.align.transport import Transports, apply_transport
from fedfuse.errors import ConfigError
from fedfuse.state import single_threaded, weighted_average

__all__ = ["fused_gromov_wasserstein_barycenter", "fgw_coupling", "DEFAULT_ALPHA"]

DEFAULT_ALPHA = 0.5


def _normalised(x: np.ndarray) -> np.ndarray:
    mean = float(x.mean())
    return x / mean if mean > 0 else x


def fgw_coupling(
    feats_bar: Tensor, feats_i: Tensor, struct_i: Tensor, alpha: float, init: Tensor | None = None, max_iter: int = 200
) -> Tensor:
    """Row-stochastic ``T`` (``n_bar × n_i``) of the FGW plan between the barycenter's and model ``i``'s neurons.

    ``feats_bar``/``feats_i``: rows in a common input ordering (feature cost); ``struct_i``: model ``i``'s rows in
    its own ordering (structure). ``init``: a row-stochastic warm start (e.g. the WB transport).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha!r} is out of range; allowed: 0 <= alpha <= 1")
    n, m = feats_bar.shape[0], feats_i.shape[0]
    p, q = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    cost = _normalised(pairwise_sq_dist(feats_bar, feats_i).numpy())
    c_bar = _normalised(pairwise_sq_dist(feats_bar, feats_bar).sqrt().numpy())
    c_i = _normalised(pairwise_sq_dist(struct_i, struct_i).sqrt().numpy())
    g0 = None
    if init is not None:
        g0 = init.double().numpy() * p[:, None]
        if not np.allclose(g0.sum(0), q, atol=1e-6):  # not a coupling of the marginals: let POT start from p qᵀ
            g0 = None
    pi = ot.gromov.fused_gromov_wasserstein(
        cost, c_bar, c_i, p, q, loss_fun="square_loss", alpha=float(alpha), G0=g0, max_iter=max_iter,
        tol_rel=1e-7, tol_abs=1e-9, symmetric=True,
    )  # fmt: skip
    pi = np.asarray(pi)
    return torch.from_numpy(pi / np.maximum(pi.sum(1, keepdims=True), 1e-300)).float()


@single_threaded()
def fused_gromov_wasserstein_barycenter(
    states: Sequence[Mapping[str, Tensor]],
    lam: Sequence[float],
    spec: TransportSpec,
    init: tuple[Mapping[str, Tensor], Sequence[Transports]],
    *,
    alpha: float = DEFAULT_ALPHA,
    ref: int = 0,
    max_iter: int = 10,
    reduce: Callable[..., dict[str, Tensor]] | None = None,
) -> tuple[dict[str, Tensor], list[Transports], list[dict[str, Tensor]]]:
    """FGW barycenter fusion (module docstring) from ``init`` = (WB barycenter, WB transports of every model).

    ``reduce(aligned, λ, ref=...)`` replaces the weighted average of the aligned models (robust aggregation).

    Returns the fused state, each model's transports and aligned state; stops when no coupling changes.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha={alpha!r} is out of range; allowed: 0 <= alpha <= 1")
    bary = dict(init[0])
    transports = [dict(t) for t in init[1]]
    aligned = [apply_transport(s, spec, t) for s, t in zip(states, transports, strict=True)]
    if alpha == 0.0:
        return (reduce or weighted_average)(aligned, lam, ref=ref), transports, aligned
    # head sets: on the merged views; their block-structured WB transports are kept (a plain FGW coupling of a merged
    # group would mix units of different heads)
    specs = [merged_spec(spec.for_state(dict(s))) for s in states]
    struct = [  # each model's own neuron rows (structure term: invariant to the ordering below)
        {g.name: group_features(s, sp, g, None, ("out",)) for g in sp.groups}
        for s, sp in zip(states, specs, strict=True)
    ]
    for _ in range(max(1, max_iter)):
        spec_bar = merged_spec(spec.for_state(bary))
        feats_bar = {g.name: group_features(bary, spec_bar, g, None, ("out",)) for g in spec_bar.groups}
        aligned, changed = [], False
        for i, (s, sp) in enumerate(zip(states, specs, strict=True)):
            new: Transports = dict(transports[i])
            for g in sp.groups:  # shallow → deep: model i's rows re-indexed by the transports found so far
                if sp.merged_heads and g.name in sp.merged_heads:
                    continue
                fb = group_features(s, sp, g, new, ("out",))
                fa, si = feats_bar[g.name], struct[i][g.name]
                if fa is None or fb is None or si is None:
                    continue
                t = fgw_coupling(fa, fb, si, float(alpha), init=transports[i].get(g.name))
                old = transports[i].get(g.name)
                changed = changed or old is None or old.shape != t.shape or not torch.allclose(old, t, atol=1e-6)
                new[g.name] = t
            transports[i] = new
            aligned.append(apply_transport(s, spec, new))
        bary = (reduce or weighted_average)(aligned, lam, ref=ref)
        if not changed:
            break
    return bary, transports, aligned
