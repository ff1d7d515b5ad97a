"""Solvers: one transport per group, mapping model B's hidden units onto model A's (``T``: ``n_a × n_b``).

* :func:`weight_matching` — Git Re-Basin coordinate descent: for a group ``g`` maximise
  ``⟨P, Σ_m W_a,m W̃_b,mᵀ⟩`` over permutations ``P`` (one linear assignment), where the sum runs over
  every (parameter, axis) member of ``g`` and ``W̃_b`` has all *other* axes already permuted.
* :func:`activation_matching` — ``P`` maximising the correlation of hidden activations on a batch.
* :func:`ot_transport` — layer-wise OT (OTFusion / WB step): in topological order, model B's incoming
  weights are re-indexed by the couplings already found, ``C[a, b] = ‖W_a[a] − W̃_b[b]‖²`` (biases and
  norm parameters are extra columns), and ``Π`` solves OT with uniform marginals (exact ``ot.emd`` or
  entropic ``ot.sinkhorn``); ``T = Π / Π·1``.

A spec with head sets (:class:`~fedfuse.align.spec.Blocks`) is solved on its merged view: a head set's slots are
solved together, two-level (best within-head transport per head pair, then one head permutation or plan over the
head-pair costs: :mod:`fedfuse.align.heads`), and its transports are keyed by the merged groups.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fedfuse.align.heads import (
    block_sigma,
    head_assignment,
    head_couplings,
    head_sets,
    merge_acts,
    merged_names,
    merged_spec,
    to_merged,
)
from fedfuse.align.resolve import InputShapeError, infer_example_input, resolve_spec  # re-exported
from fedfuse.align.shortcuts import _exact_rows, _is_permuted_copy
from fedfuse.align.spec import Group, TransportSpec, segment_range, trace_values
from fedfuse.align.terms import _budget_cache, _budget_rows, _Once, _Score, _Term
from fedfuse.align.transport import Transports, member_features, permutation_index, state_of
from fedfuse.errors import ConfigError
from fedfuse.state import single_threaded, threaded_matmul

__all__ = [
    "weight_matching",
    "activation_matching",
    "ot_transport",
    "ot_coupling",
    "resolve_spec",
    "infer_example_input",
    "InputShapeError",
    "group_features",
    "capture_activations",
    "pairwise_sq_dist",
]

Model = nn.Module | Mapping[str, Tensor]


def group_features(
    state: Mapping[str, Tensor],
    spec: TransportSpec,
    group: Group,
    transports: Mapping[str, Tensor] | None = None,
    roles: tuple[str, ...] = ("out", "in"),
    require: bool = False,
) -> Tensor | None:
    """Concatenated ``(n, D)`` features of ``group``'s members with the given roles (see ``member_features``)."""
    feats = []
    for m in group.members:
        if m.role in roles:
            f = member_features(state, spec, group, m, transports, require)
            if f is not None:
                feats.append(f)
    return torch.cat(feats, dim=1) if feats else None


def pairwise_sq_dist(x: Tensor, y: Tensor) -> Tensor:
    """``C[a, b] = ‖x_a − y_b‖²`` as one matrix product ``‖x‖² + ‖y‖² − 2 x yᵀ`` (returned float64, clamped ≥ 0);
    in float32, or in float64 where float32 overflows (features beyond ~10¹⁹, e.g. a model scaled by 10³⁰)."""

    def sq(a: Tensor, b: Tensor) -> Tensor:
        return (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * threaded_matmul(a, b.T)

    c = sq(x.float(), y.float())
    if not bool(torch.isfinite(c).all()) and bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all()):
        c = sq(x.double(), y.double())
    return c.double().clamp_min_(0.0)


def ot_coupling(cost: Tensor | np.ndarray, solver: str = "emd", epsilon: float = 0.01) -> Tensor:
    """Row-stochastic transport ``T = Π / Π·1`` of OT between uniform measures under ``cost`` (n_t × n_s);
    ``Π`` from :func:`ot_plan`."""
    pi = ot_plan(cost, solver, epsilon)
    return torch.from_numpy(pi / np.maximum(pi.sum(1, keepdims=True), 1e-300)).float()


