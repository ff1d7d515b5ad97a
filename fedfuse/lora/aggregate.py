"""Aggregating LoRA adapters of K clients: plain, exact, aligned and rank-heterogeneous.

Client i sends, per adapted layer, A_i (r_i × in) and B_i (out × r_i); its update of the frozen weight is
ΔW_i = s_i·B_i·A_i with s_i = alpha / r_i, or alpha / √r_i with ``scale="rslora"`` (``alpha=None``: s_i = 1);
rslora's s_i differ less across mixed ranks (2× rather than 4× between ranks 4 and 16). With weights
λ_i = n_i / Σ n_j the target of every rule is the mean update M = Σ_i λ_i s_i B_i A_i. Averaging the factors apart gives
s·B̄·Ā ≠ M in general (mean of products ≠ product of means); :func:`aggregation_error` measures the gap.

Every function takes adapter state dicts (built-in or PEFT keys, :func:`fedfuse.lora.layers.adapter_pairs`);
entries that are not adapters are averaged plainly (:func:`fedfuse.state.weighted_average`). Conv factors are
used as matrices (A: r × in·kh·kw, B: out × r) and returned in their own shapes. Sums run in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedfuse.errors import ConfigError
from fedfuse.lora.layers import adapter_pairs, lora_scale
from fedfuse.state import normalise_weights, weighted_average

__all__ = [
    "mean_products",
    "mean_update",
    "fedavg_lora",
    "svd_lora",
    "exact_lora",
    "aligned_lora",
    "flora_stack",
    "hetlora_pad",
    "pad_rank",
    "truncate_rank",
    "complete_rank",
    "aggregation_error",
]

State = dict[str, torch.Tensor]


def _scale(alpha: float | None, rank: int, scale: str = "standard") -> float:
    """s of a rank-``rank`` adapter (:func:`fedfuse.lora.layers.lora_scale`); 1 when ``alpha`` is None."""
    return 1.0 if alpha is None else lora_scale(alpha, rank, scale)


def _factors(state: Mapping[str, torch.Tensor], a_key: str, b_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A as r × in, B as out × r) in float64."""
    a, b = state[a_key].double(), state[b_key].double()
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])


def _shaped(like: torch.Tensor, matrix: torch.Tensor, rank_axis: int) -> torch.Tensor:
    """``matrix`` in the layout of ``like`` (a conv factor's trailing axes), with ``rank`` on ``rank_axis``."""
    shape = list(like.shape)
    shape[rank_axis] = matrix.shape[rank_axis]
    return matrix.reshape(shape).to(like.dtype)


