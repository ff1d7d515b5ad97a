"""Round-level screening of client updates, before any aggregation (no Flower here).

``Δ_i = θ_i − θ_sent_i``; all bounds are relative to the round's own clients (the *lower median*, the
⌈n/2⌉-th smallest value, which fewer than half of the clients cannot move, and which stays honest with two
clients, one of them bad). Why relative and not absolute: update norms shrink as training converges and
depend on the learning rate, the local epochs and the architecture. In order:

1. ``examples-bound`` b > 0 (off by default): a claimed num-examples ``n_i > b · med(n)`` is rejected.
2. ``min-update-cosine`` (off by default): ``cos(Δ_i, median_i Δ_i)`` below it is rejected.
3. ``examples-cap`` c > 0: a claim is never trusted beyond ``c`` × the round's median:
   ``n_i ← min(n_i, c · med(n))`` (the aggregation weight). One client's weight share is then at most
   ``c / (c + n − 1)`` of a round of ``n`` otherwise median clients, whatever it claims. The reported local
   steps ``s_i`` (the work the norm bound allows for) are capped at ``c · q(s)``, ``q`` the ⌊0.7 n⌋-th smallest
   (at least the lower median, :func:`cap_scale`): under quantity skew one honest client holds 35–49 × the
   median's data and 15 × the upper quartile's (10 clients, α 0.3), and clipping its update to 10 × the
   median's steps cost 1.7 points; up to ⌈0.3 n⌉ clients claiming anything cannot raise ``q``.
4. ``duplicate-cosine`` t > 0 (0.99 by default): updates at cosine ``≥ t`` with each other as sent (the connected
   groups; updates of norm 0 form one) count as one client: each keeps ``w_i / |G|``, so a group weighs the mean of
   its members' claims; a group of half the clients or more is the round's consensus and keeps its weights.
   Omniscient colluders send one vector (``alie``, ``ipm``, ``adaptive``, ``evade``, ``lowkey``: cosine 0.999-1.0
   with each other), and their number then buys them no more say than one client's. Honest updates reached cosine
   0.944 (digits) and 0.950 (mnist1d) with each other at most, over 15-round clean runs (Dirichlet 0.1 and 1,
   quantity 0.3, IID; 3 seeds each), and honest updates that are nearly one vector lose nothing by sharing: their
   weighted mean is that vector. Colluders that add their own noise escape it (noise of a fifth of their norm,
   cosine 0.96 with each other, suffices); similarity cannot tell them from honest clients that hold the same
   class, which FoolsGold (Fung et al. 2020) meets with similarity over rounds, at the cost of honest IID clients.
5. ``update-norm-bound`` k > 0, relative to how much each client trained: with ``ν_i = ‖Δ_i‖ / s_i``
   (the norm per local step; a client that trains 40 × longer moves ~40 × further),
   ``‖Δ_i‖ > k_i · med(ν) · s_i`` is clipped to that norm (``clip``, the default: θ_i ← θ_sent + Δ_i ·
   bound/‖Δ_i‖, so an honest outlier still counts) or rejected (``reject``). Without reported steps the
   claimed num-examples stand in (steps ∝ examples at a fixed batch size and epochs). ``k_i = k`` without a
   trusted reference; with one (below), ``k_i = 1 + (k − 1) · clamp(cos(Δ_i, g₀) / 0.25, 0, 1)``: only an
   update that agrees with the server's own update may move further per step than the round's median client
   (a label-flipped client boosted 4 × sits at cosine −0.4…+0.3 with g₀, honest ones (Dirichlet, quantity) at
   −0.07…+0.7, 259 of 274 above +0.1; docs/robustness.md).
6. ``direction-guard median`` (the default): with ``r`` the coordinate-wise median of the Δ_i, each first
   scaled down to the round's median norm (unweighted, so neither a large claim nor a large norm moves it), the
   part of each update that points against it is removed: ``Δ_i ← Δ_i − min(0, ⟨Δ_i, r⟩/‖r‖²) · r``.
   An honest update keeps everything orthogonal to the consensus (its own data's direction) and any
   positive component; a sign-flipped, inner-product-manipulation (Xie et al. 2020) or "−mean" update
   loses its harmful component, and its weight is scaled by ``max(0, 1 + cos(Δ_i, r) / 0.5)`` (an update at
   cosine −0.5 or below keeps no weight, so neither its remainder nor its claim acts on the round). This is
   the trust-by-alignment idea of FLTrust (Cao et al. 2021) with the reference taken from the round's
   coordinate median instead of a labelled server batch, and projecting and down-weighting rather than
   zeroing, so honest non-IID updates (cosines down to −0.27 with the median) keep most of their say.

   With a trusted reference (``trusted-data`` N > 0, :mod:`fedfuse.trust`): ``r`` is the server's own update
   on N labelled examples instead, the weight factor is ``clamp(1 + (cos + b)/0.25, 0, 1)`` with the band
   ``b = 0.4`` (``TRUSTED_BAND``: no loss of weight down to cosine −0.4, none left at −0.65; an update the norm
   bound clipped gets no band, ``b = 0``), and per parameter tensor ``t`` only the part pointing against ``r`` beyond
   that band is removed: ``Δ_i[t] ← Δ_i[t] − min(0, p − p_b) · r[t]``, ``p = ⟨Δ_i[t], r[t]⟩/‖r[t]‖²`` and
   ``p_b = −b/√(1 − b²) · ‖Δ_i[t]⊥‖/‖r[t]‖`` the coefficient at which the tensor's cosine with ``r[t]`` is ``−b``
   (so with ``b = 0`` all of the part against ``r[t]``; per tensor because a boosted
   label flip can agree with ``r`` overall and still pull the output layer against it). Colluders can pull the
   coordinate median towards them (measured: three identical ``−μ`` updates of ten Dirichlet-0.3 clients at
   cosine +0.26 with it, honest ones down to −0.23); they cannot move the server's update.

7. ``influence-z`` z > 0 (2 by default), with a trusted reference and the server's per-example ``losses``: the
   influence test (:mod:`fedfuse.influence`). An update whose influence ``w_i · ‖Δ_i‖`` (after 3-6) exceeds 2 × the
   round's median is cut to the median's where that lowers the loss on the server's examples by more than z
   standard errors; each cut update then gets its weight back unless that raises the loss significantly, and one
   whose full size does keeps a tenth of the median's influence (unless that raises the loss significantly).
   It is what stops a liar at the caps (``--attack evade``: coherent junk inside the band, half a round's weight,
   10 × the median's norm budget), which 1-6 let through to chance. The same test runs on updates whose claimed
   weight alone exceeds 2 × the median's (cut to the median's weight): a free rider (``--attack freeride``) sends
   nothing and dilutes the rest. Then, whatever an update's size, its own step
   ``w_i Δ_i / Σ_j w_j`` (the others not rescaled) is put in the aggregate only where it does not raise that loss by
   more than z standard errors; one that does keeps a tenth of the median's influence (``--attack lowkey``: the same
   junk claiming like a median client).

Checks 2, 4, 6 and 7 need three clients (with fewer there is nothing to compare with).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedfuse.errors import ConfigError
from fedfuse.influence import claim_test, influence_test
from fedfuse.screening_options import (
    DIRECTION_GUARDS,
    DUPLICATE_COSINE,
    EXAMPLES_BOUND,
    EXAMPLES_CAP,
    INFLUENCE_Z,
    MIN_UPDATE_COSINE,
    NORM_ACTIONS,
    ROBUST_OPTIONS,
    SCREENING_OPTIONS,
    UPDATE_NORM_BOUND,
)
from fedfuse.validation import single_threaded, valid_variance

__all__ = [
    "NORM_ACTIONS",
    "DIRECTION_GUARDS",
    "UPDATE_NORM_BOUND",
    "EXAMPLES_CAP",
    "EXAMPLES_BOUND",
    "MIN_UPDATE_COSINE",
    "DUPLICATE_COSINE",
    "SCREENING_OPTIONS",
    "ROBUST_OPTIONS",
    "ScreeningConfig",
    "Screening",
    "screen_updates",
    "lower_median",
    "cap_scale",
    "update_norm",
    "diverged_updates",
    "nonfinite_reason",
    "state_norm",
    "RoundScreen",
    "screen_round",
    "screen_apart_claims",
]

State = Mapping[str, Tensor]
LossFn = Callable[[State], Tensor]  # a model state -> its per-example losses on the server's examples
log = logging.getLogger("fedfuse")
TRUST_SLOPE = 0.5  # direction guard: weight × max(0, 1 + cos/0.5) for an update against the round
TRUSTED_SLOPE = 0.25  # the same against a trusted reference, below its band (no weight left 0.25 below the band)
# against a trusted reference an update keeps its whole weight, and each tensor everything down to, this far below
# orthogonal (cosine −0.4); only what points further against g₀ is projected away, and the weight is gone at −0.65.
# Why so wide: g₀ from 100 examples is noisy, and honest non-IID updates scatter widely around it (−0.38 … +0.78 in
# one digits round, Dirichlet 0.1): an honest client that alone holds a class sits far below the rest, and taking its
# weight or projecting its tensors to 0 (the rule until 2026-12-07) lost that class (20 seeds, 15 rounds: −3.2 ± 1.0
# points on digits Dirichlet 0.1 against every defence off; −0.8 ± 0.5 with this band, benchmarks/clean_cost.py).
# Not for an update the norm bound clipped (band 0: a boosted label flip sits near cosine 0 and is oversized)
TRUSTED_BAND = 0.4


def lower_median(values: Sequence[float]) -> float:
    """The ⌈n/2⌉-th smallest value (for 2 values, the smaller one)."""
    if not values:
        raise ConfigError("lower_median needs at least one value")
    return sorted(values)[(len(values) - 1) // 2]


CAP_QUANTILE = 0.7  # claimed local steps are capped relative to this quantile of the round (cap_scale)


def cap_scale(values: Sequence[float]) -> float:
    """The ``⌊CAP_QUANTILE · n⌋``-th smallest value, and at least the lower median: up to ``n`` minus that rank
    clients (3 of 10) claiming anything cannot raise it above an honest client's value."""
    if not values:
        raise ConfigError("cap_scale needs at least one value")
    n = len(values)
    return sorted(values)[max((n - 1) // 2, int(CAP_QUANTILE * n) - 1)]


def update_norm(state: State, sent: State) -> float:
    """``‖θ − θ_sent‖₂`` over the floating entries (float64)."""
    return float(_flat_delta(state, sent).norm())


def _flat_delta(state: State, sent: State) -> Tensor:
    keys = [k for k, v in state.items() if torch.is_floating_point(v)]
    if not keys:
        return torch.zeros(1, dtype=torch.float64)
    return torch.cat([(state[k].detach().double() - sent[k].detach().double()).reshape(-1) for k in keys])


def _moved(state: State, sent: State, delta: Tensor) -> dict[str, Tensor]:
    """``sent + delta`` (a flat float64 update over the floating entries, in ``state``'s key order); a running
    variance stays ``>= 0`` (a projected update can take it below, and BatchNorm's outputs with it to NaN)."""
    out, pos = {}, 0
    for k, v in state.items():
        if torch.is_floating_point(v):
            n = v.numel()
            out[k] = valid_variance(k, (sent[k].detach().double() + delta[pos : pos + n].reshape(v.shape)).to(v.dtype))
            pos += n
        else:
            out[k] = v
    return out


@dataclass
class Screening:
    """What :func:`screen_updates` decided: per client a rejection reason (or None), the states to aggregate
    (clipped / projected ones replaced), the weights to aggregate with (capped), counts and the bounds used."""

    reasons: list[str | None]
    states: list[dict[str, Tensor]]
    weights: list[float]
    clipped: int = 0
    capped: int = 0
    projected: int = 0
    cut: int = 0
    shared: int = 0  # updates in a group of near-identical ones (they share one client's weight)
    groups: list[list[int]] = field(default_factory=list)  # those groups (client indices), for the log
    notes: dict[int, str] = field(default_factory=dict)  # per client: why the influence test kept it at its floor
    trims: dict[int, str] = field(default_factory=dict)  # ... or cut it to the median's influence
    bounds: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)  # largest value / lower median, per check


def _check_factor(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 0:
        raise ConfigError(f"{name}={value!r} is out of range; allowed: a number >= 0 (0 = off)")
    return float(value)


def _check_cosine(name: str, value: object, off: int) -> None:
    """A cosine threshold in ``[off, 1]``, ``off`` turning its check off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not off <= float(value) <= 1.0:
        raise ConfigError(f"{name}={value!r} is out of range; allowed: [{off}, 1] ({off} = off)")


@dataclass(frozen=True)
class ScreeningConfig:
    """The screening a strategy applies (the run options of :data:`SCREENING_OPTIONS`, validated)."""

    update_norm_bound: float = UPDATE_NORM_BOUND
    update_norm_action: str = "clip"
    examples_cap: float = EXAMPLES_CAP
    examples_bound: float = EXAMPLES_BOUND
    min_update_cosine: float = MIN_UPDATE_COSINE
    direction_guard: str = "median"
    influence_z: float = INFLUENCE_Z
    duplicate_cosine: float = DUPLICATE_COSINE

    def __post_init__(self) -> None:
        for name in ("update_norm_bound", "examples_cap", "examples_bound", "influence_z"):
            object.__setattr__(self, name, _check_factor(name, getattr(self, name)))
        _check_cosine("min_update_cosine", self.min_update_cosine, -1)
        _check_cosine("duplicate_cosine", self.duplicate_cosine, 0)
        if self.update_norm_action not in NORM_ACTIONS:
            raise ConfigError(
                f"update-norm-action={self.update_norm_action!r} is not allowed; allowed: {', '.join(NORM_ACTIONS)}"
            )
        if self.direction_guard not in DIRECTION_GUARDS:
            raise ConfigError(
                f"direction-guard={self.direction_guard!r} is not allowed; allowed: {', '.join(DIRECTION_GUARDS)}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> ScreeningConfig:
        """From a run config's option names (``update-norm-bound``, ...); absent ones keep the defaults."""
        names = {o.name: o.name.replace("-", "_") for o in SCREENING_OPTIONS}
        return cls(**{attr: cfg[name] for name, attr in names.items() if name in cfg})  # type: ignore[arg-type]

    def screen(
        self, states: Sequence[State], sent: Sequence[State], weights: Sequence[float],
        work: Sequence[float] | None = None, *, direction: bool = True, reference: State | None = None,
        losses: LossFn | None = None,
    ) -> Screening:  # fmt: skip
        """:func:`screen_updates` with this configuration (``direction=False``: no direction guard, e.g. for
        clients that did not start from the model sent)."""
        return screen_updates(
            states, sent, weights, work, norm_factor=self.update_norm_bound, norm_action=self.update_norm_action,
            examples_cap=self.examples_cap, examples_factor=self.examples_bound, min_cosine=self.min_update_cosine,
            direction=self.direction_guard if direction else "off", reference=reference, losses=losses,
            influence_z=self.influence_z, duplicate_cosine=self.duplicate_cosine,
        )  # fmt: skip


def screen_updates(
    states: Sequence[State],
    sent: Sequence[State],
    weights: Sequence[float],
    work: Sequence[float] | None = None,
    *,
    norm_factor: float = 0.0,
    norm_action: str = "clip",
    examples_cap: float = 0.0,
    examples_factor: float = 0.0,
    min_cosine: float = -1.0,
    direction: str = "off",
    reference: State | None = None,
    losses: LossFn | None = None,
    influence_z: float = 0.0,
    duplicate_cosine: float = 0.0,
) -> Screening:
    """Round-level checks relative to the round's own clients (see the module docstring for the maths).

    ``work``: each client's local steps (``None``: the same for all, so the norm bound is ``k × med‖Δ‖``).
    ``losses`` (with a trusted ``reference`` and ``influence_z`` > 0): a model state's per-example losses on the
    server's examples, for the influence test (:mod:`fedfuse.influence`).
    A factor of 0 turns that check off; the defaults here are all off (:class:`ScreeningConfig` has the
    shipped ones)."""
    if norm_action not in NORM_ACTIONS:
        raise ConfigError(f"update-norm-action={norm_action!r} is not allowed; allowed: {', '.join(NORM_ACTIONS)}")
    n = len(states)
    reasons: list[str | None] = [None] * n
    result = Screening(reasons, [dict(s) for s in states], [float(w) for w in weights])
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
    # the float64 flat updates, only when a check reads them (screening off: no copy of any client's model)
    need = (min_cosine > -1.0 and n >= 3) or norm_factor > 0 or direction == "median" or duplicate_cosine > 0
    deltas = [_flat_delta(s, r) for s, r in zip(states, sent, strict=True)] if need else []
    if min_cosine > -1.0 and n >= 3:
        median_delta = torch.stack(deltas).median(dim=0).values
        cosines = [float(torch.nn.functional.cosine_similarity(d, median_delta, dim=0)) for d in deltas]
        result.ratios["update_cosine_min"] = min(cosines)
        for i, cos in enumerate(cosines):
            if reasons[i] is None and cos < min_cosine:
                reasons[i] = f"update direction: cosine {cos:.3f} with the round's median update < {min_cosine:g}"
    live = [i for i in range(n) if reasons[i] is None]
    steps = [float(w) for w in work] if work is not None else [1.0] * n
    if examples_cap > 0 and live:
        for values, key in ((result.weights, "examples"), (steps, "steps")):
            median = lower_median([values[i] for i in live])
            result.ratios[f"{key}_ratio"] = max(values[i] for i in live) / median
            scale = cap_scale([values[i] for i in live]) if key == "steps" else median
            for i in live:
                if values[i] > examples_cap * scale:
                    values[i] = examples_cap * scale
                    result.capped += key == "examples"
    if duplicate_cosine > 0 and len(live) >= 3 and len({deltas[i].numel() for i in live}) == 1:
        _share_duplicates(result, live, deltas, duplicate_cosine)  # as sent: before the bounds treat them apart
    trusted = _trusted_vector(states, sent, live, deltas, reference) if direction == "median" else None
    oversized: set[int] = set()  # clipped by the norm bound: no deadband against g₀ (below)
    if norm_factor > 0 and live:
        norms = [float(d.norm()) for d in deltas]
        per_step = lower_median([norms[i] / steps[i] for i in live])
        result.bounds["norm_per_step_bound"] = norm_factor * per_step
        if per_step > 0:  # most clients did not move: nothing to scale a bound by
            result.ratios["update_norm_ratio"] = max(norms[i] / steps[i] for i in live) / per_step
        for i in live:
            bound = _allowance(norm_factor, deltas[i], trusted) * per_step * steps[i]
            if not norms[i] > bound or per_step == 0:
                continue
            if norm_action == "reject":
                reasons[i] = (
                    f"update norm {norms[i]:.4g} exceeds {norm_factor:g} × the round's median norm per local step "
                    f"× its {steps[i]:g} steps (= {bound:.4g})"
                )
            else:
                deltas[i] = deltas[i] * (bound / norms[i])
                result.states[i] = _moved(states[i], sent[i], deltas[i])
                result.clipped += 1
                oversized.add(i)
    live = [i for i in range(n) if reasons[i] is None]
    same_shape = bool(deltas) and len({deltas[i].numel() for i in live}) == 1  # mixed widths share no coordinates
    if direction == "median" and len(live) >= 3 and same_shape:
        slope, deadband = TRUST_SLOPE, 0.0
        if trusted is not None:  # the server's own update (fedfuse.trust): colluders cannot move it
            ref, slope, deadband = trusted, TRUSTED_SLOPE, TRUSTED_BAND
        else:
            m = lower_median([float(deltas[i].norm()) for i in live])  # each update held to the median norm first,
            held = [deltas[i] * min(1.0, m / max(float(deltas[i].norm()), 1e-30)) for i in live]  # size buys nothing
            ref = torch.stack(held).median(dim=0).values
        # against a trusted reference, per parameter tensor (a label-flipped client can agree overall and still
        # pull its output layer against the server's); against the round's median, as one vector
        segments = _segments(states[live[0]]) if slope == TRUSTED_SLOPE else [(0, ref.numel())]
        ref_sq = float(ref.dot(ref))
        for i in live:
            cos = float(deltas[i].dot(ref)) / max(math.sqrt(ref_sq) * float(deltas[i].norm()), 1e-30)
            band = 0.0 if i in oversized else deadband
            if cos < -band:
                result.weights[i] *= max(1.0 + (cos + band) / slope, 1e-6)  # never all 0
            kept, moved = deltas[i].clone(), False
            for a, b in segments:
                r = ref[a:b]
                r_sq = float(r.dot(r))
                p = float(kept[a:b].dot(r)) / r_sq if r_sq > 0 else 0.0
                floor = _band_floor(kept[a:b], r, p, r_sq, band)
                if p < floor:
                    kept[a:b] -= (p - floor) * r
                    moved = True
            if moved:
                result.states[i] = _moved(states[i], sent[i], kept)
                result.projected += 1
                deltas[i] = kept
        if trusted is not None and losses is not None and influence_z > 0:
            _influence(result, live, deltas, states[live[0]], sent[live[0]], losses, influence_z)
    return result


def duplicate_groups(deltas: Sequence[Tensor], threshold: float) -> list[list[int]]:
    """Groups (of two or more) of near-identical updates: the connected components of the graph with an edge
    where ``cos(Δ_i, Δ_j) ≥ threshold``; updates of norm 0 (nothing trained, or a free rider) are one group."""
    norms = torch.stack([d.norm() for d in deltas])
    unit = torch.stack([d / n if n > 0 else d for d, n in zip(deltas, norms, strict=True)])
    still = norms == 0
    reach = ((unit @ unit.T) >= threshold) | (still[:, None] & still[None, :])
    reach |= torch.eye(len(deltas), dtype=torch.bool)  # every update reaches itself
    while True:  # transitive closure by squaring (no scipy: plain FedAvg's clients and server never import it)
        wider = (reach.double() @ reach.double()) > 0
        if torch.equal(wider, reach):
            break
        reach = wider
    groups = {tuple(torch.nonzero(row).flatten().tolist()) for row in reach}
    return sorted(list(g) for g in groups if len(g) > 1)


def _share_duplicates(result: Screening, live: list[int], deltas: list[Tensor], threshold: float) -> None:
    """Near-identical updates (:func:`duplicate_groups`) count as one client: each keeps ``w_i / |G|``, so the
    group weighs the mean of its members' weights — Sybils sending one vector buy no more say by their number. A
    group of half the live clients or more is the round's consensus (fewer than half are assumed to attack), and
    keeps its weights: honest clients whose updates all point one way (IID data, few steps) are not thinned out
    against the rest."""
    for group in duplicate_groups([deltas[i] for i in live], threshold):
        if 2 * len(group) >= len(live):
            continue
        members = [live[j] for j in group]
        for i in members:
            result.weights[i] /= len(members)
        result.shared += len(members)
        result.groups.append(members)


def _influence(
    result: Screening, live: list[int], deltas: list[Tensor], like: State, sent: State, losses: LossFn, z: float
) -> None:
    """:func:`fedfuse.influence.influence_test` on the live updates (after the guard), applied to ``result``."""
    pos = {i: j for j, i in enumerate(live)}
    groups = [[pos[i] for i in g if i in pos] for g in result.groups]
    test = influence_test([deltas[i] for i in live], [result.weights[i] for i in live],
                          lambda delta: losses(_moved(like, sent, delta)), z, groups)  # fmt: skip
    for j, i in enumerate(live):
        result.weights[i] = test.weights[j]
    result.cut += test.cut
    result.notes |= {live[j]: note for j, note in test.notes.items()}
    result.trims |= {live[j]: note for j, note in test.trims.items()}


def _band_floor(d: Tensor, r: Tensor, p: float, r_sq: float, band: float) -> float:
    """The smallest coefficient along ``r`` the projection leaves ``d = p·r + d⊥``: 0 without a band; with one,
    ``−b/√(1 − b²) · ‖d⊥‖/‖r‖`` — the coefficient at which ``cos(d, r) = −b``."""
    if band <= 0.0 or p >= 0.0 or r_sq <= 0.0:
        return 0.0
    perp = float((d - p * r).norm())
    return -band / math.sqrt(1.0 - band * band) * perp / math.sqrt(r_sq)


def _trusted_vector(
    states: Sequence[State], sent: Sequence[State], live: list[int], deltas: list[Tensor], reference: State | None
) -> Tensor | None:
    """The trusted reference as a flat update (``reference − sent``), or None: no reference, fewer than three
    live clients, or clients sent another model (a sub-width one under width heterogeneity: those are measured
    against the round's median instead)."""
    if reference is None or len(live) < 3 or not deltas or len({deltas[i].numel() for i in live}) != 1:
        return None
    base = sent[live[0]]
    if not all(k in reference and reference[k].shape == base[k].shape for k in base):
        return None
    return _flat_delta({k: reference[k] for k in states[live[0]]}, base)


def _allowance(norm_factor: float, delta: Tensor, trusted: Tensor | None) -> float:
    """The norm bound's factor for one update: ``k`` without a trusted reference; with one,
    ``1 + (k − 1) · clamp(cos(Δ, g₀) / 0.25, 0, 1)`` — an update that does not agree with the server's own
    update may move no further per step than the round's median client, one at cosine ≥ 0.25 k × as far."""
    if trusted is None or norm_factor <= 1.0:
        return norm_factor
    cos = float(delta.dot(trusted)) / max(float(delta.norm()) * float(trusted.norm()), 1e-30)
    return 1.0 + (norm_factor - 1.0) * min(max(cos / TRUSTED_SLOPE, 0.0), 1.0)


def _segments(state: State) -> list[tuple[int, int]]:
    """``[start, end)`` of each floating tensor of ``state`` in the flat update (:func:`_flat_delta`'s order)."""
    out, pos = [], 0
    for v in state.values():
        if torch.is_floating_point(v):
            out.append((pos, pos + v.numel()))
            pos += v.numel()
    return out


def nonfinite_reason(reply: object) -> bool:
    """Whether a refused reply's reason is non-finite values (as :func:`fedfuse.validation.check_update` says)."""
    return isinstance(reply, str) and "non-finite value" in reply


def diverged_updates(reasons: Sequence[str], answered: int) -> list[int]:
    """Which of a round's rejection ``reasons`` to blame on the global model rather than on the clients: the
    non-finite updates, when at least half of the round's ``answered`` replies (and at least 2) are
    non-finite — training from the model sent is then what fails (a poisoned global, or a too large learning
    rate). Empty otherwise."""
    idx = [i for i, r in enumerate(reasons) if nonfinite_reason(r)]
    return idx if len(idx) >= 2 and 2 * len(idx) >= answered else []


def state_norm(state: State) -> float:
    """``‖θ‖₂`` over the floating entries."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values() if torch.is_floating_point(v)))


@dataclass
class RoundScreen:
    """A round's answers after :func:`screen_round`: the indices kept, their (screened) states and (capped)
    weights, and the round statistics (``rejected``, ``diverged``, ``clipped``, ``capped``, ``projected``,
    ratios)."""

    keep: list[int]
    states: list[dict[str, Tensor]]
    weights: list[float]
    stats: dict[str, float]


def screen_round(
    server_round: int, labels: Sequence[str], replies: Sequence[object], sent: Sequence[State],
    config: ScreeningConfig, *, direction: bool = True, reference: State | None = None, losses: LossFn | None = None,
) -> RoundScreen:  # fmt: skip
    """Every answer of a round (a :class:`fedfuse.replies.Reply` or the reason it was refused, one per
    ``labels``), screened with ``config``; each rejection logged once, naming the client. Non-finite
    updates from most of the round are counted as ``diverged`` (:func:`diverged_updates`), not ``rejected``.
    The work each client did is its reported local steps where every reply has them, else its num-examples.
    ``nonfinite`` counts the replies refused for non-finite values (rejected or diverged), where there are any."""
    refused = [i for i, r in enumerate(replies) if isinstance(r, str)]
    diverged = {refused[j] for j in diverged_updates([replies[i] for i in refused], len(replies))}  # type: ignore[misc]
    if diverged:
        log.warning(
            "round %d: %d of %d updates are non-finite after training from the global model sent (norm %.4g); "
            "the global model is the likely cause, not the clients (%s)", server_round, len(diverged),
            len(replies), state_norm(sent[min(diverged)]), ", ".join(labels[i] for i in sorted(diverged)),
        )  # fmt: skip
    valid = [i for i, r in enumerate(replies) if not isinstance(r, str)]
    ok = [replies[i] for i in valid]
    work = [r.steps for r in ok] if all(r.steps for r in ok) else [r.weight for r in ok]  # type: ignore[attr-defined]
    with single_threaded():  # many small reductions: intra-op threads only add contention (10x under load)
        screen = config.screen([r.state for r in ok], [sent[i] for i in valid], [r.weight for r in ok], work,  # type: ignore[attr-defined]
                               direction=direction, reference=reference, losses=losses)  # fmt: skip
    reasons = {**{i: r for i, r in enumerate(replies) if isinstance(r, str) and i not in diverged},
               **{valid[j]: r for j, r in enumerate(screen.reasons) if r is not None}}  # fmt: skip
    for i in sorted(reasons):
        log.warning("round %d: rejected update from %s: %s", server_round, labels[i], reasons[i])
    for group in screen.groups:
        log.warning(
            "round %d: near-identical updates (cosine >= %g with each other) from %s: they share one client's weight",
            server_round, config.duplicate_cosine, ", ".join(labels[valid[j]] for j in group),
        )  # fmt: skip
    _log_down_weighted(server_round, [labels[i] for i in valid], screen.notes | screen.trims)
    kept = [j for j, r in enumerate(screen.reasons) if r is None]
    stats = {"rejected": float(len(reasons)), **screen.ratios, "clipped": float(screen.clipped),
             "capped": float(screen.capped), "projected": float(screen.projected),
             "cut": float(screen.cut), "shared": float(screen.shared)}  # fmt: skip
    if diverged:
        stats["diverged"] = float(len(diverged))
    if nonfinite := sum(map(nonfinite_reason, replies)):
        stats["nonfinite"] = float(nonfinite)
    return RoundScreen([valid[j] for j in kept], [screen.states[j] for j in kept],
                       [screen.weights[j] for j in kept], stats)  # fmt: skip


def screen_apart_claims(
    server_round: int, labels: Sequence[str], weights: Sequence[float], aggregate: Callable[[list[float]], State],
    losses: LossFn, config: ScreeningConfig,
) -> tuple[list[float], int]:  # fmt: skip
    """Clients that trained apart (round 1 from their own inits) share no starting point, so the guard and the
    influence test have no update to measure; their claims still answer to the server's examples:
    :func:`fedfuse.influence.claim_test` on ``aggregate(weights)`` (the strategy's own fusion), with the
    influence test's ``z``. Returns the weights and how many were cut; each cut is logged, naming the client."""
    with single_threaded():
        test = claim_test(lambda ws: losses(aggregate(list(ws))), weights, config.influence_z)
    _log_down_weighted(server_round, labels, test.notes | test.trims)
    return test.weights, test.cut


def _log_down_weighted(server_round: int, labels: Sequence[str], notes: Mapping[int, str]) -> None:
    """One warning per down-weighted update (by its index into ``labels``), naming the client and why."""
    for j, note in sorted(notes.items()):
        log.warning("round %d: down-weighted update from %s: %s", server_round, labels[j], note)
