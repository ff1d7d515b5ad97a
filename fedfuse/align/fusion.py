"""Fusing N models into one: average, matched average, Wasserstein and Gromov-Wasserstein barycenters.

All methods return a state dict. With ``λ`` the normalised ``weights``:

* ``average``: ``Σ λ_i θ_i``.
* ``match``: weight-match every model to a reference (largest λ, or ``init``), then average.
* ``wb`` (Akash et al. 2022): barycenter ``θ̄`` initialised from the reference; alternate
  (a) layer-wise OT of every model onto ``θ̄`` (:func:`ot_transport`, couplings carried to the next
  layer, warm-started from the previous iteration) and (b) ``θ̄ ← Σ λ_i apply_transport(θ_i, T_i)``
  until ``‖Δθ̄‖/‖θ̄‖ < tol`` or ``max_iter``.
* ``gwb``: fused Gromov-Wasserstein barycenter (structure + WB's feature term, trade-off ``alpha``), see
  :mod:`fedfuse.align.gw`.
* ``gw`` (plain GW, the paper's GWB): per group, every model gives the intra-model distance matrix
  ``D_i[b, b'] = ‖w_b − w_b'‖`` of its neurons' incoming weights (invariant to how the previous layer is
  ordered, so no coupling needs carrying); ``ot.gromov.gromov_barycenters`` returns the barycenter structure and the GW
  couplings ``Π_i``; each model is mapped with ``T_i = Π_i / Π_i·1`` and the results averaged.
  *(our reading: the paper leaves the weight reconstruction open; we use the GW couplings as transports.)*

``target_width`` (int or ``{group: width}``) fixes the barycenter's widths. Initialisation *(our choice)*:
shrinking a group clusters the reference's neurons (k-means on incoming weights, previous layers already
mapped) and averages each cluster (outgoing weights summed); growing copies source neuron ``⌊a·n_s/n_t⌋``
into target neuron ``a`` with its outgoing weights split evenly among its copies, which keeps the function
exactly (for element-wise nonlinearities and per-channel norms). The WB/GW iterations then refine these
supports with uniform-marginal couplings.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import ot
import torch
from scipy.cluster.vq import kmeans2
from torch import Tensor, nn

from fedfuse.align.bn import fold_bn, fold_pairs, has_batch_norm, reset_bn_stats, unfold_bn
from fedfuse.align.gw import DEFAULT_ALPHA, fused_gromov_wasserstein_barycenter
from fedfuse.align.peft_lora import check_lora_states
from fedfuse.align.repair import repair
from fedfuse.align.resolve import InputShapeError
from fedfuse.align.solvers import (
    _layerwise_ot,
    activation_matching,
    group_features,
    ot_transport,
    pairwise_sq_dist,
    resolve_spec,
    weight_matching,
)
from fedfuse.align.spec import TransportSpec, segment_range
from fedfuse.align.transport import Transports, apply_transport, state_of
from fedfuse.errors import ConfigError
from fedfuse.robust import Reducer
from fedfuse.state import caller_threads, normalise_weights, single_threaded, weighted_average

__all__ = ["fuse", "align", "wasserstein_barycenter", "gromov_wasserstein_barycenter", "init_barycenter"]

Model = nn.Module | Mapping[str, Tensor]
METHODS = ("average", "match", "wb", "gwb", "gw", "cca", "zip")
#: methods that compare units by their activations and so need ``fuse(..., data=batch)`` (:mod:`fedfuse.merge`)
DATA_METHODS: frozenset[str] = frozenset({"cca", "zip"})


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------


def _check_states(states: list[dict[str, Tensor]], same_shapes: bool, method: str) -> None:
    keys0 = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(keys0):
            missing, extra = sorted(set(keys0) - set(s)), sorted(set(s) - set(keys0))
            raise ConfigError(
                f"model {i} does not match model 0's architecture: missing parameters {missing[:5]}, "
                f"unexpected parameters {extra[:5]}"
            )
        for k in keys0:
            a, b = states[0][k], s[k]
            if a.dim() != b.dim() or (same_shapes and a.shape != b.shape):
                hint = "" if a.dim() != b.dim() else "; use method='wb', 'gwb' or 'gw' to fuse unequal widths"
                raise ConfigError(
                    f"models disagree on parameter {k!r}: shape {tuple(a.shape)} in model 0 vs {tuple(b.shape)} in "
                    f"model {i}; method={method!r} needs identical shapes{hint}"
                )
    for i, s in enumerate(states):
        for k, v in s.items():
            # a finite sum has no inf/NaN term (one pass, no mask); an overflowing one is checked per entry
            if torch.is_floating_point(v) and not math.isfinite(float(v.sum())) and not bool(torch.isfinite(v).all()):
                raise ConfigError(f"parameter {k!r} of model {i} contains NaN or inf values; cannot fuse")


def _check_free_axes(states: list[dict[str, Tensor]], specs: list[TransportSpec]) -> None:
    """Axes no group indexes (inputs, classes, kernels) must agree across models."""
    for k, v0 in states[0].items():
        moving = {ax.axis for _, ax in specs[0].members_of(k)}
        for i, s in enumerate(states[1:], start=1):
            for d in range(v0.dim()):
                if d not in moving and s[k].shape[d] != v0.shape[d]:
                    raise ConfigError(
                        f"models disagree on parameter {k!r}: shape {tuple(v0.shape)} in model 0 vs "
                        f"{tuple(s[k].shape)} in model {i}, on axis {d} which no hidden-unit group indexes"
                    )


def _relative_change(new: Mapping[str, Tensor], old: Mapping[str, Tensor]) -> float:
    num = den = 0.0
    for k, v in new.items():
        if torch.is_floating_point(v) and old[k].shape == v.shape:
            o = old[k].to(torch.float64, copy=True)
            d = v.to(torch.float64, copy=True).sub_(o)  # ((v − o)²).sum() and (o²).sum(), in place on copies
            num += float(d.mul_(d).sum())
            den += float(o.mul_(o).sum())
    return math.sqrt(num / max(den, 1e-300))


def _target_sizes(spec: TransportSpec, target_width: int | Mapping[str, int] | None) -> dict[str, int]:
    sizes = dict(spec.sizes)
    if target_width is None:
        return sizes
    if isinstance(target_width, Mapping):
        unknown = set(target_width) - set(sizes)
        if unknown:
            raise ConfigError(f"target_width names unknown groups {sorted(unknown)}; groups are {spec.names}")
        sizes.update({k: int(v) for k, v in target_width.items()})
    else:
        sizes = {k: int(target_width) for k in sizes}
    if any(v < 1 for v in sizes.values()):
        raise ConfigError(f"target_width must be >= 1, got {target_width}")
    return sizes


# ---------------------------------------------------------------------------------------------------------------
# barycenters
# ---------------------------------------------------------------------------------------------------------------


def init_barycenter(
    state: Mapping[str, Tensor], spec: TransportSpec, sizes: Mapping[str, int], seed: int = 0
) -> tuple[dict[str, Tensor], Transports]:
    """``state`` re-supported on widths ``sizes`` (k-means merge when shrinking, split when growing)."""
    spec = spec.for_state(dict(state))
    transports: Transports = {}
    for g in spec.groups:
        n_s, n_t = g.size, int(sizes[g.name])
        if n_t == n_s:
            continue
        if n_t > n_s:  # target unit a copies source unit ⌊a·n_s/n_t⌋; S splits its outgoing weights evenly
            t = torch.zeros(n_t, n_s)
            t[torch.arange(n_t), (torch.arange(n_t) * n_s) // n_t] = 1.0
        else:
            feats = group_features(state, spec, g, transports, ("out",))
            assert feats is not None
            labels = _kmeans_labels(feats.double().numpy(), n_t, seed)
            t = torch.zeros(n_t, n_s)
            t[torch.as_tensor(labels), torch.arange(n_s)] = 1.0
            t = t / t.sum(1, keepdim=True)
        transports[g.name] = t
    return apply_transport(state, spec, transports), transports


def _kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels with every one of the ``k`` clusters non-empty."""
    _, labels = kmeans2(x, k, minit="++", seed=seed)
    counts = np.bincount(labels, minlength=k)
    for c in np.flatnonzero(counts == 0):  # refill an empty cluster from the largest one
        big = int(np.argmax(counts))
        j = int(np.flatnonzero(labels == big)[0])
        labels[j], counts[big], counts[c] = c, counts[big] - 1, 1
    return labels


