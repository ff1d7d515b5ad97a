"""The influence test: an outsized update is trusted only as far as the server's own examples bear it out.

After the claim caps, the norm bound and the direction guard (:mod:`fedfuse.screening`), update ``i`` acts on the
weighted mean ``Σ_j w_j Δ_j / Σ_j w_j`` with its *influence* ``I_i = w_i · ‖Δ_i‖``. The caps let a client that claims
~10 × the median's examples and steps weigh ~10 × more and move ~10 × further: an honest big client under quantity
skew does, and so can a liar — ``--attack evade`` (claims at the caps, coherent junk inside the guard's band) took
every run to chance before this test. A claim cannot be checked; its effect can, on the labelled examples the server
holds (:mod:`fedfuse.trust`), in the spirit of Zeno (Xie et al., ICML 2019), which scores updates by the loss they
remove on a server batch. Here the test only ever acts on outsized updates, and only on significant evidence:

1. *outsized*: ``I_i > 2 · med(I)`` (the lower median: fewer than half of the clients cannot move it);
2. every outsized update is cut to the median's influence (``w_i ← w_i · med(I) / I_i``); the cut stands only if the
   per-example loss of the aggregate ``θ_sent + Σ w_j Δ_j / Σ w_j`` on the server's examples falls
   *significantly*: the paired mean difference below ``−z`` standard errors (``z`` = ``influence-z``, 2);
3. then, from the least to the most influential, each cut update gets its weight back unless that raises the loss
   significantly (``+z`` standard errors); if it does, the update is harmful at the size it claims, and it keeps a
   tenth of the median's influence (``FLOOR``) unless that raises the loss significantly (else the median's).

Nothing is rejected: an update harmful at its claimed size is down-weighted, as the guard does (a liar's claim and
norm buy it a tenth of a median client's say; an honest client whose full-size update the examples speak against
keeps that much of its data in the round). An honest outsized client keeps its weight wherever the evidence does not
speak against it; an update within 2 × the median's influence is never touched (an attacker that claims and moves
like a median client is left to the guard, see docs/robustness.md). With ``n`` the number of examples the test's
resolution is ~``z · σ/√n`` of loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["OUTSIZED", "FLOOR", "InfluenceTest", "influence_test"]

OUTSIZED = 2.0  # an update whose influence exceeds this × the round's lower median is tested
FLOOR = 0.1  # an update harmful at its claimed size keeps this × the median's influence


@dataclass
class InfluenceTest:
    """What :func:`influence_test` decided: each update's weight, how many were tested (outsized), cut (to the
    median's influence or below) and, of those, kept at only ``FLOOR`` × the median's (harmful at full size)."""

    weights: list[float]
    tested: int = 0
    cut: int = 0
    notes: dict[int, str] = field(default_factory=dict)  # why an update was kept at FLOOR (for the log)

    @property
    def floored(self) -> int:
        """How many updates were kept at ``FLOOR`` × the median's influence."""
        return len(self.notes)


def _paired(new: Tensor, old: Tensor) -> tuple[float, float]:
    """Mean of the per-example differences ``new − old`` and its standard error (non-finite losses count as 1e6)."""
    d = torch.nan_to_num(new.double(), nan=1e6, posinf=1e6) - torch.nan_to_num(old.double(), nan=1e6, posinf=1e6)
    se = float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return float(d.mean()), se


def influence_test(
    deltas: Sequence[Tensor], weights: Sequence[float], losses: Callable[[Tensor], Tensor], z: float
) -> InfluenceTest:
    """The test above on one round: ``deltas`` the (screened) flat updates, ``weights`` their aggregation weights,
    ``losses(Δ)`` the per-example losses of the model moved by the aggregate update ``Δ`` on the server's
    examples. ``z ≤ 0`` or fewer than three updates: nothing is tested."""
    out = InfluenceTest([float(w) for w in weights])
    n = len(deltas)
    if z <= 0 or n < 3:
        return out
    infl = [float(w) * float(d.norm()) for w, d in zip(weights, deltas, strict=True)]
    med = sorted(infl)[(n - 1) // 2]
    outsized = sorted((i for i in range(n) if infl[i] > OUTSIZED * med), key=lambda i: infl[i])
    out.tested = len(outsized)
    if not outsized or med <= 0:
        return out

    def loss_of(ws: Sequence[float]) -> Tensor:
        total = sum(ws)
        return losses(sum(d * (w / total) for d, w in zip(deltas, ws, strict=True) if w > 0))

    full = list(out.weights)
    cut = [w * med / infl[i] if i in outsized else w for i, w in enumerate(full)]
    now, best = loss_of(full), loss_of(cut)
    diff, se = _paired(best, now)
    if not diff < -z * se:
        return out  # cutting them does not help on the server's examples: every claim stands
    current = cut
    for i in outsized:
        trial = list(current)
        trial[i] = full[i]
        tried = loss_of(trial)
        diff, se = _paired(tried, best)
        if not diff > z * se:
            current, best = trial, tried
            continue
        trial = list(current)
        trial[i] = cut[i] * FLOOR  # harmful at its claimed size: a tenth of the median's influence
        without = loss_of(trial)
        d_low, se_low = _paired(without, best)
        if not d_low > z * se_low:
            current, best = trial, without
            sig = f"{diff / se:.1f} standard errors" if se > 0 else "on every example"
            out.notes[i] = (
                f"its influence ({infl[i] / med:.3g} × the round's median) raises the loss on the server's "
                f"{len(tried)} examples by {diff:.3g} ({sig}) at its claimed size: kept at {FLOOR:g} × the median's"
            )
    out.weights = current
    out.cut = sum(1 for i in outsized if current[i] < full[i])
    return out
