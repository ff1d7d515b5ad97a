"""The influence test: an outsized or harmful update is trusted only as far as the server's own examples bear it out.

After the claim caps, the norm bound and the direction guard (:mod:`fedfuse.screening`), update ``i`` acts on the
weighted mean ``Σ_j w_j Δ_j / Σ_j w_j`` with its *influence* ``I_i = w_i · ‖Δ_i‖``. The caps let a client that claims
~10 × the median's examples and steps weigh ~10 × more and move ~10 × further: an honest big client under quantity
skew does, and so can a liar — ``--attack evade`` (claims at the caps, coherent junk inside the guard's band) took
every run to chance before this test. A claim cannot be checked; its effect can, on the labelled examples the server
holds (:mod:`fedfuse.trust`), in the spirit of Zeno (Xie et al., ICML 2019), which scores updates by the loss they
remove on a server batch. Here the test acts only on significant evidence, in two steps:

1. *outsized*: ``I_i > 2 · med(I)`` (the lower median: fewer than half of the clients cannot move it); then,
   among the rest, by claimed weight alone, ``w_i > 2 · med(w)`` (cut to ``med(w)``): an update of ~0 claiming the
   caps (a free rider, ``--attack freeride``) has no influence, but its weight dilutes everyone else's;
2. every outsized update is cut to the median's influence (``w_i ← w_i · med(I) / I_i``); the cut stands only if the
   per-example loss of the aggregate ``θ_sent + Σ w_j Δ_j / Σ w_j`` on the server's examples falls
   *significantly*: the paired mean difference below ``−z`` standard errors (``z`` = ``influence-z``, 2);
3. then, from the least to the most influential, each cut update gets its weight back unless that raises the loss
   significantly (``+z`` standard errors); if it does, the update is harmful at the size it claims, and it keeps a
   tenth of the median's influence (``FLOOR``) unless that raises the loss significantly (else the median's).
   Near-identical updates (one group of ``duplicate-cosine``, counted as one client) are put back together, here
   and in step 4: one at a time, each of three junk copies can look harmless where the three are not.
4. *harmful steps*, whatever their size: with ``W = Σ_j w_j`` held fixed, update ``i``'s own step ``s_i = w_i Δ_i / W``
   is what it adds to the aggregate ``S = Σ_j s_j`` (the others not rescaled). Those whose step raises the loss
   (``L(S) > L(S − s_i)`` on average) are taken out jointly; that stands only if it lowers the loss significantly;
   then, from the least to the most harmful, each step is put back unless it raises the loss by more than ``z``
   standard errors, and one that does keeps ``FLOOR`` × the median's influence. An honest update descends its
   client's loss, which shares most of its classes' evidence with the server's examples: in 3-round digits runs
   (Dirichlet 0.1 to quantity skew; 270 honest updates) no honest step raised the loss by 1 standard error, where
   junk at a median client's size and claim (``--attack lowkey``) raised it by 4-13; over 15-round runs a few honest
   updates late in training are floored (up to 42 more of 3,000 per setting, docs/robustness.md). Holding ``W``
   fixed matters: leaving a client out *and* rescaling the rest (the leave-one-out of the aggregate) flagged honest
   non-IID clients in a third of clean rounds, because a client with one or two classes pulls the average towards
   them.

Nothing is rejected: an update harmful at its claimed size is down-weighted, as the guard does (a liar's claim and
norm buy it a tenth of a median client's say; an honest client whose update the examples speak against keeps that
much of its data in the round). An honest client keeps its weight wherever the evidence does not speak against it.
What is left to the guard (docs/robustness.md): junk whose harm the examples cannot resolve — a few clients each
claiming twice the median slow the honest mean by diluting it, and colluders that add noise enough to escape the
near-duplicate groups are put back one at a time. With ``n`` examples the test's resolution is ~``z · σ/√n`` of
loss; it costs ``n_updates + 2`` forward passes over them per round (plus two per harmful-looking or outsized
update).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["OUTSIZED", "FLOOR", "InfluenceTest", "influence_test", "claim_test"]

OUTSIZED = 2.0  # an update whose influence exceeds this × the round's lower median is tested
FLOOR = 0.1  # an update harmful at its claimed size keeps this × the median's influence


@dataclass
class InfluenceTest:
    """What :func:`influence_test` decided: each update's weight, how many were outsized (``tested``), how many
    lost weight (``cut``: to the median's influence or below, by either step) and, of those, the ones kept at only
    ``FLOOR`` × the median's (harmful at full size, or a harmful step) and those harmful at full size that kept the
    median's, with why (``notes``, ``trims``: the server logs both)."""

    weights: list[float]
    tested: int = 0
    cut: int = 0
    notes: dict[int, str] = field(default_factory=dict)  # why an update was kept at FLOOR (for the log)
    trims: dict[int, str] = field(default_factory=dict)  # why one harmful at full size kept the median's

    @property
    def floored(self) -> int:
        """How many updates were kept at ``FLOOR`` × the median's influence (or claimed weight)."""
        return len(self.notes)


def _paired(new: Tensor, old: Tensor) -> tuple[float, float]:
    """Mean of the per-example differences ``new − old`` and its standard error (non-finite losses count as 1e6)."""
    d = torch.nan_to_num(new.double(), nan=1e6, posinf=1e6) - torch.nan_to_num(old.double(), nan=1e6, posinf=1e6)
    se = float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return float(d.mean()), se


def _significance(diff: float, se: float) -> str:
    """How a loss difference reads in the log: in standard errors, or on every example where they are all equal."""
    return f"{diff / se:.1f} standard errors" if se > 0 else "on every example"


def influence_test(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    losses: Callable[[Tensor], Tensor],
    z: float,
    groups: Sequence[Sequence[int]] = (),
) -> InfluenceTest:
    """The test above on one round: ``deltas`` the (screened) flat updates, ``weights`` their aggregation weights,
    ``losses(Δ)`` the per-example losses of the model moved by the aggregate update ``Δ`` on the server's
    examples; ``groups`` the near-identical updates (indices into ``deltas``) that count as one client, so steps 3
    and 4 put a group's members back together. ``z ≤ 0`` or fewer than three updates: nothing is tested."""
    out = InfluenceTest([float(w) for w in weights])
    n = len(deltas)
    if z <= 0 or n < 3:
        return out
    infl = [float(w) * float(d.norm()) for w, d in zip(weights, deltas, strict=True)]
    med, w_med = sorted(infl)[(n - 1) // 2], sorted(float(w) for w in weights)[(n - 1) // 2]
    if med <= 0 or w_med <= 0:
        return out

    def loss_of(ws: Sequence[float]) -> Tensor:  # the aggregate θ_sent + Σ w_j Δ_j / Σ w_j under weights ws
        total = sum(ws)
        return losses(sum(d * (w / total) for d, w in zip(deltas, ws, strict=True) if w > 0))

    big = sorted((i for i in range(n) if infl[i] > OUTSIZED * med), key=lambda i: infl[i])
    if big:
        cut = [w * med / infl[i] if i in big else w for i, w in enumerate(out.weights)]
        _outsized_step(out, loss_of, z, [v / med for v in infl], cut, _units(big, groups), "influence")
    # then by claimed weight alone: an update of ~0 claiming the caps moves nothing but dilutes the others
    heavy = sorted((i for i in range(n) if i not in big and weights[i] > OUTSIZED * w_med), key=lambda i: weights[i])
    if heavy:
        cut = [min(w, w_med) if i in heavy else w for i, w in enumerate(out.weights)]
        sizes = [float(w) / w_med for w in weights]
        _outsized_step(out, loss_of, z, sizes, cut, _units(heavy, groups), "claimed weight")
    out.tested = len(big) + len(heavy)
    _harm_step(out, deltas, losses, z, med, groups)
    out.cut = sum(1 for w, w0 in zip(out.weights, weights, strict=True) if w < w0)
    return out


def claim_test(loss_of: Callable[[Sequence[float]], Tensor], weights: Sequence[float], z: float) -> InfluenceTest:
    """Steps 1-3 by claimed weight alone, on any aggregate: ``loss_of(ws)`` the per-example losses, on the server's
    examples, of the round's aggregate under weights ``ws`` — e.g. the fusion of models trained apart, which share
    no starting point and so have no update to measure (a liar claiming the caps took every such run to chance).
    A weight above 2 × the lower median is cut to the median's where that lowers the loss by more than ``z``
    standard errors, and gets it back unless that raises the loss significantly (then a tenth of the median's, or
    the median's where a tenth raises it too). ``z ≤ 0`` or fewer than three weights: nothing is tested."""
    out = InfluenceTest([float(w) for w in weights])
    n = len(out.weights)
    if z <= 0 or n < 3:
        return out
    w_med = sorted(out.weights)[(n - 1) // 2]
    heavy = sorted((i for i in range(n) if out.weights[i] > OUTSIZED * w_med), key=lambda i: out.weights[i])
    if heavy and w_med > 0:
        cut = [min(w, w_med) if i in heavy else w for i, w in enumerate(out.weights)]
        _outsized_step(out, loss_of, z, [w / w_med for w in out.weights], cut, [[i] for i in heavy], "claimed weight")
        out.tested = len(heavy)
        out.cut = sum(1 for w, w0 in zip(out.weights, weights, strict=True) if w < w0)
    return out


def _units(members: Sequence[int], groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """``members`` (in their order) as the units steps 3 and 4 put back: the members of one near-duplicate group
    together, at the place of the first of them, every other update alone. Colluders sending one vector count as one
    client (:mod:`fedfuse.screening`, ``duplicate-cosine``); put back one at a time, each of three junk updates looked
    harmless on its own and two of them went back at full size (the BatchNorm CNN, 3 of 10, ``--attack evade``)."""
    group_of = {i: set(g) for g in groups for i in g}
    units: list[list[int]] = []
    placed: set[int] = set()
    for i in members:
        if i not in placed:
            unit = [j for j in members if j in group_of.get(i, {i})]
            placed.update(unit)
            units.append(unit)
    return units


def _with(ws: Sequence[float], unit: Sequence[int], values: Sequence[float], factor: float = 1.0) -> list[float]:
    """``ws`` with the ``unit``'s entries set to ``factor`` × theirs in ``values``."""
    out = list(ws)
    for i in unit:
        out[i] = values[i] * factor
    return out


def _joint(unit: Sequence[int]) -> str:
    """How a log line says an update was tested with its near-identical ones."""
    return f" (put back with the {len(unit) - 1} near-identical update(s) sent with it)" if len(unit) > 1 else ""


def _outsized_step(
    out: InfluenceTest, loss_of: Callable[[Sequence[float]], Tensor], z: float,
    size: list[float], cut: list[float], outsized: list[list[int]], what: str,
) -> None:  # fmt: skip
    """Steps 2-3 on ``out``'s weights: ``cut`` the outsized updates' weights at the median's ``what`` (influence or
    claimed weight), ``size`` how far above the median each is; ``outsized`` the units put back together
    (:func:`_units`); ``loss_of(ws)`` the aggregate's losses."""
    full = list(out.weights)
    now, best = loss_of(full), loss_of(cut)
    diff, se = _paired(best, now)
    if not diff < -z * se:
        return  # cutting them does not help on the server's examples: every claim stands
    current = cut
    for unit in outsized:
        trial = _with(current, unit, full)
        tried = loss_of(trial)
        diff, se = _paired(tried, best)
        if not diff > z * se:
            current, best = trial, tried
            continue
        trial = _with(current, unit, cut, FLOOR)  # harmful at its claimed size: a tenth of the median's influence
        without = loss_of(trial)
        d_low, se_low = _paired(without, best)
        floored = not d_low > z * se_low  # else it carries signal: less than the median's influence raises the loss
        if floored:
            current, best = trial, without
        for i in unit:
            why = (f"its {what} ({size[i]:.3g} × the round's median) raises the loss on the server's {len(tried)} "
                   f"examples by {diff:.3g} ({_significance(diff, se)}) at its claimed size{_joint(unit)}")  # fmt: skip
            if floored:
                out.notes[i] = f"{why}: kept at {FLOOR:g} × the median's"
            else:
                out.trims[i] = f"{why}: cut to the median's"
    out.weights = current


def _harm_step(
    out: InfluenceTest, deltas: Sequence[Tensor], losses: Callable[[Tensor], Tensor], z: float, med: float,
    groups: Sequence[Sequence[int]] = (),
) -> None:  # fmt: skip
    """Step 4 on ``out``'s weights: each update's own step ``s_i = w_i·Δ_i / W`` (``W = Σ_j w_j`` held fixed, so
    the others are not rescaled) in the aggregate ``S = Σ_j s_j``. The steps that raise the loss on average are
    taken out together, which stands only if that lowers the loss by more than ``z`` standard errors; then each is
    put back (least harmful first; a near-duplicate group's members together, :func:`_units`) unless it raises the
    loss by more than ``z`` standard errors, and one that does keeps ``FLOOR`` × the median's influence ``med``."""
    ws = out.weights
    total = sum(ws)
    if total <= 0:
        return
    steps = [d * (w / total) for d, w in zip(deltas, ws, strict=True)]
    agg = sum(steps)
    base = losses(agg)
    harmful = []
    for i, step in enumerate(steps):
        if ws[i] <= 0 or i in out.notes:
            continue
        diff, se = _paired(base, losses(agg - step))
        if diff > 0:
            harmful.append((diff / se if se > 0 else math.inf, i))
    if not harmful:
        return
    without = agg - sum(steps[i] for _, i in harmful)
    best = losses(without)
    diff, se = _paired(best, base)
    if not diff < -z * se:
        return
    for unit in _units([i for _, i in sorted(harmful)], groups):
        step = sum(steps[i] for i in unit)
        tried = losses(without + step)
        diff, se = _paired(tried, best)
        if not diff > z * se:
            without, best = without + step, tried
            continue
        for i in unit:
            norm = float(deltas[i].norm())
            out.weights[i] = min(ws[i], FLOOR * med / norm) if norm > 0 else ws[i]
            out.notes[i] = (
                f"its step (weight × update, the others not rescaled) raises the loss on the server's {len(tried)} "
                f"examples by {diff:.3g} ({_significance(diff, se)}){_joint(unit)}: kept at {FLOOR:g} × the "
                "median's influence"
            )