# At most this many models are aligned to the barycenter at once (and no more than the caller's torch threads).
WB_WORKERS = 4


@single_threaded()
def wasserstein_barycenter(
    states: Sequence[Mapping[str, Tensor]],
    lam: Sequence[float],
    spec: TransportSpec,
    *,
    ref: int = 0,
    solver: Literal["emd", "sinkhorn"] = "emd",
    epsilon: float = 0.01,
    max_iter: int = 10,
    tol: float = 1e-4,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    reduce: Reducer | None = None,
) -> tuple[dict[str, Tensor], list[Transports], list[dict[str, Tensor]]]:
    """WB fusion (see module docstring): barycenter state, each model's transports and aligned state."""
    bary, _ = init_barycenter(states[ref], spec, sizes or spec.for_state(dict(states[ref])).sizes, seed)
    transports: list[Transports | None] = [None] * len(states)
    aligned: list[dict[str, Tensor]] = []
    states = [state_of(s) for s in states]
    specs = [spec.for_state(s) for s in states]
    workers = min(len(states), caller_threads(), WB_WORKERS)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    for _ in range(max(1, max_iter)):
        previous = aligned
        spec_bar = spec.for_state(bary)
        cache: dict[tuple[str, Any], Tensor] = {}  # the barycenter's rows: read once per iteration, not per model

        # the models are independent given the barycenter: ``workers`` at a time (torch and POT's emd release the
        # GIL), each with one intra-op thread (a lone worker's large products use the caller's threads)
        args = [
            (bary, spec_bar, s, sp, spec, transports[i], previous[i] if previous else None, solver, epsilon, cache)
            for i, (s, sp) in enumerate(zip(states, specs, strict=True))
        ]
        results = (
            [f.result() for f in [pool.submit(_wb_step, *a) for a in args]] if pool else [_wb_step(*a) for a in args]
        )
        transports = [t for t, _ in results]  # type: ignore[misc]
        aligned = [a for _, a in results]
        if reduce is None and all(a is p for a, p in zip(aligned, previous, strict=False)) and previous:
            new, change = bary, 0.0  # bary is already weighted_average(previous): the same bits
        else:
            new = (reduce or weighted_average)(aligned, lam, ref=ref)
            change = _relative_change(new, bary)
        bary = new
        if change < tol:
            break
    if pool is not None:
        pool.shutdown()
    return bary, transports, aligned  # type: ignore[return-value]