def ot_plan(cost: Tensor | np.ndarray, solver: str = "emd", epsilon: float = 0.01) -> np.ndarray:
    """The plan ``Π`` (total mass 1) of OT between uniform measures under ``cost`` (n_t × n_s).

    ``solver="emd"``: exact network simplex (``ot.emd``); ``"sinkhorn"``: entropic OT (``ot.sinkhorn``,
    log-domain for ε < 1/600) with regulariser ``epsilon`` relative to the cost's range
    (the cost is mapped to [0, 1] first; a constant shift does not change any OT plan).
    """
    c = cost.detach().cpu().double().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    if not np.isfinite(c).all():  # POT would only warn ("problem infeasible") and return a plan of zeros
        raise ConfigError(
            f"the alignment cost has {int((~np.isfinite(c)).sum())} non-finite entries of {c.size}: a model holds "
            "non-finite values or ones too large to compare; allowed: finite weights (and activations)"
        )
    n_t, n_s = c.shape
    a, b = np.full(n_t, 1.0 / n_t), np.full(n_s, 1.0 / n_s)
    if solver == "emd":
        pi = ot.emd(a, b, c, numItermax=1_000_000, check_marginals=False, center_dual=False)
    elif solver == "sinkhorn":
        if not epsilon > 0:
            raise ConfigError(f"epsilon={epsilon} must be > 0 for solver='sinkhorn'")
        lo, hi = float(c.min()), float(c.max())
        c = (c - lo) / (hi - lo if hi > lo else 1.0)  # OT plans ignore a constant shift; ε is relative to the range
        # Subtracting a row-wise then a column-wise minimum changes only the duals, not the plan, and leaves a 0 in
        # every row and column, so exp(−c/ε) never underflows a whole row/column in float64 while ε ≥ 1/700: plain
        # (vectorised) Sinkhorn is then safe, log-domain Sinkhorn below. Stop test: ‖Π1ᵀ − b‖ ≤ 1e-3·‖b‖ (rows are
        # renormalised below). Measured on 512×512 WB couplings at ε = 0.01: the costs of WB iterations ≥ 2 (model vs
        # the blurred barycenter) need ~3000 iterations for 1e-4 but ~370 for 1e-3, and the 1e-3 plan is within
        # 1.3e-3 (L1 per row) of the converged one. The previous setting (log-stabilised iterations below ε = 0.02,
        # absolute tolerance 1e-6, 1000-iteration cap) mostly stopped at the cap, unconverged (10 s per 2-model
        # MLP-512 WB, 45 s on a loaded machine).
        c = c - c.min(1, keepdims=True)
        c = c - c.min(0, keepdims=True)
        method = "sinkhorn" if epsilon >= 1.0 / 600 else "sinkhorn_log"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
            pi = ot.sinkhorn(
                a, b, c, reg=float(epsilon), method=method, numItermax=2000, stopThr=1e-3 * float(np.linalg.norm(b))
            )
        if not np.isfinite(pi).all():
            raise ConfigError(f"Sinkhorn produced non-finite couplings at epsilon={epsilon}; use a larger epsilon")
    else:
        raise ConfigError(f"solver={solver!r} is not supported; allowed: 'emd', 'sinkhorn'")
    return np.asarray(pi)


def capture_activations(model: nn.Module, spec: TransportSpec, batch: Any) -> dict[str, Tensor]:
    """``(n, samples)`` hidden activations per group (groups without an observable site are omitted).

    Sites are the inputs of the layers that consume the group (post-activation values); a group read
    at several sites (residual streams) concatenates them along the sample axis.
    """
    if batch is None:
        raise ConfigError("activation-based alignment needs batch= (an input batch)")
    _, values = trace_values(model, batch)
    spec = spec.for_state(state_of(model))
    sizes = spec.sizes
    acts: dict[str, Tensor] = {}
    for g in spec.groups:
        parts = []
        for site in g.sites:
            v = values.get(site.node)
            if not isinstance(v, Tensor):
                continue
            x = v.detach().movedim(site.dim, 0)
            block, off, n = segment_range(site, sizes, x.shape[0])
            parts.append(x.reshape(block, site.expand, -1)[off : off + n].reshape(n, -1))
        if parts:
            acts[g.name] = torch.cat(parts, dim=1).float()
    return acts