def _others(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    keys = [k for k in states[0] if "lora_A" not in k and "lora_B" not in k]
    return weighted_average([{k: s[k] for k in keys} for s in states], weights) if keys else {}


def _check(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, tuple[str, str]]:
    if not states:
        raise ConfigError("no adapter states to aggregate")
    if len(weights) != len(states):
        raise ConfigError(f"{len(weights)} weights for {len(states)} adapter states")
    pairs = adapter_pairs(states[0])
    if not pairs:
        raise ConfigError("the states hold no LoRA adapters (no 'lora_A'/'lora_B' keys)")
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(states[0]):
            raise ConfigError(f"adapter state {i} has other keys than state 0")
    return pairs


def mean_products(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    alpha: float | None = None,
    scale: str = "standard",
) -> dict[str, torch.Tensor]:
    """Layer prefix → M = Σ_i λ_i s_i B_i A_i (float64, out × in), the update every rule aims at."""
    pairs = _check(states, weights)
    lam = normalise_weights(weights, len(states))
    out: dict[str, torch.Tensor] = {}
    for prefix, (ak, bk) in pairs.items():
        total = None
        for s, w in zip(states, lam, strict=True):
            a, b = _factors(s, ak, bk)
            term = (float(w) * _scale(alpha, a.shape[0], scale)) * (b @ a)
            total = term if total is None else total + term
        out[prefix] = total
    return out


def mean_update(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    start: Mapping[str, torch.Tensor],
    alpha: float | None = None,
    scale: str = "standard",
) -> dict[str, torch.Tensor]:
    """Layer prefix → U = G + Σ_i λ_i (s_i B_i A_i − T_i): the product G = s_R·B₀·A₀ of the global adapters
    ``start`` plus the mean of each client's change from what it was sent, T_i = the product of ``start`` at
    client i's rank (:func:`truncate_rank`: its first r_i components, the best rank-r_i part once ``start`` comes
    from an SVD). With one rank, T_i = G and U = M (:func:`mean_products`). With mixed ranks, M counts G's
    components beyond r_i as zero for a rank-r_i client (it never received them), so every round M shrinks them
    by the weight of the lower-rank clients; U keeps them and moves them only by what the clients changed."""
    pairs = _check(states, weights)
    lam = normalise_weights(weights, len(states))
    base = mean_products([start], [1.0], alpha, scale)
    out = {p: base[p].clone() for p in pairs}
    starts: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}  # truncated products, per tuple of layer ranks
    for s, w in zip(states, lam, strict=True):
        ranks = {p: s[ak].shape[0] for p, (ak, _) in pairs.items()}
        for p, (ak, _) in pairs.items():
            if ranks[p] > start[ak].shape[0]:
                raise ConfigError(f"{p!r}: a client's rank {ranks[p]} is above the global rank {start[ak].shape[0]}")
        key = tuple(ranks[p] for p in pairs)
        if key not in starts:
            sent = truncate_rank({k: start[k] for ab in pairs.values() for k in ab}, ranks, alpha, scale)
            starts[key] = mean_products([sent], [1.0], alpha, scale)
        own = mean_products([s], [1.0], alpha, scale)
        for p in pairs:
            out[p] += float(w) * (own[p] - starts[key][p])
    return out


def fedavg_lora(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], alpha: float | None = None
) -> State:
    """FedAvg on the factors (the baseline, e.g. FlowerTune): Ā = Σ λ_i A_i, B̄ = Σ λ_i B_i, apart.

    s·B̄·Ā differs from M = Σ λ_i s B_i A_i by the cross terms Σ_{i≠j} λ_i λ_j B_i A_j − ... (inexact).
    Needs one rank per layer across clients (:func:`hetlora_pad` for mixed ranks)."""
    pairs = _check(states, weights)
    for prefix, (ak, _) in pairs.items():
        ranks = {s[ak].shape[0] for s in states}
        if len(ranks) > 1:
            raise ConfigError(f"fedavg_lora needs one rank per layer; {prefix!r} has ranks {sorted(ranks)}")
    keys = [k for k in states[0] if "lora_A" in k or "lora_B" in k]
    return {**_others(states, weights), **weighted_average([{k: s[k] for k in keys} for s in states], weights)}