def _wb_step(
    bary: dict[str, Tensor],
    spec_bar: TransportSpec,
    state: dict[str, Tensor],
    spec_i: TransportSpec,
    spec: TransportSpec,
    old: Transports | None,
    previous: dict[str, Tensor] | None,
    solver: Literal["emd", "sinkhorn"],
    epsilon: float,
    cache: dict[tuple[str, Any], Tensor],
) -> tuple[Transports, dict[str, Tensor]]:
    """One model's WB step: ``ot_transport(bary, state, spec, solver=…, epsilon=…, init=old, sweeps=1)`` sharing
    ``cache`` (the barycenter's rows), and the model aligned by it (``previous`` when the transports are ``old``)."""
    new = _layerwise_ot(bary, state, spec_bar, spec_i, solver, epsilon, old, 1, cache)
    if previous is not None and old is not None and all(g in old and torch.equal(old[g], t) for g, t in new.items()):
        return new, previous  # same transports: the same aligned state as last iteration
    return new, apply_transport(state, spec, new)


@single_threaded()
def gromov_wasserstein_barycenter(
    states: Sequence[Mapping[str, Tensor]],
    lam: Sequence[float],
    spec: TransportSpec,
    *,
    ref: int = 0,
    max_iter: int = 100,
    tol: float = 1e-9,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    reduce: Reducer | None = None,
) -> tuple[dict[str, Tensor], list[Transports], list[dict[str, Tensor]]]:
    """GWB fusion (see module docstring): fused state, each model's transports and aligned state."""
    specs = [spec.for_state(dict(s)) for s in states]
    sizes = dict(sizes or specs[ref].sizes)
    init, _ = init_barycenter(states[ref], spec, sizes, seed)
    spec_bar = spec.resized(sizes)
    transports: list[Transports] = [{} for _ in states]
    for gi, g in enumerate(spec_bar.groups):
        dists = []
        for s, sp in zip(states, specs, strict=True):
            f = group_features(s, sp, sp.groups[gi], None, ("out",))
            dists.append(pairwise_sq_dist(f, f).sqrt().numpy())  # type: ignore[arg-type]
        f0 = group_features(init, spec_bar, g, None, ("out",))
        n = g.size
        p = np.full(n, 1.0 / n)
        _, log = ot.gromov.gromov_barycenters(
            n, dists, ps=[np.full(d.shape[0], 1.0 / d.shape[0]) for d in dists], p=p, lambdas=list(lam),
            loss_fun="square_loss", max_iter=max_iter, tol=tol, init_C=pairwise_sq_dist(f0, f0).sqrt().numpy(),
            random_state=seed, log=True,
        )  # fmt: skip
        for i, pi in enumerate(log["T"]):
            pi = np.asarray(pi)
            transports[i][g.name] = torch.from_numpy(pi / np.maximum(pi.sum(1, keepdims=True), 1e-300)).float()
    aligned = [apply_transport(s, spec, t) for s, t in zip(states, transports, strict=True)]
    return (reduce or weighted_average)(aligned, lam, ref=ref), transports, aligned