def _lap_permutation(score: np.ndarray) -> Tensor:
    """0/1 matrix ``P`` (n × n) maximising ``Σ_a score[a, P(a)]`` (``linear_sum_assignment``)."""
    rows, cols = linear_sum_assignment(score, maximize=True)
    p = torch.zeros(score.shape, dtype=torch.float32)
    p[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
    return p


def _specs(
    spec: TransportSpec, sa: Mapping[str, Tensor], sb: Mapping[str, Tensor], equal: bool, what: str
) -> tuple[TransportSpec, TransportSpec]:
    spec_a, spec_b = spec.for_state(sa), spec.for_state(sb)
    if equal and spec_a.sizes != spec_b.sizes:
        diff = {k: (spec_a.sizes[k], spec_b.sizes[k]) for k in spec_a.sizes if spec_a.sizes[k] != spec_b.sizes[k]}
        raise ConfigError(f"{what} needs equal widths; groups differ (a, b): {diff}. Use ot_transport / method='wb'")
    return spec_a, spec_b


@single_threaded()
def weight_matching(
    model_a: Model,
    model_b: Model,
    spec: TransportSpec | None = None,
    *,
    example_input: Any = None,
    max_iter: int = 100,
    seed: int = 0,
    init: Mapping[str, Tensor] | None = None,
    frozen: Iterable[str] = (),
    return_iterations: bool = False,
    start: Literal["greedy", "identity"] = "greedy",
) -> Transports | tuple[Transports, int]:
    """Permutations ``P_g`` (``n × n``, 0/1) mapping B onto A: ``apply_transport(B, spec, P) ≈ A``.

    Coordinate descent over groups in a seeded random order; each step solves
    ``max_P ⟨P, Σ_m A_m B̃_mᵀ⟩`` with ``linear_sum_assignment``; stops when a full sweep improves nothing
    or after ``max_iter`` sweeps. ``frozen`` groups keep their ``init`` permutation.

    ``start`` (groups not in ``init``): ``"greedy"`` solves the groups once shallow → deep, each from the
    members whose other axes are already solved (a layer-wise matching; it recovers a permuted copy by
    itself). Measured on random-init pairs (benchmarks/speed.py): fewer sweeps (CIFAR VGG11 23 → 3,
    ResNet-18 6 → 2, vgg11_bn 12 → 2; resnet50 15 → 18) and a higher objective ``Σ⟨A, P·B⟩``, except
    the small ResNet-20 of the tests (0.02 % lower). ``"identity"`` starts every group at ``I`` (Git
    Re-Basin's plain start).

    With ``return_iterations=True`` returns ``(perms, sweeps)``: the number of full sweeps run, the last
    (non-improving) one included, so 1 means the initial permutations were already a fixed point.

    Each member's term ``C_m = A_m B̃_mᵀ`` is cached with the permutations of B's other axes it was built
    with and only rebuilt (or corrected by a low-rank update, when few units moved) after one of those
    changes; a group whose terms all stand as at its last step is not re-solved (the assignment would be
    the same). Terms with no other axis permuted (BatchNorm vectors, biases) are summed once per group as
    one product (:class:`_Score`). The result is the plain coordinate descent's
    (``_weight_matching_reference``) from the same start, up to the float64 summation order of the scores.
    """
    spec = resolve_spec(spec, model_a, example_input)
    sa, sb = state_of(model_a), state_of(model_b)
    spec_a, spec_b = _specs(spec, sa, sb, True, "weight_matching")
    if start not in ("greedy", "identity"):
        raise ConfigError(f"start={start!r} is not supported; allowed: 'greedy', 'identity'")
    frozen = set(frozen)
    if spec_a.blocks:  # head sets: solved on the merged view, keyed by its groups
        init, frozen = to_merged(spec_a, init or {}) or None, merged_names(spec_a, frozen)
        spec_a, spec_b = merged_spec(spec_a), merged_spec(spec_b)
    given = {k: permutation_index(v) for k, v in (init or {}).items()}
    if _REFERENCE or any(idx is None for idx in given.values()):
        return _weight_matching_reference(sa, sb, spec_a, spec_b, max_iter, seed, init, frozen, return_iterations)
    perms: dict[str, Tensor] = {g.name: torch.arange(g.size) for g in spec_a.groups}
    perms.update(given)  # type: ignore[arg-type]
    terms = {
        ga.name: [_Term(sa, sb, spec_a, spec_b, ga, gb, i) for i in range(len(ga.members))]
        for ga, gb in zip(spec_a.groups, spec_b.groups, strict=True)
    }
    _budget_cache(terms)
    budget = _Once(lambda: _budget_rows(terms))  # float64 row copies: only once a product is built
    scores = {name: _Score(ts) for name, ts in terms.items()}
    last: dict[tuple[str, ...], tuple[int, ...]] = {}  # the term versions each unit was last solved with
    names = [g.name for g in spec_a.groups if g.name not in frozen]
    sets = dict(head_sets(spec_a))  # merged names of a head set -> their heads' widths
    unit_of = {n: names_ for names_ in sets for n in names_}
    units = list(dict.fromkeys(unit_of.get(n, (n,)) for n in names))  # a head set's slots: one step
    verified: set[str] = set()
    if start == "greedy":
        perms.update(_greedy_start(terms, scores, names, frozen | set(given), perms, budget, verified, sets))
    rng = np.random.default_rng(seed)
    sweeps = 0
    if _EXACT and max_iter > 0 and _is_permuted_copy(sa, sb, spec_b, perms, verified):
        sweeps, max_iter = 1, 0  # a global maximum: the first sweep would move nothing (see _is_permuted_copy)
    if max_iter > 0:
        budget()
    for _ in range(max_iter):
        sweeps += 1
        progress = False
        for idx in rng.permutation(len(units)):
            unit = units[idx]
            for name in unit:
                for t in terms[name]:
                    t.refresh(perms)
            versions = tuple(t.version for name in unit for t in terms[name])
            if last.get(unit) == versions:  # same score as at this unit's last step: same (non-)move
                continue
            last[unit] = versions
            scs = [scores[name].value().numpy() for name in unit]
            if unit in sets:  # one head permutation for the slots, a permutation within each head pair
                value, new = head_assignment(scs, sets[unit])
            else:
                new = [linear_sum_assignment(scs[0], maximize=True)[1]]
                value = float(scs[0][np.arange(len(new[0])), new[0]].sum())
            cur = sum(
                float(sc[np.arange(sc.shape[0]), perms[n].numpy()].sum()) for n, sc in zip(unit, scs, strict=True)
            )
            if value - cur > 1e-9 * max(1.0, sum(float(np.abs(sc).sum()) for sc in scs)):
                for name, cols in zip(unit, new, strict=True):
                    perms[name] = torch.from_numpy(cols.astype(np.int64))
                progress = True
        if not progress:
            break
    out: Transports = {}
    for g in spec_a.groups:
        idx = perms[g.name]
        out[g.name] = init[g.name].float() if init and idx is given.get(g.name) else torch.eye(g.size)[idx]
    return (out, sweeps) if return_iterations else out


# ``_REFERENCE = True`` routes weight_matching to the plain implementation (benchmarks/speed.py measures both).
_REFERENCE = False


def _greedy_start(
    terms: Mapping[str, list[_Term]],
    scores: Mapping[str, _Score],
    names: list[str],
    solved: set[str],
    perms: dict[str, Tensor],
    budget: Callable[[], None] = lambda: None,
    verified: set[str] | None = None,
    sets: Mapping[tuple[str, ...], list[tuple[int, ...]]] | None = None,
) -> dict[str, Tensor]:
    """Layer-wise start: each group (shallow → deep) maximises the terms whose other axes are solved.
    ``budget`` runs before the first score product (see :func:`_budget_rows`); ``verified`` collects the
    parameters that :func:`_exact_rows` compared whole (B's, re-indexed, equal to A's). ``sets``: head sets
    (merged names -> head widths), solved together when their first slot comes."""
    perms, solved, out = dict(perms), set(solved), {}
    unit_of = {n: unit for unit in sets or {} for n in unit}
    for name in names:
        if name in solved:
            continue
        if name in unit_of:
            _greedy_heads(terms, scores, unit_of[name], sets[unit_of[name]], solved, perms, out, budget, verified)  # type: ignore[index]
            continue
        ready = [t for t in terms[name] if all(d in solved for d in t.deps)]
        solved.add(name)
        exact = _exact_rows(ready, perms) if ready and _EXACT else None
        if exact is not None:  # B's rows are A's, reordered: the unique optimum, found without the n × n product
            perms[name] = out[name] = exact
            if verified is not None:
                verified.update(t.key for t in ready if t.whole)
        elif ready:
            budget()
            for t in ready:
                t.refresh(perms)
            score = scores[name].value(ready).numpy()
            perms[name] = out[name] = torch.from_numpy(linear_sum_assignment(score, maximize=True)[1].astype(np.int64))
    return out


def _greedy_heads(
    terms: Mapping[str, list[_Term]],
    scores: Mapping[str, _Score],
    unit: tuple[str, ...],
    widths: list[tuple[int, ...]],
    solved: set[str],
    perms: dict[str, Tensor],
    out: dict[str, Tensor],
    budget: Callable[[], None],
    verified: set[str] | None,
) -> None:
    """:func:`_greedy_start`'s step for one head set: exact rows when every slot's are a block-structured
    reordering with one head permutation, else the two-level assignment on the ready terms."""
    ready = {n: [t for t in terms[n] if all(d in solved for d in t.deps)] for n in unit}
    solved.update(unit)
    if not any(ready.values()):
        return
    exact = [_exact_rows(ready[n], perms) if ready[n] and _EXACT else None for n in unit]
    sigmas = [block_sigma(e, w) if e is not None else None for e, w in zip(exact, widths, strict=True)]
    if all(s is not None for s in sigmas) and all((s == sigmas[0]).all() for s in sigmas):  # type: ignore[union-attr]
        for n, e in zip(unit, exact, strict=True):
            perms[n] = out[n] = e  # type: ignore[assignment]
            if verified is not None:
                verified.update(t.key for t in ready[n] if t.whole)
        return
    budget()
    scs = []
    for n in unit:
        for t in ready[n]:
            t.refresh(perms)
        size = len(perms[n])
        scs.append(scores[n].value(ready[n]).numpy() if ready[n] else np.zeros((size, size)))
    for n, cols in zip(unit, head_assignment(scs, widths)[1], strict=True):
        perms[n] = out[n] = torch.from_numpy(cols.astype(np.int64))


# Permuted-copy shortcuts (fedfuse.align.shortcuts: _exact_rows, _is_permuted_copy); False runs the plain products
# (the "before" of benchmarks/speed_copy.py).
_EXACT = True


def _weight_matching_reference(
    sa: Mapping[str, Tensor],
    sb: Mapping[str, Tensor],
    spec_a: TransportSpec,
    spec_b: TransportSpec,
    max_iter: int,
    seed: int,
    init: Mapping[str, Tensor] | None,
    frozen: Iterable[str],
    return_iterations: bool,
) -> Transports | tuple[Transports, int]:
    """The plain coordinate descent: every step rebuilds the group's whole ``(n, D)`` features of B."""
    perms: dict[str, Tensor] = {g.name: torch.eye(g.size) for g in spec_a.groups}
    perms.update({k: v.float() for k, v in (init or {}).items()})
    frozen = set(frozen)
    feats_a = {g.name: group_features(sa, spec_a, g) for g in spec_a.groups}
    groups_b = {g.name: g for g in spec_b.groups}
    names = [g.name for g in spec_a.groups if g.name not in frozen]
    sets = dict(head_sets(spec_a))
    unit_of = {n: unit for unit in sets for n in unit}
    units = list(dict.fromkeys(unit_of.get(n, (n,)) for n in names))
    rng = np.random.default_rng(seed)
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        progress = False
        for idx in rng.permutation(len(units)):
            unit = units[idx]
            scs = []
            for name in unit:
                fb = group_features(sb, spec_b, groups_b[name], perms)
                scs.append((feats_a[name].double() @ fb.double().T).numpy())  # type: ignore[union-attr]
            if unit in sets:
                new = [torch.eye(len(c))[torch.from_numpy(c)] for c in head_assignment(scs, sets[unit])[1]]
            else:
                new = [_lap_permutation(scs[0])]
            gain = sum(
                float((sc * p.double().numpy()).sum() - (sc * perms[n].double().numpy()).sum())
                for n, sc, p in zip(unit, scs, new, strict=True)
            )
            if gain > 1e-9 * max(1.0, sum(float(np.abs(sc).sum()) for sc in scs)):
                perms.update(zip(unit, new, strict=True))
                progress = True
        if not progress:
            break
    return (perms, sweeps) if return_iterations else perms


@single_threaded()
def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: TransportSpec | None = None,
    batch: Any = None,
    *,
    example_input: Any = None,
    max_iter: int = 100,
    seed: int = 0,
) -> Transports:
    """Permutations maximising ``Σ_a corr(act_a[a], act_b[P(a)])`` per group over ``batch`` (one LAP each).

    Groups whose activations are not observable in the fx graph (inner layers of a multi-layer
    ``nn.LSTM``) fall back to weight matching with the activation-matched groups frozen.
    """
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise ConfigError("activation_matching needs nn.Module models (it runs them on the batch)")
    spec = resolve_spec(spec, model_a, example_input if example_input is not None else batch)
    sa, sb = state_of(model_a), state_of(model_b)
    spec_a, _ = _specs(spec, sa, sb, True, "activation_matching")
    acts_a, acts_b = capture_activations(model_a, spec, batch), capture_activations(model_b, spec, batch)
    view = merged_spec(spec_a)  # head sets: their slots' heads stacked, solved two-level
    acts_a, acts_b = merge_acts(spec_a, acts_a), merge_acts(spec_a, acts_b)
    corr = {}
    for name in acts_a:
        xa, xb = _standardise(acts_a[name]), _standardise(acts_b[name])
        corr[name] = threaded_matmul(xa, xb.T).numpy() / xa.shape[1]
    perms: dict[str, Tensor] = {}
    for unit, widths in head_sets(view):  # a set with a slot unobserved is weight-matched whole
        if all(n in corr for n in unit):
            cols = head_assignment([corr.pop(n) for n in unit], widths)[1]
            perms.update({n: torch.eye(len(c))[torch.from_numpy(c)] for n, c in zip(unit, cols, strict=True)})
        for n in unit:
            corr.pop(n, None)
    perms.update({name: _lap_permutation(c) for name, c in corr.items()})
    if len(perms) < len(view.groups):
        perms = weight_matching(sa, sb, spec, max_iter=max_iter, seed=seed, init=perms, frozen=perms)
    return perms