def _refactor(m: torch.Tensor, rank: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD M ≈ U_r Σ_r V_rᵀ split evenly: B = U_r Σ_r^½ / s, A = Σ_r^½ V_rᵀ (s·B·A = best rank-r M)."""
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, sv.numel())
    root = sv[:r].sqrt()
    b, a = u[:, :r] * root / s, root[:, None] * vh[:r]
    if r < rank:  # a layer smaller than the rank asked for: zero components (min(in, out) bounds the rank)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
    return a, b


Ranks = int | Mapping[str, int]  # one rank for every adapted layer, or one per layer prefix


def _target_rank(states: Sequence[Mapping[str, torch.Tensor]], prefix: str, ak: str, rank: Ranks | None) -> int:
    if isinstance(rank, Mapping):
        rank = rank.get(prefix)
    r = max(s[ak].shape[0] for s in states) if rank is None else rank
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"rank={rank!r} is out of range; allowed: an integer >= 1")
    return r


def svd_lora(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    rank: Ranks | None = None,
    alpha: float | None = None,
    scale: str = "standard",
    start: Mapping[str, torch.Tensor] | None = None,
) -> State:
    """M re-factorised at ``rank`` (per layer prefix when a mapping; default: the largest client rank) by truncated
    SVD: the best rank-r approximation of the mean update (Eckart–Young); exact when rank(M) <= r. Works for mixed
    client ranks (each client's s_i B_i A_i is summed before factorising); with ``start`` (the global adapters the
    clients were sent) the target is :func:`mean_update` U instead of M (the same for one rank)."""
    return exact_lora(states, weights, rank, alpha, scale, start)[0]


def exact_lora(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    rank: Ranks | None = None,
    alpha: float | None = None,
    scale: str = "standard",
    start: Mapping[str, torch.Tensor] | None = None,
) -> tuple[State, dict[str, torch.Tensor]]:
    """Exact aggregation (FedEx-LoRA, Singhal et al. 2024, with an SVD re-factorisation): the adapters
    (A', B') are the truncated SVD of M = Σ λ_i s_i B_i A_i at ``rank`` (s' = the scale of that rank), and the residual
    R = M − s'·B'·A' (per layer prefix, an out × in float64 matrix: reshape to the base weight) is what the
    caller folds into the frozen base weight: W + R + s'B'A' = W + M exactly. With ``start`` (the global adapters
    the clients were sent), the target is :func:`mean_update` U (= M for one rank; mixed ranks keep the global
    components a lower-rank client never received)."""
    pairs = _check(states, weights)
    if start is None:
        products = mean_products(states, weights, alpha, scale)
    else:
        products = mean_update(states, weights, start, alpha, scale)
    out, residuals = _others(states, weights), {}
    for prefix, (ak, bk) in pairs.items():
        r = _target_rank(states, prefix, ak, rank)
        s_out = _scale(alpha, r, scale)
        a, b = _refactor(products[prefix], r, s_out)
        out[ak], out[bk] = _shaped(states[0][ak], a, 0), _shaped(states[0][bk], b, 1)
        residuals[prefix] = products[prefix] - s_out * (b @ a)
    return out, residuals


def _align_to(a: torch.Tensor, b: torch.Tensor, a_ref: torch.Tensor, b_ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(Pᵀ·A·sign, B·P·sign) with P the permutation maximising Σ_k |cos(a_k, a'_k)|·|cos(b_k, b'_k)| over the
    rank-1 components b_k a_kᵀ (LAP), and each matched component's sign flipped jointly (b_k a_kᵀ unchanged) so
    that a_k points along its reference's."""
    eps = 1e-12
    na = a / (a.norm(dim=1, keepdim=True) + eps)
    nb = b / (b.norm(dim=0, keepdim=True) + eps)
    ra = a_ref / (a_ref.norm(dim=1, keepdim=True) + eps)
    rb = b_ref / (b_ref.norm(dim=0, keepdim=True) + eps)
    cos_a = ra @ na.T  # reference component l × client component k
    sim = cos_a.abs() * (rb.T @ nb).abs()
    from scipy.optimize import linear_sum_assignment  # here: every ClientApp imports this package (0.3 s+)

    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    order = torch.as_tensor(cols[np.argsort(rows)])
    sign = torch.sign(cos_a[torch.arange(len(order)), order])
    sign[sign == 0] = 1.0
    return a[order] * sign[:, None], b[:, order] * sign[None, :]


def aligned_lora(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    alpha: float | None = None,
    iterations: int = 2,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> State:
    """Rank-aligned FedAvg of the factors. The rank axis is a symmetry: (B·P, Pᵀ·A) gives the same update for
    any permutation P (and sign flips of a component's b and a together), so two clients can hold the same
    components in another order, which plain factor averaging mixes. Per layer, each client's components are
    matched to a reference (first ``reference``'s adapters of the same rank — in FL the global adapters every
    client started from — else the heaviest client; then the aligned average, ``iterations`` times) by
    :func:`scipy.optimize.linear_sum_assignment` on |cos| of the rank-1 components, signs fixed, then A and B are
    averaged apart as :func:`fedavg_lora` does. Needs one rank per layer (pad first for mixed ranks)."""
    pairs = _check(states, weights)
    lam = normalise_weights(weights, len(states))
    out = _others(states, weights)
    for prefix, (ak, bk) in pairs.items():
        factors = [_factors(s, ak, bk) for s in states]
        if len({a.shape[0] for a, _ in factors}) > 1:
            raise ConfigError(f"aligned_lora needs one rank per layer; {prefix!r} has mixed ranks")
        ref_a, ref_b = factors[int(np.argmax(lam))] if reference is None else _factors(reference, ak, bk)
        if ref_a.shape[0] != factors[0][0].shape[0]:
            raise ConfigError(f"aligned_lora: the reference's rank of {prefix!r} differs from the clients'")
        for _ in range(max(1, int(iterations))):
            aligned = [_align_to(a, b, ref_a, ref_b) for a, b in factors]
            ref_a = sum(float(w) * a for w, (a, _) in zip(lam, aligned, strict=True))
            ref_b = sum(float(w) * b for w, (_, b) in zip(lam, aligned, strict=True))
        out[ak], out[bk] = _shaped(states[0][ak], ref_a, 0), _shaped(states[0][bk], ref_b, 1)
    return out


def flora_stack(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    alpha: float | None = None,
    scale: str = "standard",
) -> State:
    """FLoRA (Wang et al. 2024): stack the clients' factors, A = [A_1; …; A_K] (Σr_i × in) and
    B = [λ_1 s_1 B_1, …, λ_K s_K B_K] (out × Σr_i), so B·A = M exactly, for any mix of ranks; the rank grows to
    Σ r_i. The result carries scale 1 (B·A is the update): the caller folds it into the base weight and starts
    fresh adapters, as FLoRA's clients do."""
    pairs = _check(states, weights)
    lam = normalise_weights(weights, len(states))
    out = _others(states, weights)
    for _prefix, (ak, bk) in pairs.items():
        factors = [_factors(s, ak, bk) for s in states]
        a = torch.cat([f[0] for f in factors], 0)
        b = torch.cat(
            [float(w) * _scale(alpha, f[0].shape[0], scale) * f[1] for w, f in zip(lam, factors, strict=True)], 1
        )
        out[ak], out[bk] = _shaped(states[0][ak], a, 0), _shaped(states[0][bk], b, 1)
    return out


def pad_rank(
    state: Mapping[str, torch.Tensor], rank: Ranks, alpha: float | None = None, scale: str = "standard"
) -> State:
    """Every adapter zero-padded to ``rank`` components (per layer prefix when a mapping), B rescaled so the update
    is unchanged: s_R·B'·A' = s_r·B·A (B' = [B·s_r / s_R, 0], A' = [A; 0])."""
    out = dict(state)
    for prefix, (ak, bk) in adapter_pairs(state).items():
        a, b = _factors(state, ak, bk)
        r, to = a.shape[0], rank[prefix] if isinstance(rank, Mapping) else rank
        if r > to:
            raise ConfigError(f"rank {r} of {prefix!r} is above the rank {to} to pad to")
        a = torch.cat([a, a.new_zeros(to - r, a.shape[1])], 0)
        ratio = _scale(alpha, r, scale) / _scale(alpha, to, scale)
        b = torch.cat([b * ratio, b.new_zeros(b.shape[0], to - r)], 1)
        out[ak], out[bk] = _shaped(state[ak], a, 0), _shaped(state[bk], b, 1)
    return out


def hetlora_pad(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    alpha: float | None = None,
    scale: str = "standard",
) -> State:
    """HetLoRA's aggregation (Cho et al. 2024) without its rank self-pruning: every client's factors zero-padded
    to the largest rank R (:func:`pad_rank`: s_R·B'·A' = s_i·B_i·A_i), then averaged apart as :func:`fedavg_lora`;
    clients take the first r_i components back (:func:`truncate_rank`)."""
    pairs = _check(states, weights)
    ranks = {p: max(s[ak].shape[0] for s in states) for p, (ak, _) in pairs.items()}
    padded = [_pad_layers(s, ranks, alpha, scale) for s in states]
    return fedavg_lora(padded, weights, alpha)


def _pad_layers(
    state: Mapping[str, torch.Tensor], ranks: Mapping[str, int], alpha: float | None, scale: str = "standard"
) -> State:
    out = dict(state)
    for prefix, (ak, bk) in adapter_pairs(state).items():
        out.update(pad_rank({ak: state[ak], bk: state[bk]}, ranks[prefix], alpha, scale))
    return out


def truncate_rank(
    state: Mapping[str, torch.Tensor],
    rank: int | Mapping[str, int],
    alpha: float | None = None,
    scale: str = "standard",
) -> State:
    """The first ``rank`` components of every adapter (per layer prefix when a mapping), B rescaled so the kept
    components' update is unchanged: s_r·B'·A' = s_R·B[:, :r]·A[:r] (B' = B[:, :r]·s_R / s_r)."""
    out = dict(state)
    for prefix, (ak, bk) in adapter_pairs(state).items():
        r = rank[prefix] if isinstance(rank, Mapping) else rank
        big = state[ak].shape[0]
        if r <= 0 or r > big:
            raise ConfigError(f"rank={r} for {prefix!r} is out of range; allowed: 1..{big}")
        out[ak] = state[ak][:r].clone()
        out[bk] = (state[bk][:, :r] * (_scale(alpha, big, scale) / _scale(alpha, r, scale))).to(state[bk].dtype)
    return out


def complete_rank(
    state: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor], alpha: float | None = None,
    scale: str = "standard",
) -> State:  # fmt: skip
    """A rank-r_i client's adapters completed to the rank R of ``full`` (the global adapters it got the first r_i
    components of, :func:`truncate_rank`): its own components (B rescaled to scale s_R), then ``full``'s components
    r_i..R, which it never received and so did not change. Then s_R·B'·A' − G = s_i·B_i·A_i − T_i exactly (G the
    global product, T_i its part the client received): every client's change, measured in one space against one
    model, the change :func:`mean_update` counts. :func:`truncate_rank` to r_i undoes it."""
    out = dict(state)
    for prefix, (ak, bk) in adapter_pairs(state).items():
        r, big = state[ak].shape[0], full[ak].shape[0]
        if r == big:
            continue
        if r > big:
            raise ConfigError(f"rank {r} of {prefix!r} is above the global rank {big}")
        a, b = _factors(state, ak, bk)
        fa, fb = _factors(full, ak, bk)
        a = torch.cat([a, fa[r:]], 0)
        b = torch.cat([b * (_scale(alpha, r, scale) / _scale(alpha, big, scale)), fb[:, r:]], 1)
        out[ak] = _shaped(full[ak], a, 0).to(state[ak].dtype)
        out[bk] = _shaped(full[bk], b, 1).to(state[bk].dtype)
    return out


def aggregation_error(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    aggregate: Mapping[str, torch.Tensor],
    alpha: float | None = None,
    residuals: Mapping[str, torch.Tensor] | None = None,
    out_scale: float | None = None,
    scale: str = "standard",
    target: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Layer prefix → ‖M − (s·B̄·Ā + R)‖_F: how far the aggregate's update (plus a residual R folded into the
    base, if any) is from the mean of the clients' updates M = Σ λ_i s_i B_i A_i, or from ``target`` (layer prefix →
    matrix, e.g. :func:`mean_update`'s U, already computed by the caller). ``aggregate`` carries scale
    s = ``out_scale``, default the scale of its rank (1 for :func:`flora_stack`'s output)."""
    products = mean_products(states, weights, alpha, scale) if target is None else target
    errors: dict[str, float] = {}
    for prefix, (ak, bk) in adapter_pairs(aggregate).items():
        a, b = _factors(aggregate, ak, bk)
        got = (_scale(alpha, a.shape[0], scale) if out_scale is None else out_scale) * (b @ a)
        if residuals is not None and prefix in residuals:
            got = got + residuals[prefix].double().reshape(got.shape)
        errors[prefix] = float((products[prefix] - got).norm())
    return errors