# ---------------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------------


@single_threaded()
def fuse(
    models: Sequence[Model],
    weights: Sequence[float] | None = None,
    method: Literal["average", "match", "wb", "gwb", "gw", "cca", "zip"] = "average",
    spec: TransportSpec | None = None,
    example_input: Any = None,
    *,
    template: nn.Module | None = None,
    solver: Literal["emd", "sinkhorn"] = "emd",
    epsilon: float = 0.01,
    max_iter: int | None = None,
    tol: float = 1e-4,
    target_width: int | Mapping[str, int] | None = None,
    init: int | None = None,
    bn_repair: Literal["auto", "reset", "repair"] | None = "auto",
    repair_data: Any = None,
    data: Any = None,
    bn_fold: bool = False,
    seed: int = 0,
    alpha: float | None = None,
    return_aligned: bool = False,
    reduce: Reducer | None = None,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Fuse ``models`` (modules, or state dicts with a ``template`` module / a ``spec``) into one state dict.

    ``init`` is the reference model's index (default: largest weight). ``max_iter``: WB outer iterations
    (default 10), weight-matching sweeps for ``match`` (100), GW barycenter iterations for ``gw`` (20).
    ``alpha``: ``gwb``'s structure/feature trade-off (default :data:`fedfuse.align.gw.DEFAULT_ALPHA`).
    ``bn_repair``: ``"auto"`` resets BatchNorm statistics on ``repair_data`` when given (otherwise the
    transported average of the running statistics is kept), ``"reset"``, ``"repair"`` (REPAIR, with or without
    BatchNorm: :mod:`fedfuse.align.repair`), or None. ``return_aligned``: also return every model aligned to
    the fused one (what federated REPAIR sends back to each client).
    ``data``: a batch of inputs for the methods in :data:`DATA_METHODS` (activation-based alignment); it is
    also ``repair_data`` when that is not given. ``cca`` (CCA Merge, :mod:`fedfuse.merge.cca`) and ``zip``
    (ZipIt!-style zipping, :mod:`fedfuse.merge.zip`) merge by linear maps of the units fitted on ``data``; they
    fold BatchNorm themselves (``bn_fold`` is implied) and keep the reference's widths.
    ``bn_fold`` (BN-aware alignment, needs a module): every BatchNorm that reads a Linear/Conv's output is folded
    into it first (:func:`fedfuse.align.bn.fold_bn`: per unit ``W ← γW/√(σ²+ε)``, shift ``β + γ(b−μ)/√(σ²+ε)``,
    the unit's eval-mode affine map), so the alignment cost and the average compare the functions the units
    compute rather than raw ``W`` whose scale BatchNorm makes arbitrary; afterwards the fused model and every
    aligned parent are unfolded (:func:`fedfuse.align.bn.unfold_bn`, exact in eval mode) onto BN parameters
    ``(γ, β, σ²)``: the λ-average of the aligned parents', resp. each parent's own. *(our reading: OTFusion /
    Git Re-Basin / REPAIR align raw parameters; folding is the standard inference-time BN fold.)*
    ``reduce(aligned, λ, ref=...)`` replaces the weighted average of the aligned models (WB/GW: in every
    barycenter iteration), e.g. :func:`fedfuse.robust.reducer` for robust aggregation in the aligned space.
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not supported; allowed: {', '.join(METHODS)}")
    if not models:
        raise ConfigError("fuse needs at least one model")
    if method in DATA_METHODS and data is None:
        raise ConfigError(f"method={method!r} aligns by activations and needs data= (a batch of inputs)")
    repair_data = data if repair_data is None else repair_data
    states = [state_of(m) for m in models]
    lam = normalise_weights(weights, len(states))
    originals, pairs = states, []
    ref = int(np.argmax(lam)) if init is None else int(init)
    if not 0 <= ref < len(states):
        raise ConfigError(f"init={init} is not a model index (0..{len(states) - 1})")
    check_lora_states(states)  # PEFT adapters: same targets and ranks, else one line
    _check_states(states, same_shapes=method in ("average", "match") or method in DATA_METHODS, method=method)
    module = template if template is not None else next((m for m in models if isinstance(m, nn.Module)), None)
    if bn_fold and method not in DATA_METHODS:  # cca/zip fold BatchNorm themselves
        if module is None:
            raise ConfigError("bn_fold=True needs an nn.Module (pass template=) to find the BatchNorm layers")
        pairs = fold_pairs(module, example_input)
        states = [fold_bn(s, pairs) for s in states]

    aligned: list[dict[str, Tensor]] = states
    transports: list[Transports] = [{} for _ in states]
    average = reduce or weighted_average
    if method == "average":
        if target_width is not None:
            raise ConfigError("target_width needs method='wb', 'gwb' or 'gw'")
        fused = average(states, lam, ref=ref)
    else:
        try:
            spec = resolve_spec(spec, module, example_input)
        except InputShapeError:  # no input shape to infer (token ids): the activation batch fixes it
            if example_input is not None or not isinstance(data, Tensor) or len(data) < 2:
                raise
            spec = resolve_spec(spec, module, data[:2])
        specs = [spec.for_state(s) for s in states]
        _check_free_axes(states, specs)
        if method in DATA_METHODS:
            if target_width is not None:
                raise ConfigError(f"target_width does not apply to method={method!r} (it keeps the reference's widths)")
            from fedfuse.merge.activation import merge_by_activations

            fused, aligned = merge_by_activations(method, states, lam, spec, module, data, ref)  # type: ignore[arg-type]
        elif method == "match":
            if target_width is not None:
                raise ConfigError("target_width needs method='wb', 'gwb' or 'gw'")
            transports = [
                {} if i == ref else weight_matching(states[ref], s, spec, max_iter=max_iter or 100, seed=seed)
                for i, s in enumerate(states)
            ]
            aligned = [apply_transport(s, spec, t) if t else s for s, t in zip(states, transports, strict=True)]
            fused = average(aligned, lam, ref=ref)
        elif method == "wb":
            sizes = _target_sizes(specs[ref], target_width)
            fused, transports, aligned = wasserstein_barycenter(
                states, lam, spec, ref=ref, solver=solver, epsilon=epsilon, max_iter=max_iter or 10, tol=tol,
                sizes=sizes, seed=seed, reduce=reduce,
            )  # fmt: skip
        elif method == "gwb":
            sizes = _target_sizes(specs[ref], target_width)
            wb = wasserstein_barycenter(
                states, lam, spec, ref=ref, solver=solver, epsilon=epsilon, max_iter=max_iter or 10, tol=tol,
                sizes=sizes, seed=seed, reduce=reduce,
            )  # fmt: skip
            fused, transports, aligned = fused_gromov_wasserstein_barycenter(
                states, lam, spec, wb[:2], alpha=DEFAULT_ALPHA if alpha is None else alpha, ref=ref,
                max_iter=max_iter or 10, reduce=reduce,
            )  # fmt: skip
        else:
            sizes = _target_sizes(specs[ref], target_width)
            fused, transports, aligned = gromov_wasserstein_barycenter(
                states, lam, spec, ref=ref, max_iter=max_iter or 20, sizes=sizes, seed=seed, reduce=reduce
            )
        if method not in DATA_METHODS:  # their parents come back folded; tests pin permuted-copy recovery
            check_alignment(states, aligned, spec, ref, method)
    if pairs:  # back to ordinary BN parameters: the aligned parents' own, and their λ-average for the fused model
        norms = [apply_transport(o, spec, t) if t else o for o, t in zip(originals, transports, strict=True)]
        aligned = [unfold_bn(a, pairs, n) for a, n in zip(aligned, norms, strict=True)]
        fused = unfold_bn(fused, pairs, weighted_average(norms, lam, ref=ref))
    fused = _post_norm(fused, aligned, lam, module, bn_repair, repair_data)
    return (fused, aligned) if return_aligned else fused


class AlignmentError(RuntimeError):
    """Alignment produced a result that cannot be right (see :func:`check_alignment`)."""


def _float_keys(a: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in a.items() if torch.is_floating_point(v) and v.numel()]


def _same_sums(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Every float tensor of ``a`` has ``b``'s shape and sum: necessary for the same values in some order (cheap)."""
    for k in _float_keys(a):
        x, y = a[k], b[k]
        if x.shape != y.shape:
            return False
        sx, sy = x.sum(dtype=torch.float64), y.sum(dtype=torch.float64)  # accumulated in float64, no copies
        if not torch.allclose(sx, sy.to(sx.device), rtol=1e-6, atol=1e-9 * x.numel()):
            return False
    return True


def _identical(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Every float tensor of ``a`` equals ``b``'s bit for bit (stops at the first difference)."""
    return all(k in b and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in _float_keys(a))


def _same_up_to_reordering(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Every float tensor of ``a`` holds the same values as ``b``'s, in some order (sums first: cheap)."""
    if not _same_sums(a, b):
        return False
    for k in _float_keys(a):
        x, y = a[k].flatten().sort().values, b[k].flatten().sort().values
        if not torch.allclose(x, y, rtol=1e-6, atol=1e-8):
            return False
    return True


def check_alignment(
    states: Sequence[Mapping[str, Tensor]],
    aligned: Sequence[Mapping[str, Tensor]],
    spec: TransportSpec,
    ref: int,
    method: str = "match",
    tol: float = 1e-4,
) -> None:
    """No silent wrong answer after alignment; raises :class:`AlignmentError` or ConfigError.

    (a) Every aligned state is consistent with the spec: each group's members agree on its width and
    concatenated segments add up (``spec.for_state``). (b) Models holding the same values up to reordering
    (permuted copies) must land on exactly the reference's aligned state: ``max|θ_i − θ_ref| ≤ tol·max|θ_ref|``
    over every float tensor — so the fused model computes the reference's function.
    """
    for a in aligned:
        sp = spec.for_state(dict(a))
        for g in sp.groups:
            for m in g.members:
                if m.segments is not None:
                    segment_range(m, sp.sizes, a[m.key].shape[m.axis])  # raises if segments do not add up
    if method in ("gw", "gwb"):
        return  # GW / fused-GW couplings need not be permutations even for permuted copies
    for i, s in enumerate(states):
        # aligned exactly onto the reference (a recovered permuted copy): nothing can differ
        if i == ref or _identical(aligned[ref], aligned[i]) or not _same_sums(s, states[ref]):
            continue
        worst, where = 0.0, ""
        for k, v in aligned[ref].items():
            if torch.is_floating_point(v) and v.numel() and not torch.equal(aligned[i][k], v):
                d = float((aligned[i][k].double() - v.double()).abs().max()) / max(float(v.abs().max()), 1e-12)
                if d > worst:
                    worst, where = d, k
        # the sorting test (O(n log n), most of a permuted copy's check) only where alignment left a difference
        if worst > tol and _same_up_to_reordering(s, states[ref]):
            raise AlignmentError(
                f"method={method!r}: model {i} holds model {ref}'s weights in another order, but after alignment "
                f"{where!r} differs by {worst:.3g} (relative); the transport spec or the solver missed a symmetry"
            )


def _post_norm(
    fused: dict[str, Tensor],
    aligned: list[dict[str, Tensor]],
    lam: list[float],
    module: nn.Module | None,
    mode: str | None,
    data: Any,
) -> dict[str, Tensor]:
    if mode not in (None, "none", "auto", "reset", "repair"):
        raise ConfigError(f"bn_repair={mode!r} is not supported; allowed: None, 'auto', 'reset', 'repair'")
    if mode == "auto":
        mode = "reset" if data is not None and module is not None and has_batch_norm(module) else None
    if mode in (None, "none"):
        return fused
    if data is None:
        raise ConfigError(f"bn_repair={mode!r} needs repair_data= (an input batch)")
    if module is None:
        raise ConfigError(f"bn_repair={mode!r} needs an nn.Module (pass template= with the fused widths)")
    net = _load(module, fused)
    if mode == "reset":
        reset_bn_stats(net, data)
    else:
        repair(net, [_load(module, a) for a in aligned], data, lam)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _load(module: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    net = copy.deepcopy(module)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"the template module does not have the fused widths; pass template= ({exc})") from exc
    return net


@single_threaded()
def align(
    model_a: Model,
    model_b: Model,
    method: Literal["weight", "activation", "ot"] = "weight",
    spec: TransportSpec | None = None,
    example_input: Any = None,
    *,
    batch: Any = None,
    as_module: bool = False,
    **kwargs: Any,
) -> dict[str, Tensor] | nn.Module:
    """B re-indexed onto A (``weight``/``activation`` matching, or layer-wise ``ot``); a state dict, or with
    ``as_module=True`` a copy of ``model_a`` (an ``nn.Module``) holding B's transported weights."""
    ex = example_input if example_input is not None else batch
    spec = resolve_spec(spec, model_a if isinstance(model_a, nn.Module) else model_b, ex)
    if method == "weight":
        t = weight_matching(model_a, model_b, spec, **kwargs)
    elif method == "activation":
        t = activation_matching(model_a, model_b, spec, batch, **kwargs)  # type: ignore[arg-type]
    elif method == "ot":
        t = ot_transport(model_a, model_b, spec, batch=batch, **kwargs)
    else:
        raise ConfigError(f"method={method!r} is not supported; allowed: 'weight', 'activation', 'ot'")
    state = apply_transport(model_b, spec, t)
    if not as_module:
        return state
    if not isinstance(model_a, nn.Module):
        raise ConfigError("as_module=True needs model_a to be an nn.Module")
    return _load(model_a, state)