def _standardise(x: Tensor) -> Tensor:
    x = x.double()
    x = x - x.mean(1, keepdim=True)
    return x / x.std(1, keepdim=True).clamp_min(1e-8)


@single_threaded()
def ot_transport(
    model_a: Model,
    model_b: Model,
    spec: TransportSpec | None = None,
    *,
    example_input: Any = None,
    solver: Literal["emd", "sinkhorn"] = "emd",
    epsilon: float = 0.01,
    cost: Literal["weight", "activation"] = "weight",
    batch: Any = None,
    init: Mapping[str, Tensor] | None = None,
    sweeps: int = 2,
) -> Transports:
    """Layer-wise OT transports ``T_g`` (``n_a × n_b``, row-stochastic) of B onto the target A.

    Groups are solved shallow → deep; B's incoming weights are first re-indexed by the transports found
    so far (the coupling is carried to the next layer). On the first sweep a member whose other axes
    belong to a group not yet solved (a residual's inner layer, an RNN's recurrent weights) is left
    out; later sweeps include every member with the current transports, and stop early when no
    transport changes. ``init`` (e.g. the previous WB iteration) counts as solved from the start.
    ``cost="activation"`` uses ``‖act_a[a] − act_b[b]‖²`` on ``batch`` (weights where unobservable).
    Rectangular (unequal widths) is allowed.
    """
    spec = resolve_spec(spec, model_a if isinstance(model_a, nn.Module) else model_b, example_input)
    sa, sb = state_of(model_a), state_of(model_b)
    spec_a, spec_b = _specs(spec, sa, sb, False, "ot_transport")
    acts_a = acts_b = {}
    if cost == "activation":
        if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
            raise ConfigError("cost='activation' needs nn.Module models (they are run on the batch)")
        acts_a, acts_b = capture_activations(model_a, spec, batch), capture_activations(model_b, spec, batch)
    elif cost != "weight":
        raise ConfigError(f"cost={cost!r} is not supported; allowed: 'weight', 'activation'")
    return _layerwise_ot(sa, sb, spec_a, spec_b, solver, epsilon, init, sweeps, {}, acts_a, acts_b)


def _layerwise_ot(
    sa: Mapping[str, Tensor],
    sb: Mapping[str, Tensor],
    spec_a: TransportSpec,
    spec_b: TransportSpec,
    solver: Literal["emd", "sinkhorn"],
    epsilon: float,
    init: Mapping[str, Tensor] | None,
    sweeps: int,
    cache_a: dict[tuple[str, Any], Tensor],
    acts_a: Mapping[str, Tensor] | None = None,
    acts_b: Mapping[str, Tensor] | None = None,
) -> Transports:
    """:func:`ot_transport` on states with their specs. ``cache_a`` keeps A's rows (per member, and
    concatenated per group and member set): A is the fixed target, so the WB step shares it across models.
    Head sets are solved on the merged views, two-level (:func:`~fedfuse.align.heads.head_couplings`)."""
    acts_a, acts_b = acts_a or {}, acts_b or {}
    if spec_b.blocks and spec_b.merged_heads is None:
        init = to_merged(spec_b, init) if init else init
        acts_a, acts_b = merge_acts(spec_a, acts_a), merge_acts(spec_b, acts_b)
        spec_a, spec_b = merged_spec(spec_a), merged_spec(spec_b)
    transports: dict[str, Tensor] = {k: v.float() for k, v in (init or {}).items()}
    sets_a, sets_b = dict(head_sets(spec_a)), dict(head_sets(spec_b))
    unit_of = {n: unit for unit in sets_a for n in unit}
    groups_b = {g.name: g for g in spec_b.groups}

    def cost(ga: Group, sweep: int) -> Tensor:
        name, gb = ga.name, groups_b[ga.name]
        if name in acts_a:
            return pairwise_sq_dist(acts_a[name], acts_b[name])
        require = sweep == 0 and init is None
        pairs = _paired_out_features(sa, spec_a, ga, sb, spec_b, gb, transports, require, cache_a)
        if not pairs:  # nothing solved yet feeds this group: use every member untransported
            pairs = _paired_out_features(sa, spec_a, ga, sb, spec_b, gb, transports, False, cache_a)
        key = (name, tuple(i for i, _, _ in pairs))
        if key not in cache_a:
            cache_a[key] = torch.cat([p[1] for p in pairs], 1)
        return pairwise_sq_dist(cache_a[key], torch.cat([p[2] for p in pairs], 1))

    by_name = {g.name: g for g in spec_a.groups}
    for sweep in range(max(1, sweeps)):
        changed = False
        done: set[str] = set()
        for ga in spec_a.groups:
            if ga.name in done:
                continue
            unit = unit_of.get(ga.name, (ga.name,))
            done.update(unit)
            if unit in sets_a:  # a head plan over the head pairs' costs, each pair's own plan inside
                costs = [cost(by_name[n], sweep).numpy() for n in unit]
                plan = lambda c: ot_plan(c, solver, epsilon)  # noqa: E731
                new = head_couplings(costs, sets_a[unit], sets_b[unit], plan)
            else:
                new = [ot_coupling(cost(ga, sweep), solver, epsilon)]
            for name, t in zip(unit, new, strict=True):
                old = transports.get(name)
                if old is None or old.shape != t.shape or not torch.allclose(old, t, atol=1e-6):
                    changed = True
                transports[name] = t
        if not changed and sweep > 0:
            break
    return transports


def _paired_out_features(
    sa: Mapping[str, Tensor],
    spec_a: TransportSpec,
    ga: Group,
    sb: Mapping[str, Tensor],
    spec_b: TransportSpec,
    gb: Group,
    transports: Mapping[str, Tensor],
    require: bool,
    cache_a: dict[tuple[str, Any], Tensor],
) -> list[tuple[int, Tensor, Tensor]]:
    """(member index, A rows, B rows with other axes transported) for each ``out`` member usable now."""
    pairs = []
    for i, (ma, mb) in enumerate(zip(ga.members, gb.members, strict=True)):
        if ma.role != "out":
            continue
        fb = member_features(sb, spec_b, gb, mb, transports, require)
        if fb is None:
            continue
        if (ga.name, i) not in cache_a:
            cache_a[(ga.name, i)] = member_features(sa, spec_a, ga, ma)  # type: ignore[assignment]
        pairs.append((i, cache_a[(ga.name, i)], fb))
    return pairs
